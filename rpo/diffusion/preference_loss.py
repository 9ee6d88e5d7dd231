"""Preference losses of the paper's baselines on denoising errors (docs/design.md,
"Preference baselines"): Diffusion-DPO (paired) and Diffusion-KTO (unpaired, labelled).

Pure tensor math, in the convention of `rpo.diffusion.loss.ranking_loss`: the arguments are
per-sample errors (B,) of the trainable model and of the frozen reference — the mean
squared error over C, H, W against the family's own target (ε, v, or flow velocity), as
`per_sample_mse` computes it — and each function returns (loss, stats), stats a dict of
detached float32 scalars for logging. Gradients flow only through the model's errors.

Diffusion-DPO (Wallace et al. 2023; SalesforceAIResearch/DiffusionDPO, train.py): for a
pair noised with the same ε and t,
    inside = −β/2 · [(e_θ(x_w) − e_ref(x_w)) − (e_θ(x_l) − e_ref(x_l))]
    loss   = mean(−log σ(inside))
β default 5000 (`--beta_dpo` default there, and launchers/sd15.sh and sdxl.sh).

Diffusion-KTO (Li et al. 2024; jacklishufan/diffusion-kto, train_kto_sd_v1.5.py, its
defaults --halo sigmoid, --bce_offset none): per image, the implicit reward is
    g = e_ref(x) − e_θ(x)          (−e_θ − (−e_ref): log-likelihood ratio up to weights)
the reference point is z₀ = max(mean over the batch of g, 0), detached, and
    loss = mean(w_y · (1 − σ(s_y · β · (g − z₀)))),
s_y = +1 for a desirable image and −1 for an undesirable one, w_y = λ_D or λ_U
(both 1 by default); β default 1000 (its `--beta_dpo`).
"""
import torch
import torch.nn.functional as F

DPO_BETA = 5000.0   # SalesforceAIResearch/DiffusionDPO train.py `--beta_dpo` default, the SD1.5 and SDXL launchers
KTO_BETA = 1000.0   # jacklishufan/diffusion-kto train_kto_sd_v1.5.py `--beta_dpo` default (exps/example.sh keeps it)

DPO_STAT_KEYS = ("loss", "implicit_acc", "reward_margin", "model_win", "model_lose", "ref_win", "ref_lose",
                 "win_diff", "lose_diff")
KTO_STAT_KEYS = ("loss", "reference_point", "implicit_acc", "reward_desirable", "reward_undesirable",
                 "desirable_fraction", "model", "ref")


def _check(name, errors):
    """All errors one shape (B,) with B ≥ 1: a silent broadcast would pair the wrong samples."""
    first = next(iter(errors.values()))
    for key, v in errors.items():
        if v.dim() != 1 or v.shape != first.shape or len(v) == 0:
            raise ValueError(f"{name}: {key} has shape {tuple(v.shape)}; every error must have the same shape (B,) "
                             f"with B >= 1, {next(iter(errors))} has {tuple(first.shape)}")


def dpo_loss(model_win, model_lose, ref_win, ref_lose, beta=DPO_BETA):
    """Diffusion-DPO on the per-sample errors of the preferred (win) and the other (lose)
    image of each pair, both noised with the same ε and timestep -> (loss, stats).

    stats (DPO_STAT_KEYS): `implicit_acc` the share of pairs whose `inside` term is > 0
    (the model prefers the winner more than the reference does; the official code's
    implicit_acc), `reward_margin` the mean of `inside` (= implicit reward of the winner
    minus that of the loser), the four mean errors, and `win_diff`/`lose_diff` the mean
    model − reference error on each half.
    """
    _check("dpo_loss", dict(model_win=model_win, model_lose=model_lose, ref_win=ref_win, ref_lose=ref_lose))
    model_win, model_lose = model_win.float(), model_lose.float()
    ref_win, ref_lose = ref_win.detach().float(), ref_lose.detach().float()
    win_diff, lose_diff = model_win - ref_win, model_lose - ref_lose
    inside = -0.5 * beta * (win_diff - lose_diff)
    loss = -F.logsigmoid(inside).mean()
    values = (loss, (inside > 0).float(), inside, model_win, model_lose, ref_win, ref_lose, win_diff, lose_diff)
    return loss, {key: v.detach().mean() for key, v in zip(DPO_STAT_KEYS, values)}


def kto_reference_point(model_errors, ref_errors):
    """Diffusion-KTO's reference point z₀: the batch mean of the implicit reward
    e_ref − e_θ, clamped at 0, detached (the official code then averages it over ranks:
    pass that average to `kto_loss` as `reference_point` under several processes)."""
    return (ref_errors.detach().float() - model_errors.detach().float()).mean().clamp(min=0)


def kto_loss(model_errors, ref_errors, desirable, beta=KTO_BETA, lambda_desirable=1.0, lambda_undesirable=1.0,
             reference_point=None):
    """Diffusion-KTO on per-image errors and a bool label per image (True: desirable)
    -> (loss, stats). `reference_point` None: `kto_reference_point` of this batch.

    stats (KTO_STAT_KEYS): `reference_point` z₀; `implicit_acc` the share of images with
    s_y·(g − z₀) > 0; `reward_desirable`/`reward_undesirable` the mean g − z₀ over each
    label (0 when the batch has none, as the official code logs it);
    `desirable_fraction`; `model`/`ref` the mean errors.
    """
    _check("kto_loss", dict(model_errors=model_errors, ref_errors=ref_errors, desirable=desirable))
    if desirable.dtype != torch.bool:
        raise ValueError(f"kto_loss: desirable must be a bool tensor, got {desirable.dtype}")
    model_errors, ref_errors = model_errors.float(), ref_errors.detach().float()
    z0 = kto_reference_point(model_errors, ref_errors) if reference_point is None else \
        torch.as_tensor(reference_point, dtype=torch.float32, device=model_errors.device).detach()
    reward = (ref_errors - model_errors) - z0
    sign = desirable.float() * 2 - 1
    weight = torch.where(desirable, torch.full_like(reward, lambda_desirable),
                         torch.full_like(reward, lambda_undesirable))
    loss = (weight * (1 - torch.sigmoid(sign * beta * reward))).mean()

    def label_mean(mask):
        r = reward.detach()[mask]
        return r.mean() if len(r) else torch.zeros((), device=reward.device)

    values = (loss, z0, (sign * reward > 0).float(), label_mean(desirable), label_mean(~desirable), desirable.float(),
              model_errors, ref_errors)
    return loss, {key: v.detach().float().mean() for key, v in zip(KTO_STAT_KEYS, values)}
