"""Nothing lost, nothing silent (issue 17): score.py killed mid-run resumes with only the
missing images, a damaged cache entry is rescored, inference.py regenerates a damaged PNG
and refuses weights swapped under the same path, and every bad input (non-UTF-8 caption,
binary --config, read-only or full output, fp16 on the CPU, an unreachable hub) is one
line and exit status 2. Faults are injected: SIGKILL at a random moment, byte flips,
read-only and full tmpfs mounts (or, where mounting is not allowed, a patched os.write)."""
import errno
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import score
from rpo import cli, generate
from rpo.data import score_cache
from rpo.scores.folders import CACHE_NAME, read_cache
from scores_fixtures import write_image_dir
from test_inference import argv, inference, pixels, run as run_inference
from test_scores_cli import counting_scorers, run_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def messages(stderr):
    """stderr's lines without progress bars (tqdm redraws with carriage returns)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]


def side_files(d):
    return sorted(glob.glob(os.path.join(d, "scores_cache.rank*.jsonl")))


def image_keys(d):
    """{image path: cache key}, computed here from the bytes and the caption (rpo/scores/folders.py's rule)."""
    keys = {}
    for folder in sorted(glob.glob(os.path.join(d, "*", ""))):
        caption = open(os.path.join(folder, "caption.txt")).read().strip()
        for path in sorted(glob.glob(os.path.join(folder, "*.png")) + glob.glob(os.path.join(folder, "*.jpg"))):
            keys[path] = hashlib.sha256(caption.encode() + b"\0" + open(path, "rb").read()).hexdigest()
    return keys


# --------------------------------------------------------------------------- mounts
def can_mount():
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = "/tmp/.rpo-mount-probe"
    os.makedirs(probe, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", probe])
    return ok


MOUNT = can_mount()


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, readonly=False, fill=False, keep=0): a fresh tmpfs (root only); `fill`
    leaves only `keep` bytes free (a full disk); remounted read-only after `populate(path)`."""
    if not MOUNT:
        pytest.skip("mount -t tmpfs needs root; the os.write-patched tests cover the full disk")
    mounted = []

    def mount(size="4m", populate=None, readonly=False, keep=None):
        path = tmp_path / f"mnt{len(mounted)}"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(path)
        if populate:
            populate(str(path))
        if keep is not None:  # fill up, then give back `keep` bytes
            filler = path / ".filler"
            with open(filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
            os.truncate(filler, max(0, os.path.getsize(filler) - keep))
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return str(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)])


# --------------------------------------------------------------------------- score.py
SLOW_SCORE = """
import sys, time
import score
from rpo.scores import hpsv2, pickscore
for cls in (pickscore.PickScore, hpsv2.HPSv2):  # slow enough to be killed in the middle
    def slow(self, pixels, prompts, inner=cls.score_tensors):
        time.sleep(0.15)
        return inner(self, pixels, prompts)
    cls.score_tensors = slow
score.run_main(lambda: score.main(sys.argv[1:]))
"""


def test_killed_score_run_resumes_with_only_the_missing_images(scorer_weights, tmp_path, capsys, monkeypatch):
    dirs = [write_image_dir(tmp_path / "a", seed=1, prompts=4), write_image_dir(tmp_path / "b", seed=2, prompts=3)]
    total = {d: len(image_keys(d)) for d in dirs}                            # 8 + 6 images
    flags = ["--pickscore", "--hpsv2", "--batch_size", "1", "--num_workers", "0", "--weights_dir", scorer_weights,
             "--dir", dirs[0], "--dir", dirs[1]]
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SCORE, *flags, "--output", str(tmp_path / "killed")],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after = random.Random().randint(1, 10)                              # images, at a random moment
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        lines = sum(open(p, "rb").read().count(b"\n") for d in dirs for p in side_files(d))
        if lines >= 2 * kill_after:                                          # one line per image and metric
            break
        time.sleep(0.01)
    time.sleep(random.random() * 0.15)                                       # anywhere inside the next batch
    proc.send_signal(signal.SIGKILL)
    stderr = proc.communicate()[1].decode()
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    assert not os.path.exists(tmp_path / "killed" / "scores.csv")
    # a line torn by a kill in the middle of a write
    with open(side_files(dirs[0])[0], "ab") as f:
        f.write(b'{"metric": "pickscore@')

    # what the side files hold, read here: per dir and metric, the keys already scored
    kept = {d: {} for d in dirs}
    for d in dirs:
        for path in side_files(d):
            for line in open(path, "rb"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                kept[d].setdefault(record["metric"].split("@")[0], set()).add(record["key"])
    missing = {m: sum(total[d] - len(kept[d].get(m, set()) & set(image_keys(d).values())) for d in dirs)
               for m in ("pickscore", "hpsv2")}
    assert 0 < missing["pickscore"] < sum(total.values()), missing            # killed in the middle

    counts = counting_scorers(monkeypatch)
    status, resumed_table, _ = run_score(flags + ["--output", str(tmp_path / "resumed")], capsys)
    assert status == 0
    assert counts == {m: n for m, n in missing.items() if n}                  # only the missing ones
    assert all(side_files(d) == [] for d in dirs)                              # folded into scores_cache.json
    assert all(len(v) == total[d] for d in dirs for v in json.load(open(os.path.join(d, CACHE_NAME))).values())

    for d in dirs:                                                             # the same, in one go
        os.remove(os.path.join(d, CACHE_NAME))
    counts.clear()
    status, one_shot_table, _ = run_score(flags + ["--output", str(tmp_path / "one_shot")], capsys)
    assert status == 0 and counts == {m: sum(total.values()) for m in ("pickscore", "hpsv2")}
    assert resumed_table == one_shot_table
    for name in ("scores.csv", "scores.json"):
        assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "one_shot" / name).read_text()


def test_non_numeric_cached_scores_are_dropped_and_rescored(scorer_weights, tmp_path, capsys, monkeypatch):
    a = write_image_dir(tmp_path / "a", seed=3)
    # batch size 1: a batch holding a missing image is scored whole (rpo/scores/loop.py), so
    # one image per batch makes the count below exactly the images whose scores were dropped
    args = ["--pickscore", "--batch_size", "1", "--num_workers", "0", "--dir", a, "--weights_dir", scorer_weights,
            "--output", str(tmp_path / "out")]
    assert run_score(args, capsys)[0] == 0
    first = (tmp_path / "out" / "scores.csv").read_text()
    path = os.path.join(a, CACHE_NAME)
    cache = json.load(open(path))
    name = next(iter(cache))
    keys = sorted(cache[name])
    cache[name][keys[0]], cache[name][keys[1]], cache[name][keys[2]] = "0.5x", None, True
    json.dump(cache, open(path, "w"))
    with open(os.path.join(a, "scores_cache.rank0.jsonl"), "w") as f:       # and one in a side file
        f.write(json.dumps({"metric": name, "key": keys[3], "score": "nan?"}) + "\n")
    del cache[name][keys[3]]
    json.dump(cache, open(path, "w"))

    counts = counting_scorers(monkeypatch)
    status, _, stderr = run_score(args, capsys)
    assert status == 0 and counts == {"pickscore": 4}
    assert "dropped 3 score(s) that are not numbers" in stderr and "malformed line" in stderr
    assert (tmp_path / "out" / "scores.csv").read_text() == first
    assert all(isinstance(v, float) for v in json.load(open(path))[name].values())


def test_full_disk_while_scoring_is_one_line_and_keeps_what_was_scored(scorer_weights, tmp_path, capsys, monkeypatch):
    """In-process ENOSPC from the second append on (the tmpfs tests below use a real full disk)."""
    a = write_image_dir(tmp_path / "a", seed=4)
    args = ["--pickscore", "--batch_size", "2", "--num_workers", "0", "--dir", a, "--weights_dir", scorer_weights,
            "--output", str(tmp_path / "out")]
    calls, real_write = [], os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl"):
            calls.append(len(data))
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(score_cache.os, "write", write)
    status, _, stderr = run_score(args, capsys)
    (line,) = messages(stderr)
    assert status == 2 and line.startswith("error: No space left on device writing ") and "rank0.jsonl" in line
    monkeypatch.setattr(score_cache.os, "write", real_write)
    counts = counting_scorers(monkeypatch)
    assert run_score(args, capsys)[0] == 0 and counts == {"pickscore": 4}     # the first batch (2) was kept


def test_read_only_or_full_folders_are_refused_before_scoring(scorer_weights, tmp_path, tmpfs, capsys, monkeypatch):
    counts = counting_scorers(monkeypatch)
    readonly = tmpfs(populate=lambda p: write_image_dir(os.path.join(p, "a"), seed=5), readonly=True)
    full = tmpfs(size="1m", populate=lambda p: write_image_dir(os.path.join(p, "a"), seed=6), keep=0)
    fine = write_image_dir(tmp_path / "fine", seed=7)
    for d, output, where in ((os.path.join(readonly, "a"), tmp_path / "out", "--dir"),
                             (os.path.join(full, "a"), tmp_path / "out", "--dir"),
                             (fine, os.path.join(readonly, "out"), "--output"),
                             (fine, os.path.join(full, "new", "out"), "--output")):
        status, _, stderr = run_score(["--clip", "--dir", d, "--weights_dir", scorer_weights, "--output", str(output)],
                                      capsys)
        assert status == 2 and stderr.count("\n") == 1 and stderr.startswith(f"error: {where} ")
        assert ("Read-only file system" in stderr) if readonly in stderr else ("No space left" in stderr)
    assert counts == {}


def test_non_utf8_caption_and_binary_config(scorer_weights, tmp_path, capsys):
    a = write_image_dir(tmp_path / "a", seed=8)
    caption = os.path.join(a, "01", "caption.txt")
    open(caption, "wb").write("une île".encode("latin-1"))
    status, _, stderr = run_score(["--clip", "--dir", a, "--weights_dir", scorer_weights], capsys)
    assert status == 2 and stderr.count("\n") == 1 and caption in stderr and "UTF-8" in stderr

    config = tmp_path / "config.yaml"
    config.write_bytes(bytes(range(256)) * 4)
    status, _, stderr = run_score(["--config", str(config)], capsys)
    assert status == 2 and stderr.count("\n") == 1 and str(config) in stderr and "not a UTF-8 text file" in stderr


# --------------------------------------------------------------------------- inference.py
def test_damaged_png_is_regenerated(kit, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_inference(argv(kit, out), capsys)[0] == 0
    names = sorted(glob.glob(str(out / "*" / "*.png")))
    victim = random.Random().choice(names)
    before = pixels(victim)
    data = bytearray(open(victim, "rb").read())
    for i in random.Random().sample(range(len(data) // 4, 3 * len(data) // 4), 3):  # flip bytes in the middle
        data[i] ^= 0xFF
    open(victim, "wb").write(data)
    assert not generate.png_complete(victim)
    untouched = {p: open(p, "rb").read() for p in names if p != victim}
    code, stdout, _ = run_inference(argv(kit, out), capsys)
    assert code == 0 and f"generated 1 images" in stdout and f"skipped {len(names) - 1} already complete" in stdout
    assert (pixels(victim) == before).all()
    assert all(open(p, "rb").read() == b for p, b in untouched.items())


def test_png_complete_catches_every_flip_and_truncation(tmp_path):
    from PIL import Image
    path = str(tmp_path / "a.png")
    generate.save_png(Image.effect_noise((48, 48), 40).convert("RGB"), path)
    data = open(path, "rb").read()
    assert generate.png_complete(path)
    rng = random.Random(0)
    for _ in range(200):
        damaged = bytearray(data)
        damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        open(path, "wb").write(damaged)
        assert not generate.png_complete(path)
    for cut in (1, 12, len(data) // 2, len(data) - 1):
        open(path, "wb").write(data[:cut])
        assert not generate.png_complete(path)
    open(path, "wb").write(data + b"\0")                                      # trailing bytes after IEND
    assert not generate.png_complete(path)


def test_weights_swapped_under_the_same_path_are_refused(kit, tmp_path, capsys):
    unet = tmp_path / "unet"
    shutil.copytree(os.path.join(kit["sd15"], "unet"), unet)
    out = tmp_path / "out"
    assert run_inference(argv(kit, out, "--unet", str(unet), "--num_images_per_prompt", "1"), capsys)[0] == 0
    manifest = json.load(open(out / "manifest.json"))
    weights = manifest["settings"]["weights"]
    assert sorted(weights) == ["text_encoder", "unet", "vae"] and weights["unet"]["folder"] == str(unet)
    (file,) = [n for n in os.listdir(unet) if n.endswith(".safetensors")]
    assert weights["unet"]["files"][file] == hashlib.sha256(open(unet / file, "rb").read()).hexdigest()

    # a rerun with the same weights is accepted (and reads nothing anew: the memo holds)
    code, stdout, _ = run_inference(argv(kit, out, "--unet", str(unet)), capsys)
    assert code == 0 and "generated" in stdout

    tensors = load_file(str(unet / file))                                    # fine-tune one middle tensor
    names = sorted(tensors)
    middle = names[len(names) // 2]
    tensors[middle] = tensors[middle] + 1e-3 * torch.ones_like(tensors[middle])
    size = os.path.getsize(unet / file)
    save_file(tensors, str(unet / file), metadata={"format": "pt"})
    assert os.path.getsize(unet / file) == size                             # same path, same size
    before = {p: open(p, "rb").read() for p in glob.glob(str(out / "**"), recursive=True) if os.path.isfile(p)}
    code, _, stderr = run_inference(argv(kit, out, "--unet", str(unet)), capsys)
    assert code == 2 and stderr.count("\n") == 1 and "the UNet weights changed" in stderr and file in stderr
    assert {p: open(p, "rb").read() for p in before} == before


def test_vae_swap_is_named(kit, tmp_path, capsys):
    pipeline = tmp_path / "sd15"
    shutil.copytree(kit["sd15"], pipeline)
    args = argv(kit, tmp_path / "out", "--num_images_per_prompt", "1")
    args[args.index(kit["sd15"])] = str(pipeline)
    assert run_inference(args, capsys)[0] == 0
    (file,) = glob.glob(str(pipeline / "vae" / "*.safetensors"))
    tensors = load_file(file)
    key = sorted(tensors)[0]
    tensors[key] = -tensors[key]
    save_file(tensors, file, metadata={"format": "pt"})
    code, _, stderr = run_inference(args, capsys)
    assert code == 2 and "the VAE weights changed" in stderr and "UNet" not in stderr


def test_inference_bad_input_is_one_line(kit, tmp_path, capsys):
    prompts = tmp_path / "prompts"
    shutil.copytree(kit["prompts"], prompts)
    caption = sorted(glob.glob(str(prompts / "*" / "caption.txt")))[1]
    open(caption, "wb").write(b"\xff\xfe a cat")
    args = argv(kit, tmp_path / "out")
    args[args.index(kit["prompts"])] = str(prompts)
    code, _, stderr = run_inference(args, capsys)
    assert code == 2 and stderr.count("\n") == 1 and caption in stderr and "UTF-8" in stderr

    code, _, stderr = run_inference(argv(kit, tmp_path / "out2", "--mixed_precision", "fp16"), capsys)
    assert code == 2 and stderr.count("\n") == 1 and "fp16 on the CPU" in stderr
    assert not os.path.exists(tmp_path / "out2")

    config = tmp_path / "c.json"
    config.write_bytes(b"\x00\xff\xfe\x80" * 100)
    code, _, stderr = run_inference(argv(kit, tmp_path / "out3", "--config", str(config)), capsys)
    assert code == 2 and stderr.count("\n") == 1 and "not a UTF-8 text file" in stderr


def test_inference_full_disk_is_one_line_and_the_rerun_completes(kit, tmp_path, tmpfs, capsys):
    reference = tmp_path / "reference"
    assert run_inference(argv(kit, reference), capsys)[0] == 0
    root = tmpfs(size="1m", keep=3 * 4096)                                     # room for the probe, not the images
    out = os.path.join(root, "out")
    code, _, stderr = run_inference(argv(kit, out), capsys)
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("error: No space left on device")
    os.remove(os.path.join(root, ".filler"))                                 # space freed: the rerun completes
    assert run_inference(argv(kit, out), capsys)[0] == 0
    names = sorted(os.path.relpath(p, reference) for p in glob.glob(str(reference / "*" / "*.png")))
    assert sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "*", "*.png"))) == names
    for name in names:
        assert abs(pixels(os.path.join(out, name)) - pixels(reference / name)).max() <= 1


def test_inference_read_only_output_is_refused(kit, tmpfs, capsys):
    root = tmpfs(readonly=True)
    code, _, stderr = run_inference(argv(kit, os.path.join(root, "out")), capsys)
    assert code == 2 and stderr.count("\n") == 1 and "--output" in stderr and "Read-only file system" in stderr


# --------------------------------------------------------------------------- no network
@pytest.mark.slow
def test_unreachable_hub_fails_within_seconds(kit, scorer_weights, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                            "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=ROOT, OMP_NUM_THREADS="1",
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    a = write_image_dir(tmp_path / "a", seed=9)
    for cmd in ([os.path.join(ROOT, "inference.py"), "--pretrained_model_name_or_path", "nobody/not-cached",
                 "--test_dataset_root", kit["prompts"], "--output", str(tmp_path / "out"), "--mixed_precision", "no"],
                [os.path.join(ROOT, "score.py"), "--pickscore", "--dir", a, "--output", str(tmp_path / "s")]):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=tmp_path,
                                timeout=120)
        seconds = time.perf_counter() - start
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr[-2000:]
        assert lines[0].startswith("warning: http://127.0.0.1:9 does not answer") and len(lines) == 2, lines
        assert lines[1].startswith("error: ") and ("download" in lines[1] or "--weights_dir" in lines[1])
        # no network attempt was made (not a timed assertion: the machine's load varies); the
        # subprocess timeout above only stops a hang
        assert "retry" not in result.stderr.lower() and "Retrying" not in result.stderr, result.stderr[-2000:]
        print(f"{os.path.basename(cmd[0])}: failed in {seconds:.1f} s")
