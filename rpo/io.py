"""Atomic file writes: one home for "write a temporary file beside the target, then rename
it over the target", so a reader (or a resumed run) sees the old file or the whole new one,
never half of one — whatever kills the writer, and whenever.

Folders that must appear whole (checkpoints, dataset items, exported pipelines) use the same
idea with a temporary folder; see rpo/training/checkpoint.py and rpo/data/items.py.
"""
import json
import os


def atomic_write(path, write):
    """`write(tmp_path)`, then rename the result over `path`; the temporary file (hidden, in
    the same folder, so the rename is atomic) is removed if anything fails."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def write_bytes(path, data):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def write_json(path, value, **dump_options):
    write_text(path, json.dumps(value, **dump_options))
