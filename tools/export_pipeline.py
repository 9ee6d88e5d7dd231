"""Write a checkpoint as a complete diffusers pipeline folder.

    python -m tools.export_pipeline --checkpoint ./logs/run/ckpt-25600 --output ./sd15-dro [--raw]

The folder holds the base pipeline's text encoder(s), tokenizer(s), VAE and scheduler with
the checkpoint's EMA UNet (`ckpt-N/ema`; `--raw`: the trained weights, `ckpt-N/unet`; a
checkpoint without `ema/` is refused unless its run trained without an EMA), or,
for a LoRA checkpoint (`ckpt-N/lora_ema`, `--raw`: `ckpt-N/lora`), the base UNet with the
adapters fused in. `DiffusionPipeline.from_pretrained(DIR)` loads it offline. The base
model and the VAE come from the run's options: `ckpt-N/state/trainer.pt` when the checkpoint
still holds its state, else `<logdir>/training_config.json` (the latest start), else
`--pretrained_model_name_or_path`. A `.tmp-ckpt-N` folder (a checkpoint being written, or
left half-written) is refused; a disk that fills up while writing is one line naming the
folder and the space needed, and leaves no temporary folder.
"""
import argparse
import json
import os
import shutil

from rpo.cli import UserError, parse_args, run_main
from rpo.generate import DTYPES, check_output
from rpo.io import check_space, disk_space_guard

LORA_DIRS = ("lora_ema", "lora")  # rpo/training/parametrisation.py LoRAFineTune.ema_dir / weights_dir


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a <logdir>/ckpt-N folder")
    p.add_argument("--output", required=True, help="the pipeline folder to write (must not exist, or be empty)")
    p.add_argument("--raw", action="store_true", help="the raw trained weights instead of the EMA")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="base pipeline; default: the one the run trained from")
    p.add_argument("--mixed_precision", default="no", choices=list(DTYPES), help="dtype the pipeline is saved in")
    return p


def run_options(checkpoint):
    """The options of the run that wrote `checkpoint` (a dict), or {} when none is recorded."""
    trainer = os.path.join(checkpoint, "state", "trainer.pt")
    if os.path.isfile(trainer):
        from rpo.training.state import read_trainer
        return dict(read_trainer(checkpoint).get("args", {}))
    config = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "training_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            runs = json.load(f)
        runs = runs.get("runs", []) if isinstance(runs, dict) and "runs" in runs else [{"args": runs}]
        if runs:
            return dict(runs[-1].get("args", {}))
    return {}


def weights_folder(checkpoint, raw, use_ema=None):
    """('lora' | 'unet', folder) of what to export from `checkpoint`.

    The EMA (`ema/`, `lora_ema/`) unless `raw`. A checkpoint without it is exported only
    when the run trained without an EMA (`use_ema` False in its recorded options): with
    the EMA missing otherwise, the raw weights would go out under the EMA's name."""
    lora = {name: os.path.isdir(os.path.join(checkpoint, name)) for name in LORA_DIRS}
    unet = {name: os.path.isfile(os.path.join(checkpoint, name, "config.json")) for name in ("ema", "unet")}
    if raw:
        for name, kind, present in (("lora", "lora", lora["lora"]), ("unet", "unet", unet["unet"])):
            if present:
                return kind, os.path.join(checkpoint, name)
        raise UserError(f"--checkpoint {checkpoint} holds no unet/ nor lora/ folder: pass a <logdir>/ckpt-N folder")
    if lora["lora_ema"]:
        return "lora", os.path.join(checkpoint, "lora_ema")
    if unet["ema"]:  # a UNet's EMA, or a LoRA run's EMA merged into a UNet (--save_merged_unet)
        return "unet", os.path.join(checkpoint, "ema")
    raw_name = "lora" if lora["lora"] else "unet" if unet["unet"] else None
    if raw_name is None:
        raise UserError(f"--checkpoint {checkpoint} holds no ema/, unet/ nor LoRA folder: pass a <logdir>/ckpt-N folder")
    if use_ema is False:  # trained without an EMA: the raw weights are the model
        return ("lora" if raw_name == "lora" else "unet"), os.path.join(checkpoint, raw_name)
    ema_name = "lora_ema" if raw_name == "lora" else "ema"
    why = "the run trained with --use_ema" if use_ema else "the run's options are not recorded"
    raise UserError(f"--checkpoint {checkpoint} has no {ema_name}/ ({why}; was it deleted or not copied?): "
                    f"pass --raw to export the raw trained weights ({raw_name}/) instead")


def check_checkpoint(checkpoint):
    """A complete `ckpt-N` folder: not one still being written (or left by a crash)."""
    if not os.path.isdir(checkpoint):
        raise UserError(f"--checkpoint {checkpoint}: no such folder")
    name = os.path.basename(os.path.normpath(os.path.abspath(checkpoint)))
    if name.startswith(".tmp-"):
        raise UserError(f"--checkpoint {checkpoint} is a checkpoint still being written, or half-written by a run "
                        f"that was stopped: export a complete {name[len('.tmp-'):]} folder instead")


def check_export_output(output):
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise UserError(f"--output {output} already exists and is not empty; pass a new folder")
    check_output(output)


def export(checkpoint, output, *, raw=False, base=None, dtype="no"):
    """Write the pipeline folder; returns (base model, what was exported)."""
    import torch  # noqa: F401  (loaded here: the option checks above stay fast)
    from rpo import families

    check_checkpoint(checkpoint)
    check_export_output(output)
    args = run_options(checkpoint)
    kind, folder = weights_folder(checkpoint, raw, args.get("use_ema"))
    base = base or args.get("pretrained_model_name_or_path")
    if not base:
        raise UserError(f"--checkpoint {checkpoint}: the run's options are not recorded (no state/trainer.pt, no "
                        "../training_config.json); pass --pretrained_model_name_or_path")
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()  # loading bars would bury the one line that matters
    transformers.utils.logging.disable_progress_bar()
    family = families.resolve(args.get("model_family", "auto"), base, sdxl=bool(args.get("sdxl", False)))
    # the run's own VAE when it trained and validated with another than the pipeline's
    pipe = family.load_pipeline(base, denoiser=folder if kind == "unet" else None, variant=args.get("variant"),
                                dtype=DTYPES[dtype], vae=args.get("vae"))
    if kind == "lora":
        pipe.load_lora_weights(folder)
        pipe.fuse_lora()            # W + scale * BA into the base weights
        pipe.unload_lora_weights()  # drop the adapter modules: a plain UNet is saved
    tmp = os.path.join(os.path.dirname(os.path.abspath(output)), f".{os.path.basename(os.path.normpath(output))}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    needed = pipeline_bytes(pipe)
    with disk_space_guard(output, needed, "the exported pipeline", cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        check_space(output, needed, "the exported pipeline")
        pipe.save_pretrained(tmp)
    if os.path.isdir(output):
        os.rmdir(output)  # empty, checked above
    os.replace(tmp, output)  # a reader never finds half a pipeline under `output`
    return base, folder


def pipeline_bytes(pipe):
    """What `save_pretrained` writes, about: every component's tensors (configs are small)."""
    total = 0
    for component in pipe.components.values():
        if hasattr(component, "state_dict"):
            total += sum(t.numel() * t.element_size() for t in component.state_dict().values())
    return total + (1 << 20)


def main(argv=None):
    args = parse_args(build_parser(), argv)
    base, folder = export(args.checkpoint, args.output, raw=args.raw, base=args.pretrained_model_name_or_path,
                          dtype=args.mixed_precision)
    print(f"exported {folder} on {base} -> {args.output} (DiffusionPipeline.from_pretrained({args.output!r}))")


if __name__ == "__main__":
    run_main(main)
