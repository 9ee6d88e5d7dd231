"""The flow-matching family (SD3 / SD3.5 transformers) and its per-row Euler sampler
(docs/design.md, "Model families").

Noising at level σ ∈ (0, 1]: x_σ = (1 − σ) x0 + σ ε; the model predicts the velocity
v = ε − x0 (what diffusers' SD3 training script regresses); the sampler integrates
dx/dσ = v from σ = 1 down to 0 with Euler steps x ← x + (σ_{k+1} − σ_k) v̂.

**Timesteps are integers t ∈ [1, N], σ = t / N** (N = num_train_timesteps = 1000). The
replay buffer (rpo/diffusion/buffer.py) stores integer timesteps and round-trips them
exactly; t is also exactly the `timestep` value the transformer is called with (the SD3
pipeline passes σ·1000). t = N is σ = 1, pure noise, where every rollout starts; σ = 0
is never a model input (the clean end of the last step), so 0 is not used. The grid of a
row is the shifted σ (below) rounded to the nearest 1/N: rollouts, the buffer and the
loss all see that same rounded σ, so nothing is inconsistent, only quantised (at 20 steps
adjacent grid points are ≥ 16/1000 apart). Too many steps for distinct integers are
refused.

**Grid.** Base σ per row, then SD3's shift σ' = sσ / (1 + (s − 1)σ) (s = the scheduler
config's `shift`, 3 for SD3). Without perturbation the base is the stock scheduler's own
`set_timesteps(T)` grid. With `--buffer_perturb_timesteps` row i's base is
σ_{i,k} = 1 − (k + u_i) / T, k = 0..T−1, u_i ~ U[0, 1) from the CPU generator: the
continuous counterpart of the UNet's `ratio·k + u_i` offsets (rpo/diffusion/schedulers.py),
every row covering (0, 1] evenly at its own phase.

Given one row, `PerRowFlowEuler` reproduces the stock `FlowMatchEulerDiscreteScheduler`
run on that row alone with `set_timesteps(sigmas=<the row's unshifted σ>)`
(tests/test_sd3.py).
"""
import json
import os

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rpo.cli import UserError
from rpo.diffusion.schedulers import PerSampleScheduler

SAMPLER_NAME = "FlowMatchEuler"  # the only rollout sampler of this family
# Config keys that replace or bend the σ grid in ways the per-row sampler does not follow.
UNSUPPORTED = {"use_dynamic_shifting": False, "invert_sigmas": False, "use_karras_sigmas": False,
               "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False,
               "shift_terminal": None}


def read_flow_schedule(source, *, subfolder="scheduler", revision=None, cache_dir=None):
    """The pipeline's FlowMatchEulerDiscreteScheduler config, checked; refuses what the
    per-row sampler cannot follow, naming the key."""
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
    return check_flow_schedule(raw, where)


def check_flow_schedule(raw, where="scheduler config"):
    config = dict(FlowMatchEulerDiscreteScheduler.from_config(dict(raw)).config)
    for key, ok in UNSUPPORTED.items():
        if config.get(key, ok) not in (ok, None, False):
            raise UserError(f"{where}: {key}={config[key]!r} is not supported by rpo's per-row flow sampler")
    if not isinstance(config["num_train_timesteps"], int) or config["num_train_timesteps"] < 2:
        raise UserError(f"{where}: num_train_timesteps must be an integer >= 2")
    return config


def shift_sigmas(sigma, shift):
    """SD3's timestep shift σ' = sσ / (1 + (s − 1)σ)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_sigmas(sigma, shift):
    """The inverse of `shift_sigmas`: σ = σ' / (s − (s − 1)σ')."""
    return sigma / (shift - (shift - 1) * sigma)


def flow_timesteps(config, num_steps, batch_size, perturb, generator=None, device="cpu"):
    """(batch_size, num_steps) integer timesteps in [1, N], strictly decreasing per row (module docstring)."""
    n, shift = config["num_train_timesteps"], float(config["shift"])
    if not 1 <= num_steps <= n:
        raise UserError(f"number of inference steps must be between 1 and {n}, got {num_steps}")
    if perturb:
        draw_on = generator.device if generator is not None else "cpu"
        u = torch.rand((batch_size, 1), generator=generator, device=draw_on, dtype=torch.float64).cpu()
        base = 1 - (torch.arange(num_steps, dtype=torch.float64) + u) / num_steps
        sigmas = shift_sigmas(base, shift)
    else:
        stock = FlowMatchEulerDiscreteScheduler.from_config(config)
        stock.set_timesteps(num_steps)
        sigmas = stock.sigmas[:-1].double().repeat(batch_size, 1)  # already shifted
    grid = (sigmas * n).round().clamp(1, n).long()
    if num_steps > 1 and (grid[:, 1:] >= grid[:, :-1]).any():
        raise UserError(f"{num_steps} flow-matching steps do not give distinct integer timesteps on the shifted grid "
                        f"(shift {shift}); use fewer --buffer_num_inference_steps")
    return grid.to(device)


class PerRowFlowEuler:
    """Euler on a per-row σ grid: the PerSampleScheduler interface rollouts use
    (set_timesteps, scale_model_input, step, keep_rows, draws_noise)."""

    name = SAMPLER_NAME
    draws_noise = False  # deterministic
    row_state = ("timesteps", "sigmas")

    def __init__(self, config):
        self.config = config
        self.num_train_timesteps = config["num_train_timesteps"]
        self.timesteps = self.sigmas = None

    def set_timesteps(self, timesteps):
        if not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 2 or timesteps.numel() == 0:
            raise ValueError("timesteps must be a non-empty (batch, steps) tensor")
        if timesteps.dtype.is_floating_point or timesteps.dtype == torch.bool:
            raise ValueError(f"timesteps must be integers (σ = t / {self.num_train_timesteps}), got {timesteps.dtype}")
        if int(timesteps.min()) < 1 or int(timesteps.max()) > self.num_train_timesteps:
            raise ValueError(f"timesteps must lie in [1, {self.num_train_timesteps}]")
        if (timesteps[:, 1:] >= timesteps[:, :-1]).any():
            raise ValueError("timesteps must strictly decrease along each row")
        self.timesteps = timesteps
        self.num_inference_steps = timesteps.shape[1]
        sigmas = timesteps.to(torch.float32) / self.num_train_timesteps
        self.sigmas = torch.cat([sigmas, torch.zeros_like(sigmas[:, :1])], dim=1)  # σ = 0 after the last step

    keep_rows = PerSampleScheduler.keep_rows  # the same per-row state trimming (truncated rollouts)

    def scale_model_input(self, sample, k):
        return sample

    def step(self, model_output, k, sample, noise=None, generator=None):
        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        if not 0 <= k < self.num_inference_steps:
            raise ValueError(f"step index must be in 0..{self.num_inference_steps - 1}, got {k}")
        x = sample.float()
        shape = (-1, *[1] * (x.dim() - 1))
        dt = (self.sigmas[:, k + 1] - self.sigmas[:, k]).to(x.device).view(shape)
        return (x + dt * model_output.float()).to(sample.dtype)


class TransformerAsDenoiser:
    """The SD3 transformer behind the UNet call that rollouts make
    (`unet(x, t, encoder_hidden_states=..., added_cond_kwargs=...)`, rpo/diffusion/rollout.py),
    so rollouts, guidance and truncation are shared; the pooled embedding travels in
    `added_cond_kwargs["pooled_projections"]`."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None):
        return self.model(hidden_states=x, timestep=t, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=added_cond_kwargs["pooled_projections"])


class FlowMatchFamily:
    """SD3 / SD3.5: x_σ = (1 − σ) x0 + σ ε, target v = ε − x0, σ = t / N (module docstring)."""

    flow = True
    prediction_type = "flow_velocity"

    def __init__(self, schedule_config):
        self.config = check_flow_schedule(schedule_config)

    @classmethod
    def from_pretrained(cls, source, *, revision=None, cache_dir=None):
        return cls(read_flow_schedule(source, revision=revision, cache_dir=cache_dir))

    @property
    def schedule(self):
        return self.config

    @property
    def num_train_timesteps(self):
        return self.config["num_train_timesteps"]

    @property
    def shift(self):
        return float(self.config["shift"])

    def sigma(self, t, like):
        return (t.to(like.device, torch.float32) / self.num_train_timesteps).view(-1, *[1] * (like.dim() - 1))

    def add_noise(self, x0, noise, t):
        s = self.sigma(t, x0)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def target(self, x0, noise, t):
        return noise - x0

    @staticmethod
    def predict(model, x, t, cond):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                     pooled_projections=cond["pooled_projections"]).sample

    def conditioning(self, sample, repeat=1):
        return {"prompt_embeds": torch.cat([sample["prompt_embeds"]] * repeat),
                "pooled_projections": torch.cat([sample["pooled_embeds"]] * repeat)}

    def training_timesteps(self, batch_size, generator=None, device="cpu"):
        """(batch_size,) float timesteps t = N σ' for `--buffer_mode resample`: σ logit-normal
        (σ = sigmoid(u), u ~ N(0, 1), drawn from `generator`, float64 on the CPU), then SD3's
        shift. Continuous, not the integer grid: nothing is stored in a buffer, and the
        transformer takes any float timestep (the SD3 pipeline passes σ·1000)."""
        u = torch.randn((batch_size,), generator=generator, dtype=torch.float64)
        sigma = shift_sigmas(torch.sigmoid(u), self.shift)
        return (sigma * self.num_train_timesteps).to(device, torch.float32)

    # --- what rollouts ask of a flow family (rpo/families/sd3.py, rpo/training/rollouts.py)
    def rollout_timesteps(self, num_steps, batch_size, perturb, generator=None, device="cpu"):
        return flow_timesteps(self.config, num_steps, batch_size, perturb, generator=generator, device=device)

    def sampler(self):
        return PerRowFlowEuler(self.config)

    def rollout_conditioning(self, pooled, empty_embeds, batch_size):
        """(cond, negative cond, buffer extras) of a rollout batch: the pooled embedding
        conditions the transformer and is stored with each trajectory."""
        cond = {"pooled_projections": pooled}
        neg = None if empty_embeds is None else {"pooled_projections": empty_embeds[1].expand(batch_size, -1)}
        return cond, neg, {"pooled_embeds": pooled}

    @staticmethod
    def denoiser(model):
        return TransformerAsDenoiser(model)
