"""EMA of the trainable parameters, keyed by parameter name.

diffusers' `EMAModel` does the averaging (decay rule min(decay, (1 + s) / (10 + s)) with s
the number of earlier updates, as in its `get_decay`), but it keeps its shadow values as a
list matched to parameters by position. This wrapper records the names at construction and
checks them at every use, so the exported weights (`ckpt-N/ema`) map each value to the
parameter it averages, and a model whose parameters come in another order is refused instead
of being silently scrambled.
"""
import contextlib

import torch
from diffusers.training_utils import EMAModel


class NamedEMA:
    def __init__(self, named_parameters, *, decay=0.9999, offload=False):
        named = list(named_parameters)
        self.names = [name for name, _ in named]
        self.offload = offload
        self.ema = EMAModel([p for _, p in named], decay=decay, foreach=True)
        if offload:
            self.ema.to("cpu")

    def _params(self, named_parameters):
        named = list(named_parameters)
        names = [name for name, _ in named]
        if names != self.names:
            missing = sorted(set(self.names) - set(names))[:3]
            raise ValueError(f"EMA: the parameters differ from those it was built on (e.g. missing {missing})")
        return [p for _, p in named]

    @property
    def num_updates(self):
        return self.ema.optimization_step

    def step(self, named_parameters):
        """One EMA update. An offloaded EMA visits the parameters' device for it; the copy back
        is blocking, so the CPU copy is complete before anything reads or saves it."""
        params = self._params(named_parameters)
        device = params[0].device
        if self.offload and device.type != "cpu":
            self.ema.to(device, non_blocking=True)
            self.ema.step(params)
            self.ema.to("cpu")
        else:
            self.ema.step(params)

    def named_shadows(self):
        """{parameter name: EMA value}: what `ckpt-N/ema` holds for the trained parameters."""
        return dict(zip(self.names, self.ema.shadow_params))

    @contextlib.contextmanager
    def swapped_into(self, named_parameters):
        """The EMA values inside the model for the duration (validation), the trained ones after."""
        params = self._params(named_parameters)
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def state_dict(self):
        return {"names": list(self.names), "ema": self.ema.state_dict()}

    def load_state_dict(self, state, *, device):
        if "names" not in state:  # written before names were recorded: built on the same parameter order
            state = {"names": self.names, "ema": state}
        if state["names"] != self.names or len(state["ema"]["shadow_params"]) != len(self.names):
            raise ValueError("EMA state: its parameters differ from the model's")
        self.ema.load_state_dict(state["ema"])
        self.ema.to("cpu" if self.offload else device)


def mix_into(weights, shadows):
    """`weights` (a full state dict) with the EMA values put in by name; every EMA name must
    be a key of `weights` with the same shape."""
    out = dict(weights)
    for name, value in shadows.items():
        if name not in weights:
            raise KeyError(f"EMA parameter {name!r} is not in the model's state dict")
        if tuple(weights[name].shape) != tuple(value.shape):
            raise ValueError(f"EMA parameter {name!r} has shape {tuple(value.shape)}, the model {tuple(weights[name].shape)}")
        out[name] = value.to(weights[name].dtype) if torch.is_tensor(value) else value
    return out
