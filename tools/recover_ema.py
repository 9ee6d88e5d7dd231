"""Rewrite `ckpt-N/ema` of a run made before rpo wrote the EMA correctly.

    python -m tools.recover_ema --logdir ./logs/my_run

Before the fix, `ckpt-N/ema` held the raw trainable weights (a byte copy of `ckpt-N/unet`):
diffusers' `save_pretrained` has no `state_dict` parameter and silently wrote the model's own
weights. The real EMA survived only in `ckpt-N/state/trainer.pt` of the newest
`--checkpoints_total_limit` checkpoints. For each checkpoint this tool either rewrites `ema/`
from that saved EMA (atomically: a new folder, then a rename) or says that its EMA is lost.

The saved EMA of that time is a list of shadow tensors in the order of the UNet's parameters;
the names come from a UNet built (on the meta device, no weights) from `ckpt-N/unet`'s config,
and every shape is checked against `ckpt-N/unet`'s weights before anything is written.
"""
import argparse
import os
import shutil

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from rpo.cli import UserError, run_main
from rpo.training import checkpoint


def saved_shadows(trainer):
    """The EMA's shadow tensors from a trainer.pt, in parameter order (old or new layout)."""
    ema = trainer.get("ema")
    if ema is None:
        return None, None
    if "names" in ema:  # written by the fixed trainer: names recorded with the values
        return ema["ema"]["shadow_params"], ema["names"]
    return ema["shadow_params"], None


def recover(ckpt):
    """Rewrite `ckpt/ema` from `ckpt/state/trainer.pt`; returns a one-line report."""
    marker = os.path.join(ckpt, "state", "trainer.pt")
    if not os.path.isfile(marker):
        return f"{ckpt}: no state/ left (older than --checkpoints_total_limit): its EMA cannot be recovered"
    shadows, names = saved_shadows(checkpoint.load_torch(marker))
    if shadows is None:
        return f"{ckpt}: the run had --no-use_ema: nothing to recover"
    unet_dir = os.path.join(ckpt, "unet")
    raw = load_file(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))
    if names is None:
        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
        names = [n for n, _ in model.named_parameters()]
    if len(names) != len(shadows):
        raise UserError(f"{marker}: {len(shadows)} EMA tensors, the UNet has {len(names)} parameters")
    recovered = dict(raw)
    for name, value in zip(names, shadows):
        if name not in raw or tuple(raw[name].shape) != tuple(value.shape):
            raise UserError(f"{marker}: EMA tensor for {name} does not fit {unet_dir}")
        recovered[name] = value.to(raw[name].dtype).contiguous()
    model = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
    tmp = os.path.join(ckpt, ".tmp-ema")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.write_model_folder(tmp, model=model, state_dict=recovered)
    old = os.path.join(ckpt, ".old-ema")
    if os.path.isdir(os.path.join(ckpt, "ema")):
        os.replace(os.path.join(ckpt, "ema"), old)
    os.replace(tmp, os.path.join(ckpt, "ema"))
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
    for _, path in found:
        print(recover(path))


if __name__ == "__main__":
    run_main(main)
