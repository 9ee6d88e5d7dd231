"""The objective the paper states is really optimised: after training, on held-out
expert/policy pairs, d = (L_E - Lref_E) - (L_P - Lref_P) is below zero on average and the
trained model denoises experts better than the frozen reference.

Note on the policy half: its target is the rollout model's own noise prediction. When the
rollout model *is* the trainable model (the paper's setting: refreshed at every update, so
fully on-policy), L_P is exactly zero at rollout time and has zero gradient; the policy
term then acts only through Lref_P, a per-sample offset of the hinge. The test checks that
too, since it is what the algorithm of the paper's code (basiclab/DiffusionDRO) does.
"""
import os
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from rpo.data.folders import ExpertDataset
from rpo.diffusion.loss import per_sample_mse
from rpo.models import load_text_encoders
from rpo.diffusion.rollout import rollout
from rpo.diffusion.schedulers import PerSampleScheduler, make_timesteps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@torch.no_grad()
def held_out_errors(kit, policy, reference, seed=1234, rounds=4):
    """Per-sample (expert_diff, policy_diff) of `policy` against `reference` on fresh pairs."""
    gen = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(kit["sd15"], subfolder="vae")
    text = load_text_encoders(kit["sd15"])
    noise = DDPMScheduler.from_pretrained(kit["sd15"], subfolder="scheduler")
    sampler = PerSampleScheduler.from_name("DPMSolver++", noise.config)
    experts = ExpertDataset(kit["experts"], 32, random_flip=False)
    expert_diff, policy_diff = [], []
    for r in range(rounds):
        items = [experts[(r * 4 + i) % len(experts)] for i in range(4)]
        embeds, _ = text.encode([it["caption"] for it in items])
        x0 = vae.encode(torch.stack([it["pixel_values"] for it in items])).latent_dist.sample(gen) * vae.config.scaling_factor
        grid = make_timesteps("DPMSolver++", noise.config, 4, 4, True, generator=gen)
        traj = rollout(policy, sampler, torch.randn(4, 4, 4, 4, generator=gen), grid, embeds)
        k = torch.randint(0, 4, (4,), generator=gen)
        rows = torch.arange(4)
        t, x_p, eps_p = traj.t[rows, k], traj.x_t[rows, k], traj.eps[rows, k]
        eps_e = torch.randn(x0.shape, generator=gen)
        x_e = noise.add_noise(x0, eps_e, t)
        def err(model, x, target):
            return per_sample_mse(model(x, t, encoder_hidden_states=embeds).sample, target)
        own = err(policy, x_p, eps_p)
        assert own.abs().max() < 1e-10  # on its own rollouts the policy's error is zero (see module doc)
        expert_diff.append(err(policy, x_e, eps_e) - err(reference, x_e, eps_e))
        policy_diff.append(own - err(reference, x_p, eps_p))
    return torch.cat(expert_diff), torch.cat(policy_diff)


@pytest.mark.slow
def test_training_lowers_d_on_held_out_pairs(kit, tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--pretrained_model_name_or_path", kit["sd15"],
           "--train_dataset", kit["experts"], "--logdir", str(tmp_path), "--resolution", "32",
           "--batch_size", "4", "--buffer_batch_size", "4", "--buffer_size", "4", "--buffer_num_inference_steps", "4",
           "--num_steps", "40", "--gradient_accumulation_steps", "1", "--buffer_update_steps", "1",
           "--checkpointing_steps", "40", "--learning_rate", "1e-3", "--mixed_precision", "no",
           "--dataloader_num_workers", "0", "--no-use_ema"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = UNet2DConditionModel.from_pretrained(kit["sd15"], subfolder="unet")
    trained = UNet2DConditionModel.from_pretrained(tmp_path / "ckpt-40" / "unet")
    expert_diff, policy_diff = held_out_errors(kit, trained, reference)
    d = expert_diff - policy_diff
    print(f"held-out: expert_diff {expert_diff.mean():.4g}, policy_diff {policy_diff.mean():.4g}, d {d.mean():.4g}")
    assert d.mean() < 0
    assert expert_diff.mean() < 0
    # control: the reference moved as far as training moved it, but in a random direction
    # (per tensor, the same norm as trained - reference) does not denoise experts better, so
    # the improvement above comes from the direction training chose, not from any change
    control = UNet2DConditionModel.from_pretrained(kit["sd15"], subfolder="unet")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for (name, p), q in zip(control.named_parameters(), trained.parameters()):
            step = q - p
            direction = torch.randn(p.shape, generator=gen)
            p.add_(direction * (step.norm() / direction.norm().clamp_min(1e-12)))
    e_control, _ = held_out_errors(kit, control, reference)
    print(f"control (random direction, same size): expert_diff {e_control.mean():.4g}")
    assert expert_diff.mean() < e_control.mean()
