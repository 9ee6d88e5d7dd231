"""Shared pieces of the scorer tests: the tiny scorer weights (written once per session)
and small image folders in inference.py's layout."""
import os
import random

import pytest

from rpo.tiny.scorers import write_tiny_scorers
from rpo.tiny.pipelines import CAPTIONS, random_image


@pytest.fixture(scope="session")
def scorer_weights(tmp_path_factory):
    """`python -m rpo.tiny scorers` output, written once per session (this fixture is
    imported by several test modules; the folder check keeps it to one write)."""
    path = tmp_path_factory.getbasetemp() / "tiny_scorers"
    if not (path / "imagereward" / "ImageReward.pt").exists():
        write_tiny_scorers(str(path), seed=0)
    return str(path)


def write_image_dir(root, seed, prompts=3, per_prompt=2, sizes=((96, 96), (80, 64), (64, 96)), captions=CAPTIONS):
    """inference.py's output layout: root/<index>/caption.txt + images (png, one jpg)."""
    rng = random.Random(seed)
    for p in range(prompts):
        folder = os.path.join(root, f"{p:02d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "caption.txt"), "w") as f:
            f.write(captions[p % len(captions)] + "\n")
        for k in range(per_prompt):
            width, height = sizes[(p + k) % len(sizes)]
            ext = "jpg" if (p, k) == (1, 1) else "png"
            random_image(rng, width, height).save(os.path.join(folder, f"{p + k * prompts}.{ext}"))
    return str(root)
