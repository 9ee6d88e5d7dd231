"""Write a checkpoint as a complete diffusers pipeline folder.

    python -m tools.export_pipeline --checkpoint ./logs/run/ckpt-25600 --output ./sd15-dro [--raw]

The folder holds the base pipeline's text encoder(s), tokenizer(s), VAE and scheduler with
the checkpoint's EMA UNet (`ckpt-N/ema`; `--raw`: the trained weights, `ckpt-N/unet`), or,
for a LoRA checkpoint (`ckpt-N/lora_ema`, `--raw`: `ckpt-N/lora`), the base UNet with the
adapters fused in. `DiffusionPipeline.from_pretrained(DIR)` loads it offline. The base
model and the VAE come from the run's options: `ckpt-N/state/trainer.pt` when the checkpoint
still holds its state, else `<logdir>/training_config.json` (the latest start), else
`--pretrained_model_name_or_path`.
"""
import argparse
import json
import os
import shutil

from rpo.cli import UserError, parse_args, run_main
from rpo.generate import DTYPES, check_output

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


def weights_folder(checkpoint, raw):
    """('lora' | 'unet', folder) of what to export from `checkpoint`."""
    for name in (LORA_DIRS[1:] if raw else LORA_DIRS):
        if os.path.isdir(os.path.join(checkpoint, name)):
            return "lora", os.path.join(checkpoint, name)
    names = ("unet",) if raw else ("ema", "unet")  # a --no-use_ema run has no ema/
    for name in names:
        if os.path.isfile(os.path.join(checkpoint, name, "config.json")):
            return "unet", os.path.join(checkpoint, name)
    raise UserError(f"--checkpoint {checkpoint} holds no {' or '.join(names)}/ UNet folder nor LoRA folder: "
                    "pass a <logdir>/ckpt-N folder")


def check_export_output(output):
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise UserError(f"--output {output} already exists and is not empty; pass a new folder")
    check_output(output)


def export(checkpoint, output, *, raw=False, base=None, dtype="no"):
    """Write the pipeline folder; returns (base model, what was exported)."""
    import torch  # noqa: F401  (loaded here: the option checks above stay fast)
    from rpo import families

    if not os.path.isdir(checkpoint):
        raise UserError(f"--checkpoint {checkpoint}: no such folder")
    check_export_output(output)
    kind, folder = weights_folder(checkpoint, raw)
    args = run_options(checkpoint)
    base = base or args.get("pretrained_model_name_or_path")
    if not base:
        raise UserError(f"--checkpoint {checkpoint}: the run's options are not recorded (no state/trainer.pt, no "
                        "../training_config.json); pass --pretrained_model_name_or_path")
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
    pipe.save_pretrained(tmp)
    if os.path.isdir(output):
        os.rmdir(output)  # empty, checked above
    os.replace(tmp, output)  # a reader never finds half a pipeline under `output`
    return base, folder


def main(argv=None):
    args = parse_args(build_parser(), argv)
    base, folder = export(args.checkpoint, args.output, raw=args.raw, base=args.pretrained_model_name_or_path,
                          dtype=args.mixed_precision)
    print(f"exported {folder} on {base} -> {args.output} (DiffusionPipeline.from_pretrained({args.output!r}))")


if __name__ == "__main__":
    run_main(main)
