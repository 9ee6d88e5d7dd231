"""The scoring loop: every image once, in DataLoader workers (read, hash, decode, each
metric's own transform), model forwards in the main process, sharded over ranks.

Images are cut into global batches of `batch_size` in a fixed order; rank r takes batches
r, r + world, r + 2 world, ... So an image is always scored in the same batch whatever the
number of processes — a model forward can round differently with a different batch — and
1 and N processes give identical scores. A rerun (after a kill, a full disk) scores each
missing image in that same batch too, with the batch's cached images alongside (their
cached scores are kept), so resumed and uninterrupted runs give bit-identical scores; a
batch whose every score is cached is read and hashed but not decoded.
"""
import io

import torch
from PIL import Image

from rpo.data.folders import IMAGE_ERRORS, scorer_input
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
        item, data = self.read(index)
        if item["error"] is None:
            self.decode(item, data, [m for m in self.transforms if item["key"] not in self.cached[item["cache"]][m]])
        return item

    def read(self, index):
        """(item with its cache key, or an error; the file's bytes)."""
        path, caption, cache = self.entries[index]
        item = {"index": index, "key": None, "pixels": {}, "error": None, "cache": cache}
        try:
            with open(path, "rb") as f:
                data = f.read()
            item["key"] = image_key(caption, data)
            return item, data
        except OSError as e:
            item["error"] = f"{type(e).__name__}: {e}"
            return item, None

    def decode(self, item, data, needed):
        """Put each `needed` metric's input tensor into `item` (or set its error)."""
        if not needed:
            return
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # decode fully here, so a truncated file fails now, by path
            image = scorer_input(image)  # 16-bit scaled, not clipped; other modes as the official code sees them
            done = {}
            for m in needed:
                if self.same_as[m] not in done:
                    done[self.same_as[m]] = self.transforms[m](image)
                item["pixels"][m] = done[self.same_as[m]]
        except IMAGE_ERRORS as e:
            item["pixels"], item["error"] = {}, f"{type(e).__name__}: {e}"


class BatchScoringDataset(torch.utils.data.Dataset):
    """Item b = global batch b, read and decoded whole: a metric is computed for every
    readable image of the batch as soon as one of them lacks it in the cache. So each image
    is scored in the very batch it would be in with an empty cache, and a rerun after a
    kill or a full disk gives bit-identical scores (a model forward rounds differently with
    another batch); the cost is rescoring the cached images of at most the batches that
    hold missing ones. Images whose every score is cached are read and hashed, not decoded."""

    def __init__(self, images, batches):
        self.images, self.batches = images, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, b):
        read = [self.images.read(index) for index in self.batches[b]]
        metrics = self.images.transforms
        needed = [m for m in metrics
                  if any(item["error"] is None and item["key"] not in self.images.cached[item["cache"]][m]
                         for item, _ in read)]
        for item, data in read:
            if item["error"] is None:
                self.images.decode(item, data, needed)
        return collate([item for item, _ in read])


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
        "cache": [item["cache"] for item in items],
        "index": [item["index"] for item in items],
        "key": [item["key"] for item in items],
        "error": [item["error"] for item in items],
        "pixels": pixels,
    }


def shard(count, batch_size, rank, world):
    """The indices rank `rank` scores: every world-th global batch, starting at its own."""
    return [i for batch in global_batches(count, batch_size, rank, world) for i in batch]


def global_batches(count, batch_size, rank, world):
    """Rank `rank`'s global batches (lists of indices): batches r, r + world, r + 2 world, ..."""
    starts = range(rank * batch_size, count, world * batch_size)
    return [list(range(start, min(start + batch_size, count))) for start in starts]


def _same(batch):
    return batch


def score_entries(entries, scorers, cached, batch_size, num_workers=0, rank=0, world=1, progress=None,
                  on_batch=None):
    """Score this rank's share of `entries` (path, caption, cache index) with every scorer
    in `scorers` ({metric: Scorer}) where `cached` lacks the score. `on_batch(results)`
    gets each batch's results as soon as they are computed (score.py appends them to the
    cache's side files, so a killed run keeps them).

    Returns [(index, key, {metric: score}, error)] for the rank's images, each holding only
    the scores `cached` lacked (a batch's cached images are scored along, see
    BatchScoringDataset, but their cached scores stay the ones reported); `key` is None
    and `error` set for an image that could not be read.
    """
    images = ImageScoringDataset(entries, {m: s.transform for m, s in scorers.items()}, cached)
    batches = global_batches(len(entries), batch_size, rank, world)
    loader = torch.utils.data.DataLoader(BatchScoringDataset(images, batches), batch_size=None, shuffle=False,
                                         num_workers=num_workers, collate_fn=_same, persistent_workers=False,
                                         prefetch_factor=4 if num_workers else None)
    results = []
    for batch in loader:
        scores = [{} for _ in batch["index"]]
        for metric, (positions, pixels) in batch["pixels"].items():
            captions = [entries[batch["index"][p]][1] for p in positions]
            for p, value in zip(positions, scorers[metric].score_tensors(pixels, captions).tolist()):
                if batch["key"][p] not in cached[batch["cache"][p]][metric]:  # computed along: the cache keeps its own
                    scores[p][metric] = value
        done = list(zip(batch["index"], batch["key"], scores, batch["error"]))
        if on_batch is not None:
            on_batch(done)
        results.extend(done)
        if progress is not None:
            progress.update(len(batch["index"]))
    return results
