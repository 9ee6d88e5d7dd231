"""rpo/diffusion/preference_loss.py: Diffusion-DPO and Diffusion-KTO against the formulas
written out here another way (softplus for −log σ, σ(−x) for 1 − σ(x), closed-form
gradients, central finite differences), on numbers and on real prediction tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from rpo.diffusion.loss import per_sample_mse
from rpo.diffusion.preference_loss import (DPO_BETA, DPO_STAT_KEYS, KTO_BETA, KTO_STAT_KEYS, dpo_loss, kto_loss,
                                           kto_reference_point)

# four pairs; errors of the order of real ε-MSEs, differences of the order 1e-4 (β = 5000 makes them O(1))
MW = [0.1012, 0.2000, 0.0500, 0.3300]
ML = [0.1100, 0.1990, 0.0600, 0.3300]
RW = [0.1010, 0.2003, 0.0502, 0.3290]
RL = [0.1099, 0.1991, 0.0601, 0.3302]


def leaves(*rows):
    return [torch.tensor(r, dtype=torch.float32, requires_grad=True) for r in rows]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def softplus(x):
    return math.log1p(math.exp(x))


def test_dpo_values_stats_and_gradients_by_hand():
    beta = DPO_BETA
    mw, ml, rw, rl = leaves(MW, ML, RW, RL)
    loss, stats = dpo_loss(mw, ml, rw, rl, beta=beta)
    # −log σ(x) = softplus(−x), x = −β/2·((mw − rw) − (ml − rl)), in float64 by hand
    x = [-beta / 2 * ((a - c) - (b - d)) for a, b, c, d in zip(MW, ML, RW, RL)]
    assert loss.item() == pytest.approx(sum(softplus(-v) for v in x) / 4, rel=2e-3)
    loss.backward()
    # d/dmw softplus(−x) = σ(−x)·β/2 (per pair, over the batch of 4); d/dml the opposite
    assert mw.grad.tolist() == pytest.approx([sigmoid(-v) * beta / 2 / 4 for v in x], rel=2e-3)
    assert ml.grad.tolist() == pytest.approx([-sigmoid(-v) * beta / 2 / 4 for v in x], rel=2e-3)
    assert rw.grad is None and rl.grad is None            # the reference is a constant
    want = {"loss": sum(softplus(-v) for v in x) / 4, "implicit_acc": sum(v > 0 for v in x) / 4,
            "reward_margin": sum(x) / 4, "model_win": sum(MW) / 4, "model_lose": sum(ML) / 4,
            "ref_win": sum(RW) / 4, "ref_lose": sum(RL) / 4,
            "win_diff": sum(a - c for a, c in zip(MW, RW)) / 4, "lose_diff": sum(b - d for b, d in zip(ML, RL)) / 4}
    assert set(stats) == set(want) == set(DPO_STAT_KEYS)
    assert sorted(v > 0 for v in x) == [False, False, True, True]   # the example tests both sides of implicit_acc
    assert min(abs(v) for v in x) > 0.2                             # and float32 rounding cannot flip one
    for key, value in want.items():
        assert stats[key].dim() == 0 and stats[key].dtype == torch.float32 and not stats[key].requires_grad
        assert stats[key].item() == pytest.approx(value, rel=2e-3, abs=1e-6), key


def test_dpo_is_symmetric_in_the_pair_and_log2_at_the_reference():
    """Swapping winner and loser turns softplus(−x) into softplus(x); at model = reference the loss is log 2."""
    mw, ml, rw, rl = (torch.tensor(v) for v in (MW, ML, RW, RL))
    loss, _ = dpo_loss(mw, ml, rw, rl, beta=1000.0)
    swapped, _ = dpo_loss(ml, mw, rl, rw, beta=1000.0)
    x = -500.0 * ((mw - rw) - (ml - rl))
    assert loss.item() == pytest.approx(F.softplus(-x.double()).mean().item(), rel=1e-5)
    assert swapped.item() == pytest.approx(F.softplus(x.double()).mean().item(), rel=1e-5)
    same, stats = dpo_loss(rw, rl, rw, rl)
    assert same.item() == pytest.approx(math.log(2), abs=1e-6) and stats["implicit_acc"].item() == 0.0


def test_dpo_from_prediction_tensors_epsilon_and_velocity_targets():
    """One micro-step's shape: predictions (2B, C, H, W) of model and reference, the pair's
    halves sharing noise and timestep; gradient w.r.t. the model's predictions against a
    finite difference of the formula written with F.mse_loss."""
    g = torch.Generator().manual_seed(0)
    b, shape = 3, (4, 8, 8)
    x0 = torch.randn(2 * b, *shape, generator=g)
    eps = torch.randn(b, *shape, generator=g).repeat(2, 1, 1, 1)        # same ε for winner and loser
    alpha = torch.rand(b, generator=g).repeat(2).view(-1, 1, 1, 1)       # same level for both
    targets = {"epsilon": eps, "v_prediction": alpha.sqrt() * eps - (1 - alpha).sqrt() * x0}
    for name, target in targets.items():
        model = (target + 0.1 * torch.randn(target.shape, generator=g)).double().requires_grad_()
        ref = target + 0.1 * torch.randn(target.shape, generator=g)

        def written_out(pred):
            err = F.mse_loss(pred, target.double(), reduction="none").mean(dim=(1, 2, 3))
            ref_err = F.mse_loss(ref.double(), target.double(), reduction="none").mean(dim=(1, 2, 3))
            w, l = err[:b] - ref_err[:b], err[b:] - ref_err[b:]
            return F.softplus(50.0 * (w - l)).mean()                    # β = 100: −β/2·(…) inside −log σ

        e = per_sample_mse(model, target)
        r = per_sample_mse(ref, target)
        loss, _ = dpo_loss(e[:b], e[b:], r[:b], r[b:], beta=100.0)
        assert loss.item() == pytest.approx(written_out(model.detach()).item(), rel=1e-5), name
        loss.backward()
        # central differences of the written-out formula on three coordinates
        for index in [(0, 0, 0, 0), (b, 1, 2, 3), (2 * b - 1, 3, 7, 7)]:
            h = 1e-6
            plus, minus = model.detach().clone(), model.detach().clone()
            plus[index] += h
            minus[index] -= h
            numeric = (written_out(plus) - written_out(minus)).item() / (2 * h)
            assert model.grad[index].item() == pytest.approx(numeric, rel=1e-3, abs=1e-9), (name, index)


# ---- KTO --------------------------------------------------------------------------------

M = [0.1000, 0.2000, 0.0500, 0.3000, 0.1500]
R = [0.1006, 0.1998, 0.0503, 0.3001, 0.1495]
D = [True, False, True, False, False]


def kto_by_hand(m, r, d, beta, lam_d=1.0, lam_u=1.0, z0=None):
    """The loss, the per-image gradient w.r.t. m (z0 a constant) and z0, in float64."""
    g = [b - a for a, b in zip(m, r)]                 # implicit reward: e_ref − e_θ
    if z0 is None:
        z0 = max(sum(g) / len(g), 0.0)
    loss, grad = 0.0, []
    for gi, di in zip(g, d):
        s, w = (1, lam_d) if di else (-1, lam_u)
        u = s * beta * (gi - z0)
        loss += w * sigmoid(-u) / len(g)              # 1 − σ(u) = σ(−u)
        grad.append(w * s * beta * sigmoid(u) * sigmoid(-u) / len(g))   # d/dm: du/dm = −sβ, dσ(−u)/du = −σ(u)σ(−u)
    return loss, grad, z0


@pytest.mark.parametrize("beta, lam_d, lam_u", [(KTO_BETA, 1.0, 1.0), (3000.0, 1.0, 2.5)])
def test_kto_values_stats_and_gradients_by_hand(beta, lam_d, lam_u):
    m, r = leaves(M, R)
    loss, stats = kto_loss(m, r, torch.tensor(D), beta=beta, lambda_desirable=lam_d, lambda_undesirable=lam_u)
    want_loss, want_grad, z0 = kto_by_hand(M, R, D, beta, lam_d, lam_u)
    assert z0 > 0                                     # the example's reference point is not clamped
    assert loss.item() == pytest.approx(want_loss, rel=2e-3)
    loss.backward()
    assert m.grad.tolist() == pytest.approx(want_grad, rel=5e-3, abs=1e-7)
    assert r.grad is None
    g = [b - a - z0 for a, b in zip(M, R)]
    want = {"loss": want_loss, "reference_point": z0,
            "implicit_acc": sum((gi > 0) == di for gi, di in zip(g, D)) / 5,
            "reward_desirable": (g[0] + g[2]) / 2, "reward_undesirable": (g[1] + g[3] + g[4]) / 3,
            "desirable_fraction": 2 / 5, "model": sum(M) / 5, "ref": sum(R) / 5}
    assert set(stats) == set(want) == set(KTO_STAT_KEYS)
    for key, value in want.items():
        assert stats[key].dim() == 0 and stats[key].dtype == torch.float32 and not stats[key].requires_grad
        assert stats[key].item() == pytest.approx(value, rel=2e-3, abs=2e-7), key


def test_kto_reference_point_clamps_at_zero_and_can_be_given():
    worse = [x + 0.001 for x in R]                     # the model denoises worse than the reference: mean g < 0
    assert kto_reference_point(torch.tensor(worse), torch.tensor(R)).item() == 0.0
    loss, stats = kto_loss(torch.tensor(worse), torch.tensor(R), torch.tensor(D), beta=500.0)
    assert loss.item() == pytest.approx(kto_by_hand(worse, R, D, 500.0)[0], rel=1e-4)
    assert stats["reference_point"].item() == 0.0
    # a reference point from elsewhere (e.g. averaged over ranks) replaces the batch's own
    m = torch.tensor(M, requires_grad=True)
    loss, stats = kto_loss(m, torch.tensor(R), torch.tensor(D), beta=500.0, reference_point=torch.tensor(3e-4))
    want_loss, want_grad, _ = kto_by_hand(M, R, D, 500.0, z0=3e-4)
    loss.backward()
    assert loss.item() == pytest.approx(want_loss, rel=1e-4) and stats["reference_point"].item() == pytest.approx(3e-4)
    assert m.grad.tolist() == pytest.approx(want_grad, rel=2e-3, abs=1e-8)


def test_kto_finite_differences_and_one_label_batches():
    """The reference point is a constant of the gradient (detached), so a finite difference
    of the loss with z0 held fixed equals the autograd gradient; a batch of one label logs
    0 for the other label's reward."""
    m = torch.tensor(M, dtype=torch.float32, requires_grad=True)
    beta = 200.0
    z0 = kto_reference_point(m, torch.tensor(R))
    loss, _ = kto_loss(m, torch.tensor(R), torch.tensor(D), beta=beta)
    loss.backward()
    for i in range(len(M)):
        h = 1e-6
        plus, minus = list(M), list(M)
        plus[i] += h
        minus[i] -= h
        numeric = (kto_by_hand(plus, R, D, beta, z0=z0.item())[0] - kto_by_hand(minus, R, D, beta, z0=z0.item())[0]) / (2 * h)
        assert m.grad[i].item() == pytest.approx(numeric, rel=1e-3, abs=1e-7)
    _, stats = kto_loss(torch.tensor(M), torch.tensor(R), torch.ones(5, dtype=torch.bool))
    assert stats["reward_undesirable"].item() == 0.0 and stats["desirable_fraction"].item() == 1.0


def test_shape_and_label_errors():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="ref_lose has shape"):
        dpo_loss(a, a, a, torch.zeros(4))
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(a.view(3, 1), a.view(3, 1), a.view(3, 1), a.view(3, 1))
    with pytest.raises(ValueError, match="bool"):
        kto_loss(a, a, torch.ones(3))
    with pytest.raises(ValueError, match="desirable has shape"):
        kto_loss(a, a, torch.ones(2, dtype=torch.bool))


def test_kto_from_prediction_tensors_flow_velocity_target():
    """One micro-step's shape for a flow-matching family: target = ε − x0 per image; the
    gradient w.r.t. the model's predictions against a central difference of the formula
    written with F.mse_loss, the reference point held at its value (it is detached)."""
    g = torch.Generator().manual_seed(1)
    b, shape = 4, (4, 6, 6)
    x0, eps = torch.randn(b, *shape, generator=g), torch.randn(b, *shape, generator=g)
    target = (eps - x0).double()
    desirable = torch.tensor([True, False, True, False])
    model = (target + 0.2 * torch.randn(target.shape, generator=g, dtype=torch.float64)).requires_grad_()
    ref = target + 0.2 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    beta = 50.0
    ref_err = F.mse_loss(ref, target, reduction="none").mean(dim=(1, 2, 3))
    z0 = max((ref_err - F.mse_loss(model.detach(), target, reduction="none").mean(dim=(1, 2, 3))).mean().item(), 0.0)

    def written_out(pred):
        reward = ref_err - F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) - z0
        sign = torch.where(desirable, 1.0, -1.0).double()
        return torch.sigmoid(-sign * beta * reward).mean()

    loss, stats = kto_loss(per_sample_mse(model, target), per_sample_mse(ref, target), desirable, beta=beta)
    assert stats["reference_point"].item() == pytest.approx(z0, rel=1e-5, abs=1e-9)
    assert loss.item() == pytest.approx(written_out(model.detach()).item(), rel=1e-5)
    loss.backward()
    for index in [(0, 0, 0, 0), (1, 2, 3, 4), (3, 3, 5, 5)]:
        h = 1e-6
        plus, minus = model.detach().clone(), model.detach().clone()
        plus[index] += h
        minus[index] -= h
        numeric = (written_out(plus) - written_out(minus)).item() / (2 * h)
        assert model.grad[index].item() == pytest.approx(numeric, rel=1e-3, abs=1e-9), index
