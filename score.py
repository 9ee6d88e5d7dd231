"""Score image folders with the preference metrics (docs/design.md, "Data formats" and "Scorers").

    accelerate launch [--multi_gpu --num_processes 4] score.py --batch_size 32 \\
        --pickscore --hpsv2 --aestheticv2 --clip --imagereward \\
        --dir ./output/pickapicv2_pickscore_test --dir ./output/hpdv2_anime [--compare ./output/sd15]

Each `--dir` is inference.py's output (`<dir>/<prompt index>/caption.txt` + images); every
image of every prompt is scored. Prints one table — per dir the number of images, the
unreadable ones (reported by path, excluded), and per metric mean ± std over images — and
writes it to `OUTPUT/scores.csv` (one row per dir and metric, full precision, with the
metric's version) and `OUTPUT/scores.json` (the same plus every image's scores), OUTPUT
being `--output` (default: the current folder). `--compare BASE_DIR` adds the paper's win
rate of every other dir over BASE_DIR (median-PickScore image per prompt; PickScore is then
scored even if not asked for), printed and in `scores.json` / `OUTPUT/winrate.csv`;
scores.json adds wins, ties and losses apart and a bootstrap 95 % interval per metric.
`--report FILE.html` also writes one self-contained page (tables, confidence intervals,
win rates, a per-prompt gallery of thumbnails; rpo/scores/html_report.py).

Comparing methods, as the paper's tables do (rpo/scores/comparison.py):

    python score.py --pickscore --hpsv2 --aestheticv1 --clip --imagereward \
        --method "DRO=pickapic:out/dro/pickapic,anime:out/dro/hpdv2_anime" \
        --method "SD1.5=pickapic:out/sd15/pickapic,anime:out/sd15/hpdv2_anime" \
        --reference DRO --method_logdir DRO=logs/dro --output out/compare --report out/compare/index.html

writes `table3.csv` (methods × metric × benchmark, mean ± std, best marked), `table1.csv`
(the reference's win rate against each other method per metric and benchmark, with
bootstrap interval, wins, ties, losses) and `comparison.json` under OUTPUT, and with
`--report` one page with both tables, charts, training curves and a two-method gallery
(rpo/scores/comparison_page.py). `--config FILE.yaml` may hold the `method:` list.

Per-image scores are cached in each dir (`scores_cache.json`, see rpo/scores/folders.py),
appended batch by batch while scoring: a rerun, even of a killed run, scores only the
batches holding new, changed or missing images (each whole, as a fresh run batches it, so the
scores are bit-identical to a fresh run's; rpo/scores/loop.py). Every dir and `--output` must be writable (checked first). Each scorer is loaded once for all dirs; with
several processes each scores its share and the results are gathered in a fixed order, so
the tables do not depend on the number of processes.
"""
import argparse
import contextlib
import json
import math
import os
import sys

from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

from rpo.io import write_text
from rpo.lock import DirectoryLock
from rpo.cli import UserError, check_writable, cpu_ranks, flag, parse_args, run_main
from rpo.models import offline_unless_hub_reachable
from rpo.scores import HPS_VERSIONS, METRICS, load_scorer
from rpo.scores.folders import CacheAppender, has_side_files, read_cache, scan_image_dir, write_cache
from rpo.scores.comparison import (benchmarks, check_methods, curves, gallery_data, table1, table1_csv, table3,
                                   table3_csv)
from rpo.scores.comparison_page import comparison_tables, write_comparison_page
from rpo.scores.html_report import write_html_report
from rpo.scores.loop import score_entries, shard
from rpo.scores.report import (scores_csv, scores_table, summarize, win_rate, win_rate_bootstrap, win_rate_csv,
                               win_rate_table)

BOOTSTRAP = {"resamples": 1000, "seed": 0}   # win-rate intervals: prompts resampled, fixed seed

HELP = {
    "pickscore": "PickScore (logit_scale.exp() * cos, PickScore_v1)",
    "hpsv2": "HPSv2 (100 * cos; checkpoint by --hps_version)",
    "aestheticv1": "LAION aesthetic v1, linear head (the paper's tables)",
    "aestheticv2": "LAION aesthetic v2, improved MLP head",
    "clip": "CLIP score (raw cosine, open_clip ViT-H-14 laion2B-s32B-b79K)",
    "imagereward": "ImageReward v1.0",
}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for metric in METRICS:
        flag(parser, metric, False, HELP[metric])
    parser.add_argument("--dir", action="append", default=[], help="image folder to score (repeatable)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per model forward")
    parser.add_argument("--num_workers", type=int, default=8, help="DataLoader workers decoding images")
    parser.add_argument("--hps_version", default="v2.0", help=f"HPSv2 checkpoint: {' or '.join(HPS_VERSIONS)}")
    parser.add_argument("--weights_dir", default=None,
                        help="local scorer weights, one sub-folder per metric (layout: rpo/scores/__init__.py)")
    parser.add_argument("--compare", default=None, metavar="BASE_DIR", help="add win rates of every dir over BASE_DIR")
    parser.add_argument("--output", default=".", help="folder for scores.csv / scores.json (default: current folder)")
    parser.add_argument("--report", default=None, metavar="FILE.html",
                        help="also write one self-contained HTML page: tables, win rates, per-prompt gallery")
    parser.add_argument("--method", action="append", default=[], metavar="NAME=BENCH:DIR[,BENCH:DIR...]",
                        help="compare methods (repeatable): a display name and its image folder per benchmark; "
                             "writes table3.csv, table1.csv and comparison.json (and the page with --report)")
    parser.add_argument("--reference", default=None, metavar="NAME",
                        help="with --method: the method whose win rate against each other one Table 1 shows "
                             "(default: the first --method)")
    parser.add_argument("--method_logdir", action="append", default=[], metavar="NAME=LOGDIR",
                        help="with --method: a method's training logdir; its history.jsonl is drawn on the page")
    parser.add_argument("--gallery_prompts", type=int, default=20,
                        help="with --method --report: prompts per benchmark in the page's gallery (page size grows "
                             "with it: ~16 KB per image)")
    return parser


def check_args(args):
    metrics = [m for m in METRICS if getattr(args, m) or (m == "pickscore" and (args.compare or args.method))]
    if not metrics:
        raise UserError("no metric chosen: pass one or more of " + " ".join(f"--{m}" for m in METRICS))
    if args.hps_version not in HPS_VERSIONS:
        raise UserError(f"--hps_version must be one of {', '.join(HPS_VERSIONS)}, got '{args.hps_version}'")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if args.method and (args.dir or args.compare):
        raise UserError("--method names every folder to score: leave out --dir and --compare")
    if not args.method and (args.reference or args.method_logdir):
        raise UserError("--reference and --method_logdir need --method")
    if args.gallery_prompts < 0:
        raise UserError(f"--gallery_prompts must be 0 or more, got {args.gallery_prompts}")
    if args.method:
        args.methods, args.reference = check_methods(args.method, args.reference, args.method_logdir)
        args.dir = [folder for m in args.methods for folder in m.dirs.values()]
    if not args.dir:
        raise UserError("no --dir given: pass the image folders to score")
    if args.weights_dir is not None and not os.path.isdir(args.weights_dir):
        raise UserError(f"--weights_dir: no such folder: {args.weights_dir}")
    if args.report is not None:
        check_report_path(args.report)
    dirs = []
    for d in args.dir + ([args.compare] if args.compare else []):
        if os.path.realpath(d) not in [os.path.realpath(x) for x in dirs]:
            dirs.append(d)
    for m in getattr(args, "methods", []):
        m.index = {b: [os.path.realpath(x) for x in dirs].index(os.path.realpath(d)) for b, d in m.dirs.items()}
    return metrics, dirs


def check_report_path(path):
    """--report must be writable before hours of scoring: not a folder, and the nearest
    existing parent a writable folder (missing parents are created, as for --output)."""
    if os.path.isdir(path):
        raise UserError(f"--report: {path} is a folder; give a file name such as {os.path.join(path, 'report.html')}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"--report {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"--report {path}: not writable")


def check_comparable(folders, base, option="--compare"):
    """Every dir shares prompts with the base, under the same captions (before any model loads)."""
    base_captions = {p.name: p.caption for p in base.prompts}
    for folder in folders:
        if folder is base:
            continue
        shared = [p for p in folder.prompts if p.name in base_captions]
        if not shared:
            raise UserError(f"{option}: {folder.root} and {base.root} have no prompt folder in common")
        for prompt in shared:
            if prompt.caption != base_captions[prompt.name]:
                raise UserError(f"{option}: prompt {prompt.name} differs between {folder.root} and {base.root}")


def json_safe(value):
    """NaN (a dir whose every image failed) as null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def score_folders(folders, scorers, accelerator, batch_size, num_workers):
    """On the main process: the images (path, caption, folder index), each one's
    {metric: score} (None if unreadable) and {image index: error}; None elsewhere. Cached scores are reused; each folder's cache is
    rewritten with what was scored, minus entries of images no longer there."""
    metrics = list(scorers)
    cache_names = {m: f"{m}@{scorers[m].version}" for m in metrics}
    caches = [read_cache(folder.root) for folder in folders]
    cached = [{m: set(cache.get(cache_names[m], {})) for m in metrics} for cache in caches]
    entries = [(path, prompt.caption, d) for d, folder in enumerate(folders) for prompt, path in folder.images()]

    rank, world = accelerator.process_index, accelerator.num_processes
    appenders = [CacheAppender(folder.root, rank) for folder in folders]

    def keep(batch):  # each batch's fresh scores reach the dirs' side files before the next batch starts
        fresh = [[] for _ in folders]
        for index, key, values, error in batch:
            if error is None:
                fresh[entries[index][2]] += [(cache_names[m], key, v) for m, v in values.items()]
        for appender, records in zip(appenders, fresh):
            appender.add(records)

    with tqdm(total=len(shard(len(entries), batch_size, rank, world)), desc="scoring", unit="img",
              disable=not accelerator.is_main_process, file=sys.stderr) as progress:
        results = score_entries(entries, scorers, cached, batch_size, num_workers, rank, world, progress, keep)
    if world > 1:
        print(f"process {rank}/{world}: scored {len(results)} of {len(entries)} images", file=sys.stderr)
        results = gather_object(results)
    if not accelerator.is_main_process:
        return None

    scores, errors = [None] * len(entries), {}
    current = [set() for _ in folders]   # keys of the images now in each folder
    changed = [False for _ in folders]
    for index, key, fresh, error in sorted(results, key=lambda r: r[0]):
        d = entries[index][2]
        if error is not None:
            errors[index] = error
            continue
        current[d].add(key)
        for m, value in fresh.items():
            caches[d].setdefault(cache_names[m], {})[key] = value
            changed[d] = True
        scores[index] = {m: caches[d][cache_names[m]][key] for m in metrics}
    for d, folder in enumerate(folders):
        for name in cache_names.values():   # forget images that were replaced or removed
            kept = {k: v for k, v in caches[d].get(name, {}).items() if k in current[d]}
            changed[d] |= len(kept) != len(caches[d].get(name, {}))
            caches[d][name] = kept
        if changed[d] or has_side_files(folder.root):  # side files are folded into the JSON file, then removed
            write_cache(folder.root, caches[d])
    return entries, scores, errors


def main(argv=None):
    args = parse_args(build_parser(), argv)
    metrics, dirs = check_args(args)
    is_base = [args.compare is not None and os.path.realpath(d) == os.path.realpath(args.compare) for d in dirs]
    folders = [scan_image_dir(d, "--compare" if base else "--dir") for d, base in zip(dirs, is_base)]
    # before any model loads: the cache of every dir (written as scoring goes) and the tables' folder
    for d, base in zip(dirs, is_base):
        check_writable(d, "--compare" if base else "--dir")
    check_writable(args.output, "--output")
    base = folders[is_base.index(True)] if args.compare else None
    if base is not None:
        check_comparable(folders, base)
    if args.method:
        check_methods_comparable(args.methods, args.reference, folders)

    offline_unless_hub_reachable([args.weights_dir])  # None: the scorers' weights come from the hub
    accelerator = Accelerator(cpu=cpu_ranks())
    with contextlib.ExitStack() as held:
        if accelerator.is_main_process:  # one writer per cache and table folder (a second run stops here)
            for folder, option in locked_folders(dirs, is_base, args.output):
                held.enter_context(DirectoryLock(folder, what=option))
        scorers = {m: load_scorer(m, args.weights_dir, accelerator.device, args.hps_version) for m in metrics}
        scored = score_folders(folders, scorers, accelerator, args.batch_size, args.num_workers)
        accelerator.end_training()
        if accelerator.is_main_process:
            versions = {m: s.version for m, s in scorers.items()}
            summaries, per_dir = write_report(args, dirs, folders, base, versions, *scored)
            if args.method:
                write_comparison(args, folders, summaries, per_dir, versions)


def locked_folders(dirs, is_base, output):
    """(folder, option) of every folder this run writes: each dir (its score cache) and
    --output (the tables), each once, in a fixed order (two runs never wait on each other crosswise)."""
    seen, found = set(), []
    for folder, option in [(d, "--compare" if base else "--dir") for d, base in zip(dirs, is_base)] + [(output, "--output")]:
        if os.path.realpath(folder) not in seen:
            seen.add(os.path.realpath(folder))
            found.append((folder, option))
    return sorted(found, key=lambda entry: os.path.realpath(entry[0]))


def check_methods_comparable(methods, reference, folders):
    """Per benchmark, every method's folder shares prompts (same captions) with the
    reference's (or, without it there, the first method's) — before any model loads."""
    for bench in benchmarks(methods):
        having = [m for m in methods if bench in m.index]
        base = next((m for m in having if m.name == reference), having[0])
        check_comparable([folders[m.index[bench]] for m in having], folders[base.index[bench]],
                         f"--method (benchmark {bench})")


def write_comparison(args, folders, summaries, per_dir, versions):
    """table3.csv, table1.csv and comparison.json under --output; the page with --report."""
    methods, metrics, benches = args.methods, list(versions), benchmarks(args.methods)
    prompts = [{p.name: p.images for p in folder.prompts} for folder in folders]
    comparison = {
        "metrics": versions, "benchmarks": benches, "reference": args.reference, "bootstrap": BOOTSTRAP,
        "methods": [{"name": m.name, "dirs": m.dirs, "logdir": m.logdir} for m in methods],
        "table3": table3(methods, benches, metrics, summaries),
        "table1": table1(methods, args.reference, benches, metrics, prompts, per_dir, BOOTSTRAP),
        "curves": {m.name: curves(m.logdir) for m in methods if m.logdir},
        "gallery": gallery_data(methods, benches, folders, per_dir, metrics, args.gallery_prompts),
    }
    comparison = json_safe(comparison)
    print()
    print(comparison_tables(comparison))
    write_text(os.path.join(args.output, "table3.csv"), table3_csv(comparison["table3"]))
    write_text(os.path.join(args.output, "table1.csv"), table1_csv(comparison["table1"]))
    write_text(os.path.join(args.output, "comparison.json"), json.dumps(comparison, indent=1))
    print(f"wrote table3.csv, table1.csv and comparison.json to {args.output}", file=sys.stderr)
    if args.report is not None:
        write_comparison_page(args.report, comparison, args.methods)
        print(f"wrote {args.report}", file=sys.stderr)


def write_report(args, dirs, folders, base, versions, entries, scores, errors):
    """Print the tables and write scores.csv, scores.json (and winrate.csv) under --output."""
    metrics = list(versions)
    for index, error in sorted(errors.items()):
        print(f"warning: unreadable image, excluded: {entries[index][0]} ({error})", file=sys.stderr)
    summaries, per_dir, report = [], [], {"metrics": versions, "hps_version": args.hps_version, "dirs": []}
    for d in range(len(folders)):
        indices = [i for i, entry in enumerate(entries) if entry[2] == d]
        valid = [i for i in indices if scores[i] is not None]
        summaries.append({"dir": dirs[d], "images": len(indices), "failed": len(indices) - len(valid),
                          "metrics": {m: summarize([scores[i][m] for i in valid]) for m in metrics}})
        per_dir.append({m: {entries[i][0]: scores[i][m] for i in valid} for m in metrics})
        report["dirs"].append({**summaries[-1], "unreadable": [entries[i][0] for i in indices if i in errors],
                               "scores": {os.path.relpath(entries[i][0], dirs[d]): scores[i] for i in valid}})
    print(scores_table(summaries, metrics))
    os.makedirs(args.output, exist_ok=True)
    write_text(os.path.join(args.output, "scores.csv"), scores_csv(summaries, metrics, versions))

    if base is not None:
        b = folders.index(base)
        base_prompts = {p.name: p.images for p in base.prompts}
        comparisons = []
        for d, folder in enumerate(folders):
            if d != b:
                prompts = {p.name: p.images for p in folder.prompts}
                rates, compared = win_rate(prompts, base_prompts, per_dir[d], per_dir[b], metrics)
                # wins/ties/losses apart and a bootstrap interval, for the --report page and readers of scores.json
                intervals = win_rate_bootstrap(prompts, base_prompts, per_dir[d], per_dir[b], metrics,
                                               BOOTSTRAP["resamples"], BOOTSTRAP["seed"])
                comparisons.append({"dir": dirs[d], "prompts": compared, "win_rate": rates, "bootstrap": intervals})
        report["win_rate"] = {"base": dirs[b], "bootstrap": BOOTSTRAP, "rows": comparisons}
        print()
        print(win_rate_table(comparisons, dirs[b], metrics))
        write_text(os.path.join(args.output, "winrate.csv"), win_rate_csv(comparisons, metrics))
    report = json_safe(report)   # the page shows exactly what scores.json holds
    write_text(os.path.join(args.output, "scores.json"), json.dumps(report, indent=1))
    print(f"\nwrote {os.path.join(args.output, 'scores.csv')} and scores.json", file=sys.stderr)
    if args.report is not None and not args.method:
        if not any(entry["scores"] for entry in report["dirs"]):
            raise UserError(f"--report {args.report}: no image could be scored (all unreadable), no page written")
        write_html_report(args.report, report, [{p.name: p.caption for p in folder.prompts} for folder in folders])
        print(f"wrote {args.report}", file=sys.stderr)
    return summaries, per_dir


if __name__ == "__main__":
    run_main(main)
