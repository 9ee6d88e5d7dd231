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
from diffusers.utils.torch_utils import randn_tensor


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


@dataclass
class Picks:
    t: torch.Tensor      # (B,) long: t_{k_i} of row i (0 where row i was not asked for)
    x_t: torch.Tensor    # (B, C, H, W): the UNet input x_{t_{k_i}} (zeros where not asked for)
    eps: torch.Tensor    # (B, C, H, W): the (guided) noise prediction there (zeros where not asked for)
    unet_rows: int       # batch rows summed over the UNet passes (a guided pass counts its two halves once)


def _rows(value, rows):
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: v[rows] for k, v in value.items()}
    return value[rows]


@torch.no_grad()
def truncated_rollout(unet, scheduler, x_T, timesteps, prompt_embeds, stop, guidance_scale=1.0,
                      negative_prompt_embeds=None, added_cond_kwargs=None, negative_added_cond_kwargs=None,
                      generator=None):
    """`rollout`, recording only step `stop[i]` of row i and running row i no further
    (stop[i] = -1: row i is not needed and never runs). Row i costs stop[i] + 1 UNet rows
    instead of T; finished rows leave the batch (`scheduler.keep_rows`). The scheduler's noise
    (DDPM) is drawn for the whole batch at every one of the T steps, exactly as `rollout` draws
    it, and the rows still running take theirs: with the same generator every recorded
    (t_k, x_{t_k}, eps_k) is the one `rollout` records at step k, and the generator ends in
    the same state."""
    B, T = timesteps.shape
    if timesteps.ndim != 2 or B != x_T.shape[0] or stop.shape != (B,):
        raise ValueError(f"truncated_rollout: timesteps (batch, steps) and stop (batch,) must match x_T's batch "
                         f"{x_T.shape[0]}, got {tuple(timesteps.shape)} and {tuple(stop.shape)}")
    if int(stop.max()) >= T or int(stop.min()) < -1:
        raise ValueError(f"truncated_rollout: stop must lie in -1..{T - 1}, got {stop.tolist()}")
    scheduler.set_timesteps(timesteps)
    timesteps, stop = timesteps.to(x_T.device), stop.to(x_T.device)
    t_out = torch.zeros(B, dtype=timesteps.dtype, device=x_T.device)
    x_out, eps_out = None, None
    live = (stop >= 0).nonzero().flatten()  # batch rows still running, ascending
    scheduler.keep_rows(live)
    x, unet_rows = x_T[live], 0
    for k in range(T):
        noise = None
        if scheduler.draws_noise:  # the same call as PerSampleDDPM.step makes on the whole batch
            noise = randn_tensor(x_T.shape, generator=generator, device=x_T.device, dtype=torch.float32)
        if len(live) == 0:
            continue  # only the noise draws remain, to leave the generator where `rollout` leaves it
        model_input = scheduler.scale_model_input(x, k)
        eps = predict_noise(unet, model_input, timesteps[live, k], prompt_embeds[live], guidance_scale,
                            _rows(negative_prompt_embeds, live), _rows(added_cond_kwargs, live),
                            _rows(negative_added_cond_kwargs, live))
        unet_rows += len(live)
        if x_out is None:
            x_out = torch.zeros((B, *model_input.shape[1:]), dtype=model_input.dtype, device=x_T.device)
            eps_out = torch.zeros((B, *eps.shape[1:]), dtype=eps.dtype, device=x_T.device)
        done = stop[live] == k
        rows = live[done]
        t_out[rows], x_out[rows], eps_out[rows] = timesteps[rows, k], model_input[done], eps[done]
        keep = (~done).nonzero().flatten()
        live = live[keep]
        if len(live):
            scheduler.keep_rows(keep)
            x = scheduler.step(eps[keep], k, x[keep], noise=None if noise is None else noise[live], generator=generator)
    if x_out is None:  # no row was asked for
        x_out = eps_out = torch.zeros_like(x_T)
    return Picks(t=t_out, x_t=x_out, eps=eps_out, unet_rows=unet_rows)
