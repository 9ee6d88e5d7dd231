"""Rewrite `ckpt-N/ema` of a run made before rpo wrote the EMA correctly.

    python -m tools.recover_ema --logdir ./logs/my_run

Before the fix, `ckpt-N/ema` held the raw trainable weights (a byte copy of `ckpt-N/unet`):
diffusers' `save_pretrained` has no `state_dict` parameter and silently wrote the model's own
weights. The real EMA survived only in `ckpt-N/state/trainer.pt` of the newest
`--checkpoints_total_limit` checkpoints. For each checkpoint this tool either rewrites `ema/`
from that saved EMA (atomically: a new folder, then a rename), says that its EMA is lost, or
says that it needs nothing: an `ema/` that differs from `unet/` (written by the fixed
trainer), a LoRA checkpoint, a --no-use_ema run. SD3 runs (a transformer in `unet/`) are
handled like UNet runs. A truncated or unreadable weights or state file is one line naming it.

The saved EMA of that time is a list of shadow tensors in the order of the UNet's parameters;
the names come from a UNet built (on the meta device, no weights) from `ckpt-N/unet`'s config,
and every shape is checked against `ckpt-N/unet`'s weights before anything is written.
"""
import argparse
import filecmp
import json
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from rpo.cli import UserError, run_main
from rpo.lock import DirectoryLock
from rpo.training import checkpoint

WEIGHTS = "diffusion_pytorch_model.safetensors"  # what rpo's write_model_folder (and the old save_pretrained) wrote
LORA_DIRS = ("lora", "lora_ema")                  # rpo/training/parametrisation.py LoRAFineTune


def saved_shadows(trainer):
    """The EMA's shadow tensors from a trainer.pt, in parameter order (old or new layout)."""
    ema = trainer.get("ema")
    if ema is None:
        return None, None
    if "names" in ema:  # written by the fixed trainer: names recorded with the values
        return ema["ema"]["shadow_params"], ema["names"]
    return ema["shadow_params"], None


def check_weights_file(folder):
    """The path of `folder`'s weights, refused in one line when missing or unreadable
    (truncated: safetensors checks that the header's tensors cover the file)."""
    path = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing")
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is unreadable ({str(e).splitlines()[0]}): truncated or damaged") from None
    return path


def model_class(folder):
    """The diffusers class of a model folder, from its config's `_class_name` (a UNet for
    SD1.5/SDXL runs, SD3Transformer2DModel for SD3 runs)."""
    import diffusers
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            name = json.load(f).get("_class_name", "UNet2DConditionModel")
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}/config.json is unreadable ({e})") from None
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise UserError(f"{folder}/config.json names {name!r}, not a diffusers model class")
    return cls


def build_empty(folder):
    """The model of `folder`'s config on the meta device (names and shapes, no weights)."""
    cls = model_class(folder)
    with torch.device("meta"):
        return cls.from_config(cls.load_config(folder))


def state_of(ckpt, marker):
    """(shadows, names) from `marker`; a file that does not load is one line naming it."""
    try:
        trainer = torch.load(marker, weights_only=True)
    except Exception as e:  # truncated, corrupt or not a plain-data pickle
        raise UserError(f"{marker} is unreadable: {checkpoint.refusal(marker, e)}") from None
    return saved_shadows(trainer)


def recover(ckpt):
    """Rewrite `ckpt/ema` from `ckpt/state/trainer.pt` if it needs it; returns a one-line report."""
    if any(os.path.isdir(os.path.join(ckpt, name)) for name in LORA_DIRS):
        return (f"{ckpt}: a LoRA checkpoint (lora_ema/ holds its EMA, written by code the bug never touched): "
                "nothing to do")
    unet_dir, ema_dir = os.path.join(ckpt, "unet"), os.path.join(ckpt, "ema")
    if not os.path.isfile(os.path.join(unet_dir, "config.json")):
        return f"{ckpt}: no unet/ model folder: not a checkpoint this tool knows, left as it is"
    raw_path = check_weights_file(unet_dir)
    has_ema = os.path.isfile(os.path.join(ema_dir, "config.json"))
    if has_ema and not filecmp.cmp(check_weights_file(ema_dir), raw_path, shallow=False):
        return f"{ckpt}: ema/ differs from unet/, so it holds the EMA already (the bug made it a byte copy): left as it is"
    marker = os.path.join(ckpt, "state", "trainer.pt")
    if not os.path.isfile(marker):
        if not has_ema:
            return f"{ckpt}: no ema/ and no state/ (a --no-use_ema run, or older than --checkpoints_total_limit): nothing to recover"
        return f"{ckpt}: no state/ left (older than --checkpoints_total_limit): its EMA cannot be recovered"
    shadows, names = state_of(ckpt, marker)
    if shadows is None:
        return f"{ckpt}: the run had --no-use_ema: nothing to recover"
    raw = load_file(raw_path)
    if names is None:
        names = [n for n, _ in build_empty(unet_dir).named_parameters()]
    if len(names) != len(shadows):
        raise UserError(f"{marker}: {len(shadows)} EMA tensors, the model in {unet_dir} has {len(names)} parameters")
    recovered = dict(raw)
    for name, value in zip(names, shadows):
        if name not in raw or tuple(raw[name].shape) != tuple(value.shape):
            raise UserError(f"{marker}: EMA tensor for {name} does not fit {unet_dir}")
        recovered[name] = value.to(raw[name].dtype).contiguous()
    tmp = os.path.join(ckpt, ".tmp-ema")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.write_model_folder(tmp, model=build_empty(unet_dir), state_dict=recovered)
    old = os.path.join(ckpt, ".old-ema")
    if os.path.isdir(ema_dir):
        os.replace(ema_dir, old)
    os.replace(tmp, ema_dir)
    shutil.rmtree(old, ignore_errors=True)
    diff = max((recovered[k].float() - raw[k].float()).abs().max().item() for k in raw)
    return f"{ckpt}: ema/ rewritten from state/trainer.pt (max |ema - unet| = {diff:.3g})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--logdir", required=True, help="the run's --logdir (holds ckpt-N/)")
    args = p.parse_args(argv)
    found = checkpoint.list_checkpoints(args.logdir)
    if not found:
        raise UserError(f"--logdir {args.logdir}: no ckpt-N folders")
    failed = []
    with DirectoryLock(args.logdir, what="--logdir", create=False):  # not while a run writes into it
        for _, path in found:  # one bad checkpoint does not stop the others
            try:
                print(recover(path), flush=True)
            except UserError as e:
                failed.append(str(e))
    if failed:
        raise UserError(failed[0] + (f" (and {len(failed) - 1} more checkpoint(s) not handled)" if len(failed) > 1 else ""))


if __name__ == "__main__":
    run_main(main)
