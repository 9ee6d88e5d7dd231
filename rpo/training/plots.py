"""The run's history (`<logdir>/history.jsonl`) and its plots (`<logdir>/plots/*.png`).

The trainer appends one JSON line per optimizer update (`{"kind": "train", "step": N,
"loss/...": ...}`) and one per scored validation (`{"kind": "validation", "step": N,
"metrics/<score>": ...}`). Each line goes out in a single `write` on a file opened with
O_APPEND, so a kill leaves whole lines (at worst a torn last one, which `read_history`
skips). A resumed run first drops the lines after its checkpoint's step, which the killed
run wrote after that checkpoint and the resumed run will write again.
"""
import json
import math
import os

from rpo.io import atomic_write, write_text

HISTORY = "history.jsonl"


def history_path(logdir):
    return os.path.join(logdir, HISTORY)


def append_history(logdir, record):
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(history_path(logdir), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_history(logdir):
    """The records in file order; a line cut short by a kill is skipped."""
    records = []
    try:
        with open(history_path(logdir), encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return records


def truncate_history(logdir, step):
    """Keep only the records up to `step` (a resume from ckpt-`step`); atomic rewrite."""
    records = [r for r in read_history(logdir) if r.get("step", 0) <= step]
    path = history_path(logdir)
    if not os.path.exists(path):
        return
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def series(records, kind, prefix):
    """{name: ([steps], [values])} of the `kind` records' keys starting with `prefix`; a
    step seen twice keeps its last value."""
    out = {}
    for r in records:
        if r.get("kind") != kind:
            continue
        for key, value in r.items():
            if key.startswith(prefix) and isinstance(value, (int, float)):
                out.setdefault(key, {})[r["step"]] = value
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in out.items()}


def write_plots(logdir):
    """`plots/loss.png` (one panel per loss statistic) and, once a validation was scored,
    `plots/score.png`, both against the micro-step. Returns {file: series plotted}."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a training node
    import matplotlib.pyplot as plt

    records = read_history(logdir)
    folder = os.path.join(logdir, "plots")
    os.makedirs(folder, exist_ok=True)
    written = {}
    for name, kind, prefix in (("loss.png", "train", "loss/"), ("score.png", "validation", "metrics/")):
        data = series(records, kind, prefix)
        if not data:
            continue
        cols = min(4, len(data))
        rows = math.ceil(len(data) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, (key, (steps, values)) in zip(axes.flat, data.items()):
            ax.plot(steps, values, marker="." if len(steps) < 50 else None)
            ax.set_title(key)
            ax.set_xlabel("micro-step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(data):]:
            ax.set_visible(False)
        fig.tight_layout()
        atomic_write(os.path.join(folder, name), lambda tmp: fig.savefig(tmp, dpi=80, format="png"))  # never half a PNG
        plt.close(fig)
        written[name] = data
    return written
