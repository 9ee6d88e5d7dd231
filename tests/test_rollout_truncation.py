"""Truncated rollouts (README, "Truncated rollouts"; rpo/diffusion/rollout.py `truncated_rollout`,
rpo/training/rollouts.py `Refiller.truncated_refill`): the same (t_k, x_{t_k}, eps_k) as the full
rollout at the sampled step, the same joint law of (trajectory, k) as full rollouts + buffer
sampling, fewer UNet rows, and an exact resume."""
import contextlib
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from rpo.diffusion.rollout import rollout, truncated_rollout
from rpo.diffusion.schedulers import SCHEDULERS, PerSampleScheduler, make_timesteps
from rpo.training.state import TrainState
from rpo.families import SD15
from rpo.training.rollouts import Refiller, RolloutSettings, truncation_applies
from rpo.training.sources import ReplayPairs
from test_buffer import chi_square_critical

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RowWise(torch.nn.Module):
    """The UNet run one row at a time. A batched CPU convolution/matmul rounds differently
    for different batch sizes (~5e-7 here), so bit-equality between a 5-row and a 2-row pass
    can only be asked of a model whose rows do not see each other's batch size; the
    truncation logic (scheduler rows, recording, noise) is then checked bit for bit."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config = unet, unet.config

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None):
        rows = [self.unet(x[i:i + 1], t[i:i + 1], encoder_hidden_states=encoder_hidden_states[i:i + 1]).sample
                for i in range(len(x))]
        return SimpleNamespace(sample=torch.cat(rows))


@pytest.fixture(scope="module")
def tiny_unet(kit):
    return UNet2DConditionModel.from_pretrained(os.path.join(kit["sd15"], "unet")).eval()


def schedule(kit):
    from rpo.diffusion.family import read_schedule_config
    return read_schedule_config(kit["sd15"])[0]


@pytest.mark.parametrize("name,guidance", [("DDPM", 1.0), ("DDIM", 1.0), ("DPMSolver++", 1.0), ("DPMSolver++", 3.0)])
def test_truncated_rollout_equals_full_rollout_at_the_sampled_step(kit, tiny_unet, name, guidance):
    B, T = 6, 5
    config = schedule(kit)
    g = torch.Generator().manual_seed(3)
    grid = make_timesteps(name, config, T, B, perturb=True, generator=g)
    x_T = torch.randn(B, 4, 8, 8, generator=g)
    embeds, negative = torch.randn(B, 77, 32, generator=g), torch.randn(B, 77, 32, generator=g)
    stop = torch.tensor([2, 0, T - 1, -1, 2, 1])  # a repeat, the first and last step, a row not needed
    model = RowWise(tiny_unet)
    scheduler = PerSampleScheduler.from_name(name, config)
    full_gen, cut_gen = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    full = rollout(model, scheduler, x_T, grid, embeds, guidance, negative, generator=full_gen)
    cut = truncated_rollout(model, scheduler, x_T, grid, embeds, stop, guidance, negative, generator=cut_gen)
    for i, k in enumerate(stop.tolist()):
        if k < 0:
            continue
        assert int(cut.t[i]) == int(full.t[i, k]), (i, k)
        assert torch.equal(cut.x_t[i], full.x_t[i, k]), (i, k)
        assert torch.equal(cut.eps[i], full.eps[i, k]), (i, k)
    assert cut.unet_rows == int((stop + 1).sum())  # 11 rows instead of B * T = 30
    # the sampler's noise is drawn as the full rollout draws it: the generator ends in the same state
    assert torch.equal(full_gen.get_state(), cut_gen.get_state())

    # The batched UNet itself: equal up to its batch-size rounding only.
    scheduler_b = PerSampleScheduler.from_name(name, config)
    full_b = rollout(tiny_unet, scheduler_b, x_T, grid, embeds, guidance, negative, generator=torch.Generator().manual_seed(11))
    cut_b = truncated_rollout(tiny_unet, scheduler_b, x_T, grid, embeds, stop, guidance, negative,
                              generator=torch.Generator().manual_seed(11))
    for i, k in enumerate(stop.tolist()):
        if k >= 0:
            torch.testing.assert_close(cut_b.eps[i], full_b.eps[i, k], rtol=1e-4, atol=1e-5)


def test_truncation_applies_exactly_at_the_stated_condition():
    paper = dict(buffer_size=4, sample_steps=1, pair_batch_size=4, rollout_batch_size=4, batches_per_refill=1,
                 sync=False, world=4)
    assert truncation_applies(**paper)[0]
    assert truncation_applies(**{**paper, "rollout_batch_size": 2, "batches_per_refill": 3})[0]  # 6 >= 4: newest 4 kept
    assert truncation_applies(**{**paper, "pair_batch_size": 2})[0]  # two trajectories never reach the loss
    assert truncation_applies(**{**paper, "sync": True, "world": 1})[0]
    for change, reason in [({"sample_steps": 2}, "--buffer_sample_steps"),
                           ({"rollout_batch_size": 2}, "--buffer_size"),
                           ({"pair_batch_size": 5}, "with replacement"),
                           ({"sync": True}, "--buffer_sync")]:
        ok, why = truncation_applies(**{**paper, **change})
        assert not ok and reason in why, (change, why)


# --- the Refiller with stand-ins: an elementwise "UNet" (batch-size invariant, so full and
# truncated rollouts agree bit for bit), captions that name their trajectory, cached latents.
class Elementwise(torch.nn.Module):
    config = SimpleNamespace(in_channels=2)

    def __init__(self):
        super().__init__()
        self.rows = []  # batch rows of every pass

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None):
        self.rows.append(len(x))
        return SimpleNamespace(sample=0.3 * x + 1e-3 * t.view(-1, 1, 1, 1) + encoder_hidden_states[:, :1, :1, None])


class Captions:
    """Expert batches whose caption is the running trajectory number."""

    def __init__(self, size):
        self.size, self.next = size, 0

    def __iter__(self):
        return self

    def __next__(self):
        ids = list(range(self.next, self.next + self.size))
        self.next += self.size
        return {"caption": [str(i) for i in ids], "index": torch.tensor(ids) % 3, "flipped": torch.tensor(ids) % 2 == 1}


class Text:
    def encode(self, captions):
        return torch.tensor([float(c) if c else -1.0 for c in captions]).view(-1, 1, 1).expand(-1, 2, 3).clone(), None


def refiller(*, truncate, rollout_batch, batches, pairs, T, scheduler="DPMSolver++"):
    config = DDPMScheduler(num_train_timesteps=1000).config
    settings = RolloutSettings(scheduler=scheduler, num_steps=T, batch_size=rollout_batch, batches_per_refill=batches,
                               min_trajectories=pairs, guidance_scale=1.0, perturb_timesteps=False,
                               drop_prompt_probability=0.0, resolution=16, latent_size=2, truncate=truncate)
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, autocast=contextlib.nullcontext)
    moments = torch.randn(3, 2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    return Refiller(batches=Captions(rollout_batch), text=Text(), vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=0.5)),
                    family=SD15(config), settings=settings, accelerator=acc, weight_dtype=torch.float32, moments=moments)


def draw(r, model, state, pairs, step):
    """What the micro-step receives from the replay pair source (refill every micro-step)."""
    source = ReplayPairs(refiller=r, params=SimpleNamespace(rollout_model=model), batch_size=pairs, sample_steps=1)
    return source.draw(step, state)


CASES = {"paper": dict(rollout_batch=3, batches=1, pairs=3, T=3),        # every trajectory sampled once
         "overfull": dict(rollout_batch=2, batches=2, pairs=2, T=3)}     # 4 pushed into 3 slots, 2 of 3 sampled
BUFFER = 3


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_truncated_refill_hands_the_micro_step_what_full_rollouts_and_the_buffer_do(scheduler):
    # Same generators, two Refillers: whole rollouts pushed and sampled by ReplayBuffer.sample,
    # and truncated rollouts. Every key the loss reads is equal, draw after draw.
    for case in CASES.values():
        full, cut = (refiller(truncate=t, scheduler=scheduler, **case) for t in (False, True))
        states = [TrainState.fresh(seed=5, rank=0, buffer_size=BUFFER, device="cpu") for _ in range(2)]
        model = Elementwise()
        for step in range(1, 21):
            picks, noise = [], []
            for r, state in zip((full, cut), states):
                sample, eps = draw(r, model, state, case["pairs"], step)
                picks.append(sample)
                noise.append(eps)
            assert picks[0].keys() == picks[1].keys() and {"x0", "prompt_embeds", "t", "x_t", "eps"} <= picks[0].keys()
            for k in picks[0]:
                assert torch.equal(picks[0][k], picks[1][k]), k
            assert torch.equal(noise[0], noise[1])
            assert torch.equal(states[0].dev_gen.get_state(), states[1].dev_gen.get_state())
        assert len(states[1].buffer) == 0  # nothing kept past the micro-step
        assert 0 < cut.unet_rows < full.unet_rows


@pytest.mark.parametrize("case", sorted(CASES))
def test_pairs_reaching_the_loss_follow_the_buffer_law(case):
    # Chi-square over one cell per micro-step: the ordered tuple of (trajectory, k) the loss
    # receives. Under full rollouts + ReplayBuffer.sample the trajectories are a uniformly
    # random ordered selection without replacement from the newest BUFFER, each k uniform on
    # 0..T-1 and independent: every tuple has probability 1 / (ordered selections * T^pairs).
    c = CASES[case]
    r = refiller(truncate=True, **c)
    state = TrainState.fresh(seed=1, rank=0, buffer_size=BUFFER, device="cpu")
    model = Elementwise()
    T, pairs, per_refill = c["T"], c["pairs"], c["rollout_batch"] * c["batches"]
    grid = make_timesteps("DPMSolver++", DDPMScheduler(num_train_timesteps=1000).config, T, 1, perturb=False)[0]
    k_of_t = {int(t): k for k, t in enumerate(grid.tolist())}
    counts, draws, rows, want_rows, refill_no = {}, 2000, 0, 0, 0
    for step in range(1, draws + 1):
        before = len(model.rows)
        s, _ = draw(r, model, state, pairs, step)
        # trajectory = caption number - the first of this refill, minus the ones a full buffer drops
        traj = (s["prompt_embeds"][:, 0, 0].long() - refill_no * per_refill - (per_refill - BUFFER)).tolist()
        ks = [k_of_t[int(t)] for t in s["t"]]
        assert all(0 <= j < BUFFER for j in traj) and len(set(traj)) == pairs
        counts[(tuple(traj), tuple(ks))] = counts.get((tuple(traj), tuple(ks)), 0) + 1
        rows += sum(model.rows[before:])
        want_rows += sum(k + 1 for k in ks)
        refill_no += 1
    selections = 1
    for i in range(pairs):
        selections *= BUFFER - i
    cells = selections * T ** pairs
    expected = draws / cells
    assert len(counts) <= cells
    chi2 = sum((n - expected) ** 2 / expected for n in counts.values()) + (cells - len(counts)) * expected
    assert chi2 < chi_square_critical(cells - 1, 3.0902), (chi2, cells)
    # UNet rows actually run (counted in the model): k + 1 per sampled trajectory, 0 for the others
    assert rows == want_rows == r.unet_rows
    per_trajectory = rows / (draws * pairs)  # E = (T + 1) / 2 = 2, sd of the mean ~ 0.82 / sqrt(draws * pairs) < 0.02
    assert abs(per_trajectory - (T + 1) / 2) < 0.05, per_trajectory
    # a whole rollout runs T rows for each of the per_refill trajectories
    print(f"{case}: {rows / draws:.2f} UNet rows per refill truncated, {per_refill * T} whole")


def train_cmd(kit, logdir, *extra):
    # buffer 2 = 2 prompts x 1 batch, 2 pairs, refilled every micro-step: truncation applies
    return [sys.executable, os.path.join(REPO, "train.py"),
            "--pretrained_model_name_or_path", kit["sd15"], "--train_dataset", kit["experts"], "--logdir", str(logdir),
            "--resolution", "32", "--batch_size", "2", "--buffer_batch_size", "2", "--buffer_size", "2",
            "--buffer_num_inference_steps", "4", "--mixed_precision", "no", "--dataloader_num_workers", "0",
            "--report_to", "tensorboard", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "4",
            "--buffer_update_steps", "2", "--learning_rate", "1e-3", "--checkpoints_total_limit", "2", *extra]


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_resume_is_exact_with_truncation(kit, tmp_path):
    from safetensors.torch import load_file
    run(train_cmd(kit, tmp_path / "straight", "--num_steps", "8"))
    run(train_cmd(kit, tmp_path / "split", "--num_steps", "4"))
    run(train_cmd(kit, tmp_path / "split", "--num_steps", "8", "--resume", "latest"))
    run(train_cmd(kit, tmp_path / "whole", "--num_steps", "8", "--no-truncate_rollouts"))
    weights = {name: {sub: load_file(tmp_path / name / "ckpt-8" / sub / "diffusion_pytorch_model.safetensors")
                      for sub in ("unet", "ema")} for name in ("straight", "split", "whole")}
    for sub in ("unet", "ema"):
        for k, v in weights["straight"][sub].items():
            assert torch.equal(v, weights["split"][sub][k]), (sub, k)
    # truncation was on: its runs keep no trajectories past a micro-step; whole rollouts keep 2
    rank = torch.load(tmp_path / "straight" / "ckpt-8" / "state" / "rank0.pt", weights_only=True)
    assert rank["buffer"]["tensors"] == {}
    whole = torch.load(tmp_path / "whole" / "ckpt-8" / "state" / "rank0.pt", weights_only=True)
    assert whole["buffer"]["tensors"]["x_t"].shape[:2] == (2, 4)
    # The whole-rollout run makes the same random draws, so it trains on the same pairs; its
    # weights differ only through the UNet's batch-size rounding (test above). Adam's early
    # steps amplify a rounding difference near a zero gradient up to ~lr, hence the tolerance.
    before = load_file(os.path.join(kit["sd15"], "unet", "diffusion_pytorch_model.safetensors"))
    moved = max((weights["whole"]["unet"][k] - before[k]).abs().max().item() for k in before)
    differ = max((weights["whole"]["unet"][k] - weights["straight"]["unet"][k]).abs().max().item() for k in before)
    assert moved > 1e-3 and differ < moved / 100, (moved, differ)


def test_explicit_truncation_where_inexact_says_so_and_rolls_out_whole(kit, tmp_path):
    proc = run(train_cmd(kit, tmp_path, "--num_steps", "2", "--gradient_accumulation_steps", "1",
                         "--checkpointing_steps", "2", "--buffer_update_steps", "1", "--buffer_size", "4",
                         "--truncate_rollouts"))
    assert "rollouts stay whole" in proc.stdout + proc.stderr and "--buffer_size 4" in proc.stdout + proc.stderr
    rank = torch.load(tmp_path / "ckpt-2" / "state" / "rank0.pt", weights_only=True)
    assert rank["buffer"]["tensors"]["x_t"].shape[:2] == (4, 4)
