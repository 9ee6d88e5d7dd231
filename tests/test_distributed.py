"""Data-parallel training on the CPU with `accelerate launch --cpu --num_processes 2` (gloo:
the same torch.distributed code that runs NCCL on GPUs)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from test_train import REPO, assert_same_weights, train_cmd

pytestmark = pytest.mark.slow


def launch(num_processes, *cmd):
    # accelerate 1.15's `launch --cpu` always starts ONE process, whatever --num_processes says;
    # `--multi_gpu` starts real CPU ranks (torchrun + gloo); train.py then asks for `cpu` itself.
    if num_processes == 1:
        return [sys.executable, *cmd]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517", *cmd]


def run(cmd, ok=True, timeout=600):
    env = {**os.environ, "PYTHONPATH": REPO, "ACCELERATE_USE_CPU": "1"}  # dist_equivalence.py: plain Accelerator(), imports rpo
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env)
    if ok and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def test_two_processes_average_gradients(kit, tmp_path):
    script = os.path.join(REPO, "tests", "dist_equivalence.py")
    results = {}
    for name, procs, accumulation in [("one", 1, 1), ("two", 2, 1), ("accumulated", 1, 2)]:
        out = str(tmp_path / f"{name}.pt")
        run(launch(procs, script, out, kit["sd15"], str(accumulation), str(procs)))
        results[name] = torch.load(out, weights_only=True)
    one = results["one"]
    assert sum(g.abs().sum() for g in one["grads"].values()) > 0
    for name in ("two", "accumulated"):
        for key in ("grads", "weights"):
            for n, value in one[key].items():
                torch.testing.assert_close(results[name][key][n], value, rtol=1e-4, atol=1e-6, msg=f"{name} {key} {n}")


@pytest.mark.parametrize("sync", ["--buffer_sync", "--no-buffer_sync"])
def test_two_process_training_checkpoints_and_resumes(kit, tmp_path, sync):
    common = ("--gradient_accumulation_steps", "1", "--checkpointing_steps", "2", "--buffer_update_steps", "1", sync)
    run(launch(2, *train_cmd(kit, tmp_path / "straight", "--num_steps", "4", *common)[1:]))
    run(launch(2, *train_cmd(kit, tmp_path / "split", "--num_steps", "2", *common)[1:]))
    state = tmp_path / "split" / "ckpt-2" / "state"
    buffers = [torch.load(state / f"rank{r}.pt", weights_only=True)["buffer"]["tensors"]["x0"] for r in range(2)]
    if sync == "--buffer_sync":  # both ranks hold the union of both ranks' trajectories
        assert buffers[0].shape[0] == 8 and torch.equal(buffers[0], buffers[1])
    else:  # each rank its own shard of experts: different trajectories
        assert buffers[0].shape[0] == 4 and not torch.equal(buffers[0], buffers[1])
    run(launch(2, *train_cmd(kit, tmp_path / "split", "--num_steps", "4", "--resume", *common)[1:]))
    assert_same_weights(tmp_path / "straight" / "ckpt-4" / "ema", tmp_path / "split" / "ckpt-4" / "ema")
    # resuming with another number of processes is refused, not silently re-sharded
    proc = run(train_cmd(kit, tmp_path / "split", "--num_steps", "6", "--resume", *common), ok=False)
    assert proc.returncode == 2 and "written by 2 processes, this run has 1" in proc.stderr


def test_a_bad_image_stops_every_rank(kit, tmp_path):
    data = tmp_path / "experts"
    shutil.copytree(kit["experts"], data)
    bad = sorted(data.glob("*/*.png"))[-1]
    bad.write_bytes(b"not an image")
    proc = run(launch(2, *train_cmd(kit, tmp_path / "log", "--train_dataset", str(data))[1:]), ok=False, timeout=180)
    assert proc.returncode != 0 and f"unreadable image {bad}" in proc.stderr
