"""One Diffusion-DRO loss evaluation (docs/design.md, "Algorithm", steps 2-3), and the plain
denoising loss of the SFT baseline.

Given buffer samples (policy: the rollout model's input x_{t_k} and its stored output at t_k;
expert: x0 and its caption), noise the experts at the *same* t_k with fresh eps', run the
trainable and the frozen reference model on the concatenated [expert; policy] batch, and
compare their per-sample errors with the ranking loss. The expert target is the family's
(eps', or the velocity of (x0, eps', t_k) for v-prediction); the policy target is the
rollout model's own stored output, whatever it parametrises.

Everything model-specific goes through `family` (`rpo.diffusion.family`); the reference is a
context manager yielding the module to run, so a LoRA reference (the base with adapters
disabled) and a separate frozen copy look the same here.
"""
import contextlib

import torch

from rpo.diffusion.loss import per_sample_mse, ranking_loss


def pair_batch(family, sample, eps_expert):
    """The 2B-row model batch [expert; policy]: inputs, timesteps, conditioning, targets."""
    t = sample["t"]
    x0 = sample["x0"].float()
    return {
        "x": torch.cat([family.add_noise(x0, eps_expert, t), sample["x_t"].float()]),
        "t": torch.cat([t, t]),
        "cond": family.conditioning(sample, repeat=2),
        "target": torch.cat([family.target(x0, eps_expert, t), sample["eps"].float()]),
    }


def dro_loss(*, model, reference, family, sample, eps_expert, margin=0.001, hinge=True, autocast=None):
    """Ranking loss of `model` against the reference on one batch of buffer samples.

    `reference()` is a context manager yielding the frozen reference model. It runs without
    gradient under the same autocast as the trainable model; errors are computed in float32
    (the paper's code keeps bf16 reference errors, as coarse as the 0.001 margin:
    docs/upstream.md, defect 3).
    """
    autocast = autocast or contextlib.nullcontext
    b = pair_batch(family, sample, eps_expert)
    n = eps_expert.shape[0]
    with torch.no_grad(), autocast(), reference() as ref_model:
        ref_err = per_sample_mse(family.predict(ref_model, b["x"], b["t"], b["cond"]), b["target"])
    with autocast():
        pred = family.predict(model, b["x"], b["t"], b["cond"])
    err = per_sample_mse(pred, b["target"])
    return ranking_loss(err[:n], err[n:], ref_err[:n], ref_err[n:], margin, hinge)


def sft_loss(*, model, family, sample, eps_expert, autocast=None):
    """The SFT baseline: mean squared error of `model` against the family's target on the
    experts noised at the sampled timesteps (no policy half, no reference)."""
    autocast = autocast or contextlib.nullcontext
    t, x0 = sample["t"], sample["x0"].float()
    with autocast():
        pred = family.predict(model, family.add_noise(x0, eps_expert, t), t, family.conditioning(sample))
    err = per_sample_mse(pred, family.target(x0, eps_expert, t))
    loss = err.mean()
    return loss, {"loss": loss.detach(), "expert": err.detach().mean()}
