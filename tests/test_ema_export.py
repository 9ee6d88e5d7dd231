"""ckpt-N/ema holds the EMA of the trainable weights: recomputed here, independently, from the
sequence of trainable weights the run saved after each optimizer update (ckpt-N/unet), with
diffusers' decay rule written out in the test; and the validation images equal inference.py
on ckpt-N/ema (the same weights end to end).

The rule (diffusers' EMAModel, defaults): at update u = 1, 2, ... the decay is 0 for u = 1 and
min(0.9999, (1 + s) / (10 + s)) with s = u - 1 after, and ema <- ema - (1 - decay) (ema - w_u).
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from test_train import REPO, run, train_cmd, weights


def scale_of(state):
    return max(v.abs().max().item() for v in state.values())


def expected_ema(sequence, dtype):
    """The EMA of `sequence` (one state dict per update), computed in `dtype` like the trainer's
    shadow parameters (float64 for fp32 runs: the comparison is then to float tolerance)."""
    ema = None
    for u, w in enumerate(sequence, start=1):
        s = u - 1
        decay = 0.0 if s <= 0 else min(0.9999, (1 + s) / (10 + s))
        w = {k: v.to(dtype) for k, v in w.items()}
        if ema is None:
            ema = {k: v.clone() for k, v in w.items()}  # decay 0: the first update copies
            continue
        for k in ema:
            ema[k] = ema[k].sub(ema[k] - w[k], alpha=1 - decay)
    return ema


@pytest.mark.parametrize("precision, offload", [("no", True), pytest.param("no", False, marks=pytest.mark.slow),
                                               pytest.param("bf16", True, marks=pytest.mark.slow)])
def test_ckpt_ema_is_the_ema_of_the_trained_weights(kit, tmp_path, precision, offload):
    updates = 4
    run(train_cmd(kit, tmp_path, "--num_steps", str(2 * updates), "--gradient_accumulation_steps", "2",
                  "--checkpointing_steps", "2", "--buffer_update_steps", "2", "--mixed_precision", precision,
                  "--offload_ema" if offload else "--no-offload_ema", "--learning_rate", "1e-3"))
    sequence = [weights(tmp_path / f"ckpt-{2 * u}" / "unet") for u in range(1, updates + 1)]
    ema = weights(tmp_path / f"ckpt-{2 * updates}" / "ema")
    dtype = torch.float64 if precision == "no" else torch.bfloat16
    want = expected_ema(sequence, dtype)
    assert ema.keys() == want.keys()
    worst = max((ema[k].to(torch.float64) - want[k].to(torch.float64)).abs().max().item() for k in want)
    if precision == "no":
        assert worst < 1e-6
    else:  # the same operations in bf16: at most a rounding step apart
        assert worst <= scale_of(want) * 2 ** -7
    # and it is not the raw weights (the bug this test exists for)
    raw = sequence[-1]
    assert max((ema[k].float() - raw[k].float()).abs().max().item() for k in raw) > 1e-5
    # ckpt-2's EMA is the first update's weights (decay 0: ema - 1 * (ema - w), up to rounding)
    first = weights(tmp_path / "ckpt-2" / "ema")
    assert max((first[k].float() - sequence[0][k].float()).abs().max().item() for k in first) <= 1e-6 + scale_of(first) * (
        2 ** -7 if precision == "bf16" else 0)


def test_validation_images_equal_inference_on_ckpt_ema(kit, tmp_path):
    log, out = tmp_path / "log", tmp_path / "bench"
    run(train_cmd(kit, log, "--num_steps", "4", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "4",
                  "--buffer_update_steps", "2", "--learning_rate", "1e-3", "--validation_steps", "4",
                  "--validation_num_inference_steps", "3", "--validation_guidance_scale", "3.0",
                  "--score_num_images_per_prompt", "1", "--score_batch_size", "2"))
    run([os.sys.executable, os.path.join(REPO, "inference.py"), "--pretrained_model_name_or_path", kit["sd15"],
         "--unet", str(log / "ckpt-4" / "ema"), "--test_dataset_root", kit["prompts"], "--output", str(out),
         "--scheduler", "DDPM", "--num_inference_steps", "3", "--guidance_scale", "3.0", "--num_images_per_prompt", "1",
         "--resolution", "32", "--seed", "0", "--mixed_precision", "no", "--batch_size", "2", "--num_workers", "0"])
    val = log / "images" / "step-4"
    pairs = [(root, name) for root, _, files in os.walk(val) for name in files if name.endswith(".png")]
    assert pairs
    for root, name in pairs:
        a = np.asarray(Image.open(os.path.join(root, name)), dtype=np.int16)
        b = np.asarray(Image.open(os.path.join(out, os.path.relpath(root, val), name)), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name  # the same weights; at most CPU kernel rounding
    # and the raw trainable weights give other images: the comparison can tell the two apart
    raw_out = tmp_path / "raw"
    run([os.sys.executable, os.path.join(REPO, "inference.py"), "--pretrained_model_name_or_path", kit["sd15"],
         "--unet", str(log / "ckpt-4" / "unet"), "--test_dataset_root", kit["prompts"], "--output", str(raw_out),
         "--scheduler", "DDPM", "--num_inference_steps", "3", "--guidance_scale", "3.0", "--num_images_per_prompt", "1",
         "--resolution", "32", "--seed", "0", "--mixed_precision", "no", "--batch_size", "2", "--num_workers", "0"])
    root, name = pairs[0]
    a = np.asarray(Image.open(os.path.join(root, name)), dtype=np.int16)
    c = np.asarray(Image.open(os.path.join(raw_out, os.path.relpath(root, val), name)), dtype=np.int16)
    assert np.abs(a - c).max() > 1


@pytest.mark.slow
def test_recover_ema_rewrites_a_pre_fix_run(kit, tmp_path):
    """A run as the buggy trainer left it: ema/ a copy of unet/, the EMA only in trainer.pt
    (then a list in parameter order). The tool restores the EMA recomputed from the weights."""
    import shutil
    import subprocess
    import sys
    updates = 3
    run(train_cmd(kit, tmp_path, "--num_steps", str(2 * updates), "--gradient_accumulation_steps", "2",
                  "--checkpointing_steps", "2", "--buffer_update_steps", "2", "--learning_rate", "1e-3"))
    sequence = [weights(tmp_path / f"ckpt-{2 * u}" / "unet") for u in range(1, updates + 1)]
    for u in range(1, updates + 1):  # the bug: ema/ holds the raw weights
        ckpt = tmp_path / f"ckpt-{2 * u}"
        shutil.rmtree(ckpt / "ema")
        shutil.copytree(ckpt / "unet", ckpt / "ema")
    marker = tmp_path / f"ckpt-{2 * updates}" / "state" / "trainer.pt"
    trainer = torch.load(marker, weights_only=True)
    trainer["ema"] = trainer["ema"]["ema"]  # the old layout: EMAModel's own state dict, no names
    torch.save(trainer, marker)
    proc = subprocess.run([sys.executable, "-m", "tools.recover_ema", "--logdir", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == updates
    assert all("cannot be recovered" in line for line in lines[:-1]) and "rewritten" in lines[-1]
    ema = weights(tmp_path / f"ckpt-{2 * updates}" / "ema")
    want = expected_ema(sequence, torch.float64)
    assert max((ema[k].double() - want[k]).abs().max().item() for k in want) < 1e-6
    assert not (tmp_path / f"ckpt-{2 * updates}" / ".tmp-ema").exists()
