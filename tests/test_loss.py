import math

import pytest
import torch

from rpo.diffusion.loss import per_sample_mse, ranking_loss

# A batch of three, worked out by hand:
#   expert_diff = L_E - Lref_E = [-0.02, 0.05, 0.00]
#   policy_diff = L_P - Lref_P = [ 0.02, -0.05, 0.05]
#   d = expert_diff - policy_diff = [-0.04, 0.10, -0.05]
L_E = [0.10, 0.20, 0.30]
L_P = [0.40, 0.10, 0.25]
REF_E = [0.12, 0.15, 0.30]
REF_P = [0.38, 0.15, 0.20]
D = [-0.04, 0.10, -0.05]


def leaves(*rows):
    return [torch.tensor(r, dtype=torch.float32, requires_grad=True) for r in rows]


def test_hinge_numbers_and_per_sample_gradient():
    # margin 0.001: d + m = [-0.039, 0.101, -0.049] -> only sample 1 is active; loss = 0.101 / 3
    le, lp, re, rp = leaves(L_E, L_P, REF_E, REF_P)
    loss, _ = ranking_loss(le, lp, re, rp, margin=0.001)
    assert loss.item() == pytest.approx(0.101 / 3, abs=1e-7)
    loss.backward()
    assert le.grad.tolist() == pytest.approx([0.0, 1 / 3, 0.0], abs=1e-7)
    assert lp.grad.tolist() == pytest.approx([0.0, -1 / 3, 0.0], abs=1e-7)
    assert re.grad is None and rp.grad is None  # reference errors are detached inside

    # margin 0.06: d + m = [0.02, 0.16, 0.01], all active; loss = 0.19 / 3
    loss, _ = ranking_loss(*leaves(L_E, L_P, REF_E, REF_P), margin=0.06)
    assert loss.item() == pytest.approx(0.19 / 3, abs=1e-7)


def test_stats_values_keys_and_types():
    le, lp, re, rp = leaves(L_E, L_P, REF_E, REF_P)
    loss, stats = ranking_loss(le, lp, re, rp, margin=0.001)
    want = {
        "loss": 0.101 / 3,
        "diff": (-0.04 + 0.10 - 0.05) / 3,
        "expert": (0.10 + 0.20 + 0.30) / 3,
        "policy": (0.40 + 0.10 + 0.25) / 3,
        "expert0": (0.12 + 0.15 + 0.30) / 3,
        "policy0": (0.38 + 0.15 + 0.20) / 3,
        "expert_diff": (-0.02 + 0.05 + 0.00) / 3,
        "policy_diff": (0.02 - 0.05 + 0.05) / 3,
    }
    assert set(stats) == set(want)
    for key, value in want.items():
        s = stats[key]
        assert s.dim() == 0 and s.dtype == torch.float32 and not s.requires_grad, key
        assert s.item() == pytest.approx(value, abs=1e-7), key


def test_logistic_numbers_and_gradient():
    m = 0.06
    le, lp, re, rp = leaves(L_E, L_P, REF_E, REF_P)
    loss, stats = ranking_loss(le, lp, re, rp, margin=m, hinge=False)
    z = [(d + m) / m for d in D]
    want = sum(m * math.log1p(math.exp(x)) for x in z) / 3
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert stats["loss"].item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    # d/dL_E of m * softplus((d + m) / m) / B = sigmoid((d + m) / m) / B, and minus that for L_P
    sig = [1 / (1 + math.exp(-x)) / 3 for x in z]
    assert le.grad.tolist() == pytest.approx(sig, rel=1e-6)
    assert lp.grad.tolist() == pytest.approx([-s for s in sig], rel=1e-6)
    assert re.grad is None and rp.grad is None


def test_good_model_has_zero_hinge_loss_and_zero_gradient():
    # Better than the reference on experts and worse on its own samples, each by 0.01:
    # d = -0.02 < -margin.
    le, lp = leaves([0.09, 0.19], [0.31, 0.41])
    loss, _ = ranking_loss(le, lp, torch.tensor([0.10, 0.20]), torch.tensor([0.30, 0.40]))
    assert loss.item() == 0.0
    loss.backward()
    assert le.grad.abs().max().item() == 0.0 and lp.grad.abs().max().item() == 0.0


def test_bad_model_gradient_step_lowers_expert_error_and_raises_policy_error():
    ref_e, ref_p = torch.tensor([0.10, 0.20]), torch.tensor([0.30, 0.40])
    # Opposite: worse on experts, better on its own samples -> d = +0.02.
    le, lp = leaves([0.11, 0.21], [0.29, 0.39])
    loss, _ = ranking_loss(le, lp, ref_e, ref_p)
    assert loss.item() == pytest.approx(0.021, abs=1e-7)
    loss.backward()
    with torch.no_grad():
        new_le, new_lp = le - 0.1 * le.grad, lp - 0.1 * lp.grad  # one gradient-descent step
    assert (new_le < le).all() and (new_lp > lp).all()
    assert ranking_loss(new_le, new_lp, ref_e, ref_p)[0].item() < loss.item()


def test_gradient_flows_through_per_sample_mse_into_model_not_reference():
    torch.manual_seed(0)
    target_e, target_p = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x = torch.randn(2, 3, 4, 4)
    scale = torch.tensor(0.5, requires_grad=True)  # a one-parameter "model"
    ref_scale = torch.tensor(0.5, requires_grad=True)  # caller forgot to detach / no_grad
    loss, _ = ranking_loss(
        per_sample_mse(scale * x, target_e), per_sample_mse(scale * x, target_p),
        per_sample_mse(ref_scale * x, target_e), per_sample_mse(ref_scale * x, target_p), margin=1.0)
    loss.backward()
    assert scale.grad is not None and scale.grad.item() != 0.0
    assert ref_scale.grad is None


def test_logistic_tends_to_hinge_and_stays_smooth():
    d = torch.tensor([-0.3, -0.05, 0.02, 0.2])
    zero = torch.zeros(4)
    gaps = []
    for m in (1e-1, 1e-2, 1e-3, 1e-4):
        hinge, _ = ranking_loss(d, zero, zero, zero, margin=m)
        smooth, _ = ranking_loss(d, zero, zero, zero, margin=m, hinge=False)
        gap = smooth.item() - hinge.item()
        # softplus(x) - relu(x) = log(1 + exp(-|x|)) lies in (0, ln 2]
        assert -1e-7 <= gap <= m * math.log(2) + 1e-7
        gaps.append(gap)
    # shrinking (up to float32 rounding of the losses), from about 1e-2 down to nothing
    assert all(later <= earlier + 1e-7 for earlier, later in zip(gaps, gaps[1:]))
    assert gaps[0] > 1e-3 and gaps[-1] < 1e-6

    # Where the hinge is flat (d + m < 0) the logistic form still has a gradient.
    le = torch.tensor([-0.02], requires_grad=True)
    hinge, _ = ranking_loss(le, torch.zeros(1), torch.zeros(1), torch.zeros(1), margin=0.01)
    assert hinge.item() == 0.0
    smooth, _ = ranking_loss(le, torch.zeros(1), torch.zeros(1), torch.zeros(1), margin=0.01, hinge=False)
    smooth.backward()
    assert le.grad.item() == pytest.approx(1 / (1 + math.exp(1.0)), rel=1e-5)  # sigmoid(-1)


def test_logistic_rejects_non_positive_margin():
    e = torch.zeros(2)
    for margin in (0.0, -0.001):
        with pytest.raises(ValueError, match="margin"):
            ranking_loss(e, e, e, e, margin=margin, hinge=False)


def test_ranking_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="ref_policy"):
        ranking_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(2))


def test_per_sample_mse_against_manual_sum():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 2, 3, 4, generator=g), torch.randn(3, 2, 3, 4, generator=g)
    got = per_sample_mse(pred, target)
    assert got.shape == (3,) and got.dtype == torch.float32
    for b in range(3):
        p, q = pred[b].flatten().tolist(), target[b].flatten().tolist()
        manual = sum((x - y) ** 2 for x, y in zip(p, q)) / len(p)
        assert got[b].item() == pytest.approx(manual, rel=1e-5)


def test_per_sample_mse_computes_low_precision_inputs_in_float32():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    target = (pred.float() + 1e-3 * torch.randn(2, 4, 8, 8, generator=g)).bfloat16()
    got = per_sample_mse(pred, target)
    assert got.dtype == torch.float32
    want = ((pred.double() - target.double()) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(got.double(), want, rtol=1e-5)


def test_per_sample_mse_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        per_sample_mse(torch.zeros(2, 3), torch.zeros(2, 4))
