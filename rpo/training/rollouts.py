"""Rollouts of the current policy from expert captions (docs/design.md, "Algorithm", step 1),
as the replay and resample pair sources use them: `Refiller.refill` rolls out the next expert
batches and pushes the trajectories into the replay buffer, or (truncated rollouts) returns
the micro-step's picks directly; `Refiller.roll` is one rollout batch.

Everything that differs between model families (timestep grid, sampler, conditioning, what a
trajectory stores beside its text embedding) is the family's answer; every random draw comes
from the state's generators, so a resumed run repeats the same numbers.
"""
import math
from dataclasses import dataclass

import torch

from rpo.cli import UserError
from rpo.diffusion.buffer import draw_picks
from rpo.diffusion.rollout import rollout, truncated_rollout
from rpo.training.latents import sample_latents


@dataclass(frozen=True)
class RolloutSettings:
    scheduler: str            # one of rpo.diffusion.schedulers.SCHEDULERS
    num_steps: int            # sampler steps per trajectory
    batch_size: int           # prompts per rollout batch
    batches_per_refill: int
    min_trajectories: int     # an empty buffer is filled with at least this many (the pair batch size)
    guidance_scale: float
    perturb_timesteps: bool
    drop_prompt_probability: float
    resolution: int
    latent_size: int
    sync: bool = False        # all-gather every rank's trajectories into every buffer
    truncate: bool = False    # truncated rollouts; only where `truncation_applies` (Refiller.truncated_refill)


def truncation_applies(*, buffer_size, sample_steps, pair_batch_size, rollout_batch_size, batches_per_refill,
                       sync, world):
    """(True, why) when truncated rollouts are exact in distribution, else (False, why not).

    Exact when every trajectory reaches the loss at most once, at one step k, in the
    micro-step of the refill that made it: (1) the buffer is refilled at every micro-step
    (`--buffer_sample_steps 1`); (2) each refill pushes at least `--buffer_size` trajectories
    (`--buffer_batch_size` x `--buffer_batch_accumulation` >= `--buffer_size`), so the buffer
    then holds only this refill's newest trajectories; (3) the micro-step samples without
    replacement (`--batch_size` <= `--buffer_size`), so no trajectory is picked twice; (4) no
    other rank samples this rank's trajectories (no `--buffer_sync` with more than one
    process). The paper's settings (4, 1, 4 x 1, 4) satisfy all four (docs/design.md, "Algorithm")."""
    per_refill = rollout_batch_size * batches_per_refill
    if sample_steps != 1:
        return False, f"--buffer_sample_steps {sample_steps}: a trajectory stays in the buffer for several micro-steps"
    if per_refill < buffer_size:
        return False, (f"--buffer_batch_size {rollout_batch_size} x --buffer_batch_accumulation {batches_per_refill} "
                       f"< --buffer_size {buffer_size}: older trajectories stay in the buffer")
    if pair_batch_size > buffer_size:
        return False, f"--batch_size {pair_batch_size} > --buffer_size {buffer_size}: sampling is with replacement"
    if sync and world > 1:
        return False, "--buffer_sync: other ranks sample this rank's trajectories"
    return True, ("every trajectory is sampled at most once, in the micro-step of its refill "
                  "(--buffer_sample_steps 1, a refill replaces the whole buffer, --batch_size <= --buffer_size, no sync)")


def next_batch(batches):
    """The next expert batch. A `UserError` raised in a DataLoader worker (an image that
    became unreadable) reaches here wrapped in the worker's traceback: keep its one line."""
    try:
        return next(batches)
    except UserError as e:
        raise UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]) from None


class Refiller:
    def __init__(self, *, batches, text, vae, family, settings, accelerator, weight_dtype, moments=None, sampler=None):
        self.batches, self.text, self.vae, self.family = batches, text, vae, family
        self.settings, self.accelerator = settings, accelerator
        self.sampler = sampler if sampler is not None else family.rollout_sampler(settings.scheduler)
        self.weight_dtype, self.moments = weight_dtype, moments
        self.device = accelerator.device
        self.empty_embeds = text.encode([""]) if settings.guidance_scale != 1.0 else None
        self.unet_rows = 0  # rollout UNet batch rows so far (what truncation saves)

    def refill(self, *, model, state):
        """Roll `model` out from the next expert batches and push the trajectories; with
        truncated rollouts return the micro-step's picks instead (`truncated_refill`), else None."""
        s = self.settings
        n = s.batches_per_refill
        if len(state.buffer) == 0:
            n = max(math.ceil(s.min_trajectories / s.batch_size), n)
        if s.truncate:
            return self.truncated_refill(model=model, state=state, num_batches=n)
        for _ in range(n):
            batch = next_batch(self.batches)
            state.expert_batches_used += 1
            fields = self.trajectories(model, batch, state)
            if s.sync and self.accelerator.num_processes > 1:
                fields = {k: self.accelerator.gather(v.contiguous()) for k, v in fields.items()}
            state.buffer.push(**fields)
        return None

    def truncated_refill(self, *, model, state, num_batches):
        """What `refill` followed by `state.buffer.sample(min_trajectories)` hands the micro-step,
        with each trajectory rolled out only up to its sampled step (valid only where
        `truncation_applies`). The generators make the same draws in the same order: per batch
        the caption drops and grid from `cpu_gen`, then the buffer's pick (`draw_picks`, as
        `sample` draws it, over the trajectories a full refill would leave in the buffer);
        from `dev_gen` per batch x0, x_T and the sampler's noise. Returns the picks (shaped as
        `sample` returns them); the buffer itself is left empty."""
        s = self.settings
        prepared = []
        for _ in range(num_batches):
            batch = next_batch(self.batches)
            state.expert_batches_used += 1
            prepared.append((batch, self.conditioning(batch, state)))
        total = num_batches * s.batch_size
        kept = min(total, state.buffer.size)  # a full refill leaves the newest `kept` in the buffer
        index, step = draw_picks(kept, s.num_steps, s.min_trajectories, state.cpu_gen)
        stop = torch.full((total,), -1, dtype=torch.long)
        stop[index + total - kept] = step
        fields = []
        for i, (batch, cond) in enumerate(prepared):
            rows = stop[i * s.batch_size:(i + 1) * s.batch_size]
            fields.append(self.roll(model, batch, cond, state, stop=rows))
        chosen = index + total - kept
        device = state.buffer.device
        out = {k: torch.cat([f[k] for f in fields])[chosen.to(fields[0][k].device)].detach().to(device)
               for k in fields[0]}
        out["t"] = out["t"].long()
        out["index"], out["step"] = index.to(device), step.to(device)
        state.buffer.clear()  # a full refill would have replaced every trajectory in it
        return out

    def expert_latents(self, batch, gen):
        scale = self.vae.config.scaling_factor
        # SD3's VAE centres its latents first (shift_factor, as its pipeline decodes); SD1.5/XL have none
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        if self.moments is not None:
            return (sample_latents(self.moments, batch["index"], batch["flipped"], gen) - shift) * scale
        with torch.no_grad():
            pixels = batch["pixel_values"].to(self.device, self.weight_dtype)
            return (self.vae.encode(pixels).latent_dist.sample(generator=gen) - shift) * scale

    def conditioning(self, batch, state):
        """A rollout batch's `cpu_gen` draws (caption drops, timestep grid) and conditioning."""
        s, device = self.settings, self.device
        b = len(batch["caption"])
        drop = torch.rand(b, generator=state.cpu_gen) < s.drop_prompt_probability
        embeds, pooled = self.text.encode(["" if d else c for c, d in zip(batch["caption"], drop.tolist())])
        grid = self.family.rollout_timesteps(s.scheduler, s.num_steps, b, s.perturb_timesteps, generator=state.cpu_gen,
                                             device=device)
        return embeds, pooled, grid

    def trajectories(self, model, batch, state):
        """One rollout batch: the buffer fields of its trajectories."""
        return self.roll(model, batch, self.conditioning(batch, state), state)

    def roll(self, model, batch, cond_and_grid, state, stop=None, final=False):
        """The `dev_gen` part of a rollout batch: x0, x_T, the rollout (whole, or with `stop`
        truncated: then t, x_t, eps hold each row's one recorded step); with `final` also the
        rollout's end sample `x_final` (the policy's x0: rpo/training/sources/resample.py)."""
        s, device, gen = self.settings, self.device, state.dev_gen
        embeds, pooled, grid = cond_and_grid
        b = len(batch["caption"])
        x0 = self.expert_latents(batch, gen)
        x_T = torch.randn((b, model.config.in_channels, s.latent_size, s.latent_size), generator=gen, device=device)
        model, cond, neg_cond, extras = self.family.rollout_inputs(model, pooled, self.empty_embeds, batch, s.resolution)
        neg = self.empty_embeds[0].expand(b, -1, -1) if self.empty_embeds is not None else None
        with self.accelerator.autocast():
            if stop is None:
                traj = rollout(model, self.sampler, x_T, grid, embeds, s.guidance_scale, neg, cond, neg_cond, generator=gen)
                self.unet_rows += b * s.num_steps
            else:
                traj = truncated_rollout(model, self.sampler, x_T, grid, embeds, stop, s.guidance_scale, neg, cond,
                                         neg_cond, generator=gen)
                self.unet_rows += traj.unet_rows
        out = dict(prompt_embeds=embeds, x0=x0, t=traj.t, x_t=traj.x_t, eps=traj.eps, **extras)
        if final:
            out["x_final"] = traj.x_final
        return out
