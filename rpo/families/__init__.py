"""Model families by name (docs/design.md, "The run's parts"): one class per family, one
registry line each. `resolve` picks the family of a run from `--model_family` (auto: the
pipeline's model_index.json) before any weight loads."""
from rpo.cli import UserError
from rpo.families.sd3 import SD3
from rpo.families.sd15 import SD15
from rpo.families.sdxl import SDXL
from rpo.models import pipeline_class_name

FAMILIES = {cls.name: cls for cls in (SD15, SDXL, SD3)}
LEGACY = {"unet": ("sd15", "sdxl")}  # --model_family unet (before SDXL was a family): --sdxl picks


def detect(source, **hub):
    """The family whose pipeline class `source`'s model_index.json names, or None (unreadable)."""
    name = pipeline_class_name(source, **hub)
    if name is None:
        return None, None
    for cls in FAMILIES.values():
        if name in cls.pipeline_classes:
            return cls, name
    return False, name


def resolve(choice, source, *, sdxl=False, **hub):
    """The family class for `--model_family choice` (and the `--sdxl` shorthand) on `source`;
    a contradiction is one UserError line."""
    found, class_name = detect(source, **hub)
    if found is False:
        raise UserError(f"--pretrained_model_name_or_path {source} is a {class_name}, which rpo cannot train "
                        f"(model families: {', '.join(FAMILIES)})")
    if choice in LEGACY:
        choice = LEGACY[choice][1 if sdxl else 0]
        if found is not None and found.name not in LEGACY["unet"]:
            raise UserError(f"--model_family unet: {source} is a {class_name} (pass --model_family {found.name}, or auto)")
    if choice == "auto":
        if sdxl and found is not None and found.name != "sdxl":
            raise UserError(f"--sdxl: {source} is a {class_name} (drop --sdxl, or pass an SDXL pipeline)")
        return found or FAMILIES["sdxl" if sdxl else "sd15"]
    if choice not in FAMILIES:
        raise UserError(f"--model_family {choice}: not one of auto, {', '.join(FAMILIES)}")
    if found is not None and found.name != choice:
        raise UserError(f"--model_family {choice}: {source} is a {class_name} "
                        f"(pass --model_family {found.name}, or auto)")
    if sdxl and choice != "sdxl":
        raise UserError(f"--sdxl and --model_family {choice} contradict each other")
    return FAMILIES[choice]


def legacy_name(sdxl, family):
    """The family an inference manifest written before families meant by its `sdxl` flag:
    SDXL when set; when not set, whichever non-SDXL family now runs (SD1.5 or SD3 wrote False),
    so only a change to or from SDXL counts as a change."""
    if sdxl:
        return SDXL.name
    return family.name if family is not SDXL else SD15.name


CHOICES = ("auto", *FAMILIES, *LEGACY)
