"""`tools.pickapic --mode pairs|labels`: Pick-a-Pic's human choices written as preference
data (docs/design.md, "Preference data"), streamed shard by shard as the expert mode is.

Pass 1 (every process, its shards j ≡ rank mod N): each image of each row is decoded in
full once (a corrupt one is remembered by its absence), the readable ones' bytes go to the
image store (`<cache>/pickapic/images/<uid>`, shared with the expert mode), and the shard's
rows without images to a row index of their own (`rows/<dataset>-preference/`), which marks
the shard done. A rerun skips done shards.

Pass 2 (main process): the rows of every shard in dataset order go through
rpo/data/preference_pairs.py; each kept pair or image is copied from the store into the
output folder (rpo/data/items.py: atomic items, a rerun completes a partial output). Every
skipped duplicate and unreadable image is listed, one JSON line each, in
`<cache>/pickapic/skipped/<dataset>-<split>-<mode>.jsonl`, and the first few are printed.

Disk: the store holds every readable image once (≈ the output's size; delete the cache
when done); Pick-a-Pic v2 train has ~1 M non-tie rows, so the pairs output is ~2 M images.
"""
import json
import os

from rpo.cli import UserError
from rpo.data import pickapic
from rpo.data.folders import check_image
from rpo.data.items import image_extension, item_name, write_items
from rpo.data.preference_pairs import build_labels, build_pairs
from rpo.io import write_text

MODES = ("pairs", "labels")
SHOWN = 5   # skipped items printed; all of them are in the skipped file


def preference_index(root, dataset, split, rank):
    return pickapic.RowIndex(os.path.join(root, "rows", pickapic.dataset_tag(dataset) + "-preference"), split, rank)


def store_readable(row, store):
    """Put both images of `row` in the store if they decode; a corrupt one is left out."""
    for side in (0, 1):
        uid, data = row[f"image_{side}_uid"], row[f"jpg_{side}"]
        if store.has(uid) or not isinstance(data, bytes):
            continue
        try:
            check_image(data, uid)
        except UserError:
            continue
        store.put(uid, data)


def stream_shards(shards, index, store, rank, world):
    """Pass 1, this process's share."""
    done = index.load()
    mine = [(j, path) for j, path in enumerate(shards) if j % world == rank and pickapic.shard_name(path) not in done]
    for count, (j, path) in enumerate(mine):
        rows = pickapic.read_shard(path)
        for row in rows:
            store_readable(row, store)
        index.add(pickapic.shard_name(path), [pickapic.compact_row(row) for row in rows])
        print(f"[process {rank}] shard {j + 1}/{len(shards)} ({count + 1}/{len(mine)} of mine): {len(rows)} rows",
              flush=True)


def all_rows(shards, index):
    """[(where, compact row)] of every shard, in dataset order."""
    done = index.load()
    rows = []
    for path in shards:
        name = pickapic.shard_name(path)
        if name not in done:
            raise UserError(f"shard {name} was not processed (did another process fail?); rerun to complete it")
        rows += [(f"{name}:{i}", row) for i, row in enumerate(done[name])]
    return rows


def pair_items(pairs, store, info):
    """write_items entries of the pairs: `<i>/caption.txt, win.<ext>, lose.<ext>, info.json`."""
    items = []
    for i, pair in enumerate(pairs):
        paths = [store.path(pair.win), store.path(pair.lose)]
        names = [f"win.{image_extension(paths[0])}", f"lose.{image_extension(paths[1])}"]
        items.append((item_name(i, len(pairs)), pair.caption, names, paths,
                      {**info, "win_uid": pair.win, "lose_uid": pair.lose, "row": pair.where}))
    return items


def label_items(images, store, info):
    """write_items entries of the labelled images: `<i>/caption.txt, <uid>.<ext>, label.txt, info.json`."""
    items = []
    for i, image in enumerate(images):
        path = store.path(image.uid)
        label = "desirable" if image.desirable else "undesirable"
        file_name = f"{pickapic.safe_name(image.uid)}.{image_extension(path)}"
        items.append((item_name(i, len(images)), image.caption, file_name, path,
                      {**info, "uid": image.uid, "label": label, "row": image.where}, {"label.txt": label + "\n"}))
    return items


def finish(mode, shards, index, store, cache_root, dataset, split, output):
    """Pass 2: decide, write the output, name what was skipped. Returns the counts."""
    rows = all_rows(shards, index)
    if not rows:
        raise UserError(f"--split {split} of {dataset} has no rows")
    build = build_pairs if mode == "pairs" else build_labels
    kept, skipped, counts = build(rows, store.has)
    if not kept:
        raise UserError(f"--mode {mode}: no {'pair' if mode == 'pairs' else 'labelled image'} in --split {split} of "
                        f"{dataset} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    info = {"dataset": dataset, "split": split}
    items = pair_items(kept, store, info) if mode == "pairs" else label_items(kept, store, info)
    written, present = write_items(output, items)
    skipped_path = os.path.join(cache_root, "skipped", f"{pickapic.dataset_tag(dataset)}-{split}-{mode}.jsonl")
    os.makedirs(os.path.dirname(skipped_path), exist_ok=True)
    write_text(skipped_path, "".join(json.dumps({"reason": kind, "row": where, "detail": detail}) + "\n"
                                     for kind, where, detail in skipped))
    print(f"{dataset} [{split}] --mode {mode}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for kind, where, detail in skipped[:SHOWN]:
        print(f"skipped ({kind}) row {where}: {detail}")
    if skipped:
        print(f"{len(skipped)} skipped in all, listed in {skipped_path}")
    print(f"wrote {written} item(s) to {output}, {present} already there")
    return counts
