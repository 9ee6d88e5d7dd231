"""Ranking loss on denoising errors (docs/design.md, "Algorithm", step 3).

The trainable model should denoise expert samples better than the frozen reference, and
its own rollout samples worse, by at least `margin`:
    d = (L_E - Lref_E) - (L_P - Lref_P),   loss = mean(max(d + margin, 0)).
With hinge=False the loss is the smooth logistic counterpart
    margin * softplus((d + margin) / margin),
which is never below the hinge and exceeds it by at most margin * ln 2 (at d = -margin).
"""

import torch.nn.functional as F

STAT_KEYS = ("loss", "diff", "expert", "policy", "expert0", "policy0", "expert_diff", "policy_diff")


def per_sample_mse(pred, target):
    """Mean squared error over all non-batch dimensions, in float32: shape (B,)."""
    if pred.shape != target.shape:
        raise ValueError(f"per_sample_mse: pred has shape {tuple(pred.shape)} but target {tuple(target.shape)}")
    # float32: bf16 rounding of the per-sample error is comparable to the 0.001 margin
    # (docs/upstream.md, defect 3).
    err = (pred.float() - target.float()).square()
    return err.reshape(len(err), -1).mean(dim=1)


def ranking_loss(model_expert, model_policy, ref_expert, ref_policy, margin=0.001, hinge=True):
    """Per-sample errors (B,) of the trainable model and the reference -> (loss, stats).

    Gradients flow only through the model errors; the reference errors are detached here.
    `stats` holds detached float32 scalars under STAT_KEYS, for logging.
    """
    errors = dict(model_expert=model_expert, model_policy=model_policy, ref_expert=ref_expert, ref_policy=ref_policy)
    for name, v in errors.items():
        if v.dim() != 1 or v.shape != model_expert.shape:
            raise ValueError(f"ranking_loss: {name} has shape {tuple(v.shape)}; all four errors must have "
                             f"the same shape (B,), model_expert has {tuple(model_expert.shape)}")
    if not hinge and margin <= 0:
        raise ValueError(f"ranking_loss: the logistic loss (hinge=False) needs margin > 0, got {margin}")
    model_expert, model_policy = model_expert.float(), model_policy.float()
    ref_expert, ref_policy = ref_expert.detach().float(), ref_policy.detach().float()

    expert_diff = model_expert - ref_expert
    policy_diff = model_policy - ref_policy
    d = expert_diff - policy_diff
    if hinge:
        loss = F.relu(d + margin).mean()
    else:
        loss = (margin * F.softplus((d + margin) / margin)).mean()

    values = (loss, d, model_expert, model_policy, ref_expert, ref_policy, expert_diff, policy_diff)
    stats = {key: v.detach().mean() for key, v in zip(STAT_KEYS, values)}
    return loss, stats
