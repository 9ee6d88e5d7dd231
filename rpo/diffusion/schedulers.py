"""Samplers where every trajectory of a batch follows its own timestep grid
(docs/design.md, "Algorithm").

With `--buffer_perturb_timesteps`, trajectory i runs on t_k = ratio*(T-1-k) + u_i with its
own offset u_i ~ U{0..ratio-1} (ratio = num_train_timesteps // T). The paper's code
(basiclab/DiffusionDRO) gets there by looping over samples in Python, gives every sample
the DPM-Solver++ sigmas of sample 0, and cannot run DDIM at all (docs/upstream.md,
"Algorithm", defects 4-5). Here the whole batch steps at once: every noise level is a
(B,) vector gathered from the scheduler's alphas-bar table with that sample's own
timesteps, and the multistep history is a batch tensor, so each row keeps its own.

    grid = make_timesteps("DPMSolver++", pipe.scheduler.config, 20, B, perturb=True, generator=g)
    scheduler = PerSampleScheduler.from_name("DPMSolver++", pipe.scheduler.config)
    scheduler.set_timesteps(grid)
    for k in range(grid.shape[1]):
        eps = unet(scheduler.scale_model_input(x, k), grid[:, k], c).sample
        x = scheduler.step(eps, k, x)

"Previous timestep" of step k is the next entry of the sample's row; after the last step
it is the stock scheduler's final state (alphas-bar 1 for DDPM, `final_alpha_cumprod` for
DDIM, `final_sigmas_type` for DPM-Solver++). Given one row, each class reproduces the stock
diffusers scheduler run on that row alone (tests/test_schedulers.py):
- DDPM: `DDPMScheduler.set_timesteps(timesteps=row)`, whose prev_t is the next custom entry.
- DDIM: stock DDIM rejects custom timesteps and always steps to t - num_train // T. On the
  perturbed grid and on its own "leading" grid that is exactly the next entry of the row,
  so the stock reference is a DDIMScheduler with `set_timesteps(T)` fed the row's
  timesteps. On grids with other spacings ("linspace", "trailing") stock DDIM would jump
  to t - ratio, which is not the next grid point; this class always uses the next point.
- DPM-Solver++: `DPMSolverMultistepScheduler.set_timesteps(timesteps=row)`, including its
  lower-order first and final steps.

Noise levels are computed in float32; `step` returns the dtype of `sample`.
"""
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from rpo.cli import UserError

# Every sampler name rpo knows, in one place. Rollouts need per-sample timesteps, which
# rpo implements for the first three (PerSampleScheduler below); validation and inference
# use the stock diffusers classes of STOCK_SCHEDULERS. "SDXL" is the paper's code's name
# for Euler (EulerDiscrete).
STOCK_SCHEDULERS = {
    "DDPM": DDPMScheduler,
    "DDIM": DDIMScheduler,
    "DPMSolver++": DPMSolverMultistepScheduler,  # algorithm_type="dpmsolver++" is its default
    "Euler": EulerDiscreteScheduler,
    "SDXL": EulerDiscreteScheduler,
}
SCHEDULERS = ("DDPM", "DDIM", "DPMSolver++")  # the rollout (per-sample) samplers


def check_name(name):
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{name}': choose one of {', '.join(SCHEDULERS)}")


def stock_scheduler(name, scheduler_config):
    """The diffusers scheduler called `name`, built from a pipeline's scheduler config."""
    check_name(name)
    if name == "DDPM":
        return DDPMScheduler.from_config(scheduler_config)
    if name == "DDIM":
        return DDIMScheduler.from_config(scheduler_config)
    return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++")


def make_timesteps(name, scheduler_config, num_steps, batch_size, perturb, generator=None, device="cpu"):
    """A (batch_size, num_steps) LongTensor of per-sample timestep grids, each strictly decreasing.

    perturb=True: row i is ratio*(T-1-k) + u_i, k = 0..T-1, with u_i ~ U{0..ratio-1} drawn
    from `generator`. perturb=False: the stock scheduler's own `set_timesteps(num_steps)`
    grid on every row.
    """
    stock = stock_scheduler(name, scheduler_config)
    num_train = stock.config.num_train_timesteps
    if not 1 <= num_steps <= num_train:
        raise UserError(f"number of inference steps must be between 1 and {num_train}, got {num_steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if perturb:
        ratio = num_train // num_steps
        base = ratio * torch.arange(num_steps - 1, -1, -1)
        draw_on = generator.device if generator is not None else "cpu"
        offsets = torch.randint(0, ratio, (batch_size, 1), generator=generator, device=draw_on)
        grid = base + offsets.cpu()
    else:
        stock.set_timesteps(num_steps)
        grid = stock.timesteps.to(torch.int64).repeat(batch_size, 1)
    return grid.to(device)


def check_timesteps(timesteps, num_train_timesteps):
    """Raise ValueError unless `timesteps` is a (B, T) integer tensor, in range, decreasing per row."""
    if not isinstance(timesteps, torch.Tensor):
        raise ValueError(f"timesteps must be a (batch, steps) tensor, got {type(timesteps).__name__}")
    if timesteps.dim() != 2 or timesteps.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 2-D (batch, steps) tensor, got shape {tuple(timesteps.shape)}")
    if timesteps.dtype.is_floating_point or timesteps.dtype.is_complex or timesteps.dtype == torch.bool:
        raise ValueError(f"timesteps must be integers, got dtype {timesteps.dtype}")
    low, high = int(timesteps.min()), int(timesteps.max())
    if low < 0 or high >= num_train_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got values from {low} to {high}")
    rising = (timesteps[:, 1:] >= timesteps[:, :-1]).nonzero()
    if len(rising):
        row, k = rising[0].tolist()
        raise ValueError(f"timesteps must strictly decrease along each row: row {row} has "
                         f"{int(timesteps[row, k])} at step {k} then {int(timesteps[row, k + 1])} at step {k + 1}")


class PerSampleScheduler:
    """Common part: config checks, the per-sample grid, and the (B,) noise-level lookups."""

    name = None  # one of SCHEDULERS, set by each subclass
    draws_noise = False  # whether `step` draws noise from its generator
    row_state = ("timesteps",)  # attributes whose first dimension runs over the batch rows

    @staticmethod
    def from_name(name, scheduler_config):
        check_name(name)
        return {"DDPM": PerSampleDDPM, "DDIM": PerSampleDDIM, "DPMSolver++": PerSampleDPMSolver}[name](scheduler_config)

    def __init__(self, scheduler_config):
        self.stock = stock_scheduler(self.name, scheduler_config)  # config and noise tables
        self.config = self.stock.config
        self.num_train_timesteps = self.config.num_train_timesteps
        self.alphas_cumprod = self.stock.alphas_cumprod.to(torch.float32)
        self.require("prediction_type", ("epsilon", "v_prediction", "sample"))
        self.require("thresholding", (False,))
        self.timesteps = None

    def require(self, key, supported):
        value = self.config.get(key)
        if value not in supported:
            raise UserError(f"scheduler {self.name}: {key}={value!r} is not supported with per-sample timesteps "
                            f"(supported: {', '.join(map(repr, supported))})")

    def set_timesteps(self, timesteps):
        check_timesteps(timesteps, self.num_train_timesteps)
        self.timesteps = timesteps
        self.num_inference_steps = timesteps.shape[1]

    def keep_rows(self, rows):
        """Keep only the batch rows `rows` (indices into the current rows, ascending) of the
        per-row state, so the next `step` takes a batch of len(rows). Each row's update
        depends on its own grid and history alone, so the kept rows continue exactly as
        they would have in the whole batch (tests/test_rollout_truncation.py)."""
        for name in self.row_state:
            value = getattr(self, name, None)
            if value is not None:
                setattr(self, name, value[rows.to(value.device)])

    def scale_model_input(self, sample, k):
        return sample  # none of these three scales the model input

    def check_step(self, k):
        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        if not 0 <= k < self.num_inference_steps:
            raise ValueError(f"step index must be in 0..{self.num_inference_steps - 1}, got {k}")

    def alphas_bar_with_final(self, final):
        """(B, T+1): alphas-bar at each sample's timesteps, then `final` for the state after the last step."""
        alphas_bar = self.alphas_cumprod.to(self.timesteps.device)[self.timesteps]
        return torch.cat([alphas_bar, torch.full_like(alphas_bar[:, :1], float(final))], dim=1)

    @staticmethod
    def column(table, k, like):
        """Column k of a (B, T+1) table, shaped (B, 1, 1, ...) to broadcast against `like`."""
        return table[:, k].to(like.device).view(-1, *[1] * (like.dim() - 1))

    def x0_and_eps(self, model_output, sample, alpha_bar):
        # x_t = sqrt(ab) x0 + sqrt(1-ab) eps  and  v = sqrt(ab) eps - sqrt(1-ab) x0
        if self.config.prediction_type == "epsilon":
            return (sample - (1 - alpha_bar) ** 0.5 * model_output) / alpha_bar ** 0.5, model_output
        if self.config.prediction_type == "v_prediction":
            return (alpha_bar ** 0.5 * sample - (1 - alpha_bar) ** 0.5 * model_output,
                    alpha_bar ** 0.5 * model_output + (1 - alpha_bar) ** 0.5 * sample)
        return model_output, (sample - alpha_bar ** 0.5 * model_output) / (1 - alpha_bar) ** 0.5

    def clip(self, x0):
        if self.config.get("clip_sample", False):
            return x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0


# --- DDPM (Ho et al. 2020, eq. 6-7), ab = alphas-bar, prev = next entry of the row (ab = 1 after the last):
#   alpha = ab_t / ab_prev,  beta = 1 - alpha,  x0 from the model output
#   mean  = sqrt(ab_prev) beta / (1 - ab_t) * x0 + sqrt(alpha) (1 - ab_prev) / (1 - ab_t) * x_t
#   x_prev = mean + std * z,  std^2 = (1 - ab_prev) / (1 - ab_t) * beta ("fixed_small", floored at 1e-20)
#                              or beta ("fixed_large"); no noise where t = 0.
class PerSampleDDPM(PerSampleScheduler):
    name = "DDPM"
    draws_noise = True
    row_state = ("timesteps", "alphas_bar")

    def __init__(self, scheduler_config):
        super().__init__(scheduler_config)
        self.require("variance_type", ("fixed_small", "fixed_large"))

    def set_timesteps(self, timesteps):
        super().set_timesteps(timesteps)
        self.alphas_bar = self.alphas_bar_with_final(1.0)

    def step(self, model_output, k, sample, noise=None, generator=None):
        self.check_step(k)
        x, eps_or_v = sample.float(), model_output.float()
        ab_t, ab_prev = self.column(self.alphas_bar, k, x), self.column(self.alphas_bar, k + 1, x)
        alpha = ab_t / ab_prev
        beta = 1 - alpha
        x0 = self.clip(self.x0_and_eps(eps_or_v, x, ab_t)[0])
        mean = (ab_prev ** 0.5 * beta) / (1 - ab_t) * x0 + alpha ** 0.5 * (1 - ab_prev) / (1 - ab_t) * x
        if self.config.variance_type == "fixed_small":
            variance = torch.clamp((1 - ab_prev) / (1 - ab_t) * beta, min=1e-20)
        else:
            variance = beta
        if noise is None:  # always drawn, even when every t is 0: no host sync to find out
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        noisy = self.column(self.timesteps, k, x) > 0
        return (mean + noisy * variance ** 0.5 * noise.float()).to(sample.dtype)


# --- DDIM with eta = 0 (Song et al. 2021, eq. 12), prev = next entry of the row (final_alpha_cumprod after the last):
#   x_prev = sqrt(ab_prev) * x0 + sqrt(1 - ab_prev) * eps
# x0 is clipped when clip_sample is set; eps stays the model's (diffusers' use_clipped_model_output=False).
class PerSampleDDIM(PerSampleScheduler):
    name = "DDIM"
    row_state = ("timesteps", "alphas_bar")

    def set_timesteps(self, timesteps):
        super().set_timesteps(timesteps)
        self.alphas_bar = self.alphas_bar_with_final(self.stock.final_alpha_cumprod)

    def step(self, model_output, k, sample, noise=None, generator=None):
        self.check_step(k)  # deterministic: noise and generator are not used
        x = sample.float()
        ab_t, ab_prev = self.column(self.alphas_bar, k, x), self.column(self.alphas_bar, k + 1, x)
        x0, eps = self.x0_and_eps(model_output.float(), x, ab_t)
        return (ab_prev ** 0.5 * self.clip(x0) + (1 - ab_prev) ** 0.5 * eps).to(sample.dtype)


# --- DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", eq. 8-9 and Alg. 2), in diffusers' variables:
#   s = sqrt((1 - ab) / ab),  alpha = 1 / sqrt(1 + s^2),  sigma = s * alpha,  lambda = log(alpha) - log(sigma)
#   D = the model's x0 prediction at the current step,  h = lambda_next - lambda_now
#   1st order: x_next = (sigma_next / sigma_now) x - alpha_next (e^-h - 1) D_k
#   2nd order: D1 = (D_k - D_{k-1}) / r,  r = (lambda_now - lambda_prev) / h,
#              midpoint: x_next = 1st order - 0.5 alpha_next (e^-h - 1) D1
#              heun:     x_next = 1st order + alpha_next ((e^-h - 1) / h + 1) D1
# After the last step s = 0 (final_sigmas_type "zero") or s at t = 0 ("sigma_min"). As in diffusers,
# the first step is 1st order, and so is the last when it ends at s = 0, with euler_at_final, or
# with lower_order_final and fewer than 15 steps. Every row steps at the same k, so the order is
# shared; the noise levels and the history D_{k-1} are per row.
class PerSampleDPMSolver(PerSampleScheduler):
    name = "DPMSolver++"
    row_state = ("timesteps", "alpha", "sigma", "lam", "previous_x0")

    def __init__(self, scheduler_config):
        super().__init__(scheduler_config)
        self.require("solver_order", (1, 2))
        self.require("solver_type", ("midpoint", "heun"))
        self.require("final_sigmas_type", ("zero", "sigma_min"))
        self.require("variance_type", (None,))
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                    "use_flow_sigmas"):  # these replace the timestep grid; diffusers rejects them with custom timesteps
            self.require(key, (False, None))

    def set_timesteps(self, timesteps):
        super().set_timesteps(timesteps)
        ab = self.alphas_cumprod[0]
        final = 0.0 if self.config.final_sigmas_type == "zero" else float(((1 - ab) / ab) ** 0.5)
        alphas_bar = self.alphas_bar_with_final(1.0)
        s = ((1 - alphas_bar) / alphas_bar) ** 0.5
        s[:, -1] = final
        self.alpha = 1 / ((s ** 2 + 1) ** 0.5)
        self.sigma = s * self.alpha
        self.lam = torch.log(self.alpha) - torch.log(self.sigma)  # +inf after the last step when s = 0
        self.previous_x0 = None
        self.next_k = 0

    def step(self, model_output, k, sample, noise=None, generator=None):
        self.check_step(k)  # deterministic: noise and generator are not used
        if k == 0:
            self.previous_x0 = None  # a new trajectory on the same grid
        elif k != self.next_k:
            raise ValueError(f"DPMSolver++ is multistep: call step with k = {self.next_k} next, got {k}")
        x, m = sample.float(), model_output.float()
        alpha_now, alpha_next = self.column(self.alpha, k, x), self.column(self.alpha, k + 1, x)
        sigma_now, sigma_next = self.column(self.sigma, k, x), self.column(self.sigma, k + 1, x)
        lam_now, lam_next = self.column(self.lam, k, x), self.column(self.lam, k + 1, x)
        if self.config.prediction_type == "epsilon":  # with DPM's own alpha, sigma (as diffusers computes them)
            x0 = (x - sigma_now * m) / alpha_now
        elif self.config.prediction_type == "v_prediction":
            x0 = alpha_now * x - sigma_now * m
        else:
            x0 = m

        T = self.num_inference_steps
        last_first_order = k == T - 1 and (self.config.euler_at_final or self.config.final_sigmas_type == "zero"
                                           or (self.config.lower_order_final and T < 15))
        h = lam_next - lam_now
        x_next = (sigma_next / sigma_now) * x - (alpha_next * (torch.exp(-h) - 1.0)) * x0
        if self.config.solver_order == 2 and self.previous_x0 is not None and not last_first_order:
            r = (lam_now - self.column(self.lam, k - 1, x)) / h
            d1 = (1.0 / r) * (x0 - self.previous_x0)
            if self.config.solver_type == "midpoint":
                x_next = x_next - 0.5 * (alpha_next * (torch.exp(-h) - 1.0)) * d1
            else:
                x_next = x_next + (alpha_next * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
        self.previous_x0 = x0
        self.next_k = k + 1
        return x_next.to(sample.dtype)
