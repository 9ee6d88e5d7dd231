"""Folder datasets: a root with one sub-folder per item, holding `caption.txt` and,
for image datasets, one image. Items sort by folder name.

Expert images may also come as users keep them (`ExpertDataset`):
- an image folder with `metadata.jsonl` or `metadata.csv` at its root, the `datasets`
  "imagefolder" convention: a `file_name` column (relative to the folder) and a caption
  column (default `text`); items sort by file name;
- a dataset `datasets.load_dataset` reads (a hub id, a local data folder) or a
  `save_to_disk` folder, with its `image_column` and `caption_column` (diffusers'
  train_text_to_image.py spelling and defaults); split `train`, items in row order.

`scan` (and its two siblings for the other sources) checks the whole layout up front
(missing root, empty root, a folder without caption or image, an unreadable image) so
that a script fails in its first second with the path in the message, never hours later
inside a DataLoader worker. `to_rgb` is the one conversion of any image to 8-bit RGB.
"""
import csv
import io
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rpo.cli import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # how Pillow opens 16-bit grayscale PNG/TIFF
# What opening or decoding a bad image raises: not an image, truncated, corrupt, and a
# decompression bomb (Pillow refuses more than 2 x Image.MAX_IMAGE_PIXELS, ~179 M pixels;
# DecompressionBombError derives from Exception only, so it needs naming).
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass
class Item:
    name: str        # the folder's name, e.g. "0042"; an imagefolder's file_name; a dataset's row number
    caption: str     # caption.txt, stripped
    image: str       # path of the item's image ("" for prompt-only datasets; "<dataset>[row]" for a dataset's)


def to_rgb(image):
    """An 8-bit RGB copy of a PIL image of any mode.

    `Image.convert("RGB")` clips 16-bit values at 255, so a 16-bit PNG comes out nearly
    white; here they are scaled instead: v -> round(v * 255 / 65535), which maps 0, 257 k
    and 65535 to 0, k and 255. Pixels with an alpha channel (RGBA, LA, PA, or a palette or
    RGB image with a transparent colour) are composited over white, the background a
    viewer shows, rather than keeping whatever colour a transparent pixel happens to hold.
    Everything else (L, P, 1, CMYK, YCbCr, ...) is Pillow's own conversion.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def scorer_input(image):
    """What a scorer's transform receives: 16-bit images scaled to 8-bit RGB (`to_rgb`; the
    official packages would clip them), every other mode as decoded, because each metric's
    own transform converts it as its official package does (ImageReward resizes a palette
    image before converting it to RGB, so converting first would change its score)."""
    return to_rgb(image) if image.mode in SIXTEEN_BIT_MODES else image


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
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the caption as UTF-8") from None


def check_image(path, name=None):
    """Decode `path` (a file, or bytes named `name`) fully, not just the header, so
    truncated files are caught here."""
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as image:
            image.load()
    except IMAGE_ERRORS as e:
        raise UserError(f"unreadable image {name or path}: {e}".splitlines()[0]) from None


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


def scan_imagefolder(root, caption_column="text", check_images=True, what="train dataset"):
    """Validate an image folder described by metadata.jsonl/metadata.csv; items sorted by file name."""
    found = [name for name in METADATA_FILES if os.path.isfile(os.path.join(root, name))]
    if len(found) > 1:
        raise UserError(f"{what} {root} holds both {found[0]} and {found[1]}: keep one")
    path = os.path.join(root, found[0])
    rows = read_metadata(path)
    if not rows:
        raise UserError(f"{what} is empty: {path} has no rows")
    for column in ("file_name", caption_column):
        if column not in rows[0][1]:
            raise UserError(f"{path} has no '{column}' column (it has {', '.join(map(repr, rows[0][1]))})"
                            + (": pass --caption_column" if column == caption_column else ""))
    items, seen = [], set()
    for line, row in rows:
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            raise UserError(f"{path}, line {line}: no file_name")
        if name in seen:
            raise UserError(f"{path}, line {line}: {name} is listed twice")
        seen.add(name)
        image = os.path.normpath(os.path.join(root, name))
        if not os.path.isfile(image):
            raise UserError(f"{path}, line {line}: no such image: {image}")
        caption = row.get(caption_column)
        if not isinstance(caption, str):
            raise UserError(f"{path}, line {line}: the '{caption_column}' of {name} is not a text ({caption!r:.60})")
        if check_images:
            check_image(image)
        items.append(Item(name, caption.strip(), image))
    return sorted(items, key=lambda item: item.name)


def read_metadata(path):
    """[(line number, row dict)] of a metadata.jsonl (one JSON object per line) or a
    metadata.csv (a header line, then one row per line)."""
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if path.endswith(".csv"):
                reader = csv.DictReader(f)
                return [(reader.line_num, row) for row in reader]
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{path}, line {number}: not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}, line {number}: not a JSON object")
                rows.append((number, row))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"unreadable {path}: {e}".splitlines()[0]) from None
    return rows


def load_hf_dataset(name, image_column="image", caption_column="text", cache_dir=None):
    """The `train` split of `name`, only its two columns, the image column left undecoded
    ({bytes, path}) so that images decode here, by row, with `to_rgb`."""
    import datasets

    data = open_hf_dataset(name, cache_dir)
    for column, flag_name in ((image_column, "--image_column"), (caption_column, "--caption_column")):
        if column not in data.column_names:
            raise UserError(f"--train_dataset_name {name} has no column '{column}' (it has "
                            f"{', '.join(map(repr, data.column_names))}): pass {flag_name}")
    if isinstance(data.features[image_column], datasets.Image):
        data = data.cast_column(image_column, datasets.Image(decode=False))
    return data.select_columns([image_column, caption_column])


def open_hf_dataset(name, cache_dir=None):
    """The `train` split of `name` (a hub id, a local data folder, a save_to_disk folder),
    all columns; one UserError line when it cannot be loaded."""
    import datasets

    try:
        if os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
            data = datasets.load_from_disk(name)  # a save_to_disk folder: load_dataset does not read those
            if isinstance(data, datasets.DatasetDict):
                if "train" not in data:
                    raise UserError(f"--train_dataset_name {name} has no 'train' split (it has {', '.join(data)})")
                data = data["train"]
        else:
            data = datasets.load_dataset(name, split="train", cache_dir=cache_dir)
    except UserError:
        raise
    except Exception as e:  # load_dataset raises many types (not found, offline, no such split, bad files)
        hint = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        raise UserError(f"cannot load --train_dataset_name {name}: {hint}") from None
    return data


def row_image(value):
    """A cell of an image column: encoded bytes, or a path (what an undecoded image holds)."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value


def row_caption(value):
    """A caption cell: a text, or a list of texts (then the first, as diffusers'
    train_text_to_image.py does outside training: a random pick would change with the run)."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value.strip() if isinstance(value, str) else None


def scan_hf_dataset(data, name, image_column, caption_column, check_images=True):
    """Validate every row of a `load_hf_dataset` table; items in row order."""
    if len(data) == 0:
        raise UserError(f"--train_dataset_name {name}: the train split is empty")
    items = []
    width = len(str(len(data) - 1))
    for row, values in enumerate(data):
        where = f"{name}[{row}]"
        caption = row_caption(values[caption_column])
        if caption is None:
            raise UserError(f"{where}: the '{caption_column}' is not a text ({values[caption_column]!r:.60})")
        image = row_image(values[image_column])
        if not isinstance(image, (bytes, str)) or not image:
            raise UserError(f"{where}: the '{image_column}' holds no image ({type(values[image_column]).__name__})")
        if check_images:
            check_image(image, where)
        items.append(Item(f"{row:0{width}d}", caption, where))
    return items


class ExpertDataset(torch.utils.data.Dataset):
    """Expert (image, caption) pairs for training, transformed as the paper's code (basiclab/DiffusionDRO) does:
    RGB (`to_rgb`), resize the shorter side to `resolution` (bilinear, antialiased),
    optional horizontal flip, centre or random square crop, scale to [-1, 1].

    `root` is a folder dataset or an image folder with metadata; or pass `dataset_name`
    (with `root=None`) for a `datasets` dataset (module docstring). Each source is checked
    whole when the dataset is built, before any model loads.

    Each item also reports the original size and crop corner: SDXL conditions on them.
    An item is asked for by `index` or by `(index, seed)`: the seed alone decides flip and
    crop, so the same key gives the same pixels in any worker process, which is what makes
    resume exact (see `ExpertBatches`).
    """

    def __init__(self, root, resolution, random_flip=True, random_crop=False, check_images=True, *,
                 dataset_name=None, image_column="image", caption_column="text", cache_dir=None):
        self.data, self.image_column = None, image_column  # data: the `datasets` table, if the images come from one
        if dataset_name is not None:
            if root is not None:
                raise UserError("pass either a train dataset folder or --train_dataset_name, not both")
            self.data = load_hf_dataset(dataset_name, image_column, caption_column, cache_dir)
            self.items = scan_hf_dataset(self.data, dataset_name, image_column, caption_column, check_images)
        elif root and os.path.isdir(root) and any(os.path.isfile(os.path.join(root, f)) for f in METADATA_FILES):
            self.items = scan_imagefolder(root, caption_column, check_images)
        else:
            self.items = scan(root, need_image=True, check_images=check_images, what="train dataset")
        self.resolution = resolution
        self.random_flip = random_flip
        self.random_crop = random_crop
        self.load_pixels = True  # False: captions, flips and sizes only (with cached latents)

    def open_image(self, index):
        """Item `index`'s image, opened (decoded on first use)."""
        if self.data is None:
            return Image.open(self.items[index].image)
        image = row_image(self.data[index][self.image_column])
        return Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)

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
        image = load_transformed(lambda: self.open_image(index), item.image, self.resolution, flip,
                                 self.random_crop, rng, self.load_pixels)
        out = {"caption": item.caption, "original_size": image["original_size"],
               "crop_top_left": image["crop_top_left"], "index": index, "flipped": flip}
        if self.load_pixels:
            out["pixel_values"] = image["pixel_values"]
        return out


def load_transformed(open_image, name, resolution, flip, random_crop, rng=None, load_pixels=True):
    """One training image as ExpertDataset gives it: {'original_size', 'crop_top_left'
    and, with `load_pixels`, 'pixel_values'}. `open_image()` opens it; `name` is what an
    error names. `rng` draws a random crop corner (row, then column): two images of one
    size given generators in the same state get the same crop (preference pairs)."""
    try:
        with open_image() as image:
            original_size = (image.height, image.width)
            if load_pixels:
                image = to_rgb(image)
    except IMAGE_ERRORS as e:  # changed on disk since the start-up check
        raise UserError(f"expert image {name} cannot be read any more ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    scale = resolution / min(original_size)
    size = (max(resolution, round(original_size[1] * scale)), max(resolution, round(original_size[0] * scale)))
    max_top, max_left = size[1] - resolution, size[0] - resolution
    if random_crop:
        top = int(torch.randint(0, max_top + 1, (), generator=rng))
        left = int(torch.randint(0, max_left + 1, (), generator=rng))
    else:
        top, left = max_top // 2, max_left // 2
    out = {"original_size": torch.tensor(original_size), "crop_top_left": torch.tensor((top, left))}
    if load_pixels:
        image = image.resize(size, Image.BILINEAR, reducing_gap=None)
        if flip:  # flip before the crop, as the paper's code does
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = image.crop((left, top, left + resolution, top + resolution))
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
