"""`--compile` and `--channels_last` (docs/benchmarks.md, "Training step"): the same models,
run faster where the hardware rewards it; numerics equal eager mode within float rounding
(tests/test_rollout_truncation.py).

Both act in place on the modules, so the parameters the optimizer and the EMA hold, the
state-dict keys the checkpoints write and every wrapper (accelerate, DDP) stay as they are:
`nn.Module.compile` compiles the module's call without wrapping it in an `OptimizedModule`
(whose keys would gain an `_orig_mod.` prefix), and `.to(memory_format=...)` re-lays the
4-D convolution weights in place (checkpoints write `.contiguous()` copies,
rpo/training/checkpoint.py `write_model_folder`).
"""
import torch


def speed_up(models, *, compile=False, channels_last=False):
    """Apply the options to every distinct module in `models` (None entries skipped)."""
    seen = []
    for m in models:
        if m is None or any(m is s for s in seen):
            continue
        seen.append(m)
        if channels_last:
            m.to(memory_format=torch.channels_last)
        if compile:
            m.compile()
    return seen


def unets_of(params):
    """The UNets a parametrisation holds: trainable (also the rollout model when there is no
    lagging copy), reference and rollout copy, where it has them."""
    return [getattr(params, name, None) for name in ("trainable", "reference_model", "rollout_copy")]
