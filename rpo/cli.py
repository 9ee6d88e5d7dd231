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
`sys.exit(2)` stays.
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
    and exit status 2."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"error: {os.strerror(e.errno)}{where}: free space (or remount read-write) and rerun; "
              "finished work is kept", file=sys.stderr)
        sys.exit(2)


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
