import math

import pytest
import torch

from rpo.diffusion.buffer import ReplayBuffer

C, H, W, L, D = 2, 3, 3, 4, 5


def batch(ids, T=4, extras=False):
    """Trajectories whose contents encode their id: x0 and prompt_embeds are filled with
    the id, x_t[k] with 100*id + k, eps[k] with -(100*id + k), t[k] = 50*(T-1-k) + id % 50."""
    ids = torch.tensor(ids, dtype=torch.float32)
    B = len(ids)
    k = torch.arange(T, dtype=torch.float32)
    code = (100 * ids[:, None] + k[None, :])[:, :, None, None, None].expand(B, T, C, H, W)
    out = dict(
        prompt_embeds=ids[:, None, None].expand(B, L, D).clone(),
        x0=ids[:, None, None, None].expand(B, C, H, W).clone(),
        t=(50 * (T - 1 - torch.arange(T))[None, :] + ids.long()[:, None] % 50),
        x_t=code.clone(),
        eps=-code,
    )
    if extras:  # SDXL conditioning
        out["pooled_embeds"] = ids[:, None].expand(B, 1280).clone()
        out["time_ids"] = ids[:, None].expand(B, 6).clone() + torch.arange(6.0)
    return out


def stored_ids(buf):
    return buf.data["x0"][:, 0, 0, 0].long().tolist()


def check_sample(buf, s, extras=False):
    """Every pick in `s` is exactly the stored (trajectory, step) it names."""
    T = buf.num_steps
    ids = stored_ids(buf)
    for i, (index, step) in enumerate(zip(s["index"].tolist(), s["step"].tolist())):
        tid = ids[index]
        assert 0 <= step < T
        assert (s["x_t"][i] == 100 * tid + step).all() and (s["eps"][i] == -(100 * tid + step)).all()
        assert s["t"][i].item() == 50 * (T - 1 - step) + tid % 50
        assert (s["x0"][i] == tid).all() and (s["prompt_embeds"][i] == tid).all()
        if extras:
            assert (s["pooled_embeds"][i] == tid).all()
            assert s["time_ids"][i].tolist() == [tid + j for j in range(6)]


def test_push_keeps_the_newest_trajectories():
    buf = ReplayBuffer(5)
    assert len(buf) == 0 and buf.num_steps == 0
    buf.push(**batch([0, 1, 2]))
    assert stored_ids(buf) == [0, 1, 2]
    buf.push(**batch([3, 4, 5, 6]))
    assert stored_ids(buf) == [2, 3, 4, 5, 6]
    buf.push(**batch([7, 8]))
    assert stored_ids(buf) == [4, 5, 6, 7, 8] and len(buf) == 5 and buf.num_steps == 4
    for name in ("prompt_embeds", "x_t", "eps", "t"):  # every key trimmed alike
        assert len(buf.data[name]) == 5
    assert buf.data["t"].dtype == torch.long
    assert buf.data["x_t"][:, 2, 0, 0, 0].tolist() == [402, 502, 602, 702, 802]

    small = ReplayBuffer(2)
    small.push(**batch([0, 1, 2, 3, 4]))  # one push larger than the buffer
    assert stored_ids(small) == [3, 4]


def test_push_copies_instead_of_aliasing():
    b = batch([0, 1])
    buf = ReplayBuffer(4)
    buf.push(**b)
    b["x0"].fill_(9)
    assert stored_ids(buf) == [0, 1]


def test_sample_returns_the_stored_step_without_duplicates():
    buf = ReplayBuffer(6)
    buf.push(**batch([10, 11, 12]))
    buf.push(**batch([13, 14, 15]))
    g = torch.Generator().manual_seed(0)
    for batch_size in (1, 4, 6):
        for _ in range(20):
            s = buf.sample(batch_size, generator=g)
            assert s["t"].shape == (batch_size,) and s["t"].dtype == torch.long
            assert s["x_t"].shape == s["eps"].shape == s["x0"].shape == (batch_size, C, H, W)
            assert s["prompt_embeds"].shape == (batch_size, L, D)
            assert len(set(s["index"].tolist())) == batch_size  # without replacement
            check_sample(buf, s)


def test_sample_with_replacement_when_batch_exceeds_buffer():
    buf = ReplayBuffer(3)
    buf.push(**batch([0, 1, 2]))
    s = buf.sample(50, generator=torch.Generator().manual_seed(0))
    index = s["index"].tolist()
    assert len(index) == 50 and set(index) == {0, 1, 2}  # repeats, every trajectory drawn
    check_sample(buf, s)


def chi_square_critical(dof, z):
    """Upper quantile of the chi-square distribution by the Wilson-Hilferty approximation:
    (X / k)^(1/3) is close to normal with mean 1 - 2/(9k) and variance 2/(9k). With k = 19
    and z = 3.0902 (normal 0.999 quantile) it gives 43.95; tables give 43.82 for p = 0.001."""
    v = 2 / (9 * dof)
    return dof * (1 - v + z * math.sqrt(v)) ** 3


@pytest.mark.parametrize("batch_size", [3, 12])  # randperm subset / randint with replacement
def test_sampling_is_uniform_over_trajectory_and_step(batch_size):
    n, T = 5, 4
    buf = ReplayBuffer(n)
    buf.push(**batch(list(range(n)), T=T))
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(n, T)
    calls = 24000 // batch_size
    for _ in range(calls):
        s = buf.sample(batch_size, generator=g)
        counts.index_put_((s["index"], s["step"]), torch.ones(batch_size), accumulate=True)
    expected = calls * batch_size / (n * T)  # 1200 per cell
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # Without replacement the picks within a call are negatively correlated, which only
    # lowers the statistic, so the test stays conservative. Seeded, hence deterministic;
    # a sampler that picked one step 10% more often (0.275 vs 0.25) would score about 80.
    assert chi2 < chi_square_critical(n * T - 1, 3.0902), (chi2, counts)
    assert abs(chi_square_critical(19, 3.0902) - 43.82) < 0.2


def test_sampling_is_deterministic_with_a_seeded_generator():
    buf = ReplayBuffer(8)
    buf.push(**batch(list(range(8))))
    a = [buf.sample(5, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    for key in a[0]:
        assert torch.equal(a[0][key], a[1][key]), key
    other = buf.sample(5, generator=torch.Generator().manual_seed(8))
    assert not (torch.equal(a[0]["index"], other["index"]) and torch.equal(a[0]["step"], other["step"]))
    torch.manual_seed(3)
    x = buf.sample(5)
    torch.manual_seed(3)
    y = buf.sample(5)
    assert torch.equal(x["index"], y["index"]) and torch.equal(x["step"], y["step"])


def test_sample_from_empty_buffer_raises():
    with pytest.raises(RuntimeError, match="empty"):
        ReplayBuffer(3).sample(2)


def test_size_must_be_positive():
    with pytest.raises(ValueError, match="size"):
        ReplayBuffer(0)


@pytest.mark.parametrize("extras", [False, True])
def test_state_dict_round_trip_through_torch_save(tmp_path, extras):
    buf = ReplayBuffer(4)
    buf.push(**batch([0, 1, 2], extras=extras))
    buf.push(**batch([3, 4], extras=extras))  # trimmed: [1, 2, 3, 4]
    path = tmp_path / "buffer.pt"
    torch.save(buf.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["size"] == 4
    for v in state["tensors"].values():  # only the kept rows were saved, not trimmed storage
        assert len(v) == 4 and v.untyped_storage().nbytes() == v.numel() * v.element_size()

    restored = ReplayBuffer(4)
    restored.load_state_dict(state)
    assert len(restored) == 4 and restored.num_steps == 4
    assert set(restored.data) == set(buf.data)
    for name, v in buf.data.items():
        assert restored.data[name].dtype == v.dtype and torch.equal(restored.data[name], v), name

    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        a, b = buf.sample(3, generator=ga), restored.sample(3, generator=gb)
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key
        check_sample(restored, b, extras=extras)

    # Both go on identically after the restore.
    buf.push(**batch([5], extras=extras))
    restored.push(**batch([5], extras=extras))
    assert stored_ids(restored) == stored_ids(buf) == [2, 3, 4, 5]


def test_load_into_smaller_buffer_keeps_newest_and_empty_round_trip(tmp_path):
    buf = ReplayBuffer(5)
    buf.push(**batch([0, 1, 2, 3, 4]))
    small = ReplayBuffer(2)
    small.load_state_dict(buf.state_dict())
    assert stored_ids(small) == [3, 4] and small.size == 2

    torch.save(ReplayBuffer(3).state_dict(), tmp_path / "empty.pt")
    small.load_state_dict(torch.load(tmp_path / "empty.pt", weights_only=True))
    assert len(small) == 0


def test_extras_are_stored_and_sampled():
    buf = ReplayBuffer(4)
    buf.push(**batch([0, 1, 2], extras=True))
    s = buf.sample(3, generator=torch.Generator().manual_seed(0))
    assert s["pooled_embeds"].shape == (3, 1280) and s["time_ids"].shape == (3, 6)
    check_sample(buf, s, extras=True)


def bad_cases():
    def edit(fn, extras=False):
        b = batch([0, 1], T=4, extras=extras)
        fn(b)
        return b

    def t_not_decreasing(b):
        b["t"][1, 2] = b["t"][1, 1]

    return {
        "x0 batch": ("x0", edit(lambda b: b.update(x0=b["x0"][:1]))),
        "prompt batch": ("prompt_embeds", edit(lambda b: b.update(prompt_embeds=b["prompt_embeds"][:1]))),
        "extra batch": ("pooled_embeds", edit(lambda b: b.update(pooled_embeds=b["pooled_embeds"][:1]), extras=True)),
        "t steps": ("x_t", edit(lambda b: b.update(t=torch.cat([b["t"] + 1, b["t"][:, -1:]], dim=1)))),
        "x_t steps": ("x_t", edit(lambda b: b.update(x_t=b["x_t"][:, :3]))),
        "eps steps": ("eps", edit(lambda b: b.update(eps=b["eps"][:, :3]))),
        "eps latent": ("eps", edit(lambda b: b.update(eps=b["eps"][..., :2]))),
        "x0 latent": ("x_t", edit(lambda b: b.update(x0=b["x0"][:, :1]))),
        "t float": ("t", edit(lambda b: b.update(t=b["t"].float()))),
        "t 1-D": ("t", edit(lambda b: b.update(t=b["t"][:, 0]))),
        "t order": ("t", edit(t_not_decreasing)),
        "reserved name": ("index", edit(lambda b: b.update(index=torch.zeros(2)))),
    }


@pytest.mark.parametrize("case", list(bad_cases()))
def test_push_rejects_bad_shapes_naming_the_tensor(case):
    name, b = bad_cases()[case]
    buf = ReplayBuffer(4)
    with pytest.raises(ValueError, match=name):
        buf.push(**b)
    assert len(buf) == 0 and buf.data == {}  # nothing stored by a failed push


@pytest.mark.parametrize("name,change,extras", [
    ("prompt_embeds", lambda b: b.update(prompt_embeds=b["prompt_embeds"][:, :2]), False),
    ("x0", lambda b: [b.update({k: b[k][..., :2]}) for k in ("x0", "x_t", "eps")], False),
    ("t", lambda b: [b.update({k: b[k][:, :3]}) for k in ("t", "x_t", "eps")], False),
    ("time_ids", lambda b: b.update(time_ids=b["time_ids"][:, :5]), True),
    ("pooled_embeds", lambda b: b.pop("pooled_embeds"), True),  # extras keys changed
    ("new_cond", lambda b: b.update(new_cond=torch.zeros(2, 3)), False),
])
def test_push_rejects_mismatch_with_stored_contents(name, change, extras):
    buf = ReplayBuffer(4)
    buf.push(**batch([0, 1], extras=extras))
    before = {k: v.clone() for k, v in buf.data.items()}
    b = batch([2, 3], extras=extras)
    change(b)
    with pytest.raises(ValueError, match=name):
        buf.push(**b)
    assert set(buf.data) == set(before) and all(torch.equal(buf.data[k], before[k]) for k in before)


def test_shape_mismatch_message_names_both_shapes():
    b = batch([0, 1])
    b["eps"] = b["eps"][:, :, :1]
    with pytest.raises(ValueError, match=r"eps has shape \(2, 4, 1, 3, 3\).*\(2, 4, 2, 3, 3\)"):
        ReplayBuffer(4).push(**b)


def test_tensors_live_on_the_buffer_device():
    # The meta device stands in for a GPU here: pushes and samples stay on it, no host copy.
    buf = ReplayBuffer(4, device="meta")
    buf.push(**batch([0, 1, 2]))
    assert all(v.device.type == "meta" for v in buf.data.values())
    s = buf.sample(2, generator=torch.Generator().manual_seed(0))
    assert all(v.device.type == "meta" for v in s.values())
    cpu = ReplayBuffer(4)
    cpu.push(**batch([0, 1, 2]))
    assert cpu.to("meta") is cpu and all(v.device.type == "meta" for v in cpu.data.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_buffer_keeps_tensors_on_the_gpu():
    buf = ReplayBuffer(4, device="cuda")
    buf.push(**{k: v.cuda() for k, v in batch([0, 1, 2]).items()})
    s = buf.sample(2, generator=torch.Generator().manual_seed(0))
    assert all(v.is_cuda for v in s.values())
    check_sample(buf.to("cpu"), {k: v.cpu() for k, v in s.items()})
