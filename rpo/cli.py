"""The small shared piece of argument handling: config files, one-line errors.

Every script builds a plain `argparse.ArgumentParser`, then calls `parse_args(parser)`,
which adds `--config FILE` (YAML or JSON): the file's keys replace the parser's defaults,
and the command line still wins. Scripts wrap their `main` in `run_main`, which turns a
`UserError` (bad input: a path, an option) into one line on stderr and exit status 2;
a full or read-only disk met while writing is bad input too (one line, exit status 2).

Under `accelerate launch` the rank's line and status 2 come first, but the launcher
(accelerate 1.15 re-raising torch.distributed.elastic's ChildFailedError) then prints its
own traceback and exits 1 whatever the rank's status: its "Root Cause" block shows
`exitcode: 2`. Exiting through `os._exit(2)` changes nothing there (tried), so the plain
`sys.exit(2)` stays. The other ranks, whose next collective fails when one rank stops,
print one line each naming that rank and its message (`peer_failure`), not gloo's traceback.
"""
import argparse
import errno
import json
import os
import sys
import tempfile

import yaml


class UserError(Exception):
    """Bad input from the user: printed as one line, no traceback, exit status 2."""


def flag(parser, name, default, help):
    """A `--name/--no-name` switch, spelled as the paper's code (basiclab/DiffusionDRO) spells it (underscores kept)."""
    parser.add_argument(f"--{name}", default=default, action=argparse.BooleanOptionalAction, help=help)


def load_config_file(path):
    if not os.path.isfile(path):
        raise UserError(f"--config: no such file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"--config {path}: not a UTF-8 text file (byte {e.start}: {e.reason}); "
                        "expected YAML or JSON") from None
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"--config {path}: cannot parse: {e}".splitlines()[0]) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values")
    return values


def parse_args(parser, argv=None):
    """Parse `argv`, with defaults taken from `--config FILE` when given.

    Config values go through the same type conversion and `choices` checks as the command
    line, so a typo in the file fails the same way a typo on the command line would.
    """
    parser.add_argument("--config", default=None, help="YAML or JSON file of option values; the command line overrides it")
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    values = load_config_file(args.config)
    actions = {a.dest: a for a in parser._actions}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in actions or key in ("help", "config"):
            raise UserError(f"--config {args.config}: unknown option '{key}'")
        action = actions[key]
        if action.type is not None and value is not None and not isinstance(value, (list, bool)):
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise UserError(f"--config {args.config}: bad value for '{key}': {value!r}") from None
        values_to_check = value if isinstance(value, list) else [value]
        if action.choices is not None and any(v not in action.choices for v in values_to_check):
            raise UserError(f"--config {args.config}: '{key}' must be one of {list(action.choices)}, got {value!r}")
        action.default = value
    return parser.parse_args(argv)


# Write failures that are the machine's state, not a bug: a full disk or quota, a read-only mount.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def run_main(main):
    """Run `main()`, turning a UserError (or a full / read-only disk) into one clear line
    and exit status 2. In a multi-process run, a rank that stops records why in the
    launcher's key-value store, and a rank that then loses contact with it (gloo's
    "Connection closed by peer", NCCL's errors) prints one line naming that rank instead of
    a traceback (`peer_failure`), exit status 1."""
    try:
        return main()
    except UserError as e:
        record_failure(str(e))
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            record_failure(f"{type(e).__name__}: {e}")
            raise
        where = f" writing {e.filename}" if e.filename else ""
        line = (f"{os.strerror(e.errno)}{where}: free space (or remount read-write) and rerun; "
                "finished work is kept")
        record_failure(line)
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        line = peer_failure(e)
        if line is None:
            record_failure(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(1)


# ------------------------------------------------------------------ one line per surviving rank
FAILURE_KEY = "rpo/failed_rank"
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             "ncclRemoteError", "ncclSystemError", "remote process exited", "Socket Timeout")


def _store():
    """The process group's key-value store (torchrun's agent hosts it, so it outlives any
    rank), or None outside a multi-process run."""
    try:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        from torch.distributed.distributed_c10d import _get_default_store
        return _get_default_store()
    except Exception:
        return None


def record_failure(line):
    """Tell the other ranks why this one stops (the first rank to fail wins)."""
    store = _store()
    if store is None:
        return
    try:
        import torch.distributed as dist
        store.compare_set(FAILURE_KEY, "", f"{dist.get_rank()}\t{line}")
    except Exception:
        pass  # the store itself is gone: the launcher is stopping everything anyway


def peer_failure(error):
    """One line for a rank whose collective failed because another rank stopped, naming
    that rank and its reason when it recorded one; None for any other error."""
    import torch.distributed as dist
    text = str(error)
    lost = isinstance(error, getattr(dist, "DistNetworkError", ())) or any(word in text for word in PEER_LOST)
    if not lost or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    me = os.environ.get("RANK", "?")
    store = _store()
    who = None
    try:
        if store is not None and store.check([FAILURE_KEY]):
            who = store.get(FAILURE_KEY).decode()
    except Exception:
        pass
    if who:
        rank, _, reason = who.partition("\t")
        return f"rank {me}: rank {rank} stopped ({reason}), so this rank stops too"
    return (f"rank {me}: another rank of this run stopped without a word (killed, or out of memory?), "
            "so this rank stops too; see the launcher's report below for which")


def check_writable(path, what):
    """Refuse, before hours of work, a folder that cannot take a new file: creates and
    removes a probe file (the nearest existing parent for a folder still to be created).

    An actual write, not `os.access`: root passes every permission test, and a read-only
    mount or a full disk answer only to a write.
    """
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{what} {path}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".rpo-write-probe-", dir=folder)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write in {folder}: {e.strerror or e}") from None


def cpu_ranks():
    """True when launched as several ranks on a machine without CUDA (`accelerate launch
    --multi_gpu --num_processes N` on a CPU box): accelerate must then be told `cpu=True`,
    or every rank takes itself for a lone process 0 and does all the work."""
    import torch
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
