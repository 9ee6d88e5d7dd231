"""--channels_last and --compile (rpo/training/speed.py): the tiny UNet's outputs and
gradients equal eager, default-layout mode within float rounding, and train.py runs and
checkpoints with them."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel

from rpo.training.speed import speed_up

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([999, 500, 3]), torch.randn(3, 77, 32, generator=g)


def forward_backward(unet):
    x, t, c = inputs()
    out = unet(x, t, encoder_hidden_states=c).sample
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}


@pytest.mark.parametrize("option", ["channels_last", pytest.param("compile", marks=pytest.mark.slow)])
def test_option_matches_eager(kit, option):
    eager = UNet2DConditionModel.from_pretrained(os.path.join(kit["sd15"], "unet"))
    fast = copy.deepcopy(eager)
    speed_up([fast, None, fast], **{option: True})
    if option == "channels_last":
        conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    else:
        assert fast._compiled_call_impl is not None
    assert list(fast.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    want_out, want_grads = forward_backward(eager)
    got_out, got_grads = forward_backward(fast)
    assert want_out.abs().max() > 0.1
    torch.testing.assert_close(got_out, want_out, rtol=1e-4, atol=1e-5)
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, rtol=1e-3, atol=1e-5, msg=n)


def test_train_runs_and_checkpoints_with_channels_last(kit, tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--pretrained_model_name_or_path", kit["sd15"],
           "--train_dataset", kit["experts"], "--logdir", str(tmp_path), "--resolution", "32", "--batch_size", "2",
           "--buffer_batch_size", "2", "--buffer_size", "2", "--buffer_num_inference_steps", "3", "--num_steps", "2",
           "--gradient_accumulation_steps", "1", "--checkpointing_steps", "2", "--buffer_update_steps", "2",
           "--mixed_precision", "no", "--dataloader_num_workers", "0", "--channels_last"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "ckpt-2" / "ema")
    assert loaded.config.cross_attention_dim == 32
