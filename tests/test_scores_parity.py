"""Parity with the official scorer code (docs/environment.md, "Set B"): the same tiny weights and
images scored by the hpsv2 (hpsv2x) and image-reward packages, and by the published
recipes of PickScore, the aesthetic heads and CLIP score on transformers 4.55, in the
separate virtual environment built from requirements-parity.txt (`make test-parity`),
must equal ours within 1e-5 (relative for |score| > 1: HPSv2 is a cosine x 100).

The set-B python is `$RPO_PARITY_PYTHON`, else `.venv-parity/bin/python`. Without it the
tests are skipped, unless `RPO_REQUIRE_PARITY=1` (as `make test-parity` sets): then they fail.
"""
import json
import os
import random
import subprocess

import numpy as np
import pytest
from PIL import Image

from rpo.scores import load_scorer
from rpo.scores.loop import score_entries
from rpo.tiny.pipelines import CAPTIONS, random_image

pytestmark = pytest.mark.parity
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_PYTHON = os.environ.get("RPO_PARITY_PYTHON", os.path.join(ROOT, ".venv-parity", "bin", "python"))
# official result -> (metric, HPSv2 version)
KEYS = {"hpsv2_v2.0": ("hpsv2", "v2.0"), "hpsv2_v2.1": ("hpsv2", "v2.1"), "imagereward": ("imagereward", "v2.0"),
        "pickscore": ("pickscore", "v2.0"), "aestheticv1": ("aestheticv1", "v2.0"),
        "aestheticv2": ("aestheticv2", "v2.0"), "clip": ("clip", "v2.0")}


def load(key, weights):
    name, hps_version = KEYS[key]
    return load_scorer(name, weights, hps_version=hps_version)


@pytest.fixture(scope="module")
def official(scorer_weights, tmp_path_factory):
    if not os.path.isfile(PARITY_PYTHON):
        message = f"set-B environment not built ({PARITY_PYTHON}): run `make test-parity`"
        if os.environ.get("RPO_REQUIRE_PARITY") == "1":
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("parity")
    rng = random.Random(11)
    # the formats and shapes that reach the scorers: square PNGs as generated, other sizes
    # and formats as in expert data, grayscale and palette images
    specs = [(512, 512, "png", "RGB"), (300, 200, "jpg", "RGB"), (64, 80, "png", "RGB"), (200, 256, "png", "L"),
             (128, 96, "png", "P"), (230, 180, "webp", "RGB"), (512, 512, "png", "RGB")]
    pairs = []
    for i, (width, height, ext, mode) in enumerate(specs):
        image = random_image(rng, width, height)
        image = image.convert("P", palette=Image.ADAPTIVE) if mode == "P" else image.convert(mode)
        path = str(folder / f"{i}.{ext}")
        image.save(path)
        pairs.append([path, CAPTIONS[i % len(CAPTIONS)]])
    # prompts past ImageReward's 35 BERT tokens and CLIP's 77: truncation must match too
    pairs[1][1] = ", ".join(CAPTIONS[:3])
    pairs[6][1] = ", ".join(CAPTIONS) + ", highly detailed, 8k, trending on artstation"
    with open(folder / "pairs.json", "w") as f:
        json.dump(pairs, f)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HPS_ROOT=str(folder / "hps_root"),
               PYTHONPATH="")
    result = subprocess.run([PARITY_PYTHON, os.path.join(ROOT, "tests", "scores_official.py"), scorer_weights,
                             str(folder / "pairs.json"), str(folder / "official.json")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(folder / "official.json") as f:
        return pairs, json.load(f)


def assert_equal_within(ours, theirs, what):
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    difference = np.abs(ours - theirs) / np.maximum(1.0, np.abs(theirs))
    assert difference.max() <= 1e-5, f"{what}: ours {ours} vs official {theirs}"
    assert np.ptp(theirs) > 1e-3, f"{what}: the tiny model barely depends on its input"


def test_official_checkpoint_fully_loaded(official):
    _, scores = official
    assert scores["imagereward_unloaded"] == []  # the package loads strict=False: check it took every tensor


@pytest.mark.parametrize("key", list(KEYS))
def test_scores_equal_official(key, official, scorer_weights):
    pairs, scores = official
    scorer = load(key, scorer_weights)
    images = [Image.open(path) for path, _ in pairs]
    ours = scorer.score(images, [prompt for _, prompt in pairs]).tolist()
    assert_equal_within(ours, scores[key], key)


def test_score_py_loop_equals_official(official, scorer_weights):
    """The path score.py takes: bytes read and decoded in DataLoader workers, batched."""
    pairs, scores = official
    scorers = {key: load(key, scorer_weights) for key in ("pickscore", "hpsv2_v2.0", "imagereward")}
    entries = [(path, prompt, 0) for path, prompt in pairs]
    results = score_entries(entries, scorers, [{m: set() for m in scorers}], batch_size=3, num_workers=2)
    assert [r[0] for r in results] == list(range(len(pairs))) and all(r[3] is None for r in results)
    for key in scorers:
        assert_equal_within([r[2][key] for r in results], scores[key], key)
