"""score.py --method: several methods' images on several benchmarks, compared as the paper's
tables do (docs/design.md, "Comparing methods").

    --method "DRO=pickapic:out/dro/pickapic,anime:out/dro/anime" --method "SD1.5=pickapic:..."
    --reference DRO --method_logdir DRO=logs/dro

- Table 3 layout (`table3`): one row per method, one column per metric × benchmark, mean ±
  std over every scored image (as scores.csv: ddof=0); the best mean of each column is
  marked (every metric here is better when higher; equal bests are all marked).
- Table 1 layout (`table1`): the reference method's win rate against each other method, per
  metric and benchmark — the paper's protocol of rpo/scores/report.py (each side's
  median-PickScore image per prompt, a tie half a win) with wins, ties and losses apart and
  the bootstrap 95 % interval.
- Training curves (`curves`): each `--method_logdir`'s history.jsonl, the loss statistics
  (train records) and the validation scores, per micro-step.

Everything is computed from the per-image scores score.py gathers; `comparison_json` is
what `comparison.json` holds and what the page (rpo/scores/comparison_page.py) shows.
"""
import csv
import io
import math
import os
from dataclasses import dataclass, field

from rpo.cli import UserError
from rpo.scores.html_report import mean_ci95
from rpo.scores.report import median_image, win_rate, win_rate_bootstrap
from rpo.training.plots import read_history, series


@dataclass
class Method:
    name: str
    dirs: dict                      # benchmark -> image folder, in the order given
    logdir: str = None
    index: dict = field(default_factory=dict)   # benchmark -> index of the folder among score.py's dirs


def parse_method(text):
    """'NAME=BENCH:DIR[,BENCH:DIR...]' (a lone DIR is benchmark 'images') -> Method."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise UserError(f"--method {text!r}: expected NAME=BENCHMARK:DIR[,BENCHMARK:DIR...]")
    dirs = {}
    for part in rest.split(","):
        bench, colon, folder = part.partition(":")
        bench, folder = (bench.strip(), folder.strip()) if colon else ("images", bench.strip())
        if not bench or not folder:
            raise UserError(f"--method {text!r}: empty benchmark or folder in {part!r}")
        if bench in dirs:
            raise UserError(f"--method {name.strip()}: benchmark {bench} given twice")
        dirs[bench] = folder
    return Method(name.strip(), dirs)


def check_methods(method_args, reference, logdir_args):
    """The parsed methods, logdirs attached; the reference method (default: the first)."""
    methods = [parse_method(text) for text in method_args]
    names = [m.name for m in methods]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UserError(f"--method: the name {duplicated[0]} is given twice")
    if len(methods) < 2:
        raise UserError("--method: give at least two methods to compare")
    reference = reference or names[0]
    if reference not in names:
        raise UserError(f"--reference {reference}: no --method of that name (have {', '.join(names)})")
    for text in logdir_args:
        name, sep, folder = text.partition("=")
        method = next((m for m in methods if m.name == name.strip()), None)
        if not sep or method is None:
            raise UserError(f"--method_logdir {text!r}: expected NAME=LOGDIR with NAME one of {', '.join(names)}")
        if not os.path.isfile(os.path.join(folder, "history.jsonl")):
            raise UserError(f"--method_logdir {name.strip()}: no history.jsonl in {folder}")
        method.logdir = folder
    return methods, reference


def benchmarks(methods):
    """Every benchmark named, in order of first appearance."""
    return list(dict.fromkeys(b for m in methods for b in m.dirs))


def best_marks(values):
    """[bool] marking the highest of `values` (None: no value); equal highest all marked."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    top = max(present) if present else None
    return [v is not None and top is not None and v == top for v in values]


def table3(methods, benches, metrics, summaries):
    """[{'method', 'benchmark', 'metric', 'mean', 'std', 'count', 'ci95', 'best'}], row-major
    (method, then benchmark, then metric); `summaries[d]['metrics'][metric]` as score.py's;
    ci95 the normal-approximation interval of the mean (rpo/scores/html_report.py)."""
    rows = []
    for m in methods:
        for b in benches:
            for metric in metrics:
                s = summaries[m.index[b]]["metrics"][metric] if b in m.index else None
                rows.append({"method": m.name, "benchmark": b, "metric": metric,
                             "mean": None if s is None else s["mean"], "std": None if s is None else s["std"],
                             "count": 0 if s is None else s["count"], "ci95": None if s is None else mean_ci95(s),
                             "best": False})
    for b in benches:
        for metric in metrics:
            column = [r for r in rows if r["benchmark"] == b and r["metric"] == metric]
            for row, best in zip(column, best_marks([r["mean"] for r in column])):
                row["best"] = best
    return rows


def table1(methods, reference, benches, metrics, prompts, per_dir, bootstrap):
    """[{'method' (the reference), 'against', 'benchmark', 'metric', 'prompts', 'win_rate',
    'wins', 'ties', 'losses', 'ci95'}] for each other method having the benchmark.
    `prompts[d]`: {prompt name: [image paths]}; `per_dir[d]`: {metric: {path: score}}."""
    ref = next(m for m in methods if m.name == reference)
    rows = []
    for other in methods:
        if other is ref:
            continue
        for b in benches:
            if b not in ref.index or b not in other.index:
                continue
            ours, theirs = ref.index[b], other.index[b]
            args = (prompts[ours], prompts[theirs], per_dir[ours], per_dir[theirs], metrics)
            rates, compared = win_rate(*args)
            counts = win_rate_bootstrap(*args, bootstrap["resamples"], bootstrap["seed"])
            for metric in metrics:
                rows.append({"method": reference, "against": other.name, "benchmark": b, "metric": metric,
                             "prompts": compared, "win_rate": rates[metric], **counts[metric]})
    return rows


def curves(logdir):
    """{'train': {key: [[steps], [values]]}, 'validation': {...}} of a logdir's history."""
    records = read_history(logdir)
    return {kind: {key: [list(steps), list(values)] for key, (steps, values) in series(records, kind, prefix).items()}
            for kind, prefix in (("train", "loss/"), ("validation", "metrics/"))}


def table3_csv(rows):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", "benchmark", "metric", "mean", "std", "count", "best"])
    for r in rows:
        writer.writerow([r["method"], r["benchmark"], r["metric"], repr(r["mean"]), repr(r["std"]), r["count"],
                         int(r["best"])])
    return out.getvalue()


def table1_csv(rows):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", "against", "benchmark", "metric", "prompts", "win_rate", "wins", "ties", "losses",
                     "ci95_low", "ci95_high"])
    for r in rows:
        low, high = r["ci95"] or (None, None)
        writer.writerow([r["method"], r["against"], r["benchmark"], r["metric"], r["prompts"], repr(r["win_rate"]),
                         r["wins"], r["ties"], r["losses"], repr(low), repr(high)])
    return out.getvalue()


def gallery_data(methods, benches, folders, per_dir, metrics, count):
    """What the page's side-by-side gallery shows: {benchmark: [{'prompt', 'caption',
    'images': {method: [{'path' (relative to the method's folder), 'scores' (None:
    unreadable), 'median' (the image the win rate compares)}]}}]}, for the first `count`
    prompts (by folder name) of each benchmark."""
    out = {}
    for b in benches:
        having = [m for m in methods if b in m.index]
        names = sorted({p.name for m in having for p in folders[m.index[b]].prompts})[:count]
        cards = []
        for name in names:
            images, caption = {}, None
            for m in having:
                d = m.index[b]
                prompt = next((p for p in folders[d].prompts if p.name == name), None)
                if prompt is None:
                    continue
                caption = caption or prompt.caption
                scored = {path: {metric: per_dir[d][metric][path] for metric in metrics}
                          for path in prompt.images if path in per_dir[d][metrics[0]]}
                median = median_image(list(scored), {path: v["pickscore"] for path, v in scored.items()})
                images[m.name] = [{"path": os.path.relpath(path, folders[d].root), "scores": scored.get(path),
                                   "median": path == median} for path in prompt.images]
            cards.append({"prompt": name, "caption": caption, "images": images})
        out[b] = cards
    return out
