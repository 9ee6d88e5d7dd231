"""Folder datasets: a root with one sub-folder per item, holding `caption.txt` and,
for image datasets, one image. Items sort by folder name.

`scan` checks the whole layout up front (missing root, empty root, a folder without
caption or image, an unreadable image) so that a script fails in its first second with
the path in the message, never hours later inside a DataLoader worker.
"""
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rpo.cli import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Item:
    name: str        # the folder's name, e.g. "0042"
    caption: str     # caption.txt, stripped
    image: str       # path of the item's image ("" for prompt-only datasets)


def list_images(folder):
    """Every image file directly inside `folder`, sorted by name."""
    return sorted(
        os.path.join(folder, f) for f in os.listdir(folder)
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
    )


def read_caption(folder):
    path = os.path.join(folder, "caption.txt")
    if not os.path.isfile(path):
        raise UserError(f"dataset item has no caption.txt: {folder}")
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def check_image(path):
    """Decode `path` fully (not just the header), so truncated files are caught here."""
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"unreadable image {path}: {e}") from None


def scan(root, need_image, check_images=True, what="dataset"):
    """Validate a folder dataset and return its items, sorted by folder name."""
    if not root or not os.path.isdir(root):
        raise UserError(f"{what} folder not found: {root}")
    names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)) and not n.startswith("."))
    if not names:
        raise UserError(f"{what} folder is empty (expected one sub-folder per item with caption.txt): {root}")
    items = []
    for name in names:
        folder = os.path.join(root, name)
        caption = read_caption(folder)
        image = ""
        if need_image:
            images = list_images(folder)
            if not images:
                raise UserError(f"dataset item has no image ({'/'.join(IMAGE_EXTENSIONS)}): {folder}")
            image = images[0]
            if check_images:
                check_image(image)
        items.append(Item(name, caption, image))
    return items


class ExpertDataset(torch.utils.data.Dataset):
    """Expert (image, caption) pairs for training, transformed as the paper's code (basiclab/DiffusionDRO) does:
    RGB, resize the shorter side to `resolution` (bilinear, antialiased), optional
    horizontal flip, centre or random square crop, scale to [-1, 1].

    Each item also reports the original size and crop corner: SDXL conditions on them.
    An item is asked for by `index` or by `(index, seed)`: the seed alone decides flip and
    crop, so the same key gives the same pixels in any worker process, which is what makes
    resume exact (see `ExpertBatches`).
    """

    def __init__(self, root, resolution, random_flip=True, random_crop=False, check_images=True):
        self.items = scan(root, need_image=True, check_images=check_images, what="train dataset")
        self.resolution = resolution
        self.random_flip = random_flip
        self.random_crop = random_crop
        self.load_pixels = True  # False: captions, flips and sizes only (with cached latents)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        rng = torch.Generator().manual_seed(seed) if seed is not None else None
        flip = self.random_flip and bool(torch.rand((), generator=rng) < 0.5)
        return self.load(index, flip, rng)

    def load(self, index, flip, rng=None):
        """Item `index`, mirrored or not; `rng` draws the random crop corner."""
        item = self.items[index]
        with Image.open(item.image) as image:
            original_size = (image.height, image.width)
            if self.load_pixels:
                image = image.convert("RGB")
        scale = self.resolution / min(original_size)
        size = (max(self.resolution, round(original_size[1] * scale)), max(self.resolution, round(original_size[0] * scale)))
        max_top, max_left = size[1] - self.resolution, size[0] - self.resolution
        if self.random_crop:
            top = int(torch.randint(0, max_top + 1, (), generator=rng))
            left = int(torch.randint(0, max_left + 1, (), generator=rng))
        else:
            top, left = max_top // 2, max_left // 2
        out = {"caption": item.caption, "original_size": torch.tensor(original_size),
               "crop_top_left": torch.tensor((top, left)), "index": index, "flipped": flip}
        if self.load_pixels:
            image = image.resize(size, Image.BILINEAR, reducing_gap=None)
            if flip:  # flip before the crop, as the paper's code does
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            image = image.crop((left, top, left + self.resolution, top + self.resolution))
            out["pixel_values"] = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return out


class PromptDataset(torch.utils.data.Dataset):
    """Prompts from a folder dataset (only caption.txt is needed), in folder-name order."""

    def __init__(self, root, what="prompt dataset"):
        self.items = scan(root, need_image=False, what=what)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return {"caption": self.items[index].caption, "index": index}


class ExpertBatches(torch.utils.data.Sampler):
    """An endless, resumable stream of batches of dataset keys `(index, seed)`.

    Epoch e shuffles all items with a generator seeded by (seed, e); rank r of `world`
    takes every world-th item of that order, so ranks see disjoint shards. Each key carries
    its own augmentation seed. Batch n is a pure function of (seed, rank, world, n):
    resuming at batch n needs nothing but n, whatever the number of DataLoader workers.
    """

    def __init__(self, num_items, batch_size, seed=0, rank=0, world=1, start=0):
        if num_items < world:
            raise UserError(f"the train dataset has {num_items} items, fewer than the {world} processes")
        self.num_items, self.batch_size = num_items, batch_size
        self.seed, self.rank, self.world, self.start = seed, rank, world, start

    def keys(self):
        epoch = 0
        while True:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            for position, index in enumerate(order[self.rank::self.world].tolist()):
                yield index, (self.seed * 1000003 + epoch) * 1000003 + position * self.world + self.rank
            epoch += 1

    def __iter__(self):
        keys = self.keys()
        batch_number = 0
        while True:
            batch = [next(keys) for _ in range(self.batch_size)]
            if batch_number >= self.start:
                yield batch
            batch_number += 1

    def __len__(self):  # endless; DataLoader only needs this for len(loader)
        return 2**62
