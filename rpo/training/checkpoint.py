"""Checkpoints: `<logdir>/ckpt-<step>/` with the inference weights (`ema/`, `unet/`), and for
the newest `keep` of them also `state/`, everything needed to resume exactly (DESIGN §4).

Writes are atomic: a checkpoint is assembled in `<logdir>/.tmp-ckpt-<step>/` and renamed
into place only when complete, so a crash mid-save leaves a temporary folder that resume
ignores, never a half checkpoint it would pick.
"""
import os
import re
import shutil

CKPT = re.compile(r"^ckpt-(\d+)$")


def tmp_dir(logdir, step):
    return os.path.join(logdir, f".tmp-ckpt-{step}")


def final_dir(logdir, step):
    return os.path.join(logdir, f"ckpt-{step}")


def list_checkpoints(logdir):
    """(step, path) of every complete checkpoint, oldest first."""
    if not os.path.isdir(logdir):
        return []
    found = [(int(m.group(1)), os.path.join(logdir, name)) for name in os.listdir(logdir) if (m := CKPT.match(name))]
    return sorted(found)


def latest_resumable(logdir):
    """The newest checkpoint that holds a complete resumable state, or None."""
    for step, path in reversed(list_checkpoints(logdir)):
        if os.path.isfile(os.path.join(path, "state", "trainer.pt")):
            return step, path
    return None


def begin(logdir, step):
    """Start writing checkpoint `step`: a fresh temporary folder (left-overs of a crash removed)."""
    path = tmp_dir(logdir, step)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def commit(logdir, step, keep):
    """Publish the temporary folder as `ckpt-<step>`, then drop `state/` from all but the
    newest `keep` checkpoints (their weights stay: a full SD1.5 state is several GB)."""
    final = final_dir(logdir, step)
    if os.path.exists(final):  # a rerun of the same step (resumed from an older state)
        shutil.rmtree(final)
    os.replace(tmp_dir(logdir, step), final)
    for _, path in list_checkpoints(logdir)[:-keep] if keep > 0 else []:
        marker = os.path.join(path, "state", "trainer.pt")
        if os.path.exists(marker):
            os.remove(marker)  # first the marker, so a crash mid-delete leaves no "resumable" half state
        shutil.rmtree(os.path.join(path, "state"), ignore_errors=True)
    return final


def clean_temporaries(logdir):
    """Remove temporary folders a crash left behind."""
    if os.path.isdir(logdir):
        for name in os.listdir(logdir):
            if name.startswith(".tmp-ckpt-"):
                shutil.rmtree(os.path.join(logdir, name), ignore_errors=True)
