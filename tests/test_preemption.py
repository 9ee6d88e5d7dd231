"""train.py as a cluster job meets it: a second run on the same logdir, a preemption signal,
a full disk while checkpointing (issue "Nothing lost, nothing silent, round two").

Each result is checked against what should be on disk: the first run's checkpoints read
back unchanged, the preempted run's checkpoint resumed and compared tensor by tensor with an
uninterrupted run of the same options.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_distributed import launch
from test_train import REPO, assert_same_weights, train_cmd

ENV = {**os.environ, "PYTHONPATH": REPO}


def start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)


def wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before the condition held:\n{proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def train_lines(logdir):
    path = os.path.join(logdir, "history.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip() and '"train"' in line]


def snapshot(logdir):
    """{relative path: bytes} of every checkpoint file."""
    out = {}
    for root, _, names in os.walk(logdir):
        if "ckpt-" in root:
            for n in names:
                with open(os.path.join(root, n), "rb") as f:
                    out[os.path.relpath(os.path.join(root, n), logdir)] = f.read()
    return out


def test_second_run_on_the_same_logdir_refuses_in_one_line(kit, tmp_path):
    log = tmp_path / "log"
    common = ("--num_steps", "40", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "4",
              "--checkpoints_total_limit", "20")
    first = start(train_cmd(kit, log, *common))
    wait_for(lambda: os.path.isdir(log / "ckpt-4"), first)
    before = snapshot(log)
    tic = time.time()
    second = subprocess.run(train_cmd(kit, log, *common, "--resume", "latest"), capture_output=True, text=True,
                            cwd=REPO, env=ENV, timeout=120)
    seconds = time.time() - tic
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"--logdir {log} is in use by another run" in lines[0] and f"pid {first.pid}" in lines[0]
    assert seconds < 60
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    after = snapshot(log)
    assert all(after[k] == v for k, v in before.items() if k in after)  # what existed then is what the first wrote
    assert os.path.isdir(log / "ckpt-40") and not os.path.exists(log / ".rpo.lock")  # released at the end


def preempted_then_resumed(kit, tmp_path, processes, signal_rank_only=False):
    common = ("--num_steps", "48", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "48",
              "--learning_rate", "1e-3", "--checkpoints_total_limit", "2")
    log = tmp_path / "split"
    proc = start(launch(processes, *train_cmd(kit, log, *common)[1:]))
    wait_for(lambda: len(train_lines(log)) >= 2, proc)
    if signal_rank_only:  # the scheduler's signal reaching one rank: every rank must stop at the same step
        ranks = subprocess.run(["pgrep", "-f", f"train.py.*{log}"], capture_output=True, text=True).stdout.split()
        os.kill(int(max(ranks, key=int)), signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    stopped = [d for d in os.listdir(log) if d.startswith("ckpt-")]
    assert len(stopped) == 1, (stopped, err[-3000:])
    step = int(stopped[0].split("-")[1])
    assert 2 <= step < 48 and step % 2 == 0  # at the end of an accumulation window, before the end
    assert f"checkpoint written at micro-step {step}" in out + err and "status 75" in out + err
    if processes == 1:
        assert proc.returncode == 75
    proc = subprocess.run(launch(processes, *train_cmd(kit, log, *common, "--resume", "latest")[1:]),
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)
    assert proc.returncode == 0 and f"resumed from {log / stopped[0]}" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    straight = tmp_path / "straight"
    proc = subprocess.run(launch(processes, *train_cmd(kit, straight, *common)[1:]), capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for weights in ("unet", "ema"):
        assert_same_weights(straight / "ckpt-48" / weights, log / "ckpt-48" / weights)


def test_sigterm_checkpoints_at_that_step_and_resumes_exactly(kit, tmp_path):
    preempted_then_resumed(kit, tmp_path, 1)


@pytest.mark.slow
@pytest.mark.parametrize("rank_only", [False, True], ids=["launcher", "one-rank"])
def test_sigterm_on_two_processes(kit, tmp_path, rank_only):
    preempted_then_resumed(kit, tmp_path, 2, signal_rank_only=rank_only)


def test_full_disk_while_checkpointing_from_train_py(kit, tmp_path):
    """torch.save and safetensors failing as they do on ENOSPC (tests/test_reliability2.py
    reads the wording off a real full tmpfs): one line, the earlier checkpoint untouched."""
    log = tmp_path / "log"
    common = ("--num_steps", "4", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2")
    hook = tmp_path / "sitecustomize.py"  # in the child: the second checkpoint's safetensors write hits a full disk
    hook.write_text(
        "import safetensors.torch as st\n"
        "from safetensors import SafetensorError\n"
        "real = st.save_file\n"
        "def full(tensors, path, *a, **k):\n"
        "    if '.tmp-ckpt-4' in str(path):\n"
        "        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')\n"
        "    return real(tensors, path, *a, **k)\n"
        "st.save_file = full\n")
    proc = subprocess.run(train_cmd(kit, log, *common), capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith(f"error: No space left on device writing checkpoint 4 to {log}")
    assert "Traceback" not in proc.stderr
    assert sorted(d for d in os.listdir(log) if "ckpt" in d) == ["ckpt-2"]  # no .tmp-ckpt-4 left
    proc = subprocess.run(train_cmd(kit, log, *common, "--resume", "latest"), capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=600)
    assert proc.returncode == 0 and "resumed from" in proc.stdout + proc.stderr, proc.stderr[-2000:]
