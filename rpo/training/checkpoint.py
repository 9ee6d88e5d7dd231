"""Checkpoints: `<logdir>/ckpt-<step>/` with the inference weights (`ema/`, `unet/`), and for
the newest `keep` of them also `state/`, everything needed to resume exactly (docs/design.md, "Checkpoints").

Writes are atomic: a checkpoint is assembled in `<logdir>/.tmp-ckpt-<step>/` and renamed
into place only when complete, so a crash mid-save leaves a temporary folder that resume
ignores, never a half checkpoint it would pick.
"""
import hashlib
import json
import os
import re
import shutil

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

from rpo.cli import UserError
from rpo.io import disk_space_guard, write_json

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


def tensor_bytes(*state_dicts):
    """Bytes the tensors of `state_dicts` take on disk, about (what a checkpoint's weights need)."""
    return sum(t.numel() * t.element_size() for sd in state_dicts for t in sd.values() if torch.is_tensor(t))


def disk_guard(logdir, step, needed):
    """Wrap the writing of checkpoint `step` (between `begin` and `commit`): a full disk
    becomes one UserError line naming the logdir, the space the checkpoint needs (`needed`
    bytes, e.g. from `tensor_bytes`: weights, EMA, optimizer state) and the space free, and
    `.tmp-ckpt-<step>` is removed; earlier checkpoints stay as they were.

        with checkpoint.disk_guard(logdir, step, needed):
            ...write into checkpoint.tmp_dir(logdir, step)...
    """
    return disk_space_guard(logdir, needed, f"checkpoint {step}",
                            cleanup=lambda: shutil.rmtree(tmp_dir(logdir, step), ignore_errors=True))


def commit(logdir, step, keep, keep_weights=None):
    """Publish the temporary folder as `ckpt-<step>`, then drop `state/` from all but the
    newest `keep` checkpoints (their weights stay: a full SD1.5 state is several GB) and, with
    `keep_weights`, delete all but the newest `keep_weights` checkpoints whole (diffusers'
    meaning of a checkpoint limit)."""
    final = final_dir(logdir, step)
    if os.path.exists(final):  # a rerun of the same step (resumed from an older state)
        shutil.rmtree(final)
    os.replace(tmp_dir(logdir, step), final)
    done = list_checkpoints(logdir)
    for _, path in done[:-keep] if keep > 0 else []:
        marker = os.path.join(path, "state", "trainer.pt")
        if os.path.exists(marker):
            os.remove(marker)  # first the marker, so a crash mid-delete leaves no "resumable" half state
        shutil.rmtree(os.path.join(path, "state"), ignore_errors=True)
    if keep_weights:
        for _, path in done[:-keep_weights]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def clean_temporaries(logdir):
    """Remove temporary folders a crash left behind."""
    if os.path.isdir(logdir):
        for name in os.listdir(logdir):
            if name.startswith(".tmp-ckpt-"):
                shutil.rmtree(os.path.join(logdir, name), ignore_errors=True)


def write_model_folder(path, *, model, state_dict):
    """`model`'s config and `state_dict` in the `from_pretrained` layout of a diffusers model.

    Written by hand because `ModelMixin.save_pretrained` has no `state_dict` parameter: a
    `state_dict=` keyword disappears into its `**kwargs` and the module's own weights are
    written instead (how ckpt-N/ema once came to hold the raw weights). The keys must be
    exactly the model's, so a partial or foreign state dict is refused, not written.
    """
    expected, given = set(model.state_dict()), set(state_dict)
    if expected != given:
        raise ValueError(f"write_model_folder {path}: keys differ from the model's "
                         f"(missing {sorted(expected - given)[:3]}, unexpected {sorted(given - expected)[:3]})")
    os.makedirs(path, exist_ok=True)
    model.save_config(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, os.path.join(path, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})


CHECKSUMS = "SHA256SUMS.json"


def sha256(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_checksums(state_dir):
    """Size and sha256 of every file under `state_dir`, written atomically beside them: a
    flipped byte in a safetensors file (which carries no checksum of its own) is then caught
    at resume instead of training on garbage."""
    sums = {}
    for root, _, files in os.walk(state_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, state_dir)
            if rel != CHECKSUMS:
                sums[rel] = {"size": os.path.getsize(path), "sha256": sha256(path)}
    write_json(os.path.join(state_dir, CHECKSUMS), sums, indent=1, sort_keys=True)


def verify_checksums(ckpt):
    """None if `ckpt/state` matches its checksums, else one line saying which file is wrong."""
    state_dir = os.path.join(ckpt, "state")
    listing = os.path.join(state_dir, CHECKSUMS)
    if not os.path.isfile(listing):
        return f"{listing} is missing (the save did not finish)"
    try:
        with open(listing) as f:
            sums = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"{listing} is unreadable ({e})"
    for rel, want in sorted(sums.items()):
        path = os.path.join(state_dir, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != want["size"]:
            return f"{path} has {os.path.getsize(path)} bytes, {want['size']} were written (truncated?)"
        if sha256(path) != want["sha256"]:
            return f"{path} does not match the checksum written with it (corrupted)"
    return None


def resolve_resume(logdir, resume, log=print):
    """(step, path) of the checkpoint `--resume` names, its state verified against its
    checksums: `latest` (the newest verified one, falling back to older complete ones and
    saying so; None when there is none) or a checkpoint folder holding `state/`."""
    if resume is None:
        return None
    if resume == "latest":
        problems = []
        for step, path in reversed(list_checkpoints(logdir)):
            if not os.path.isfile(os.path.join(path, "state", "trainer.pt")):
                continue
            problem = verify_checksums(path)
            if problem is None:
                for line in problems:
                    log(f"--resume latest: skipping {line}")
                if problems:
                    log(f"--resume latest: falling back to {path}")
                return step, path
            problems.append(problem)
        if problems:
            raise UserError(f"--resume latest: no checkpoint in {logdir} has an intact state: {problems[0]}")
        return None
    path = os.path.normpath(resume)
    m = CKPT.match(os.path.basename(path))
    if not os.path.isdir(path) or m is None:
        raise UserError(f"--resume {resume}: not a checkpoint folder (expected <logdir>/ckpt-N, or 'latest')")
    if not os.path.isfile(os.path.join(path, "state", "trainer.pt")):
        raise UserError(f"--resume {resume}: it holds no complete resumable state (state/trainer.pt); "
                        "only the newest --checkpoints_total_limit checkpoints keep one")
    problem = verify_checksums(path)
    if problem is not None:
        raise UserError(f"--resume {resume}: {problem}")
    return int(m.group(1)), path


def check_fresh_logdir(logdir, overwrite):
    """A fresh run must not mix with an old one: refuse a logdir holding checkpoints unless
    `overwrite`, which deletes them (and the old validation images) first."""
    old = list_checkpoints(logdir)
    if not old:
        return
    if not overwrite:
        raise UserError(f"--logdir {logdir} already holds checkpoints ({os.path.basename(old[-1][1])}): "
                        "pass --resume to continue that run, --overwrite to delete it, or another --logdir")
    for _, path in old:
        shutil.rmtree(path)
    shutil.rmtree(os.path.join(logdir, "images"), ignore_errors=True)


def refusal(path, error):
    """One line for a state file that does not load: a pickle holding code (torch's
    weights-only loader names the global it refused) or a truncated / corrupt file."""
    text = str(error).strip()
    if "Weights only load failed" in text or "Unsupported global" in text:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"{path} holds a pickle that would run code{what}, not plain tensors: refused (never load a state "
                "from an untrusted source; its SHA256SUMS.json can be forged with it)")
    return f"cannot read {path} ({type(error).__name__}: {text.splitlines()[0] if text else ''})"


def load_accelerator_state(accelerator, state_dir):
    """`accelerator.load_state(state_dir)`, with one line naming the file when a state file
    does not load: accelerate loads with `weights_only=True`, which refuses a forged pickle
    (good) with a many-line traceback (not good), and does not say which file."""
    import pickle
    try:
        accelerator.load_state(state_dir)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"--resume: {refusal(culprit(state_dir) or state_dir, e)}") from None


def culprit(state_dir):
    """The first pickle file under `state_dir` that accelerate's loader refuses, or None."""
    from accelerate.utils import load
    for root, _, names in sorted(os.walk(state_dir)):
        for name in sorted(names):
            if name.endswith((".bin", ".pkl", ".pt", ".pth")):
                path = os.path.join(root, name)
                try:
                    load(path, map_location="cpu")
                except Exception:
                    return path
    return None


def load_torch(path):
    """`torch.load(weights_only=True)` of a state file, with one line naming a missing or
    unreadable file."""
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--resume: {path} is missing") from None
    except Exception as e:  # truncated or corrupt: torch raises RuntimeError, EOFError, UnpicklingError...
        raise UserError(f"--resume: {refusal(path, e)}") from None
