"""Replay buffer of rollout trajectories (docs/design.md, "Algorithm", steps 1-2).

A trajectory is one rollout of the frozen policy UNet from fresh noise, conditioned on
an expert caption: its caption embedding `prompt_embeds` (L, D), the expert latent
`x0` (C, H, W), and for every sampler step k = 0..T-1 the timestep `t` (long), the UNet
input `x_t` (C, H, W) and the policy's noise prediction `eps` (C, H, W). Extra
conditioning (SDXL: `pooled_embeds`, `time_ids`) is stored per trajectory under its own
name. Each name is one tensor whose first dimension runs over trajectories; pushing
concatenates and keeps the newest `size` rows.

Unlike the paper's code (basiclab/DiffusionDRO; docs/upstream.md, defect 9), the state
round-trips exactly through `torch.save` / `torch.load(weights_only=True)`, so a resumed
run samples from the same trajectories with the same random numbers.
"""

import torch

PER_STEP = ("t", "x_t", "eps")  # indexed by (trajectory, step) when sampling
RESERVED = ("index", "step")  # keys that `sample` adds itself


def _shape(v):
    return tuple(v.shape)


def draw_picks(n, num_steps, batch_size, generator=None):
    """The random part of `ReplayBuffer.sample` over n trajectories of num_steps steps:
    (index, step), each (batch_size,) on the CPU. Index: a uniformly random ordered selection
    without replacement (the first batch_size of a random permutation) when batch_size <= n,
    else uniform with replacement; step: independent and uniform over 0..num_steps-1."""
    if batch_size <= n:
        index = torch.randperm(n, generator=generator)[:batch_size]
    else:
        index = torch.randint(n, (batch_size,), generator=generator)
    return index, torch.randint(num_steps, (batch_size,), generator=generator)


class ReplayBuffer:
    def __init__(self, size: int, device="cpu"):
        if size < 1:
            raise ValueError(f"ReplayBuffer size must be >= 1, got {size}")
        self.size = int(size)
        self.device = torch.device(device)
        self.data = {}  # name -> tensor (N, ...), N <= size, oldest first

    def __len__(self) -> int:
        return len(self.data["t"]) if self.data else 0

    @property
    def num_steps(self) -> int:
        """T, the number of steps per trajectory (0 while the buffer is empty)."""
        return self.data["t"].shape[1] if self.data else 0

    def push(self, *, prompt_embeds, x0, t, x_t, eps, **extras):
        """Add a batch of B trajectories; see the module docstring for the shapes."""
        new = dict(prompt_embeds=prompt_embeds, x0=x0, t=t, x_t=x_t, eps=eps, **extras)
        # Check everything before touching the stored tensors, so a bad push changes nothing.
        for name in RESERVED:
            if name in extras:
                raise ValueError(f"push: extra tensor name {name!r} is reserved for sample()")
        stored_extras = sorted(set(self.data) - {"prompt_embeds", "x0", *PER_STEP})
        if self.data and sorted(extras) != stored_extras:
            raise ValueError(f"push: extra tensors {sorted(extras)} differ from earlier pushes {stored_extras}")
        if t.dim() != 2 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"push: t must be an integer tensor (B, T), got {t.dtype} of shape {_shape(t)}")
        B, T = t.shape
        for name, v in new.items():
            if v.dim() == 0 or v.shape[0] != B:
                raise ValueError(f"push: {name} has shape {_shape(v)} but t has shape {_shape(t)}: "
                                 "batch sizes differ")
        want = (B, T, *x0.shape[1:])
        for name in ("x_t", "eps"):
            if _shape(new[name]) != want:
                raise ValueError(f"push: {name} has shape {_shape(new[name])} but t {_shape(t)} and x0 "
                                 f"{_shape(x0)} require {want}")
        for name, v in new.items():
            if name in self.data and v.shape[1:] != self.data[name].shape[1:]:
                raise ValueError(f"push: {name} has shape {_shape(v)} but the buffer holds {name} of shape "
                                 f"{_shape(self.data[name])}: sizes past the batch dimension differ")
        bad = (t[:, 1:] >= t[:, :-1]).any(dim=1)
        if bad.any():
            row = int(bad.nonzero()[0])
            raise ValueError(f"push: t must strictly decrease along each trajectory; row {row} is {t[row].tolist()}")

        for name, v in new.items():
            old = self.data.get(name)
            v = v.detach().to(self.device, dtype=torch.long if name == "t" else None)
            if old is None:
                old = v[:0]
            # torch.cat always copies: the buffer never aliases the caller's tensors. Later
            # pushes take the dtype of the first, so the store's dtype (and size) never drifts.
            self.data[name] = torch.cat([old, v.to(old.dtype)])[-self.size:]

    def sample(self, batch_size: int, generator=None) -> dict:
        """B (trajectory, step) picks: trajectories without replacement when B <= len(self),
        else with replacement; one independent uniform step per pick."""
        n = len(self)
        if n == 0:
            raise RuntimeError("ReplayBuffer.sample: the buffer is empty; push trajectories first")
        if batch_size < 1:
            raise ValueError(f"ReplayBuffer.sample: batch_size must be >= 1, got {batch_size}")
        index, step = draw_picks(n, self.num_steps, batch_size, generator)
        index, step = index.to(self.device), step.to(self.device)
        out = {name: v[index, step] if name in PER_STEP else v[index] for name, v in self.data.items()}
        out["index"], out["step"] = index, step
        return out

    def clear(self):
        self.data = {}

    def state_dict(self) -> dict:
        # clone: a trimmed row slice shares storage with the untrimmed tensor, and torch.save
        # would write the whole storage.
        return {"size": self.size, "tensors": {name: v.clone() for name, v in self.data.items()}}

    def load_state_dict(self, state):
        """Restore exactly. This buffer keeps its own `size`: loading a state with more
        trajectories than that keeps the newest `self.size` of them."""
        self.data = {}
        if state["tensors"]:
            self.push(**state["tensors"])  # same checks as a push; trims to self.size

    def to(self, device):
        self.device = torch.device(device)
        self.data = {name: v.to(self.device) for name, v in self.data.items()}
        return self
