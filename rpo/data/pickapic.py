"""Reading Pick-a-Pic shard by shard, and the small on-disk state `tools.pickapic` resumes from.

The dataset (hub `yuvalkirstain/pickapic_v1|v2`, or a local folder in the same layout:
`data/<split>-NNNNN-of-NNNNN.parquet`) is read one parquet shard at a time through
`datasets` in streaming mode, so at most one shard (~0.5 GB for v2) is ever held, in
memory, never on disk. Only the columns used are read:

    caption, jpg_0, jpg_1 (encoded image bytes), image_0_uid, image_1_uid,
    label_0, label_1 (1/0, 0/1, or 0.5/0.5 for a tie)

State kept under `<cache>/pickapic/` (all of it safe to delete; it is only a cache):

    scores/<metric>-<version>.rank<r>.jsonl   score per (uid, caption)      (rpo.data.score_cache)
    rows/<dataset>/<split>.rank<r>.jsonl      one line per finished shard: its rows without images
    images/<uid>                              encoded bytes of images that may be selected
"""
import hashlib
import os
import re

from rpo.io import write_bytes
from rpo.cli import UserError
from rpo.data.score_cache import JsonlAppender, part_paths, read_lines

COLUMNS = ("caption", "jpg_0", "jpg_1", "image_0_uid", "image_1_uid", "label_0", "label_1")


def hub_id(version):
    return f"yuvalkirstain/pickapic_{version}"


def dataset_tag(dataset):
    """A folder name for a hub id or a local path (local paths get a hash of where they are)."""
    if os.path.isdir(dataset):
        path = os.path.abspath(dataset)
        return f"{os.path.basename(path)}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    return dataset.replace("/", "--")


def list_shards(dataset, split):
    """The split's parquet shards, in order. Unknown split or missing dataset: UserError."""
    import datasets

    if not os.path.isdir(dataset) and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", dataset):  # not owner/name
        raise UserError(f"--dataset folder not found: {dataset}")
    try:
        builder = datasets.load_dataset_builder(dataset)
    except ConnectionError as e:
        raise UserError(f"--dataset {dataset}: no such local folder, and the Hugging Face hub cannot be reached "
                        f"({e}); pass --dataset PATH to a local copy in the same layout") from None
    except (OSError, ValueError) as e:  # EmptyDatasetError, DatasetNotFoundError, bad layout
        raise UserError(f"--dataset {dataset}: cannot open it as a dataset: {e}") from None
    files = dict(builder.config.data_files or {})
    if split not in files:
        raise UserError(f"--split {split!r} is not in {dataset}; available splits: {', '.join(files) or 'none'}")
    shards = list(files[split])
    if not shards:
        raise UserError(f"--split {split} of {dataset} has no data files")
    return shards


def shard_name(path):
    return path.rstrip("/").rsplit("/", 1)[-1]


def read_shard(path, columns=COLUMNS):
    """All rows of one shard as dicts holding `columns` (streamed: nothing lands on disk)."""
    import datasets

    try:
        stream = datasets.load_dataset("parquet", data_files=[path], split="train", streaming=True)
        missing = [c for c in columns if c not in (stream.column_names or [])]
        if missing:
            raise UserError(f"{path} is not in the Pick-a-Pic schema: missing column(s) {', '.join(missing)}")
        return list(datasets.load_dataset("parquet", data_files=[path], split="train", streaming=True,
                                          columns=list(columns)))
    except (OSError, ValueError) as e:  # not parquet, truncated download, network failure mid-shard
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def compact_row(row):
    """What selection needs of a row, without its images."""
    caption = (row["caption"] or "").strip()
    return [row["image_0_uid"], row["image_1_uid"], caption, row["label_0"], row["label_1"]]


class RowIndex:
    """The rows (without images) of every shard already processed, one JSONL line per shard."""

    def __init__(self, folder, split, rank=0):
        self.folder, self.split, self.rank = folder, split, rank
        self.writer = None

    def load(self):
        shards = {}
        for record in read_lines(part_paths(self.folder, self.split)):
            if isinstance(record.get("shard"), str) and isinstance(record.get("rows"), list):
                shards[record["shard"]] = record["rows"]
        return shards

    def add(self, shard, rows):
        if self.writer is None:
            self.writer = JsonlAppender(self.folder, self.split, self.rank)
        self.writer.append([{"shard": shard, "rows": rows}])


_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def safe_name(uid):
    """`uid` itself if it is a plain file name (Pick-a-Pic uids are UUIDs), else a hash of it."""
    return uid if _SAFE.match(uid) else "h" + hashlib.sha1(uid.encode()).hexdigest()


class ImageStore:
    """Encoded image bytes by uid, written atomically (any process may write)."""

    def __init__(self, folder):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def path(self, uid):
        return os.path.join(self.folder, safe_name(uid))

    def has(self, uid):
        return os.path.isfile(self.path(uid))

    def put(self, uid, data):
        write_bytes(self.path(uid), data)
