"""Image folders to score and their per-image score cache.

An image folder is inference.py's output: `<dir>/<prompt index>/caption.txt` and one or
more images (`.png`, `.jpg`, `.jpeg`, `.webp`). Every image of every prompt is scored
(the paper's code, basiclab/DiffusionDRO, scored one: docs/upstream.md, defect 12).

Scores are cached in `<dir>/scores_cache.json`, keyed by the metric with its version
(which includes a fingerprint of the weights) and by a hash of the image file's bytes and
its prompt: a regenerated image, a changed caption, another HPSv2 version or other
weights are scored afresh; an unchanged image is not. The file is replaced atomically.

While scoring, every batch's scores are appended (one write, fsynced) to side files
`<dir>/scores_cache.rank<r>.jsonl`, one per process (rpo/data/score_cache.py's
JsonlAppender, the dataset tools' kill-safe cache): a killed run loses at most the batch
in flight, and its rerun scores only what is missing. Reading the cache merges the side
files (a line torn by the kill is skipped); the final write folds them into the JSON
file and removes them. A score that is not a number is dropped with a warning, and so
scored again.
"""
import hashlib
import json
import os
import sys
from dataclasses import dataclass

from rpo.io import write_text
from rpo.cli import UserError
from rpo.data.folders import IMAGE_EXTENSIONS, list_images, read_caption
from rpo.data.score_cache import JsonlAppender, is_score, part_paths, read_lines  # noqa: F401 (is_score: one home)

CACHE_NAME = "scores_cache.json"
PARTS_NAME = "scores_cache"  # side files: scores_cache.rank<r>.jsonl


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
    """{metric@version: {image key: score}}: the JSON file merged with the side files of a
    run that did not finish. An unreadable JSON file is reported and ignored (it is
    rewritten whole at the end); entries whose score is not a number are dropped, with
    one warning line per file, so those images are scored again."""
    path = os.path.join(root, CACHE_NAME)
    cache = {}
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                cache = json.loads(f.read())
            if not isinstance(cache, dict) or not all(isinstance(v, dict) for v in cache.values()):
                raise ValueError("not a mapping of metric -> {image: score}")
        except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            print(f"warning: ignoring unreadable score cache {path}: {e}", file=sys.stderr)
            cache = {}
        dropped = [(m, k, v) for m, scores in cache.items() for k, v in scores.items() if not is_score(v)]
        for m, k, _ in dropped:
            del cache[m][k]
        if dropped:
            m, k, v = dropped[0]
            print(f"warning: {path}: dropped {len(dropped)} score(s) that are not numbers (e.g. {m} {k[:12]}: {v!r}); "
                  "those images are scored again", file=sys.stderr)
    parts = part_paths(root, PARTS_NAME)
    bad = 0
    for record in read_lines(parts):
        metric, key, value = record.get("metric"), record.get("key"), record.get("score")
        if isinstance(metric, str) and isinstance(key, str) and is_score(value):
            cache.setdefault(metric, {})[key] = value
        else:
            bad += 1
    if bad:
        print(f"warning: {root}: skipped {bad} malformed line(s) of {', '.join(map(os.path.basename, parts))}; "
              "those images are scored again", file=sys.stderr)
    return cache


def has_side_files(root):
    return bool(part_paths(root, PARTS_NAME))


class CacheAppender:
    """This process's side file of one image folder: `add` appends one batch's scores."""

    def __init__(self, root, rank):
        self.root, self.rank, self.writer = root, rank, None

    def add(self, metric_scores):
        """[(metric@version, image key, score)], written in one fsynced append."""
        if not metric_scores:
            return
        if self.writer is None:
            self.writer = JsonlAppender(self.root, PARTS_NAME, self.rank)
        self.writer.append([{"metric": m, "key": k, "score": v} for m, k, v in metric_scores])


def write_cache(root, cache):
    """Replace the JSON file with `cache` (which holds the side files' scores: read_cache
    merged them), then remove the side files; killed in between, the next read merges
    them again, which changes nothing."""
    write_text(os.path.join(root, CACHE_NAME), json.dumps(cache, sort_keys=True))
    for part in part_paths(root, PARTS_NAME):
        os.remove(part)
