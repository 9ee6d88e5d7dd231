"""Preference data for training (docs/design.md, "Preference data"): pairs (caption,
preferred image, other image) for Diffusion-DPO, labelled images (caption, image,
desirable or not) for Diffusion-KTO.

Sources, each checked whole when the dataset is built (a missing or empty folder, a
corrupt image, a non-UTF-8 caption, a missing partner image or label: one UserError line
naming the path), before any model loads:
- the folder layout `tools.pickapic --mode pairs|labels` writes: one sub-folder per item,
  `caption.txt` + `win.<ext>` + `lose.<ext>` (pairs), or `caption.txt` + one image +
  `label.txt` holding `desirable` or `undesirable` (labels); items sort by folder name;
- an image folder whose `metadata.jsonl`/`metadata.csv` names the files, in the `datasets`
  imagefolder convention (`<column>_file_name` columns become image columns): pairs
  `win_file_name`, `lose_file_name` and the caption column (default `text`); labels
  `file_name`, the caption column and `label`; items sort by the first file name;
- a dataset `datasets` loads by name (hub id, data folder, save_to_disk folder), split
  `train`, in row order: pairs in the Pick-a-Pic schema (`caption`, `jpg_0`, `jpg_1`,
  `label_0`, `label_1`: ties dropped, with `image_0_uid`/`image_1_uid` also repeated
  comparisons, as rpo/data/preference_pairs.py does) or with `win`/`lose` image columns;
  labels with `image`, caption and `label` columns.

Transforms are ExpertDataset's (rpo/data/folders.py `load_transformed`); the two images of
a pair get the same flip and, with random crops, the same crop draws (the same corner when
they have the same size, as Pick-a-Pic's pairs do), so the pair stays comparable.
"""
import io
import os
from dataclasses import dataclass

import torch
from PIL import Image

from rpo.cli import UserError
from rpo.data.folders import (METADATA_FILES, check_image, list_images, load_transformed, open_hf_dataset,
                              read_caption, read_metadata, row_caption, row_image)
from rpo.data.preference_pairs import build_pairs, choice

LABEL_WORDS = {"desirable": True, "undesirable": False, "1": True, "0": False, "true": True, "false": False}
PAIR_SIDES = ("win", "lose")


@dataclass
class PairItem:
    name: str
    caption: str
    images: tuple      # (win, lose): paths, or (row, column) of a `datasets` table


@dataclass
class LabelledItem:
    name: str
    caption: str
    images: tuple      # (image,) as PairItem's
    desirable: bool


def parse_label(value, where):
    """True (desirable) / False (undesirable) from a word, 0/1 or a bool."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    word = str(value).strip().lower() if isinstance(value, str) else None
    if word not in LABEL_WORDS:
        raise UserError(f"{where}: label must be desirable or undesirable (or 1/0, true/false), got {value!r:.40}")
    return LABEL_WORDS[word]


def _folders(root, what):
    if not root or not os.path.isdir(root):
        raise UserError(f"{what} folder not found: {root}")
    names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)) and not n.startswith("."))
    if not names:
        raise UserError(f"{what} folder is empty (expected one sub-folder per item with caption.txt): {root}")
    return names


def _named_image(folder, stem):
    """The image of `folder` called `stem`.<ext>; None if there is none."""
    found = [p for p in list_images(folder) if os.path.splitext(os.path.basename(p))[0] == stem]
    if len(found) > 1:
        raise UserError(f"{folder} holds {len(found)} images named {stem}: keep one")
    return found[0] if found else None


def scan_pair_folders(root, check_images=True, what="preference pairs"):
    items = []
    for name in _folders(root, what):
        folder = os.path.join(root, name)
        caption = read_caption(folder)
        paths = tuple(_named_image(folder, side) for side in PAIR_SIDES)
        for side, path in zip(PAIR_SIDES, paths):
            if path is None:
                raise UserError(f"preference pair has no {side} image ({side}.png/.jpg/.jpeg/.webp): {folder}")
            if check_images:
                check_image(path)
        items.append(PairItem(name, caption, paths))
    return items


def read_label_file(folder):
    path = os.path.join(folder, "label.txt")
    if not os.path.isfile(path):
        raise UserError(f"labelled image has no label.txt: {folder}")
    try:
        with open(path, encoding="utf-8") as f:
            return parse_label(f.read(), path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def scan_label_folders(root, check_images=True, what="labelled images"):
    items = []
    for name in _folders(root, what):
        folder = os.path.join(root, name)
        caption = read_caption(folder)
        images = list_images(folder)
        if len(images) != 1:
            raise UserError(f"labelled image folder must hold exactly one image, it holds {len(images)}: {folder}")
        if check_images:
            check_image(images[0])
        items.append(LabelledItem(name, caption, (images[0],), read_label_file(folder)))
    return items


def _metadata_rows(root, columns, what):
    found = [name for name in METADATA_FILES if os.path.isfile(os.path.join(root, name))]
    if len(found) > 1:
        raise UserError(f"{what} {root} holds both {found[0]} and {found[1]}: keep one")
    path = os.path.join(root, found[0])
    rows = read_metadata(path)
    if not rows:
        raise UserError(f"{what} is empty: {path} has no rows")
    for column in columns:
        if column not in rows[0][1]:
            raise UserError(f"{path} has no '{column}' column (it has {', '.join(map(repr, rows[0][1]))})")
    return path, rows


def _metadata_image(root, path, line, row, column, check_images):
    name = row.get(column)
    if not isinstance(name, str) or not name:
        raise UserError(f"{path}, line {line}: no {column}")
    image = os.path.normpath(os.path.join(root, name))
    if not os.path.isfile(image):
        raise UserError(f"{path}, line {line}: no such image: {image}")
    if check_images:
        check_image(image)
    return image


def _metadata_caption(path, line, row, column):
    caption = row.get(column)
    if not isinstance(caption, str):
        raise UserError(f"{path}, line {line}: the '{column}' is not a text ({caption!r:.60})")
    return caption.strip()


def scan_pair_imagefolder(root, caption_column="text", check_images=True, what="preference pairs"):
    columns = [f"{side}_file_name" for side in PAIR_SIDES]
    path, rows = _metadata_rows(root, columns + [caption_column], what)
    items = []
    for line, row in rows:
        images = tuple(_metadata_image(root, path, line, row, c, check_images) for c in columns)
        items.append(PairItem(row["win_file_name"], _metadata_caption(path, line, row, caption_column), images))
    return sorted(items, key=lambda item: item.name)


def scan_label_imagefolder(root, caption_column="text", label_column="label", check_images=True,
                           what="labelled images"):
    path, rows = _metadata_rows(root, ["file_name", caption_column, label_column], what)
    items = []
    for line, row in rows:
        image = _metadata_image(root, path, line, row, "file_name", check_images)
        items.append(LabelledItem(row["file_name"], _metadata_caption(path, line, row, caption_column), (image,),
                                  parse_label(row[label_column], f"{path}, line {line}")))
    return sorted(items, key=lambda item: item.name)


def _undecoded(data, columns):
    import datasets

    for column in columns:
        if isinstance(data.features[column], datasets.Image):
            data = data.cast_column(column, datasets.Image(decode=False))
    return data


def _require(data, name, columns):
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise UserError(f"dataset {name} has no column(s) {', '.join(map(repr, missing))} (it has "
                        f"{', '.join(map(repr, data.column_names))})")


def _check_cell(data, row, column, name, check_images):
    image = row_image(data[row][column])
    where = f"{name}[{row}].{column}"
    if not isinstance(image, (bytes, str)) or not image:
        raise UserError(f"{where}: holds no image")
    if check_images:
        check_image(image, where)


def scan_pair_dataset(data, name, caption_column=None, check_images=True):
    """Items of a `datasets` table of pairs (module docstring); images stay in the table."""
    pickapic = all(c in data.column_names for c in ("jpg_0", "jpg_1", "label_0", "label_1"))
    caption_column = caption_column or ("caption" if pickapic else "text")
    columns = ["jpg_0", "jpg_1", "label_0", "label_1"] if pickapic else list(PAIR_SIDES)
    _require(data, name, [caption_column] + columns)
    if len(data) == 0:
        raise UserError(f"dataset {name}: the train split is empty")
    if pickapic:
        uids = all(c in data.column_names for c in ("image_0_uid", "image_1_uid"))
        rows = []
        for row in range(len(data)):
            values = data[row]
            caption = row_caption(values[caption_column]) or ""
            uid = (values["image_0_uid"], values["image_1_uid"]) if uids else (f"{row}.0", f"{row}.1")
            rows.append((str(row), [uid[0], uid[1], caption, values["label_0"], values["label_1"]]))
        pairs, _, _ = build_pairs(rows, lambda uid: True)
        items = []
        for pair in pairs:
            row = int(pair.where)
            winner = choice(data[row]["label_0"], data[row]["label_1"])
            columns = ("jpg_0", "jpg_1") if winner == 0 else ("jpg_1", "jpg_0")
            items.append(PairItem(f"{row:0{len(str(len(data) - 1))}d}", pair.caption, tuple((row, c) for c in columns)))
    else:
        items = []
        for row in range(len(data)):
            caption = row_caption(data[row][caption_column])
            if caption is None:
                raise UserError(f"{name}[{row}]: the '{caption_column}' is not a text")
            items.append(PairItem(f"{row:0{len(str(len(data) - 1))}d}", caption, tuple((row, c) for c in PAIR_SIDES)))
    if not items:
        raise UserError(f"dataset {name}: no labelled pair (every row is a tie or has no caption)")
    for item in items:
        for row, column in item.images:
            _check_cell(data, row, column, name, check_images)
    return items


def scan_label_dataset(data, name, image_column="image", caption_column="text", label_column="label",
                       check_images=True):
    _require(data, name, [image_column, caption_column, label_column])
    if len(data) == 0:
        raise UserError(f"dataset {name}: the train split is empty")
    items = []
    for row in range(len(data)):
        values = data[row]
        caption = row_caption(values[caption_column])
        if caption is None:
            raise UserError(f"{name}[{row}]: the '{caption_column}' is not a text")
        _check_cell(data, row, image_column, name, check_images)
        items.append(LabelledItem(f"{row:0{len(str(len(data) - 1))}d}", caption, ((row, image_column),),
                                  parse_label(values[label_column], f"{name}[{row}].{label_column}")))
    return items


class _Images(torch.utils.data.Dataset):
    """What the pair and labelled datasets share: where an image is, the key -> flip -> transform."""

    def __init__(self, resolution, random_flip, random_crop):
        self.resolution, self.random_flip, self.random_crop = resolution, random_flip, random_crop
        self.data = None   # the `datasets` table, when the images live in one

    def __len__(self):
        return len(self.items)

    def open(self, ref):
        if isinstance(ref, str):
            return Image.open(ref)
        image = row_image(self.data[ref[0]][ref[1]])
        return Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)

    def transformed(self, index, seed):
        """The item's images, one flip for all, each crop drawn from the same generator state."""
        rng = torch.Generator().manual_seed(seed) if seed is not None else None
        flip = self.random_flip and bool(torch.rand((), generator=rng) < 0.5)
        state = rng.get_state() if rng is not None else None
        out = []
        for ref in self.items[index].images:
            if rng is not None:
                rng.set_state(state)
            name = ref if isinstance(ref, str) else f"row {ref[0]}, column {ref[1]}"
            out.append(load_transformed(lambda: self.open(ref), name, self.resolution, flip, self.random_crop, rng))
        return flip, {k: torch.stack([o[k] for o in out]) for k in out[0]}

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        flip, images = self.transformed(index, seed)
        return {"caption": self.items[index].caption, "index": index, "flipped": flip, **self.extra(index), **images}

    def extra(self, index):
        return {}


def _is_imagefolder(root):
    return root and os.path.isdir(root) and any(os.path.isfile(os.path.join(root, f)) for f in METADATA_FILES)


class PairDataset(_Images):
    """Preference pairs. An item: {'caption', 'index', 'flipped', 'pixel_values' (2, 3, R, R):
    [preferred, other], 'original_size' (2, 2), 'crop_top_left' (2, 2)}. Keys as
    ExpertDataset's: `index` or `(index, seed)`, the seed alone deciding flip and crop."""

    def __init__(self, root, resolution, random_flip=True, random_crop=False, check_images=True, *,
                 dataset_name=None, caption_column=None, cache_dir=None):
        super().__init__(resolution, random_flip, random_crop)
        if dataset_name is not None:
            if root is not None:
                raise UserError("pass either a preference pair folder or a dataset name, not both")
            self.data = open_hf_dataset(dataset_name, cache_dir)
            pickapic = all(c in self.data.column_names for c in ("jpg_0", "jpg_1"))
            self.data = _undecoded(self.data, [c for c in (("jpg_0", "jpg_1") if pickapic else PAIR_SIDES)
                                               if c in self.data.column_names])
            self.items = scan_pair_dataset(self.data, dataset_name, caption_column, check_images)
        elif _is_imagefolder(root):
            self.items = scan_pair_imagefolder(root, caption_column or "text", check_images)
        else:
            self.items = scan_pair_folders(root, check_images)


class LabelledDataset(_Images):
    """Images labelled desirable or undesirable. An item: {'caption', 'index', 'flipped',
    'desirable' (bool), 'pixel_values' (1, 3, R, R), 'original_size' (1, 2),
    'crop_top_left' (1, 2)}; keys as PairDataset's."""

    def __init__(self, root, resolution, random_flip=True, random_crop=False, check_images=True, *,
                 dataset_name=None, image_column="image", caption_column="text", label_column="label",
                 cache_dir=None):
        super().__init__(resolution, random_flip, random_crop)
        if dataset_name is not None:
            if root is not None:
                raise UserError("pass either a labelled image folder or a dataset name, not both")
            self.data = open_hf_dataset(dataset_name, cache_dir)
            if image_column in self.data.column_names:
                self.data = _undecoded(self.data, [image_column])
            self.items = scan_label_dataset(self.data, dataset_name, image_column, caption_column, label_column,
                                            check_images)
        elif _is_imagefolder(root):
            self.items = scan_label_imagefolder(root, caption_column, label_column, check_images)
        else:
            self.items = scan_label_folders(root, check_images)

    def extra(self, index):
        return {"desirable": self.items[index].desirable}
