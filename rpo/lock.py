"""One writer per folder: a lock file that a second process meets and refuses on.

    from rpo.lock import DirectoryLock
    with DirectoryLock(args.logdir, what="--logdir"):      # raises UserError if another run holds it
        ...write into args.logdir...

Two runs writing one folder (a resubmitted job while the old one still runs, a scheduler
that starts a requeued job early) silently interleave their files; the lock makes the
second one stop at once with one line naming the first (host, pid, start time).

`<folder>/.rpo.lock` is created with O_CREAT|O_EXCL (atomic, on NFS too) and holds JSON:
host, pid, start time, and what tells a dead holder from a live one:
- on the same machine (same host name, boot and pid namespace) the holder is dead when
  its pid no longer runs, or runs a process started at another time (a reused pid): a
  run killed by SIGKILL or a crash never blocks its own `--resume`;
- from another machine pids mean nothing, so the holder touches the file every
  `heartbeat` seconds from a daemon thread; the lock is stale when its modification time
  is `stale_after` seconds older than the file system's own clock (a probe file's mtime,
  so clocks of different nodes need not agree).
A stale lock is taken over (renamed away, then created afresh), with a warning line.

API (for train.py and every script that writes a folder):
- `DirectoryLock(path, what="--output", *, create=True, heartbeat=HEARTBEAT_S,
  stale_after=STALE_AFTER_S, wait=0.0)`: `path` the folder (created if missing when
  `create`, parents too; those it created are removed again on release while still
  empty, so a refused run leaves nothing behind); `what` the option named in the message; `wait`
  seconds to keep trying while another holder is alive (0: refuse at once).
- `acquire()` / `release()`, or use it as a context manager. `acquire` raises
  `rpo.cli.UserError` with one line when the folder is held by a live process. Only the
  process that acquired releases (a forked DataLoader worker's exit does not).
- `held_by(path)`: the holder's record (dict) or None; `lock_path(path)`.
Under several processes (accelerate launch) only the global main process takes the lock,
before anything is written; the file is then visible to every rank and, on a shared file
system, to every node.
"""
import errno
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid

from rpo.cli import UserError

LOCK_NAME = ".rpo.lock"
HEARTBEAT_S = 15.0     # the holder touches the lock this often
STALE_AFTER_S = 90.0   # another machine's lock untouched this long is a dead holder's


def lock_path(folder):
    return os.path.join(folder, LOCK_NAME)


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _proc_start(pid):
    """The start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22),
    or None where /proc is not there: tells a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])  # fields after "(comm)", which may hold spaces


def _machine():
    """What makes pids comparable: same host name, same boot, same pid namespace (two
    containers with the host's name but their own pid namespaces are different machines here)."""
    def read(path, link=False):
        try:
            return os.readlink(path) if link else open(path).read().strip()
        except OSError:
            return None
    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"),
            "pidns": read("/proc/self/ns/pid", link=True)}


def _alive(pid, start):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return start is None or _proc_start(pid) in (None, start)


def _fs_now(folder):
    """The file system's current time (the mtime of a fresh probe file): heartbeats are
    compared with the clock that stamped them, not with this node's."""
    fd, probe = tempfile.mkstemp(prefix=".rpo-clock-", dir=folder)
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.remove(probe)


def held_by(folder):
    """The record of the process holding `folder`'s lock (whether alive or not), or None."""
    data = _read(lock_path(folder))
    if data is None:
        return None
    try:
        record = json.loads(data)
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}  # being written this instant, or torn by a crash between create and write


def describe(record):
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started {when}"


class DirectoryLock:
    """Exclusive right to write into one folder (module docstring)."""

    def __init__(self, path, what="--output", *, create=True, heartbeat=HEARTBEAT_S, stale_after=STALE_AFTER_S,
                 wait=0.0):
        self.folder, self.what, self.create = path, what, create
        self.heartbeat, self.stale_after, self.wait = heartbeat, stale_after, wait
        self.path = lock_path(path)
        self.token, self.owner, self.created = None, None, []
        self._stop = threading.Event()
        self._thread = None

    # ------------------------------------------------------------------ public
    def acquire(self):
        if self.token is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        deadline = time.monotonic() + self.wait
        while True:
            self._ensure_folder()  # every try: a holder that created it removes it again if empty
            if self._try_create():
                break
            record = held_by(self.folder)
            reason = self._stale(record)
            if reason is not None:
                self._take_over(record, reason)
                continue
            if time.monotonic() >= deadline:
                self._undo_folder()
                raise UserError(self._refusal(record))
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self._start_heartbeat()
        return self

    def release(self):
        if self.token is None or os.getpid() != self.owner:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        record = held_by(self.folder)
        if record and record.get("token") == self.token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.token = None
        self._undo_folder()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

    # ------------------------------------------------------------------ inside
    def _record(self):
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": self.token,
                "pid_start": _proc_start(os.getpid()), "machine": _machine(), "heartbeat_s": self.heartbeat,
                "argv": sys.argv[:8]}

    def _try_create(self):
        """Create the lock file atomically; False if it exists."""
        self.token, self.owner = uuid.uuid4().hex, os.getpid()
        data = json.dumps(self._record()).encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except (FileExistsError, FileNotFoundError):  # held; or the folder vanished this instant: try again
            self.token = None
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        except OSError as e:  # a full disk: no half lock left behind
            os.close(fd)
            os.remove(self.path)
            self.token = None
            self._undo_folder()
            raise OSError(e.errno, e.strerror, self.path) from None
        os.close(fd)
        return True

    def _stale(self, record):
        """Why `record`'s holder is dead (a few words), or None while it may be alive."""
        if record is None:
            return "released"  # gone between our create and our read (or the folder with it): try again
        if record and record.get("machine") == _machine() and isinstance(record.get("pid"), int):
            return None if _alive(record["pid"], record.get("pid_start")) else "its process is gone"
        try:
            age = _fs_now(self.folder) - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return "released"
        if not record:  # unparsable: a writer between create and write, or one killed there
            return "empty and untouched for {:.0f} s".format(age) if age > max(10.0, self.heartbeat) else None
        limit = max(self.stale_after, 3 * float(record.get("heartbeat_s") or HEARTBEAT_S))
        return f"no heartbeat for {age:.0f} s" if age > limit else None

    def _take_over(self, record, reason):
        """Move a dead holder's lock away; if another process replaced it meanwhile by a live
        one, put that one back (a rename that finds no file means someone else was faster)."""
        if reason == "released":
            return
        aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = _read(aside)
        try:
            still = json.loads(moved) if moved else {}
        except ValueError:
            still = {}
        if (still or {}).get("token") != (record or {}).get("token"):
            try:
                os.link(aside, self.path)  # fails if yet another one was created: then that one holds it
            except OSError:
                pass
            os.remove(aside)
            return
        os.remove(aside)
        if record:
            print(f"warning: {self.what} {self.folder}: taking over the lock of a dead run ({describe(record)}: "
                  f"{reason})", file=sys.stderr)

    def _refusal(self, record):
        if not record:
            return f"{self.what} {self.folder} is being locked by another process this instant ({self.path}); retry"
        remote = record.get("machine") != _machine()
        beat = ""
        if remote:
            try:
                beat = f"; last heartbeat {_fs_now(self.folder) - os.stat(self.path).st_mtime:.0f} s ago"
            except OSError:
                pass
        return (f"{self.what} {self.folder} is in use by another run ({describe(record)}{beat}): wait for it to "
                f"finish or stop it; if it is surely dead, delete {self.path}")

    def _start_heartbeat(self):
        self._stop.clear()
        if not self.heartbeat or self.heartbeat <= 0:
            return
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.folder}", daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full or vanished folder: the owner's own writes will say so

    def _ensure_folder(self):
        if os.path.isdir(self.folder):
            return
        if not self.create:
            raise UserError(f"{self.what} {self.folder}: no such folder")
        missing, parent = [], os.path.abspath(self.folder)
        while not os.path.exists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        try:
            os.makedirs(self.folder)
            self.created = missing  # innermost first: removed in this order if left empty
        except FileExistsError:
            pass

    def _undo_folder(self):
        """Remove the folders this lock created if nothing else was written to them."""
        created, self.created = self.created, []
        for folder in created:
            try:
                os.rmdir(folder)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.EBUSY):
                    return
                raise
