"""The scoring loop: every image once, in DataLoader workers (read, hash, decode, each
metric's own transform), model forwards in the main process, sharded over ranks.

Images are cut into global batches of `batch_size` in a fixed order; rank r takes batches
r, r + world, r + 2 world, ... So an image is always scored in the same batch whatever the
number of processes — a model forward can round differently with a different batch — and
1 and N processes give identical scores. Cached scores are not recomputed: an image whose
scores are all cached is read and hashed but not decoded.
"""
import io

import torch
from PIL import Image, UnidentifiedImageError

from rpo.data.folders import scorer_input
from rpo.scores.folders import image_key


class ImageScoringDataset(torch.utils.data.Dataset):
    """Item i of `entries` (path, caption, cache index) -> its cache key and, for each
    metric whose cache lacks it, that metric's input tensor. `cached[c][metric]` is the set
    of keys cached for cache c. An unreadable image gives `error` instead of pixels."""

    def __init__(self, entries, transforms, cached):
        self.entries, self.transforms, self.cached = entries, transforms, cached
        # metrics whose transforms are the same computation share one result: PickScore and
        # the aesthetic heads (CLIP's processor at 224), HPSv2 and CLIP score (letterbox)
        self.same_as = {m: getattr(t, "key", None) or m for m, t in transforms.items()}

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        path, caption, cache = self.entries[index]
        item = {"index": index, "key": None, "pixels": {}, "error": None}
        try:
            with open(path, "rb") as f:
                data = f.read()
            item["key"] = image_key(caption, data)
            needed = [m for m in self.transforms if item["key"] not in self.cached[cache][m]]
            if needed:
                image = Image.open(io.BytesIO(data))
                image.load()  # decode fully here, so a truncated file fails now, by path
                image = scorer_input(image)  # 16-bit scaled, not clipped; other modes as the official code sees them
                done = {}
                for m in needed:
                    if self.same_as[m] not in done:
                        done[self.same_as[m]] = self.transforms[m](image)
                    item["pixels"][m] = done[self.same_as[m]]
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            item["error"] = f"{type(e).__name__}: {e}"
        return item


def collate(items):
    """A batch: per metric, the positions in the batch that need it and their stacked pixels."""
    pixels = {}
    for position, item in enumerate(items):
        for metric, tensor in item["pixels"].items():
            pixels.setdefault(metric, ([], []))
            pixels[metric][0].append(position)
            pixels[metric][1].append(tensor)
    stacked = {}  # metrics that share their items' tensors share one stacked batch too (sent once)
    for metric, (positions, tensors) in pixels.items():
        same = tuple(id(t) for t in tensors)
        if same not in stacked:
            stacked[same] = (positions, torch.stack(tensors))
        pixels[metric] = stacked[same]
    return {
        "index": [item["index"] for item in items],
        "key": [item["key"] for item in items],
        "error": [item["error"] for item in items],
        "pixels": pixels,
    }


def shard(count, batch_size, rank, world):
    """The indices rank `rank` scores: every world-th global batch, starting at its own."""
    starts = range(rank * batch_size, count, world * batch_size)
    return [i for start in starts for i in range(start, min(start + batch_size, count))]


def score_entries(entries, scorers, cached, batch_size, num_workers=0, rank=0, world=1, progress=None,
                  on_batch=None):
    """Score this rank's share of `entries` (path, caption, cache index) with every scorer
    in `scorers` ({metric: Scorer}) where `cached` lacks the score. `on_batch(results)`
    gets each batch's results as soon as they are computed (score.py appends them to the
    cache's side files, so a killed run keeps them).

    Returns [(index, key, {metric: score}, error)] for the rank's images; `key` is None
    and `error` set for an image that could not be read.
    """
    dataset = ImageScoringDataset(entries, {m: s.transform for m, s in scorers.items()}, cached)
    mine = shard(len(entries), batch_size, rank, world)
    # `mine` is whole global batches (only the very last one can be short), so the loader's
    # batches are exactly those global batches
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=collate,
                                         persistent_workers=False, prefetch_factor=4 if num_workers else None)
    results = []
    for batch in loader:
        scores = [{} for _ in batch["index"]]
        for metric, (positions, pixels) in batch["pixels"].items():
            captions = [entries[batch["index"][p]][1] for p in positions]
            for p, value in zip(positions, scorers[metric].score_tensors(pixels, captions).tolist()):
                scores[p][metric] = value
        done = list(zip(batch["index"], batch["key"], scores, batch["error"]))
        if on_batch is not None:
            on_batch(done)
        results.extend(done)
        if progress is not None:
            progress.update(len(batch["index"]))
    return results
