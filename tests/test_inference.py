"""inference.py on the tiny kit: seeds and layout, batch- and process-invariance, resume,
refusals, bad input. Small sizes (32 px, 2 steps) keep each run to about a second."""
import glob
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rpo import generate
from rpo.tiny import pipelines as tiny
from rpo.cli import UserError, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import inference  # noqa: E402  (the script; nothing else in the repository has that name any more)

NUM_IMAGES = 2


def argv(kit, output, *extra):
    return ["--pretrained_model_name_or_path", kit["sd15"], "--test_dataset_root", kit["prompts"],
            "--output", str(output), "--resolution", "32", "--num_inference_steps", "2",
            "--num_images_per_prompt", str(NUM_IMAGES), "--mixed_precision", "no", "--num_workers", "2", *extra]


def captions_of(kit):
    return [open(f).read().strip() for f in sorted(glob.glob(os.path.join(kit["prompts"], "*", "caption.txt")))]


def pngs(output):
    return sorted(os.path.relpath(p, output) for p in glob.glob(os.path.join(output, "*", "*.png")))


def snapshot(output):
    """Every file under `output` with its bytes and mtime, to prove a refused run changed nothing."""
    files = {}
    for root, _, names in os.walk(output):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, output)] = (open(path, "rb").read(), os.stat(path).st_mtime_ns)
    return files


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def assert_same_images(a, b):
    """Same files, same pixels up to floating-point kernel choice.

    The noise is the same by construction; what may differ is the convolution kernel the
    CPU picks for another batch size or thread count (differences ~1e-6), which can move
    a pixel across an 8-bit rounding boundary. Images of *different* seeds differ by
    ~30-40 levels on average, so this bound tells a seed mix-up from rounding.
    """
    assert pngs(a) == pngs(b)
    for name in pngs(a):
        x, y = pixels(os.path.join(a, name)), pixels(os.path.join(b, name))
        diff = np.abs(x - y)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (name, diff.max(), (diff > 0).mean())


def run(args, capsys):
    """inference.py's main, in this process; returns (exit status, stdout, stderr)."""
    try:
        run_main(lambda: inference.main(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def reference(kit, tmp_path_factory):
    """One complete output at batch size 3, shared (read-only) by the tests below."""
    output = str(tmp_path_factory.mktemp("inference") / "reference")
    inference.main(argv(kit, output, "--batch_size", "3"))
    return output


# --------------------------------------------------------------------------- library
def test_seed_rule_work_list_and_batches(tmp_path):
    num_prompts, seed = 12, 7
    jobs, done = generate.plan(str(tmp_path), num_prompts, 3, seed)
    assert done == 0 and len(jobs) == 36
    # The protocol written out by hand: image k of prompt p -> 7 + p + 12k.
    assert [(j.prompt_index, j.image_index, j.seed) for j in jobs[:4]] == [(0, 0, 7), (0, 1, 19), (0, 2, 31), (1, 0, 8)]
    assert jobs[-1].seed == 7 + 11 + 2 * 12
    assert len({j.seed for j in jobs}) == 36
    assert jobs[5].path == os.path.join(str(tmp_path), "01", "32.png")  # two digits for 12 prompts
    # Batches run across prompt boundaries and keep the order.
    batches = generate.batches(jobs, 5)
    assert [len(b) for b in batches] == [5] * 7 + [1]
    assert [j.prompt_index for j in batches[0]] == [0, 0, 0, 1, 1]
    # Complete images leave the list; a truncated one stays.
    os.makedirs(os.path.dirname(jobs[0].path))
    for job in jobs[:3]:
        generate.save_png(Image.new("RGB", (8, 8), (9, 9, 9)), job.path)
    data = open(jobs[2].path, "rb").read()
    open(jobs[2].path, "wb").write(data[:len(data) // 2])
    left, done = generate.plan(str(tmp_path), num_prompts, 3, seed)
    assert done == 2 and [j.seed for j in left[:2]] == [31, 8]


def test_png_complete(tmp_path):
    path = str(tmp_path / "a.png")
    generate.save_png(Image.new("RGB", (16, 16), (1, 2, 3)), path)
    assert generate.png_complete(path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-1])
    assert not generate.png_complete(path)
    open(path, "wb").write(b"")
    assert not generate.png_complete(path)
    assert not generate.png_complete(str(tmp_path / "missing.png"))
    assert os.listdir(tmp_path) == ["a.png"]  # no temporaries left behind


# --------------------------------------------------------------------------- the script
def test_layout_seeds_manifest_and_rerun(kit, reference, capsys):
    captions = captions_of(kit)
    n = len(captions)
    expected = sorted(f"{p}/{p + k * n}.png" for p in range(n) for k in range(NUM_IMAGES))
    assert pngs(reference) == expected
    for p, caption in enumerate(captions):
        assert open(os.path.join(reference, str(p), "caption.txt")).read().strip() == caption
    with Image.open(os.path.join(reference, "0", "0.png")) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    manifest = generate.read_manifest(reference)
    assert manifest["settings"]["guidance_scale"] == 7.5 and manifest["settings"]["num_prompts"] == n
    assert manifest["settings"]["scheduler"] == "DDPMScheduler" and manifest["settings"]["resolution"] == 32
    assert manifest["versions"]["diffusers"]

    before = snapshot(reference)
    code, out, _ = run(argv(kit, reference, "--batch_size", "3"), capsys)
    assert code == 0
    assert f"generated 0 images (0 on 1 process), skipped {n * NUM_IMAGES} already complete" in out
    after = snapshot(reference)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
           {k: v for k, v in before.items() if k != "manifest.json"}


def test_batch_size_does_not_change_images(kit, reference, tmp_path):
    inference.main(argv(kit, tmp_path / "bs1", "--batch_size", "1"))
    assert_same_images(reference, str(tmp_path / "bs1"))
    # The tolerance above is meaningful: two seeds of one prompt are far apart.
    a, b = pixels(os.path.join(reference, "0", "0.png")), pixels(os.path.join(reference, "0", "4.png"))
    assert np.abs(a - b).mean() > 10


def test_default_resolution_is_the_pipelines(kit, tmp_path):
    args = argv(kit, tmp_path / "out", "--num_images_per_prompt", "1")
    del args[args.index("--resolution"):args.index("--resolution") + 2]
    inference.main(args)
    with Image.open(tmp_path / "out" / "0" / "0.png") as image:
        assert image.size == (64, 64)  # tiny UNet sample_size 8 x VAE factor 8


def test_resume_makes_only_missing_images(kit, reference, tmp_path, capsys):
    output = str(tmp_path / "out")
    shutil.copytree(reference, output)
    os.remove(os.path.join(output, "1", "5.png"))
    os.remove(os.path.join(output, "3", "3.png"))
    truncated = os.path.join(output, "2", "2.png")
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 3])
    stray = os.path.join(output, "1", ".5.png.12345.tmp")
    open(stray, "wb").write(b"half a png")
    before = snapshot(output)

    code, out, _ = run(argv(kit, output, "--batch_size", "2"), capsys)
    assert code == 0
    assert "generated 3 images (3 on 1 process), skipped 5 already complete" in out
    after = snapshot(output)
    remade = {"1/5.png", "3/3.png", "2/2.png"}
    for name, value in before.items():
        if name not in remade and name not in ("manifest.json", "1/.5.png.12345.tmp"):
            assert after[name] == value, name  # untouched: same bytes, same mtime
    assert not os.path.exists(stray)
    assert_same_images(reference, output)


def test_more_images_per_prompt_adds_seeds(kit, reference, tmp_path, capsys):
    # Seeds do not depend on --num_images_per_prompt, so raising it only adds images.
    output = str(tmp_path / "out")
    shutil.copytree(reference, output)
    code, out, _ = run(argv(kit, output) + ["--num_images_per_prompt", "3"], capsys)
    assert code == 0 and "generated 4 images (4 on 1 process), skipped 8" in out
    n = len(captions_of(kit))
    assert sorted(set(pngs(output)) - set(pngs(reference))) == sorted(f"{p}/{p + 2 * n}.png" for p in range(n))


def test_two_processes_give_the_same_images(kit, reference, tmp_path):
    # 7 of 8 images missing: an uneven split (4 + 3), the case where padding would
    # duplicate work and where the paper's code (basiclab/DiffusionDRO) wrote wrong captions
    # (docs/upstream.md, defect 16).
    output = str(tmp_path / "two")
    shutil.copytree(reference, output)
    for name in pngs(output)[1:]:
        os.remove(os.path.join(output, name))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           os.path.join(REPO, "inference.py"), *argv(kit, output, "--batch_size", "3")]
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generated 7 images (4 + 3 on 2 processes), skipped 1 already complete" in proc.stdout
    assert_same_images(reference, output)


# --------------------------------------------------------------------------- refusals
def test_refuses_other_settings(kit, reference, tmp_path, capsys):
    output = str(tmp_path / "out")
    shutil.copytree(reference, output)
    os.remove(os.path.join(output, "0", "0.png"))  # work is left, yet nothing may be made
    before = snapshot(output)
    code, _, err = run(argv(kit, output, "--guidance_scale", "5"), capsys)
    assert code == 2
    assert "guidance_scale=7.5" in err and "guidance_scale=5.0" in err
    code, _, err = run(argv(kit, output, "--scheduler", "DDIM"), capsys)
    assert code == 2 and "scheduler" in err
    assert snapshot(output) == before


def test_refuses_other_captions(kit, reference, tmp_path, capsys):
    output = str(tmp_path / "out")
    shutil.copytree(reference, output)
    open(os.path.join(output, "2", "caption.txt"), "w").write("a completely different prompt\n")
    before = snapshot(output)
    code, _, err = run(argv(kit, output), capsys)
    assert code == 2
    assert os.path.join(output, "2") in err and "different prompt" in err
    assert snapshot(output) == before


def test_refuses_images_without_manifest(kit, reference, tmp_path, capsys):
    output = str(tmp_path / "out")
    shutil.copytree(reference, output)
    os.remove(os.path.join(output, "manifest.json"))
    code, _, err = run(argv(kit, output), capsys)
    assert code == 2 and "manifest.json" in err


# --------------------------------------------------------------------------- bad input
def bad_inputs(kit, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    ckpt = tmp_path / "ckpt-8"
    shutil.copytree(os.path.join(kit["sd15"], "unet"), ckpt / "ema")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {
        "missing dataset": (["--test_dataset_root", str(tmp_path / "nowhere")], str(tmp_path / "nowhere")),
        "empty dataset": (["--test_dataset", str(empty)], str(empty)),
        "missing unet": (["--unet", str(tmp_path / "no_unet")], str(tmp_path / "no_unet")),
        "checkpoint root as unet": (["--unet", str(ckpt)], str(ckpt / "ema")),
        "output under a file": (["--output", str(a_file / "out")], str(a_file / "out")),
        "bad resolution": (["--resolution", "36"], "multiple of 8"),
        "unknown scheduler": (["--scheduler", "PNDM"], "--scheduler"),
        "no safety checker to turn on": (["--safety_checker"], "has no safety checker"),
    }


@pytest.mark.parametrize("case", ["missing dataset", "empty dataset", "missing unet", "checkpoint root as unet",
                                  "output under a file", "bad resolution", "unknown scheduler",
                                  "no safety checker to turn on"])
def test_bad_input_is_one_line_and_loses_nothing(kit, reference, tmp_path, capsys, case):
    output = str(tmp_path / "out")
    shutil.copytree(reference, output)
    before = snapshot(output)
    extra, named = bad_inputs(kit, tmp_path)[case]
    code, out, err = run(argv(kit, output) + extra, capsys)  # later options win over argv's
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert named in line, err
    if case != "unknown scheduler":  # argparse prints its usage line before the error
        assert err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert snapshot(output) == before


def test_refused_run_creates_nothing(kit, tmp_path, capsys):
    code, _, err = run(argv(kit, tmp_path / "new" / "out", "--resolution", "36"), capsys)  # refused after loading
    assert code == 2 and "--resolution" in err
    assert os.listdir(tmp_path) == []


def test_script_exit_status_on_bad_input(kit, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "inference.py"),
                           *argv(kit, tmp_path / "out", "--test_dataset_root", str(tmp_path / "nowhere"))],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --test_dataset_root folder not found: {tmp_path / 'nowhere'}"
    assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------- SDXL
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sdxl") / "sdxl")
    tiny.write_sdxl(path, seed=0)
    return path


def test_sdxl(kit, sdxl, tmp_path, capsys):
    base = argv(kit, tmp_path / "xl", "--scheduler", "SDXL", "--num_images_per_prompt", "1")
    base[base.index("--pretrained_model_name_or_path") + 1] = sdxl
    code, out, _ = run(base, capsys)  # no --sdxl: the family comes from model_index.json
    assert code == 0 and "generated 4 images" in out
    code, out, _ = run(base + ["--sdxl"], capsys)  # the same pipeline, the same images: nothing to add
    assert code == 0 and "generated 0 images" in out
    # --sdxl on an SD1.5 pipeline is one line naming both
    code, _, err = run(argv(kit, tmp_path / "not-xl", "--sdxl"), capsys)
    assert code == 2 and "--sdxl" in err and "StableDiffusionPipeline" in err
    assert generate.read_manifest(str(tmp_path / "xl"))["settings"]["scheduler"] == "EulerDiscreteScheduler"
    with Image.open(tmp_path / "xl" / "3" / "3.png") as image:
        assert image.size == (32, 32)
    # An SDXL UNet in an SD1.5 pipeline is refused before the first step.
    code, _, err = run(argv(kit, tmp_path / "mix", "--unet", sdxl, "--unet_subfolder", "unet"), capsys)
    assert code == 2 and "does not fit" in err


def test_unknown_scheduler_name_in_library():
    with pytest.raises(UserError, match="--scheduler"):
        generate.make_scheduler("PNDM", {})
