"""Nothing lost, nothing silent, round two (issue 26): one writer per folder (rpo/lock.py),
preemption signals (rpo/preempt.py), hub contact that cannot hang (rpo/models.py), and the
one-line refusals of the export / recovery tools, inference, scoring and the dataset tools.
Faults are real where it is cheap: real processes, real signals, a real socket server that
never answers; a full disk is a patched write raising ENOSPC."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from rpo import lock as locks
from rpo.cli import UserError
from rpo.lock import DirectoryLock, held_by, lock_path
from rpo.preempt import REQUEUE_EXIT, Preemption
from test_reliability import tmpfs  # noqa: F401,F811  (fixture: real tmpfs mounts, root only)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")

HOLD = """
import sys, time
from rpo.cli import run_main
from rpo.lock import DirectoryLock
def main():
    with DirectoryLock(sys.argv[1], what="--output", heartbeat=float(sys.argv[3])):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
run_main(main)
"""


def holder(folder, seconds, heartbeat=15.0):
    """A real process holding `folder`'s lock for `seconds`; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds), str(heartbeat)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def try_lock(folder):
    """A second real process asking for the lock and giving it back at once: (status, stderr)."""
    result = subprocess.run([sys.executable, "-c", HOLD, str(folder), "0", "15"], env=ENV, capture_output=True,
                            text=True, timeout=60)
    return result.returncode, result.stderr


# --------------------------------------------------------------------------- one writer per folder
def test_second_process_is_refused_in_one_line_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    first = holder(out, 30)
    try:
        record = json.load(open(lock_path(out)))
        assert record["pid"] == first.pid and record["host"] == socket.gethostname()
        start = time.perf_counter()
        status, stderr = try_lock(out)
        assert time.perf_counter() - start < 30                          # refused, not waiting
        assert status == 2 and stderr.count("\n") == 1 and stderr.startswith("error: --output ")
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record["started"]))
        assert f"pid {first.pid} on host {socket.gethostname()}, started {started}" in stderr
        assert json.load(open(lock_path(out)))["pid"] == first.pid       # the holder's lock untouched
    finally:
        first.kill()
        first.wait()


def test_lock_is_released_on_exit_and_after_an_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "done.txt").write_text("finished work")
    first = holder(out, 0)
    assert first.wait(timeout=60) == 0 and not os.path.exists(lock_path(out))
    assert try_lock(out) == (0, "")
    with pytest.raises(ValueError):
        with DirectoryLock(str(out)):
            assert held_by(str(out))["pid"] == os.getpid()
            raise ValueError("boom")
    assert not os.path.exists(lock_path(out)) and os.listdir(out) == ["done.txt"]


def test_sigkilled_holders_lock_does_not_block(tmp_path):
    out = tmp_path / "out"
    (out / "kept.txt").parent.mkdir()
    (out / "kept.txt").write_text("work")
    first = holder(out, 60)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert json.load(open(lock_path(out)))["pid"] == first.pid       # left behind by the kill
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "30", "15"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert json.load(open(lock_path(out)))["pid"] == proc.pid
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    assert f"taking over the lock of a dead run (pid {first.pid}" in stderr and "its process is gone" in stderr
    assert (out / "kept.txt").read_text() == "work"


def forged(folder, age, pid=None, machine=None):
    """A lock file as another machine's holder leaves it, last touched `age` seconds ago."""
    os.makedirs(folder, exist_ok=True)
    record = {"host": "node-17", "pid": pid or 4242, "started": time.time() - 3600, "token": "x" * 32,
              "pid_start": None, "machine": machine or {"host": "node-17", "boot": "b", "pidns": "p"},
              "heartbeat_s": 15}
    path = lock_path(folder)
    with open(path, "w") as f:
        json.dump(record, f)
    os.utime(path, (time.time() - age, time.time() - age))
    return record


def test_other_machines_lock_is_live_while_it_beats_and_stale_after(tmp_path, capsys):
    out = str(tmp_path / "out")
    forged(out, age=5)
    with pytest.raises(UserError) as refused:
        DirectoryLock(out, what="--logdir").acquire()
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"--logdir {out} is in use by another run (pid 4242 on host node-17")
    assert "last heartbeat" in line and lock_path(out) in line
    assert held_by(out)["token"] == "x" * 32

    forged(out, age=locks.STALE_AFTER_S + 30)                            # a dead node's lock
    with DirectoryLock(out, what="--logdir") as held:
        assert held_by(out)["pid"] == os.getpid() and held_by(out)["token"] == held.token
    assert "no heartbeat for" in capsys.readouterr().err


def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    """Same machine, the pid alive but started at another time: the holder is gone."""
    out = str(tmp_path / "out")
    record = forged(out, age=0, pid=os.getppid(), machine=locks._machine())
    record["pid_start"] = locks._proc_start(os.getppid()) + 1
    json.dump(record, open(lock_path(out), "w"))
    with DirectoryLock(out):
        assert held_by(out)["pid"] == os.getpid()
    record["pid_start"] -= 1                                             # the real start: alive, refused
    json.dump(record, open(lock_path(out), "w"))
    with pytest.raises(UserError, match=f"pid {os.getppid()} on host"):
        DirectoryLock(out).acquire()


def test_heartbeat_touches_the_lock_and_a_waiter_gets_it(tmp_path):
    out = str(tmp_path / "out")
    with DirectoryLock(out, heartbeat=0.1):
        before = os.stat(lock_path(out)).st_mtime_ns
        time.sleep(0.5)
        assert os.stat(lock_path(out)).st_mtime_ns > before
    first = holder(out, 1.5)
    start = time.monotonic()
    with DirectoryLock(out, wait=30):                                    # waits for the holder to finish
        assert time.monotonic() - start < 30 and held_by(out)["pid"] == os.getpid()
    first.wait()


def test_refused_lock_removes_the_folder_it_created(tmp_path):
    parent = str(tmp_path / "p")
    os.makedirs(parent)
    forged(os.path.join(parent, "held"), age=0)
    os.remove(lock_path(os.path.join(parent, "held")))
    with DirectoryLock(os.path.join(parent, "new")):
        assert os.path.isdir(os.path.join(parent, "new"))
    assert not os.path.exists(os.path.join(parent, "new"))              # created for the lock, left empty


# --------------------------------------------------------------------------- preemption
PREEMPTED = """
import signal, sys, time
from rpo.preempt import Preemption, REQUEUE_EXIT
before = signal.getsignal(signal.SIGTERM)
with Preemption() as p:
    print("ready", flush=True)
    step = 0
    while not p.requested:
        step += 1
        time.sleep(0.01)
    print(p.signal_name, step, flush=True)
    second = p.signal_name
assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
sys.exit(REQUEUE_EXIT)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_sets_the_flag_and_handlers_are_restored(signum):
    proc = subprocess.Popen([sys.executable, "-c", PREEMPTED], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.1)
    proc.send_signal(signum)
    proc.send_signal(signum)                                             # a second one changes nothing
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == REQUEUE_EXIT == 75, err
    name, steps = out.split()
    assert name == signal.Signals(signum).name and int(steps) > 0


def test_preemption_restores_handlers_after_an_error():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with pytest.raises(RuntimeError):
            with Preemption() as p:
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.05)
                assert p.requested and p.signal_name == "SIGUSR1" and p.requested_on_any()
                raise RuntimeError
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


# --------------------------------------------------------------------------- a hub that never answers
class SilentServer:
    """Accepts every TCP connection and never sends a byte (a stuck proxy or firewall);
    `answer`: reply with a minimal HTTP response instead."""

    def __init__(self, answer=False):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answer, self.held = answer, []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            if self.answer:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                conn.close()

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent_server():
    server = SilentServer()
    yield server
    server.close()


def test_probe_of_a_silent_hub_gives_up_in_time(silent_server, monkeypatch):
    from rpo import models
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent_server.port}")
    start = time.perf_counter()
    assert models.hub_reachable(timeout=1.0) is False
    assert time.perf_counter() - start < 5
    assert silent_server.held                                            # it did connect: TCP alone would pass
    answering = SilentServer(answer=True)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{answering.port}")
        assert models.hub_reachable(timeout=5.0) is True
    finally:
        answering.close()
    monkeypatch.setenv("RPO_HUB_TIMEOUT", "soon")
    with pytest.raises(UserError, match="RPO_HUB_TIMEOUT='soon'"):
        models.hub_timeout()


def test_hub_requests_get_a_read_timeout(silent_server, monkeypatch):
    """huggingface_hub's shared client has no timeout of its own: set_hub_timeouts gives it one."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import _http
    from rpo import models
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(constants, name, getattr(constants, name))
    monkeypatch.setenv("RPO_HUB_TIMEOUT", "1.5")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)             # the tests run offline
    try:
        models.set_hub_timeouts()
        assert os.environ["HF_HUB_ETAG_TIMEOUT"] == "2" and constants.HF_HUB_DOWNLOAD_TIMEOUT == 2
        start = time.perf_counter()
        with pytest.raises(httpx2.TimeoutException):
            _http.get_session().get(f"http://127.0.0.1:{silent_server.port}/api/models/x")
        assert time.perf_counter() - start < 10
    finally:
        _http.set_client_factory(_http.default_client_factory)


@pytest.mark.slow
def test_silent_hub_fails_in_one_line_within_seconds(kit, tmp_path, silent_server):
    """Issue 26, finding 4: an endpoint that accepts and never answers hung train.py for minutes."""
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{silent_server.port}", HF_HOME=str(tmp_path / "hf"),
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "inference.py"), "--pretrained_model_name_or_path",
                             "nobody/not-cached", "--test_dataset_root", kit["prompts"], "--output",
                             str(tmp_path / "out"), "--mixed_precision", "no"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    seconds = time.perf_counter() - start
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 2, result.stderr[-2000:]
    assert lines[0].startswith(f"warning: http://127.0.0.1:{silent_server.port} does not answer")
    assert lines[1].startswith("error: ") and "nobody/not-cached" in lines[1]
    assert seconds < 60, seconds
    assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------- every writer takes the lock
def run_script(main, argv, capsys):
    """A script's main in this process, through run_main: (exit status, stdout, stderr)."""
    from rpo.cli import run_main
    try:
        run_main(lambda: main(argv))
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def files_under(root):
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


def test_every_writer_refuses_a_folder_another_run_holds(kit, scorer_weights, tmp_path, capsys):
    import inference
    import score
    import tools.hpdv2_benchmark as hpdv2_tool
    import tools.pickapic as pickapic_tool
    from rpo.tiny.datasets import write_tiny_hpdv2, write_tiny_pickapic
    from scores_fixtures import write_image_dir

    images = write_image_dir(tmp_path / "images", seed=1)
    pap, hpd = str(tmp_path / "pap"), str(tmp_path / "hpd")
    write_tiny_pickapic(pap, seed=0)
    write_tiny_hpdv2(hpd, seed=0)
    out = tmp_path / "out"
    cases = {  # name: (main, argv, the folder another run holds)
        "inference.py": (inference.main, ["--pretrained_model_name_or_path", kit["sd15"], "--test_dataset_root",
                                          kit["prompts"], "--output", str(out / "gen"), "--resolution", "32",
                                          "--num_inference_steps", "1", "--mixed_precision", "no"], out / "gen"),
        "score.py --dir": (score.main, ["--clip", "--dir", images, "--weights_dir", scorer_weights, "--output",
                                        str(out / "tables")], images),
        "score.py --output": (score.main, ["--clip", "--dir", images, "--weights_dir", scorer_weights, "--output",
                                           str(out / "tables")], out / "tables"),
        "tools.pickapic": (pickapic_tool.main, ["--dataset", pap, "--split", "validation", "--score", "clip",
                                                "--weights_dir", scorer_weights, "--top", "2", "--num_proc", "0",
                                                "--cache", str(out / "c1"), "--output", str(out / "pap")], out / "pap"),
        "tools.hpdv2_benchmark": (hpdv2_tool.main, ["--repo", hpd, "--styles", "anime", "photo", "--score", "clip",
                                                    "--weights_dir", scorer_weights, "--num_proc", "0", "--cache",
                                                    str(out / "c2"), "--output", str(out / "hpd_{style}")],
                                  out / "hpd_photo"),
    }
    for name, (main, argv, held) in cases.items():
        first = holder(held, 120)
        try:
            before = files_under(tmp_path)
            status, _, stderr = run_script(main, argv, capsys)
            assert status == 2 and stderr.count("\n") == 1, (name, stderr[-2000:])
            assert stderr.startswith("error: --") and f"{held} is in use by another run (pid {first.pid} on host" in stderr, name
            assert files_under(tmp_path) == before, name                 # nothing written, nothing left behind
        finally:
            first.kill()
            first.wait()
        os.remove(lock_path(held))


# --------------------------------------------------------------------------- tools.export_pipeline
def fake_run(kit, root, use_ema=True, folders=("unet",), name="ckpt-2"):
    """A logdir as train.py leaves it, built by hand: `name`/<folders> hold the kit's UNet
    (ema/ with every weight negated, so EMA and raw differ) and training_config.json the options."""
    import shutil
    from safetensors.torch import load_file, save_file
    logdir = root / "log"
    ckpt = logdir / name
    for folder in folders:
        shutil.copytree(os.path.join(kit["sd15"], "unet"), ckpt / folder)
        if folder == "ema":
            path = str(ckpt / folder / "diffusion_pytorch_model.safetensors")
            save_file({k: -v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    (logdir / "training_config.json").write_text(json.dumps(
        {"runs": [{"args": {"pretrained_model_name_or_path": kit["sd15"], "use_ema": use_ema}}]}))
    return ckpt


def exported_unet_equals(output, folder):
    import torch
    from safetensors.torch import load_file
    got = load_file(os.path.join(output, "unet", "diffusion_pytorch_model.safetensors"))
    want = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want)


def test_export_refuses_a_missing_ema_unless_raw_is_asked(kit, tmp_path, capsys):
    import tools.export_pipeline as export
    ckpt = fake_run(kit, tmp_path)                                      # use_ema, but ema/ is gone
    status, _, stderr = run_script(export.main, ["--checkpoint", str(ckpt), "--output", str(tmp_path / "p")], capsys)
    assert status == 2 and stderr.count("\n") == 1 and "has no ema/ (the run trained with --use_ema" in stderr
    assert "pass --raw" in stderr and not os.path.exists(tmp_path / "p")
    status, stdout, _ = run_script(export.main, ["--checkpoint", str(ckpt), "--output", str(tmp_path / "p"), "--raw"],
                                   capsys)
    assert status == 0 and exported_unet_equals(tmp_path / "p", ckpt / "unet")

    other = tmp_path / "no_ema_run"
    other.mkdir()
    ckpt = fake_run(kit, other, use_ema=False)                          # --no-use_ema: unet/ is the model
    assert run_script(export.main, ["--checkpoint", str(ckpt), "--output", str(other / "p")], capsys)[0] == 0
    assert exported_unet_equals(other / "p", ckpt / "unet")

    both = tmp_path / "both"
    both.mkdir()
    ckpt = fake_run(kit, both, folders=("unet", "ema"))
    assert run_script(export.main, ["--checkpoint", str(ckpt), "--output", str(both / "p")], capsys)[0] == 0
    assert exported_unet_equals(both / "p", ckpt / "ema") and not exported_unet_equals(both / "p", ckpt / "unet")


def test_export_refuses_a_half_written_checkpoint(kit, tmp_path, capsys):
    import tools.export_pipeline as export
    ckpt = fake_run(kit, tmp_path, folders=("unet", "ema"), name=".tmp-ckpt-4")
    status, _, stderr = run_script(export.main, ["--checkpoint", str(ckpt), "--output", str(tmp_path / "p")], capsys)
    assert status == 2 and stderr.count("\n") == 1 and "still being written, or half-written" in stderr
    assert "ckpt-4" in stderr and not os.path.exists(tmp_path / "p")


def test_export_on_a_full_disk_is_one_line_and_leaves_no_temporary(kit, tmp_path, capsys, monkeypatch):
    """The write fails the ways a full disk fails it (ENOSPC from os.write, torch.save's
    RuntimeError); the tmpfs test below uses a real full disk where mounting is allowed."""
    import errno
    import diffusers
    import tools.export_pipeline as export
    ckpt = fake_run(kit, tmp_path, folders=("unet", "ema"))
    real = diffusers.DiffusionPipeline.save_pretrained
    for failure in (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")):
        def half_then_full(self, folder, *a, **k):
            os.makedirs(os.path.join(folder, "unet"))
            open(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), "wb").write(b"\0" * 100)
            raise failure
        monkeypatch.setattr(diffusers.DiffusionPipeline, "save_pretrained", half_then_full)
        out = tmp_path / "exports" / "p"
        status, _, stderr = run_script(export.main, ["--checkpoint", str(ckpt), "--output", str(out)], capsys)
        assert status == 2 and stderr.count("\n") == 1, stderr
        assert stderr.startswith(f"error: No space left on device writing the exported pipeline to {out}: it needs about ")
        assert os.listdir(tmp_path / "exports") == []                  # no .p.tmp-export left
    monkeypatch.setattr(diffusers.DiffusionPipeline, "save_pretrained", real)
    assert run_script(export.main, ["--checkpoint", str(ckpt), "--output", str(out)], capsys)[0] == 0


def test_export_on_a_real_full_disk(kit, tmp_path, tmpfs, capsys):
    import tools.export_pipeline as export
    ckpt = fake_run(kit, tmp_path, folders=("unet", "ema"))
    root = tmpfs(size="1m", keep=64 * 1024)                             # the probe fits, the pipeline does not
    status, _, stderr = run_script(export.main, ["--checkpoint", str(ckpt), "--output", os.path.join(root, "p")], capsys)
    assert status == 2 and stderr.count("\n") == 1 and os.path.join(root, "p") in stderr and "needs about" in stderr
    assert sorted(os.listdir(root)) == [".filler"]


# --------------------------------------------------------------------------- weights swapped, size and mtime kept
def test_weights_swapped_with_the_same_size_and_mtime_are_refused(kit, tmp_path, capsys):
    """Issue 26, finding 3: the memo was keyed by size + mtime, so a copy preserving both passed."""
    import shutil
    import hashlib
    from safetensors.torch import load_file, save_file
    import inference
    from test_inference import argv
    unet = tmp_path / "unet"
    shutil.copytree(os.path.join(kit["sd15"], "unet"), unet)
    out = tmp_path / "out"
    args = argv(kit, out, "--unet", str(unet), "--num_images_per_prompt", "1")
    assert run_script(inference.main, args, capsys)[0] == 0
    (file,) = [n for n in os.listdir(unet) if n.endswith(".safetensors")]
    path = unet / file
    memo = json.load(open(out / "manifest.json"))["weight_hashes"][os.path.realpath(path)]
    assert memo[-1] == hashlib.sha256(path.read_bytes()).hexdigest()

    other = tmp_path / "other.safetensors"                              # another model, same size
    tensors = load_file(str(path))
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(other), metadata={"format": "pt"})
    stat = os.stat(path)
    assert os.path.getsize(other) == stat.st_size
    shutil.copyfile(other, path)                                        # in place: the same inode
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))             # and the old mtime, as cp -p leaves it
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns, os.stat(path).st_ino) == \
        (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    before = files_under(out)
    status, _, stderr = run_script(inference.main, args, capsys)
    assert status == 2 and stderr.count("\n") == 1 and "the UNet weights changed" in stderr and file in stderr
    assert files_under(out) == before


# --------------------------------------------------------------------------- tools.recover_ema
def run_recover(logdir, capsys):
    import tools.recover_ema as recover
    return run_script(recover.main, ["--logdir", str(logdir)], capsys)


def bug_run(root, model, name="ckpt-4", layout="old"):
    """A checkpoint as the buggy trainer left it: unet/ and ema/ byte copies of `model`'s
    weights, the real EMA (here: every parameter halved) only in state/trainer.pt."""
    import shutil
    import torch
    from rpo.training.checkpoint import write_model_folder
    ckpt = root / "log" / name
    write_model_folder(str(ckpt / "unet"), model=model, state_dict=model.state_dict())
    shutil.copytree(ckpt / "unet", ckpt / "ema")
    names = [n for n, _ in model.named_parameters()]
    shadows = [p.detach() * 0.5 for _, p in model.named_parameters()]
    ema = {"shadow_params": shadows, "decay": 0.9999}
    (ckpt / "state").mkdir()
    torch.save({"step": 4, "ema": ema if layout == "old" else {"names": names, "ema": ema}},
               ckpt / "state" / "trainer.pt")
    return ckpt, dict(zip(names, shadows))


def test_recover_ema_leaves_a_right_ema_and_lora_runs_alone(kit, tmp_path, capsys):
    ckpt = fake_run(kit, tmp_path, folders=("unet", "ema"))             # written by the fixed trainer
    lora = tmp_path / "log" / "ckpt-6"
    for folder in ("lora", "lora_ema"):
        (lora / folder).mkdir(parents=True)
        (lora / folder / "pytorch_lora_weights.safetensors").write_bytes(b"adapter")
    before = files_under(tmp_path / "log")
    status, stdout, stderr = run_recover(tmp_path / "log", capsys)
    assert status == 0, stderr
    lines = stdout.strip().splitlines()
    assert lines[0] == f"{ckpt}: ema/ differs from unet/, so it holds the EMA already (the bug made it a byte copy): left as it is"
    assert lines[1].startswith(f"{lora}: a LoRA checkpoint") and "nothing to do" in lines[1]
    assert "cannot be recovered" not in stdout and files_under(tmp_path / "log") == before


def test_recover_ema_on_an_sd3_run(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file
    from rpo.tiny.sd3 import tiny_sd3_transformer
    torch.manual_seed(0)
    ckpt, shadows = bug_run(tmp_path, tiny_sd3_transformer())
    raw = load_file(str(ckpt / "unet" / "diffusion_pytorch_model.safetensors"))
    status, stdout, stderr = run_recover(tmp_path / "log", capsys)
    assert status == 0 and stdout.startswith(f"{ckpt}: ema/ rewritten from state/trainer.pt"), stderr
    ema = load_file(str(ckpt / "ema" / "diffusion_pytorch_model.safetensors"))
    assert ema.keys() == raw.keys()
    assert all(torch.equal(ema[k], shadows[k]) if k in shadows else torch.equal(ema[k], raw[k]) for k in raw)
    assert json.load(open(ckpt / "ema" / "config.json"))["_class_name"] == "SD3Transformer2DModel"
    status, stdout, _ = run_recover(tmp_path / "log", capsys)            # a second pass: already right
    assert status == 0 and "holds the EMA already" in stdout


def test_recover_ema_on_truncated_files_is_one_line(kit, tmp_path, capsys):
    from diffusers import UNet2DConditionModel
    ckpt, _ = bug_run(tmp_path, UNet2DConditionModel.from_pretrained(kit["sd15"], subfolder="unet"))
    weights = ckpt / "ema" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    before = files_under(tmp_path / "log")
    status, _, stderr = run_recover(tmp_path / "log", capsys)
    assert status == 2 and stderr.count("\n") == 1 and f"{weights} is unreadable" in stderr and "truncated" in stderr
    weights.write_bytes(data)
    marker = ckpt / "state" / "trainer.pt"
    marker.write_bytes(marker.read_bytes()[:100])
    status, _, stderr = run_recover(tmp_path / "log", capsys)
    assert status == 2 and stderr.count("\n") == 1 and f"{marker} is unreadable" in stderr
    assert files_under(tmp_path / "log") == {**before, "ckpt-4/ema/diffusion_pytorch_model.safetensors": data,
                                             "ckpt-4/state/trainer.pt": marker.read_bytes()}


# --------------------------------------------------------------------------- decompression bombs
def bomb_png(side=20000):
    """A PNG whose header claims side x side pixels (400 M for 20,000): Pillow refuses it when
    opening (DecompressionBombError, not an OSError), so a few bytes are enough."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def test_decompression_bomb_in_expert_data_is_one_line_naming_it(kit, tmp_path):
    import shutil
    from rpo.data.folders import ExpertDataset
    root = tmp_path / "experts"
    shutil.copytree(kit["experts"], root)
    folder = sorted(p for p in root.iterdir() if p.is_dir())[1]
    (image,) = [p for p in folder.iterdir() if p.suffix in (".png", ".jpg", ".jpeg", ".webp")]
    image.unlink()
    bomb = folder / "bomb.png"
    bomb.write_bytes(bomb_png())
    with pytest.raises(UserError) as refused:
        ExpertDataset(str(root), resolution=16)
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"unreadable image {bomb}: ") and "400000000 pixels" in line


def test_decompression_bomb_in_a_score_folder_is_named_and_excluded(scorer_weights, tmp_path, capsys):
    import glob
    import score
    from scores_fixtures import write_image_dir
    a = write_image_dir(tmp_path / "a", seed=2)
    bomb = sorted(glob.glob(os.path.join(a, "*", "*.png")))[2]
    open(bomb, "wb").write(bomb_png())
    status, _, stderr = run_script(score.main, ["--clip", "--dir", a, "--weights_dir", scorer_weights, "--num_workers",
                                                "0", "--output", str(tmp_path / "out")], capsys)
    assert status == 0, stderr[-2000:]
    (line,) = [l for l in stderr.splitlines() if l.startswith("warning:")]
    assert line.startswith(f"warning: unreadable image, excluded: {bomb} (DecompressionBombError: ")
    table = json.load(open(tmp_path / "out" / "scores.json"))["dirs"][0]
    assert table["failed"] == 1 and table["unreadable"] == [bomb] and len(table["scores"]) == table["images"] - 1


def test_decompression_bomb_in_an_hpdv2_tarball_is_named(tmp_path, capsys, monkeypatch):
    import io
    import tarfile
    import tools.hpdv2_benchmark as tool
    from fake_scorer import FakeScorer
    from rpo.tiny.datasets import HPDV2_MODELS, write_tiny_hpdv2
    monkeypatch.setattr(tool, "load_scorer", lambda name, **kw: FakeScorer())
    repo = tmp_path / "hpd"
    write_tiny_hpdv2(str(repo), seed=0)
    model = HPDV2_MODELS[0]
    tarball = repo / "benchmark" / "benchmark_imgs" / f"{model}.tar.gz"
    with tarfile.open(tarball) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    victim = sorted(m.name for m, _ in members if m.isfile() and "/anime/" in m.name)[0]
    with tarfile.open(tarball, "w:gz") as tar:
        for member, data in members:
            if member.name == victim:
                data = bomb_png()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    status, stdout, stderr = run_script(tool.main, ["--cache", str(tmp_path / "c"), "--repo", str(repo), "--styles",
                                                    "anime", "--num_proc", "0", "--output", str(tmp_path / "o")], capsys)
    assert status == 0, stderr[-2000:]
    (line,) = [l for l in stdout.splitlines() if "unreadable" in l]
    assert line.startswith(f"anime: skipped 1 unreadable image(s), e.g. model {model} prompt ")
    assert victim.split("/", 1)[1] in line and "DecompressionBombError" in line


# --------------------------------------------------------------------------- score.py: resumed == uninterrupted
def recording_batches(monkeypatch):
    """{image pixels' hash: the set of hashes it was scored with} for every PickScore forward."""
    import hashlib
    from rpo.scores import pickscore
    seen = []
    inner = pickscore.PickScore.score_tensors

    def recorded(self, pixels, prompts):
        rows = [hashlib.sha256(p.numpy().tobytes()).hexdigest() for p in pixels]
        seen.append(rows)
        return inner(self, pixels, prompts)
    monkeypatch.setattr(pickscore.PickScore, "score_tensors", recorded)
    return seen


def test_resumed_scoring_equals_an_uninterrupted_run(scorer_weights, tmp_path, capsys, monkeypatch):
    """Issue 26, finding 3b: after a full disk, a batch whose images were partly cached was
    scored as a smaller batch, and a forward rounds differently with another batch."""
    import errno
    import shutil
    import score
    from rpo.data import score_cache
    from scores_fixtures import write_image_dir
    dirs = [write_image_dir(tmp_path / "a", seed=11), write_image_dir(tmp_path / "b", seed=12)]  # 6 + 6 images
    for d in dirs:
        shutil.copytree(d, tmp_path / "fresh" / os.path.basename(d))
    flags = ["--pickscore", "--batch_size", "4", "--num_workers", "0", "--weights_dir", scorer_weights]
    batches = recording_batches(monkeypatch)

    def argv(folders, out):
        return flags + [x for d in folders for x in ("--dir", str(d))] + ["--output", str(tmp_path / out)]

    fresh = [tmp_path / "fresh" / "a", tmp_path / "fresh" / "b"]
    assert run_script(score.main, argv(fresh, "one_shot"), capsys)[0] == 0
    one_shot = {row: set(batch) for batch in batches for row in batch}
    assert sorted(len(b) for b in batches) == [4, 4, 4]                # a0-a3 | a4 a5 b0 b1 | b2-b5

    real_write = os.write                                              # b's side file meets a full disk:
    def write(fd, data):                                               # batch 2 is kept for a, lost for b
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.startswith(str(tmp_path / "b")) and path.endswith(".jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)
    monkeypatch.setattr(score_cache.os, "write", write)
    status, _, stderr = run_script(score.main, argv(dirs, "interrupted"), capsys)
    assert status == 2 and "No space left on device writing" in stderr and "rank0.jsonl" in stderr
    monkeypatch.setattr(score_cache.os, "write", real_write)
    assert len(score.read_cache(dirs[0])["pickscore@" + json.load(open(tmp_path / "one_shot" / "scores.json"))
                                        ["metrics"]["pickscore"]]) == 6 and score.read_cache(dirs[1]) == {}

    batches.clear()
    assert run_script(score.main, argv(dirs, "resumed"), capsys)[0] == 0
    assert batches and all(set(batch) == one_shot[row] for batch in batches for row in batch)  # the same batches
    got = [d["scores"] for d in json.load(open(tmp_path / "resumed" / "scores.json"))["dirs"]]
    want = [d["scores"] for d in json.load(open(tmp_path / "one_shot" / "scores.json"))["dirs"]]
    assert got == want                                                 # exactly: no tolerance


# --------------------------------------------------------------------------- a forged state
class Payload:
    """What a malicious optimizer.bin holds: unpickling it would run a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_forged_checksums_and_a_pickle_in_optimizer_bin_are_one_line(tmp_path):
    """Issue 26, finding 7: the checksums match (forged with the file), torch's weights-only
    loader refuses the payload, and that refusal is one line naming the file."""
    import torch
    from accelerate import Accelerator
    from rpo.training import checkpoint
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    ckpt = tmp_path / "ckpt-2"
    state_dir = ckpt / "state"
    accelerator.save_state(str(state_dir))
    checkpoint.load_accelerator_state(accelerator, str(state_dir))      # the genuine state loads

    marker = tmp_path / "pwned"
    optimizer_bin = state_dir / "optimizer.bin"
    assert optimizer_bin.exists()
    torch.save({"state": Payload(marker), "param_groups": []}, optimizer_bin)
    checkpoint.write_checksums(str(state_dir))                          # forged along with it
    assert checkpoint.verify_checksums(str(ckpt)) is None
    with pytest.raises(UserError) as refused:
        checkpoint.load_accelerator_state(accelerator, str(state_dir))
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"--resume: {optimizer_bin} holds a pickle that would run code")
    assert "system" in line and not marker.exists()
    with pytest.raises(UserError, match=f"--resume: {state_dir / 'trainer.pt'} holds a pickle that would run code"):
        torch.save({"step": Payload(marker)}, state_dir / "trainer.pt")
        checkpoint.load_torch(str(state_dir / "trainer.pt"))
    assert not marker.exists()


# --------------------------------------------------------------------------- the Pick-a-Pic score cache
def test_pickapic_cache_with_malformed_lines_rescores_them(tmp_path, capsys, monkeypatch):
    """Issue 26, finding 8: a non-numeric score or a list as key was a traceback; score.py's
    cache drops such lines and rescores, the dataset tool's now does too."""
    import glob
    import tools.pickapic as tool
    from fake_scorer import FakeScorer
    from rpo.tiny.datasets import write_tiny_pickapic
    monkeypatch.setattr(tool, "load_scorer", lambda name, **kw: FakeScorer())
    pap = str(tmp_path / "pap")
    write_tiny_pickapic(pap, seed=0)
    common = ["--dataset", pap, "--split", "train", "--top", "6", "--no-preferred", "--num_proc", "0",
              "--cache", str(tmp_path / "c")]
    FakeScorer.scored, FakeScorer.fail_after = 0, None
    assert run_script(tool.main, common + ["--output", str(tmp_path / "o1")], capsys)[0] == 0
    (part,) = glob.glob(str(tmp_path / "c" / "pickapic" / "scores" / "*.jsonl"))
    lines = [json.loads(line) for line in open(part)]
    lines[0]["score"] = "0.5x"                                          # not a number
    lines[1]["key"] = [lines[1]["key"]]                                 # a list as key
    lines[2]["score"] = True                                            # a bool
    lines[3] = {"key": lines[3]["key"], "caption": lines[3]["caption"]}  # neither score nor error
    with open(part, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    FakeScorer.scored = 0
    status, _, stderr = run_script(tool.main, common + ["--output", str(tmp_path / "o2")], capsys)
    assert status == 0, stderr[-2000:]
    assert FakeScorer.scored == 4                                       # exactly the four bad lines' pairs
    (warning,) = [l for l in stderr.splitlines() if l.startswith("warning:")]
    assert "skipped 4 malformed line(s)" in warning and os.path.basename(part) in warning
    assert files_under(tmp_path / "o2") == files_under(tmp_path / "o1")


# --------------------------------------------------------------------------- inference.py --unet, half saved
def test_unet_with_half_its_tensors_is_one_line(kit, tmp_path, capsys):
    """Issue 26, finding 10: diffusers left the missing tensors on the meta device and failed
    with "Cannot copy out of meta tensor"."""
    import shutil
    from safetensors.torch import load_file, save_file
    import inference
    from test_inference import argv
    unet = tmp_path / "unet"
    shutil.copytree(os.path.join(kit["sd15"], "unet"), unet)
    weights = unet / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[::2]}, str(weights), metadata={"format": "pt"})
    status, _, stderr = run_script(inference.main, argv(kit, tmp_path / "out", "--unet", str(unet)), capsys)
    assert status == 2 and stderr.count("\n") == 1, stderr[-2000:]
    assert f"--unet {unet}: its weights lack {len(names) - len(names[::2])} of the {len(names)} tensors" in stderr
    assert names[1] in stderr and not os.path.exists(tmp_path / "out")

    save_file(tensors, str(weights), metadata={"format": "pt"})                # whole, then truncated
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    status, _, stderr = run_script(inference.main, argv(kit, tmp_path / "out", "--unet", str(unet)), capsys)
    assert status == 2 and stderr.count("\n") == 1 and f"{weights} is unreadable" in stderr

    weights.write_bytes(data)                                           # whole again: it runs
    assert run_script(inference.main, argv(kit, tmp_path / "out", "--unet", str(unet)), capsys)[0] == 0


# --------------------------------------------------------------------------- a full disk while checkpointing
def write_checkpoint_into(logdir, step, tensors):
    """What a checkpoint save does, in miniature: begin, weights (safetensors), state (torch.save), commit."""
    import torch
    from safetensors.torch import save_file
    from rpo.training import checkpoint
    with checkpoint.disk_guard(str(logdir), step, 2 * checkpoint.tensor_bytes(tensors)):
        path = checkpoint.begin(str(logdir), step)
        os.makedirs(os.path.join(path, "unet"))
        save_file(tensors, os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))
        os.makedirs(os.path.join(path, "state"))
        torch.save(tensors, os.path.join(path, "state", "optimizer.bin"))
        checkpoint.commit(str(logdir), step, keep=1)


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path, tmpfs):
    import torch
    logdir = tmpfs(size="2m")
    write_checkpoint_into(logdir, 1, {"w": torch.zeros(64 * 1024)})     # 256 KB x 2: fits
    before = files_under(logdir)
    with pytest.raises(UserError) as refused:
        write_checkpoint_into(logdir, 2, {"w": torch.ones(256 * 1024)})  # 1 MB x 2: does not
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"No space left on device writing checkpoint 2 to {logdir}: it needs "
                                                "about 2.0 MB")
    assert sorted(os.listdir(logdir)) == ["ckpt-1"] and files_under(logdir) == before  # no .tmp-ckpt-2


@pytest.mark.parametrize("failure", ["safetensors", "torch.save"])
def test_full_disk_while_checkpointing_as_the_libraries_word_it(tmp_path, monkeypatch, failure):
    """Without a mount: the errors torch.save and safetensors raise on ENOSPC (read off a real
    full tmpfs: RuntimeError "unexpected pos", SafetensorError "No space left ... (os error 28)")."""
    import torch
    import safetensors.torch
    from safetensors import SafetensorError
    write_checkpoint_into(tmp_path, 1, {"w": torch.zeros(16)})
    before = files_under(tmp_path)
    if failure == "torch.save":
        def full(obj, f, *a, **k):
            open(f, "wb").write(b"PK\x03\x04 half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        monkeypatch.setattr(torch, "save", full)
    else:
        def full(tensors, path, *a, **k):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError, match=f"^No space left on device writing checkpoint 2 to {tmp_path}: it needs"):
        write_checkpoint_into(tmp_path, 2, {"w": torch.ones(16)})
    assert sorted(os.listdir(tmp_path)) == ["ckpt-1"] and files_under(tmp_path) == before


# --------------------------------------------------------------------------- one rank dies
RANK_DIES = """
import os, signal, sys, time
import torch
from accelerate import Accelerator
from rpo.cli import UserError, run_main
def main():
    accelerator = Accelerator(cpu=True)
    if accelerator.process_index == 1:
        time.sleep(0.5)
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)                        # out of memory, say
        raise UserError("--train_dataset_root /nowhere: folder not found")
    t = torch.ones(1)
    for _ in range(20):
        torch.distributed.all_reduce(t)                                 # rank 0 waits for rank 1 here
        time.sleep(0.5)
run_main(main)
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["error", "kill"])
def test_a_rank_that_dies_is_named_by_the_survivor_in_one_line(tmp_path, how):
    """Issue 26, finding 11: the surviving rank printed a gloo traceback; now one line naming
    the rank that stopped and its own message (the launcher's report after it is torch's)."""
    script = tmp_path / "ranks.py"
    script.write_text(RANK_DIES)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), how],
                            capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert not any(line.startswith("[rank0]:") for line in result.stderr.splitlines()), result.stderr[-3000:]
    if how == "error":
        assert errors == ["error: --train_dataset_root /nowhere: folder not found",
                          "error: rank 0: rank 1 stopped (--train_dataset_root /nowhere: folder not found), "
                          "so this rank stops too"], result.stderr[-3000:]
    else:
        assert len(errors) == 1 and errors[0].startswith("error: rank 0: another rank of this run stopped without a "
                                                         "word"), result.stderr[-3000:]


def test_recover_ema_waits_for_no_run_it_would_race(kit, tmp_path, capsys):
    """A logdir another process holds (a training run) is left alone, in one line."""
    ckpt = fake_run(kit, tmp_path, folders=("unet", "ema"))
    first = holder(ckpt.parent, 60)
    try:
        status, stdout, stderr = run_recover(ckpt.parent, capsys)
        assert status == 2 and stdout == "" and stderr.count("\n") == 1
        assert f"--logdir {ckpt.parent} is in use by another run (pid {first.pid}" in stderr
    finally:
        first.kill()
        first.wait()
