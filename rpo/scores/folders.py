"""Image folders to score and their per-image score cache.

An image folder is inference.py's output: `<dir>/<prompt index>/caption.txt` and one or
more images (`.png`, `.jpg`, `.jpeg`, `.webp`). Every image of every prompt is scored
(the paper's code, basiclab/DiffusionDRO, scored one: docs/upstream.md, defect 12).

Scores are cached in `<dir>/scores_cache.json`, keyed by the metric with its version
(which includes a fingerprint of the weights) and by a hash of the image file's bytes and
its prompt: a regenerated image, a changed caption, another HPSv2 version or other
weights are scored afresh; an unchanged image is not. The file is replaced atomically.
"""
import hashlib
import json
import os
import sys
from dataclasses import dataclass

from rpo.cli import UserError
from rpo.data.folders import IMAGE_EXTENSIONS, list_images, read_caption

CACHE_NAME = "scores_cache.json"


@dataclass
class Prompt:
    name: str          # the prompt folder's name, e.g. "0042"
    caption: str
    images: list       # image paths, sorted by file name


@dataclass
class ImageDir:
    root: str
    prompts: list

    def images(self):
        """(prompt, image path) for every image, in prompt then file-name order."""
        return [(prompt, path) for prompt in self.prompts for path in prompt.images]


def scan_image_dir(root, option="--dir"):
    """Check an image folder completely before any model loads, naming the bad path."""
    if not os.path.isdir(root):
        raise UserError(f"{option}: folder not found: {root}")
    names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)) and not n.startswith("."))
    if not names:
        raise UserError(f"{option} {root}: no prompt folders (expected <dir>/<prompt index>/caption.txt and images)")
    prompts = []
    for name in names:
        folder = os.path.join(root, name)
        images = list_images(folder)
        if not images:
            raise UserError(f"{option} {root}: prompt folder without images ({'/'.join(IMAGE_EXTENSIONS)}): {folder}")
        prompts.append(Prompt(name, read_caption(folder), images))
    return ImageDir(root, prompts)


def image_key(caption, data):
    """What a cached score depends on besides the metric: the image bytes and the prompt."""
    return hashlib.sha256(caption.encode("utf-8") + b"\0" + data).hexdigest()


def read_cache(root):
    """{metric@version: {image key: score}}; an unreadable cache is reported and ignored
    (it is rewritten whole at the end)."""
    path = os.path.join(root, CACHE_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            cache = json.load(f)
        if not isinstance(cache, dict) or not all(isinstance(v, dict) for v in cache.values()):
            raise ValueError("not a mapping of metric -> {image: score}")
        return cache
    except (OSError, ValueError) as e:
        print(f"warning: ignoring unreadable score cache {path}: {e}", file=sys.stderr)
        return {}


def write_atomic(path, text):
    """Write a temporary file next to `path`, then rename it over `path`: readers see the
    old file or the new one, never half of one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_cache(root, cache):
    path = os.path.join(root, CACHE_NAME)
    try:
        write_atomic(path, json.dumps(cache, sort_keys=True))
    except OSError as e:  # a read-only benchmark folder: the scores are still reported
        print(f"warning: cannot write the score cache {path}: {e}", file=sys.stderr)
