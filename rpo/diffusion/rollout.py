"""Policy rollouts that record every step (docs/design.md, "Algorithm", step 1).

From noise x_T, run the rollout UNet for T steps with a per-sample scheduler
(`rpo.diffusion.schedulers.PerSampleScheduler`) and keep, for every step k, the timestep t_k, the
UNet *input* x_{t_k} and the noise prediction eps_k it produced there. The buffer then
pairs (x_{t_k}, eps_k) as the "policy" sample: the paper's code (basiclab/DiffusionDRO) gets the same
pairing by pushing x_T first and trimming the post-step latents (docs/upstream.md,
"Algorithm", A.7).

With guidance g > 1 the stored eps_k is the guided prediction
eps_uncond + g * (eps_cond - eps_uncond); the per-sample timestep vector is duplicated
for the two halves (the paper's code fails here, docs/upstream.md, defect 6).
"""
from dataclasses import dataclass

import torch


@dataclass
class Trajectory:
    t: torch.Tensor        # (B, T) long, strictly decreasing per row
    x_t: torch.Tensor      # (B, T, C, H, W): the UNet input at step k
    eps: torch.Tensor      # (B, T, C, H, W): the (guided) noise prediction at step k
    x_final: torch.Tensor  # (B, C, H, W): the sample after the last step


def predict_noise(unet, x, t, prompt_embeds, guidance_scale=1.0, negative_prompt_embeds=None,
                  added_cond_kwargs=None, negative_added_cond_kwargs=None):
    """One (optionally classifier-free guided) noise prediction with a per-sample t (B,)."""
    if guidance_scale == 1.0:
        return unet(x, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added_cond_kwargs).sample
    if negative_prompt_embeds is None:
        raise ValueError("guidance_scale != 1 needs negative_prompt_embeds (the empty caption's embedding)")
    cond_kwargs = None
    if added_cond_kwargs is not None:
        negative = negative_added_cond_kwargs or added_cond_kwargs
        cond_kwargs = {k: torch.cat([negative[k], v]) for k, v in added_cond_kwargs.items()}
    eps_uncond, eps_cond = unet(
        torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
        added_cond_kwargs=cond_kwargs,
    ).sample.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def rollout(unet, scheduler, x_T, timesteps, prompt_embeds, guidance_scale=1.0, negative_prompt_embeds=None,
            added_cond_kwargs=None, negative_added_cond_kwargs=None, generator=None):
    """Sample from `x_T` along the per-sample grid `timesteps` (B, T) and record each step."""
    if timesteps.ndim != 2 or timesteps.shape[0] != x_T.shape[0]:
        raise ValueError(f"timesteps must be (batch, steps) with batch {x_T.shape[0]}, got {tuple(timesteps.shape)}")
    scheduler.set_timesteps(timesteps)
    timesteps = timesteps.to(x_T.device)
    x, inputs, predictions = x_T, [], []
    for k in range(timesteps.shape[1]):
        model_input = scheduler.scale_model_input(x, k)
        eps = predict_noise(unet, model_input, timesteps[:, k], prompt_embeds, guidance_scale, negative_prompt_embeds,
                            added_cond_kwargs, negative_added_cond_kwargs)
        inputs.append(model_input)
        predictions.append(eps)
        x = scheduler.step(eps, k, x, generator=generator)
    return Trajectory(t=timesteps, x_t=torch.stack(inputs, 1), eps=torch.stack(predictions, 1), x_final=x)
