"""What trains, what the reference is, what rolls out, and how the trained weights are saved
(docs/design.md, "Model families": full fine-tuning or LoRA).

`FullFineTune` is the paper's setting: a trainable copy of the model, a frozen reference copy
(the pretrained weights), and a frozen rollout copy only when the rollout model lags behind
the trainable one. When the rollout model is refreshed right after every optimizer update
(`--gradient_accumulation_steps` a multiple of `--buffer_update_steps`, the paper's 16/16) it
always equals the trainable weights, so rollouts use the trainable model itself and the
paper's third full UNet is not needed.

A LoRA parametrisation implements the same methods on one base model: its reference is the
base with the adapters disabled, its lagging rollout model a second frozen adapter.
"""
import contextlib

from rpo.training.checkpoint import write_model_folder
from rpo.training.ema import mix_into


class FullFineTune:
    kind = "full"

    def __init__(self, *, trainable, reference, rollout=None):
        self.trainable = trainable    # the unwrapped trainable module
        self.reference_model = reference
        self.rollout_copy = rollout   # None: rollouts use the trainable model

    def named_trainable(self):
        """(name, parameter) of what the optimizer and the EMA see, in a fixed order."""
        return [(n, p) for n, p in self.trainable.named_parameters() if p.requires_grad]

    def reference(self):
        """Context manager yielding the frozen reference model."""
        return contextlib.nullcontext(self.reference_model)

    @property
    def rollout_model(self):
        return self.trainable if self.rollout_copy is None else self.rollout_copy

    def refresh_rollout(self):
        if self.rollout_copy is not None:
            self.rollout_copy.load_state_dict(self.trainable.state_dict())

    def rollout_state(self):
        """The lagging rollout weights (for an exact resume), or None when there is no copy."""
        return None if self.rollout_copy is None else self.rollout_copy.state_dict()

    def load_rollout_state(self, state_dict):
        if self.rollout_copy is not None:
            self.rollout_copy.load_state_dict(state_dict if state_dict is not None else self.trainable.state_dict())

    def save_weights(self, path, *, weights, ema_shadows=None):
        """A model folder at `path`: `weights` (the full, gathered state dict), with the EMA
        values put in by name when `ema_shadows` is given."""
        state = mix_into(weights, ema_shadows) if ema_shadows is not None else weights
        write_model_folder(path, model=self.trainable, state_dict=state)
