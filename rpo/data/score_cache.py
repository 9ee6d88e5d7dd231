"""Append-only JSONL caches that survive a kill at any moment.

A cache is a folder of part files `<name>.rank<r>.jsonl`: each process appends to its own
part, so no two processes ever write one file, and readers take the union of all parts
(whatever the number of processes of the run that wrote them). Each append is a single
`os.write` of whole lines, fsynced, so a killed process leaves at worst one truncated last line;
readers skip lines that do not parse, and the next append starts on a fresh line.

`ScoreCache` maps (key, caption) -> score for one metric and scorer version (both in the
file name, so a different metric or weights never reuses scores). A pair whose image could
not be decoded is stored with an error instead of a score, so it is not retried.
"""
import glob
import json
import math
import os
import sys


def is_score(value):
    """A finite number that is not a bool (JSON's true would pass float())."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def part_paths(folder, name):
    return sorted(glob.glob(os.path.join(glob.escape(folder), glob.escape(name) + ".rank*.jsonl")))


def read_lines(paths):
    """Every well-formed JSON object in `paths`, in file order; broken lines are skipped."""
    for path in paths:
        with open(path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if isinstance(record, dict):
                    yield record


class JsonlAppender:
    """Appends whole lines to `<folder>/<name>.rank<rank>.jsonl`, one write per call."""

    def __init__(self, folder, name, rank):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"{name}.rank{rank}.jsonl")
        self.needs_newline = False
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                self.needs_newline = f.read(1) != b"\n"

    def append(self, records):
        if not records:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        if self.needs_newline:
            data = b"\n" + data
            self.needs_newline = False
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # on disk before the caller counts the batch done (a power cut, not just a kill)
        except OSError as e:  # a full disk: name the file (os.write's error has no filename)
            raise OSError(e.errno, e.strerror, self.path) from None
        finally:
            os.close(fd)


class ScoreCache:
    """Scores of (key, caption) pairs for one metric version, read from and appended to JSONL."""

    def __init__(self, folder, name, rank=0):
        self.folder, self.name, self.rank = folder, name, rank
        self.scores = {}  # (key, caption) -> float
        self.errors = {}  # (key, caption) -> why the image could not be scored
        self.warned = 0   # malformed lines already reported
        self.reload()
        self.writer = None

    def reload(self):
        """Read every part; a line that parses but is not a (key, caption) with a finite
        number or an error (a hand edit, another tool's line, a non-numeric score, a list as
        key) is skipped with one warning line, so that pair is scored again, as score.py's
        cache does (rpo/scores/folders.py)."""
        self.scores.clear()
        self.errors.clear()
        paths = part_paths(self.folder, self.name)
        bad = 0
        for record in read_lines(paths):
            key, caption, score = record.get("key"), record.get("caption"), record.get("score")
            if not isinstance(key, str) or not isinstance(caption, str):
                bad += 1
                continue
            pair = (key, caption)
            if score is not None:
                if not is_score(score):
                    bad += 1
                    continue
                self.scores[pair] = float(score)
                self.errors.pop(pair, None)
            elif "error" in record:
                if pair not in self.scores:
                    self.errors[pair] = str(record["error"])
            else:
                bad += 1
        if bad and bad != self.warned:
            self.warned = bad
            print(f"warning: {self.folder}: skipped {bad} malformed line(s) of "
                  f"{', '.join(map(os.path.basename, paths))}; those images are scored again", file=sys.stderr)

    def __contains__(self, pair):
        return pair in self.scores or pair in self.errors

    def get(self, pair):
        return self.scores.get(pair)

    def add(self, results):
        """Record [(key, caption, score or None, error or None)] and append them in one write."""
        records = []
        for key, caption, score, error in results:
            if score is not None:
                score = float(score)
                self.scores[(key, caption)] = score
                records.append({"key": key, "caption": caption, "score": score})
            else:
                self.errors[(key, caption)] = error
                records.append({"key": key, "caption": caption, "error": error})
        if self.writer is None:
            self.writer = JsonlAppender(self.folder, self.name, self.rank)
        self.writer.append(records)
