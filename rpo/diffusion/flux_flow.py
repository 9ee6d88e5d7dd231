"""FLUX.1 flow matching: the per-row σ grid with the resolution-dependent shift, the
transformer behind the rollout call, and the training pieces (docs/design.md, "FLUX").

**Same flow as SD3.** x_σ = (1 − σ) x0 + σ ε, velocity target v = ε − x0, Euler steps
x ← x + (σ_{k+1} − σ_k) v̂ from σ = 1 down to 0 — all on the *unpacked* latent
(B, 16, h, w); the transformer wrapper packs its input and unpacks its output
(rpo/models_flux.py), so the buffer, the loss and rollouts see 4-D latents as for SD3.
The Euler sampler is rpo/diffusion/flow.py's `PerRowFlowEuler` as it is: only the grid
differs.

**Integer timesteps t ∈ [1, N], σ = t / N** (N = num_train_timesteps), as the SD3 path
(rpo/diffusion/flow.py): the replay buffer stores integer timesteps and round-trips them
exactly, and the per-row sampler and the truncated rollouts are shared unchanged. The
price is that each σ is rounded to the nearest 1/N (≤ 0.0005 at N = 1000) — FluxPipeline's
own grid is continuous. A row's trajectory is therefore the stock pipeline's for the
*rounded* grid, which FluxPipeline takes as its public `sigmas=` argument (the unshifted
values; it shifts them itself with its μ): that is the row-by-row equality
tests/test_flux.py checks. The transformer is called with `timestep = t / 1000` as
FluxPipeline calls it (the transformer multiplies by 1000 inside).

**Grid.** Base σ per row, then the scheduler's shift. FluxPipeline's base grid is
linspace(1, 1/T, T) = 1 − k/T; with `perturb` row i's base is 1 − (k + u_i)/T, u_i ~ U[0, 1)
from the CPU generator (SD3's per-row offset). The shift, as
`FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=..., mu=...)` applies it:
- `use_dynamic_shifting` (FLUX.1-dev), exponential: σ' = e^μ / (e^μ + 1/σ − 1); linear:
  σ' = μ / (μ + 1/σ − 1); μ from the image's token count (`dynamic_shift_mu`);
- otherwise (FLUX.1-schnell, shift 1): σ' = sσ / (1 + (s − 1)σ).
All three are SD3's shift sσ / (1 + (s − 1)σ) with s = e^μ, μ or `shift`
(`shift_factor`), so flow.py's `shift_sigmas` / `unshift_sigmas` do the arithmetic.
"""
import json
import math
import os

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rpo.cli import UserError
from rpo.diffusion.flow import PerRowFlowEuler, shift_sigmas, unshift_sigmas
from rpo.models_flux import dynamic_shift_mu, image_ids, pack_latents, text_ids, unpack_latents

# Config keys that replace or bend the σ grid in ways the per-row sampler does not follow.
UNSUPPORTED = {"invert_sigmas": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
               "use_beta_sigmas": False, "stochastic_sampling": False, "shift_terminal": None}
TRANSFORMER_TIMESTEP_SCALE = 1000  # FluxPipeline calls the transformer with timestep / 1000


def read_flux_schedule(source, *, subfolder="scheduler", revision=None, cache_dir=None):
    """The pipeline's FlowMatchEulerDiscreteScheduler config, checked (`check_flux_schedule`)."""
    if os.path.isdir(source):
        where = os.path.join(source, subfolder, "scheduler_config.json")
        try:
            with open(where, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {where}: {e}") from None
    else:
        where = f"{source} ({subfolder}/scheduler_config.json)"
        try:
            raw = FlowMatchEulerDiscreteScheduler.load_config(source, subfolder=subfolder, revision=revision,
                                                              cache_dir=cache_dir)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the scheduler config of '{source}': {str(e).splitlines()[0] if str(e) else e}. "
                            "Without network access pass a local pipeline folder.") from None
    return check_flux_schedule(raw, where)


def check_flux_schedule(raw, where="scheduler config"):
    """The full config (the scheduler class's defaults filled in); refuses, naming the key,
    what the per-row sampler cannot follow. Dynamic shifting is followed (module docstring)."""
    config = dict(FlowMatchEulerDiscreteScheduler.from_config(dict(raw)).config)
    for key, ok in UNSUPPORTED.items():
        if config.get(key, ok) not in (ok, None, False):
            raise UserError(f"{where}: {key}={config[key]!r} is not supported by rpo's per-row flow sampler")
    if not isinstance(config["num_train_timesteps"], int) or config["num_train_timesteps"] < 2:
        raise UserError(f"{where}: num_train_timesteps must be an integer >= 2")
    return config


def shift_factor(config, seq_len):
    """s of σ' = sσ / (1 + (s − 1)σ) for an image of `seq_len` packed tokens: e^μ
    (exponential dynamic shift), μ (linear), or the config's static `shift`."""
    if not config["use_dynamic_shifting"]:
        return float(config["shift"])
    mu = dynamic_shift_mu(config, seq_len)
    if config["time_shift_type"] == "exponential":
        return math.exp(mu)
    if config["time_shift_type"] == "linear":
        return float(mu)
    raise UserError(f"time_shift_type {config['time_shift_type']!r} is not supported")


def base_sigmas(num_steps, batch_size, perturb, generator=None):
    """(batch_size, num_steps) unshifted σ, float64: FluxPipeline's 1 − k/T, or 1 − (k + u_i)/T."""
    k = torch.arange(num_steps, dtype=torch.float64)
    if not perturb:
        return (1 - k / num_steps).repeat(batch_size, 1)
    draw_on = generator.device if generator is not None else "cpu"
    u = torch.rand((batch_size, 1), generator=generator, device=draw_on, dtype=torch.float64).cpu()
    return 1 - (k + u) / num_steps


def flux_timesteps(config, num_steps, batch_size, perturb, seq_len, generator=None, device="cpu"):
    """(batch_size, num_steps) integer timesteps in [1, N], strictly decreasing per row, for an
    image of `seq_len` packed tokens (module docstring)."""
    n = config["num_train_timesteps"]
    if not 1 <= num_steps <= n:
        raise UserError(f"number of inference steps must be between 1 and {n}, got {num_steps}")
    s = shift_factor(config, seq_len)
    sigmas = shift_sigmas(base_sigmas(num_steps, batch_size, perturb, generator), s)
    grid = (sigmas * n).round().clamp(1, n).long()
    if num_steps > 1 and (grid[:, 1:] >= grid[:, :-1]).any():
        raise UserError(f"{num_steps} flow-matching steps do not give distinct integer timesteps on the shifted grid "
                        f"(shift {s:.4g}); use fewer --buffer_num_inference_steps")
    return grid.to(device)


def pipeline_sigmas(config, timesteps, seq_len):
    """The unshifted σ list that makes FluxPipeline (its `sigmas=` argument, shifted by its own μ)
    run exactly the integer grid `timesteps` (T,): for validation images on a buffer's grid,
    and for the row-by-row check against the stock pipeline."""
    shifted = timesteps.double().cpu() / config["num_train_timesteps"]
    return unshift_sigmas(shifted, shift_factor(config, seq_len)).tolist()


def sampler(config):
    """The per-row Euler sampler: flow.py's, unchanged (its step is the same on any latent shape)."""
    return PerRowFlowEuler(config)


# --------------------------------------------------------------------------- the transformer
def flux_velocity(model, x, t, prompt_embeds, pooled, guidance=None):
    """The transformer's velocity on unpacked latents x (B, C, h, w) at integer (or float)
    timesteps t (B,): packs x, builds the image/text position ids, calls the transformer as
    FluxPipeline does, unpacks the output. `guidance` (B,) is the embedded guidance scale of
    FLUX.1-dev (an input, not classifier-free doubling); a model without the guidance
    embedding (schnell) takes none."""
    b, _, h, w = x.shape
    embeds_guidance = bool(model.config.guidance_embeds)
    if embeds_guidance and guidance is None:
        raise ValueError("this FLUX transformer has a guidance embedding (FLUX.1-dev): pass guidance (B,)")
    if not embeds_guidance and guidance is not None:
        raise ValueError("this FLUX transformer has no guidance embedding (FLUX.1-schnell): pass no guidance")
    dtype = x.dtype
    out = model(hidden_states=pack_latents(x), timestep=t.to(x.device, dtype) / TRANSFORMER_TIMESTEP_SCALE,
                guidance=None if guidance is None else guidance.to(x.device, torch.float32),
                pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids(prompt_embeds.shape[1], x.device, dtype), img_ids=image_ids(h, w, x.device, dtype),
                return_dict=False)[0]
    return unpack_latents(out, h, w)


class _Output:
    def __init__(self, sample):
        self.sample = sample


class FluxAsDenoiser:
    """The FLUX transformer behind the UNet call rollouts make
    (`unet(x, t, encoder_hidden_states=..., added_cond_kwargs=...)`, rpo/diffusion/rollout.py),
    so rollouts and truncation are shared. `added_cond_kwargs` carries `pooled_projections`
    (B, P) and, for FLUX.1-dev, `guidance` (B,) — per row, so truncated rollouts slice it
    with the rest. Call rollouts with guidance_scale 1.0: FLUX.1 has no classifier-free pass."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None):
        return _Output(flux_velocity(self.model, x, t, encoder_hidden_states, added_cond_kwargs["pooled_projections"],
                                     added_cond_kwargs.get("guidance")))


def rollout_conditioning(model, pooled, guidance_scale):
    """`added_cond_kwargs` of a rollout batch: the pooled embedding and, when the model embeds
    guidance (dev), `guidance_scale` for every row (stored with the trajectory, so the
    training forward of the policy half sees the guidance its output was made with)."""
    cond = {"pooled_projections": pooled}
    if model.config.guidance_embeds:
        cond["guidance"] = torch.full((pooled.shape[0],), float(guidance_scale), device=pooled.device)
    return cond


# --------------------------------------------------------------------------- training pieces
def sigma_of(t, like, num_train_timesteps):
    return (t.to(like.device, torch.float32) / num_train_timesteps).view(-1, *[1] * (like.dim() - 1))


def add_noise(x0, noise, t, num_train_timesteps):
    """x_σ = (1 − σ) x0 + σ ε, σ = t / N per row (unpacked or packed: elementwise)."""
    s = sigma_of(t, x0, num_train_timesteps)
    return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def velocity_target(x0, noise):
    """The flow-matching target v = ε − x0 (what FluxPipeline's Euler step integrates)."""
    return noise - x0


def training_timesteps(config, batch_size, seq_len, generator=None, device="cpu"):
    """(batch_size,) float timesteps t = N σ' for resample mode: σ logit-normal (σ = sigmoid(u),
    u ~ N(0, 1) from `generator`, float64 on the CPU), then the same resolution-dependent
    shift the sampler uses at this image size (as SD3's family does with its static shift).
    Continuous: nothing is stored in a buffer."""
    u = torch.randn((batch_size,), generator=generator, dtype=torch.float64)
    sigma = shift_sigmas(torch.sigmoid(u), shift_factor(config, seq_len))
    return (sigma * config["num_train_timesteps"]).to(device, torch.float32)
