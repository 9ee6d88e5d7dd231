"""One Diffusion-DRO loss evaluation (DESIGN §3, steps 2-3), shared by train.py and tests.

Given buffer samples (policy: x_{t_k}, eps_k at t_k; expert: x0 and its caption), noise the
experts at the *same* t_k with fresh eps', run the trainable and the frozen reference UNet
on the concatenated [expert; policy] batch, and compare their per-sample errors with the
ranking loss.
"""
import contextlib

import torch

from rpo.diffusion.loss import per_sample_mse, ranking_loss


def pair_batch(sample, eps_expert, noise_scheduler):
    """The 2B-sample UNet batch [expert; policy]: inputs, timesteps, conditioning, targets."""
    t = sample["t"]
    x_expert = noise_scheduler.add_noise(sample["x0"].float(), eps_expert, t)
    batch = {
        "x": torch.cat([x_expert, sample["x_t"].float()]),
        "t": torch.cat([t, t]),
        "cond": torch.cat([sample["prompt_embeds"]] * 2),
        "target": torch.cat([eps_expert, sample["eps"].float()]),
        "added": None,
    }
    if "pooled_embeds" in sample:  # SDXL: pooled text and size/crop ids for both halves
        batch["added"] = {"text_embeds": torch.cat([sample["pooled_embeds"]] * 2),
                          "time_ids": torch.cat([sample["time_ids"]] * 2)}
    return batch


def dro_loss(unet, unet_ref, sample, eps_expert, noise_scheduler, margin=0.001, hinge=True, autocast=None):
    """Ranking loss of `unet` against `unet_ref` on one batch of buffer samples.

    The reference runs without gradient under the same autocast as the trainable model;
    errors are computed in float32 (the public code's bf16 reference errors are as coarse
    as the 0.001 margin, REFERENCE §6.3).
    """
    autocast = autocast or contextlib.nullcontext
    b = pair_batch(sample, eps_expert, noise_scheduler)
    n = eps_expert.shape[0]
    with torch.no_grad(), autocast():
        ref_err = per_sample_mse(unet_ref(b["x"], b["t"], b["cond"], added_cond_kwargs=b["added"]).sample, b["target"])
    with autocast():
        pred = unet(b["x"], b["t"], b["cond"], added_cond_kwargs=b["added"]).sample
    err = per_sample_mse(pred, b["target"])
    return ranking_loss(err[:n], err[n:], ref_err[:n], ref_err[n:], margin, hinge)
