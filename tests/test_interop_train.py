"""Bring your own model: pipelines built independently of the tiny kit (tests/interop_kit.py:
a 514-token byte-level tokenizer, a PNDM config without clip_sample, a Karras DPM-Solver
config, a v-prediction model) with non-square expert images in an image folder with
metadata, each through train.py -> resume -> inference.py -> score.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from interop_kit import write_imagefolder_experts, write_independent_sd15
from test_train import REPO, assert_same_weights, run


def walk(value):
    yield value
    for child in (value.values() if isinstance(value, dict) else value if isinstance(value, list) else []):
        yield from walk(child)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    out = tmp_path_factory.mktemp("imagefolder")
    write_imagefolder_experts(out, sizes=((40, 24), (24, 48)), n=4)
    return str(out)


def train(pipeline, experts, logdir, *extra):
    return run([sys.executable, os.path.join(REPO, "train.py"), "--pretrained_model_name_or_path", pipeline,
                "--train_dataset", experts, "--logdir", str(logdir), "--resolution", "16", "--batch_size", "2",
                "--buffer_batch_size", "2", "--buffer_size", "2", "--buffer_num_inference_steps", "3",
                "--mixed_precision", "no", "--dataloader_num_workers", "0", "--gradient_accumulation_steps", "2",
                "--checkpointing_steps", "2", "--buffer_update_steps", "2", "--report_to", "tensorboard",
                "--checkpoints_total_limit", "2", *extra])


@pytest.mark.parametrize("scheduler", [pytest.param("pndm", marks=pytest.mark.slow), pytest.param("karras", marks=pytest.mark.slow),
                                       pytest.param("vpred", marks=pytest.mark.slow)])
def test_independent_pipeline_trains_resumes_generates_and_scores(tmp_path, experts, scheduler, scorer_weights):
    pipeline = write_independent_sd15(tmp_path / "pipe", scheduler=scheduler)
    train(pipeline, experts, tmp_path / "straight", "--num_steps", "4")
    train(pipeline, experts, tmp_path / "split", "--num_steps", "2")
    proc = train(pipeline, experts, tmp_path / "split", "--num_steps", "4", "--resume", "latest")
    assert "resumed from" in proc.stdout + proc.stderr
    assert_same_weights(tmp_path / "straight" / "ckpt-4" / "ema", tmp_path / "split" / "ckpt-4" / "ema")
    with open(tmp_path / "straight" / "training_config.json") as f:
        assert json.load(f)["runs"][0]["args"]["pretrained_model_name_or_path"] == pipeline

    prompts = tmp_path / "prompts"
    for i, caption in enumerate(["a red square", "two blue dots"]):
        os.makedirs(prompts / str(i))
        (prompts / str(i) / "caption.txt").write_text(caption + "\n")
    out = tmp_path / "images"
    run([sys.executable, os.path.join(REPO, "inference.py"), "--pretrained_model_name_or_path", pipeline,
         "--unet", str(tmp_path / "straight" / "ckpt-4" / "ema"), "--test_dataset_root", str(prompts),
         "--output", str(out), "--num_inference_steps", "2", "--num_images_per_prompt", "2", "--resolution", "16",
         "--mixed_precision", "no", "--num_workers", "0"])
    pngs = sorted(p for p in out.rglob("*.png"))
    assert len(pngs) == 4
    from PIL import Image
    assert all(np.asarray(Image.open(p)).shape == (16, 16, 3) for p in pngs)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "score.py"), "--clip", "--dir", str(out), "--weights_dir",
                           scorer_weights, "--num_workers", "0", "--output", str(tmp_path / "scores")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "scores" / "scores.json") as f:
        table = json.load(f)
    counts = [v["count"] for v in walk(table) if isinstance(v, dict) and "count" in v]
    assert counts == [4]  # the four images, one metric
