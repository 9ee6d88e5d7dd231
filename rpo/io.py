"""Atomic file writes: one home for "write a temporary file beside the target, then rename
it over the target", so a reader (or a resumed run) sees the old file or the whole new one,
never half of one — whatever kills the writer, and whenever.

Folders that must appear whole (checkpoints, dataset items, exported pipelines) use the same
idea with a temporary folder; see rpo/training/checkpoint.py and rpo/data/items.py.

A full disk met while writing such a folder (`disk_space_guard`) is one line naming the
folder, the space the write needs and the space free, and the temporary folder is removed:
torch.save and safetensors word ENOSPC as a RuntimeError ("unexpected pos ...") or a
SafetensorError, which `is_disk_full` recognises.
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


# --------------------------------------------------------------------------- a full disk
DISK_FULL_WORDS = ("No space left", "os error 28", "Disk quota exceeded", "os error 122", "file write failed",
                   "unexpected pos")  # safetensors' and torch.save's (PytorchStreamWriter) wording of ENOSPC


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def free_bytes(path):
    """Free space (for this user) on the file system that holds `path` or, if it does not
    exist yet, its nearest existing parent."""
    import shutil
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def is_disk_full(error, folder, needed=0):
    """Whether `error`, raised while writing into `folder`, is a full disk or quota: an
    OSError with ENOSPC/EDQUOT, a library's wording of it (torch.save's PytorchStreamWriter
    and safetensors raise RuntimeError/SafetensorError), or any write error on a file
    system with less free space than the write needs."""
    import errno
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(word in str(error) for word in DISK_FULL_WORDS):
        return True
    try:
        return isinstance(error, (OSError, RuntimeError)) and free_bytes(folder) < max(needed, 1 << 16)
    except OSError:
        return False


def disk_full_message(folder, needed, what):
    free = free_bytes(folder)
    return (f"No space left on device writing {what} to {folder}: it needs about {human_bytes(needed)}, "
            f"{human_bytes(free)} free there; free space (or choose another folder) and rerun: nothing was half-written")


def check_space(folder, needed, what):
    """Refuse before writing when the file system holding `folder` has less than `needed` bytes free."""
    from rpo.cli import UserError
    if free_bytes(folder) < needed:
        raise UserError(disk_full_message(folder, needed, what))


class disk_space_guard:
    """Inside the block, a full disk (see `is_disk_full`) becomes one `UserError` line naming
    `folder`, the space `needed` and the space free, after `cleanup()` (remove the
    temporary folder being written: a full disk must not keep a half copy)."""

    def __init__(self, folder, needed, what, cleanup=None):
        self.folder, self.needed, self.what, self.cleanup = folder, needed, what, cleanup

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        from rpo.cli import UserError
        if error is None:
            return False
        full = isinstance(error, Exception) and not isinstance(error, UserError) and \
            is_disk_full(error, self.folder, self.needed)
        if self.cleanup:
            self.cleanup()  # whatever went wrong: no half copy left
        if full:
            raise UserError(disk_full_message(self.folder, self.needed, self.what)) from None
        return False
