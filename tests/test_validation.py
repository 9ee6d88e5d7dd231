"""Training you can watch: captioned validation grids (layout and pixels against an
independent resize), step-0 images against inference.py on the base UNet, history.jsonl
against the TensorBoard event files, plots, trackers, and a validation that a kill left
partial completed after a resume."""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rpo.training.plots import append_history, read_history, truncate_history, write_plots
from rpo.training.validation import (BACKGROUND, TILE_RESAMPLE, grid_layout, page_names, render_page, trackers_of,
                                     weights_fingerprint)
from test_train import REPO, run, train_cmd

PNG = b"\x89PNG\r\n\x1a\n"
VAL = ["--validation_steps", "2", "--validation_num_inference_steps", "3", "--validation_guidance_scale", "3.0",
       "--score_batch_size", "2"]


def random_images(n, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


# --------------------------------------------------------------------------- the grid, pure
def test_grid_layout_holds_every_image_in_order_with_caption_and_seed():
    n = 19  # two pages: 16 + 3, the second with a short row
    captions = [f"prompt number {i}" for i in range(n)]
    captions[5] = "a very long caption " * 20
    seeds = [100 + i for i in range(n)]
    images = random_images(n)
    pages = grid_layout(n, (32, 32), captions, seeds, title="step 7")
    assert [len(p.tiles) for p in pages] == [16, 3]
    assert [t.index for p in pages for t in p.tiles] == list(range(n))
    assert pages[0].title == "step 7 (page 1/2)" and pages[1].title == "step 7 (page 2/2)"
    for p in pages:
        for t in p.tiles:
            *caption, seed = t.lines
            assert seed == f"seed {seeds[t.index]}"
            if t.index == 5:  # wrapped, cut to 3 lines, marked as cut
                assert len(caption) == 3 and caption[-1].endswith("...")
                assert captions[5].startswith(" ".join(caption[:2]))
            else:
                assert " ".join(caption) == captions[t.index]
    for p in pages:
        canvas = np.asarray(render_page(p, images))
        assert canvas.shape[:2] == (p.size[1], p.size[0])
        for t in p.tiles:
            x, y, w, h = t.box
            want = np.asarray(images[t.index].resize((w, h), TILE_RESAMPLE))
            assert np.array_equal(canvas[y:y + h, x:x + w], want), t.index
    # no filler tile: where tile 4 of the short row would be, the page is the neutral background
    last = pages[1]
    x, y, w, h = last.tiles[2].box
    gap = np.asarray(render_page(last, images))[y:y + h, x + w + 6:x + 2 * w + 6]
    assert gap.size and (gap == np.array(BACKGROUND, dtype=np.uint8)).all()
    # one page when everything fits: plain title, the old file name
    single = grid_layout(4, (32, 32), captions[:4], seeds[:4], title="step 0")
    assert len(single) == 1 and single[0].title == "step 0"
    assert page_names(3, 1) == [["step-3.png"]]
    assert page_names(3, 2) == [["step-3.png", "step-3-p1.png"], ["step-3-p2.png"]]


def test_weights_fingerprint_sees_one_bit():
    model = torch.nn.Linear(4, 3)
    before = weights_fingerprint(model)
    assert weights_fingerprint(model) == before
    with torch.no_grad():
        model.weight[1, 2] = torch.nextafter(model.weight[1, 2], torch.tensor(10.0))
    assert weights_fingerprint(model) != before
    with torch.no_grad():  # a permutation of the same values is a change too
        w = model.weight.clone()
        model.weight[0], model.weight[1] = w[1].clone(), w[0].clone()
    assert weights_fingerprint(model) != weights_fingerprint(torch.nn.Linear(4, 3))


# --------------------------------------------------------------------------- history and plots, pure
def test_history_truncates_on_resume_and_plots_what_it_holds(tmp_path):
    for step in (2, 4, 6):
        append_history(tmp_path, {"kind": "train", "step": step, "loss/loss": step / 10})
    append_history(tmp_path, {"kind": "validation", "step": 4, "metrics/pickscore": 21.5})
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a line a kill cut short
    assert len(read_history(tmp_path)) == 4
    truncate_history(tmp_path, 4)  # resumed from ckpt-4
    assert [(r["kind"], r["step"]) for r in read_history(tmp_path)] == [("train", 2), ("train", 4), ("validation", 4)]
    written = write_plots(tmp_path)
    assert written["loss.png"] == {"loss/loss": ([2, 4], [0.2, 0.4])}
    assert written["score.png"] == {"metrics/pickscore": ([4], [21.5])}
    for name in ("loss.png", "score.png"):
        with open(tmp_path / "plots" / name, "rb") as f:
            assert f.read(8) == PNG
        Image.open(tmp_path / "plots" / name).verify()


def test_report_to_parsing():
    assert trackers_of("none") is None and trackers_of("") is None and trackers_of("all") == "all"
    assert trackers_of("tensorboard") == ["tensorboard"]


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(kit, tmp_path_factory):
    """4 micro-steps, 2 updates, validation at 0, 2, 4; checkpoints 2 and 4 both resumable."""
    log = tmp_path_factory.mktemp("val") / "log"
    proc = run(train_cmd(kit, log, "--num_steps", "4", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
                         "--checkpoints_total_limit", "2", "--buffer_update_steps", "2", "--learning_rate", "1e-3", *VAL))
    return log, proc.stdout


def inference(kit, out, *extra):
    run([sys.executable, os.path.join(REPO, "inference.py"), "--pretrained_model_name_or_path", kit["sd15"],
         "--test_dataset_root", kit["prompts"], "--output", str(out), "--scheduler", "DDPM", "--num_inference_steps", "3",
         "--guidance_scale", "3.0", "--num_images_per_prompt", "1", "--resolution", "32", "--seed", "0",
         "--mixed_precision", "no", "--batch_size", "2", "--num_workers", "0", *extra])


def pngs(folder):
    return sorted(os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "*", "*.png")))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_step0_images_are_the_base_model(kit, trained, tmp_path):
    log, stdout = trained
    inference(kit, tmp_path / "base")  # no --unet: the pipeline's own UNet
    step0, names = log / "images" / "step-0", pngs(log / "images" / "step-0")
    assert names and names == pngs(tmp_path / "base")
    for name in names:
        assert np.abs(pixels(step0 / name) - pixels(tmp_path / "base" / name)).max() <= 1, name
    # the comparison can tell trained from base weights: step 4 (EMA after two updates at lr 1e-3) differs
    assert max(np.abs(pixels(log / "images" / "step-4" / n) - pixels(step0 / n)).max() for n in names) > 1
    assert "validating step 0: 4 images..." in stdout and "validated step 0: done in" in stdout
    assert "effective batch 4 = 2 per process x 2 accumulation x 1 process" in stdout
    assert "4 micro-steps = 2 optimizer updates" in stdout


def test_saved_grid_shows_every_image_with_its_caption(kit, trained):
    log, _ = trained
    folder = log / "images" / "step-2"
    names = pngs(folder)
    captions = [open(folder / n.split(os.sep)[0] / "caption.txt").read().strip() for n in names]
    seeds = [int(os.path.basename(n)[:-4]) for n in names]
    images = [Image.open(folder / n).convert("RGB") for n in names]  # one image per prompt: (image, prompt) order
    (page,) = grid_layout(len(images), images[0].size, captions, seeds, title="step 2")
    grid = np.asarray(Image.open(log / "images" / "step-2.png").convert("RGB"))
    assert grid.shape[:2] == (page.size[1], page.size[0])
    for tile in page.tiles:
        x, y, w, h = tile.box
        assert np.array_equal(grid[y:y + h, x:x + w], np.asarray(images[tile.index].resize((w, h), TILE_RESAMPLE)))
    assert not os.path.exists(log / "images" / "step-2-p2.png")


def scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = {}
    for path in glob.glob(os.path.join(logdir, "rpo", "**", "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def test_history_matches_tensorboard_and_plots_exist(trained):
    log, _ = trained
    train = [r for r in read_history(log) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]  # one point per optimizer update
    tb = scalars(log)
    loss_tags = [t for t in tb if t.startswith("loss/")]
    assert len(loss_tags) >= 8
    for r in train:
        for tag in loss_tags:
            assert r[tag] == pytest.approx(tb[tag][r["step"]], rel=1e-6, abs=1e-12), (tag, r["step"])
    with open(log / "plots" / "loss.png", "rb") as f:
        assert f.read(8) == PNG
    Image.open(log / "plots" / "loss.png").verify()
    assert not os.path.exists(log / "plots" / "score.png")  # no --score: nothing to plot


@pytest.mark.slow
def test_partial_validation_is_completed_after_resume(kit, trained, tmp_path):
    """A kill during the validation of step 4 (ckpt-4 already saved): one PNG and the grid
    missing. The resumed run makes that one image again, equal to the lost one, and keeps
    the others as they were (the same weights: the fingerprint matches)."""
    src, _ = trained
    log = tmp_path / "log"
    shutil.copytree(src, log)
    folder = log / "images" / "step-4"
    names = pngs(folder)
    lost = names[1]
    original = pixels(folder / lost)
    os.remove(folder / lost)
    os.remove(log / "images" / "step-4.png")
    kept = {n: os.stat(folder / n).st_mtime_ns for n in names if n != lost}
    proc = run(train_cmd(kit, log, "--num_steps", "4", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
                         "--checkpoints_total_limit", "2", "--buffer_update_steps", "2", "--learning_rate", "1e-3",
                         "--resume", "latest", *VAL))
    assert "validating step 4: 1 images (3 already made)..." in proc.stdout
    assert np.abs(pixels(folder / lost) - original).max() <= 1
    assert {n: os.stat(folder / n).st_mtime_ns for n in kept} == kept
    assert os.path.isfile(log / "images" / "step-4.png")
    # other weights (a changed fingerprint) make the whole step again
    with open(folder / "validation.json") as f:
        stamp = json.load(f)
    stamp["weights"] = "0" * 64
    with open(folder / "validation.json", "w") as f:
        json.dump(stamp, f)
    os.remove(log / "images" / "step-4.png")
    proc = run(train_cmd(kit, log, "--num_steps", "4", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
                         "--checkpoints_total_limit", "2", "--buffer_update_steps", "2", "--learning_rate", "1e-3",
                         "--resume", "latest", *VAL))
    assert "validating step 4: 4 images..." in proc.stdout
    assert [r["step"] for r in read_history(log) if r["kind"] == "train"] == [2, 4]  # resume kept one point per update


def test_report_to_none_trains(kit, tmp_path):
    run(train_cmd(kit, tmp_path, "--num_steps", "2", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
                  "--report_to", "none"))
    assert os.path.isdir(tmp_path / "ckpt-2" / "ema")
    assert not glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert [r["step"] for r in read_history(tmp_path)] == [2]


def test_missing_tracker_fails_at_start_in_one_line(kit, tmp_path):
    import importlib.util
    name = "wandb" if importlib.util.find_spec("wandb") is None else "bogus_tracker"
    proc = run(train_cmd(kit, tmp_path, "--num_steps", "2", "--gradient_accumulation_steps", "2", "--report_to", name), ok=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --report_to") and name in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "ckpt-2")
