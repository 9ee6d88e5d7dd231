"""Writing a folder dataset (docs/design.md, "Data formats") so that a kill never leaves a half-written item.

Each item is built in a hidden `.tmp-<name>` folder beside its final place and renamed
into place when complete (`rpo.data.scan` ignores hidden folders, so a leftover one is
harmless and the next run removes it). A rerun skips items already in place, so it
completes a partial output; an output folder that holds something else (another
selection, unrelated folders) is refused before anything is written.
"""
import json
import os
import shutil

from rpo.cli import UserError
from rpo.data.folders import list_images


def item_name(index, count):
    """Zero-padded folder name, as wide as the largest index (the layout of the paper's code, basiclab/DiffusionDRO)."""
    return f"{index:0{len(str(max(count - 1, 0)))}d}"


def image_extension(path):
    """The file's own format as an extension (Pick-a-Pic's images are JPEG; a PNG stays PNG)."""
    from PIL import Image

    with Image.open(path) as image:
        return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(image.format, "png")


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _matches(folder, caption, image_names, texts=None):
    path = os.path.join(folder, "caption.txt")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:  # a non-UTF-8 file is another caption, not a crash
        if f.read().strip() != caption.strip():
            return False
    for name, text in (texts or {}).items():
        try:
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                if f.read() != text:
                    return False
        except OSError:
            return False
    return sorted(os.path.basename(p) for p in list_images(folder)) == sorted(_as_list(image_names))


def write_item(root, name, caption, image_name, image_source, info=None, texts=None):
    """Write `<root>/<name>/` (caption.txt, the image copied from `image_source`, info.json,
    and each {file name: text} of `texts`). `image_name` and `image_source` may be parallel
    lists: an item of several images (a preference pair's win and lose)."""
    temp = os.path.join(root, f".tmp-{name}")
    shutil.rmtree(temp, ignore_errors=True)
    os.makedirs(temp)
    with open(os.path.join(temp, "caption.txt"), "w", encoding="utf-8") as f:
        f.write(caption.strip() + "\n")
    for file_name, source in zip(_as_list(image_name), _as_list(image_source), strict=True):
        shutil.copyfile(source, os.path.join(temp, file_name))
    for file_name, text in (texts or {}).items():
        with open(os.path.join(temp, file_name), "w", encoding="utf-8") as f:
            f.write(text)
    if info is not None:
        with open(os.path.join(temp, "info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, ensure_ascii=False, indent=1)
    os.rename(temp, os.path.join(root, name))


def write_items(root, items, option="--output"):
    """Write `items` = [(name, caption, image_name, image_source, info[, texts])] under
    `root` (`write_item`'s arguments).

    `image_source` may be a callable returning the path (or paths), so sources are fetched
    only for items not yet written. Returns (written, already present).
    """
    items = [item if len(item) == 6 else (*item, None) for item in items]
    os.makedirs(root, exist_ok=True)
    for entry in os.listdir(root):
        if entry.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    present = {e for e in os.listdir(root) if not e.startswith(".")}
    expected = {item[0] for item in items}
    extra = sorted(present - expected)
    if extra:
        raise UserError(f"{option} {root} already holds {len(extra)} entries that are not part of this selection "
                        f"(e.g. {extra[0]}); choose another {option} or remove that folder")
    for name, caption, image_name, _, _, texts in items:
        if name in present and not _matches(os.path.join(root, name), caption, image_name, texts):
            raise UserError(f"{option} {root}: item {name} holds a different caption or image than this selection "
                            f"(an earlier run with other options?); choose another {option} or remove that folder")
    written = 0
    for name, caption, image_name, source, info, texts in items:
        if name in present:
            continue
        write_item(root, name, caption, image_name, source() if callable(source) else source, info, texts)
        written += 1
    return written, len(items) - written
