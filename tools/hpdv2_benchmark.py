"""Build the HPDv2 benchmark sets: for each style, every prompt with its best expert image.

    accelerate launch --multi_gpu --num_processes 8 -m tools.hpdv2_benchmark \
        --cache ./data/cache --batch_size 64 --output ./data/hpdv2_{style}

Downloads the four style prompt lists and the benchmark models' image tarballs
(`--repo`, default the hub's ymhao/HPDv2, or a local folder in the same layout: see
rpo/data/hpdv2.py), extracts them safely, scores every model's image of every prompt with
`--score` against that prompt, and writes one folder dataset per style at `--output`
with `{style}` replaced: `<i>/caption.txt` (prompt i of `<style>.json`, duplicates kept,
blank prompts skipped), the top-1 image as `<model>.jpg`, and `info.json`. Scores are
appended to a JSONL cache after every batch; a rerun reuses downloads, extractions and
scores and completes a partial output. Unreadable images are skipped and reported.
"""
import argparse
import contextlib
import os
import statistics
from collections import Counter

from tqdm import tqdm

from rpo.data import hpdv2
from rpo.cli import UserError, check_writable, cpu_ranks, parse_args, run_main
from rpo.scores.images import score_images
from rpo.data.items import item_name, write_items
from rpo.data.score_cache import ScoreCache
from rpo.lock import DirectoryLock
from rpo.models import offline_unless_hub_reachable
from rpo.scores import HPS_VERSIONS, METRICS, load_scorer

ALIASES = {"aesthetic": "aestheticv1"}  # the name the paper's code (basiclab/DiffusionDRO) uses for Aesthetic v1


def build_parser():
    p = argparse.ArgumentParser(prog="python -m tools.hpdv2_benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="./data/cache", help="folder for downloads, extracted images and score caches")
    p.add_argument("--repo", default="ymhao/HPDv2", help="hub dataset id or local folder in the same layout")
    p.add_argument("--styles", nargs="+", choices=hpdv2.STYLES, default=list(hpdv2.STYLES), help="styles to build")
    p.add_argument("--score", default="pickscore", help=f"metric: {', '.join(METRICS)} ('aesthetic' = aestheticv1)")
    p.add_argument("--hps_version", choices=HPS_VERSIONS, default="v2.0", help="HPSv2 checkpoint for --score hpsv2")
    p.add_argument("--weights_dir", default=None, help="local scorer weights (offline); default: the hub")
    p.add_argument("--output", default="./data/hpdv2_{style}", help="output folder; {style} is replaced by the style")
    p.add_argument("--num_proc", type=int, default=8, help="image decoding workers per process")
    p.add_argument("--batch_size", type=int, default=64, help="images scored at once per process")
    return p


def check_args(args):
    args.score = ALIASES.get(args.score, args.score)
    if args.score not in METRICS:
        raise UserError(f"--score must be one of {', '.join(METRICS)} (or 'aesthetic'), got {args.score!r}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.num_proc < 0:
        raise UserError(f"--num_proc must be >= 0, got {args.num_proc}")
    args.styles = list(dict.fromkeys(args.styles))
    if len(args.styles) > 1 and "{style}" not in args.output:
        raise UserError(f"--output {args.output} must contain {{style}} when building several styles")
    for style in args.styles:  # before downloads and hours of scoring
        check_writable(args.output.replace("{style}", style), "--output")
    check_writable(args.cache, "--cache")
    return args


def candidates(benchmark, styles):
    """{style: (number of prompts, [(index, prompt, [(model, image path)])] for the non-blank ones)}."""
    prompts = {style: benchmark.prompts(style) for style in styles}
    folders = {model: benchmark.model_folder(model) for model in benchmark.models()}
    table = {}
    for style in styles:
        where = {model: hpdv2.style_folder(folder, model, style) for model, folder in folders.items()}
        table[style] = (len(prompts[style]), [
            (index, prompt.strip(), [(m, p) for m in sorted(where) if (p := hpdv2.image_path(where[m], index))])
            for index, prompt in enumerate(prompts[style]) if prompt.strip()
        ])
    return table


def run(args, rank=0, world=1, device="cpu", barrier=lambda: None):
    args = check_args(args)
    with contextlib.ExitStack() as held:  # one writer per output folder, held by the main process
        if rank == 0:
            for output in sorted({args.output.replace("{style}", style) for style in args.styles}):
                held.enter_context(DirectoryLock(output, what="--output"))
        return build(args, rank, world, device, barrier)


def build(args, rank, world, device, barrier):
    """Fetch, extract and score this process's share; on the main process, write each style."""
    offline_unless_hub_reachable([args.repo, args.weights_dir])  # before any hub request
    benchmark = hpdv2.Benchmark(args.repo, args.cache)
    if rank == 0:  # the main process downloads and extracts; the others then find it all in place
        table = candidates(benchmark, args.styles)
    barrier()
    if rank != 0:
        table = candidates(benchmark, args.styles)
    scorer = load_scorer(args.score, weights_dir=args.weights_dir, device=device, hps_version=args.hps_version)
    metric_version = f"{scorer.name}-{scorer.version}"
    scores = ScoreCache(os.path.join(benchmark.work, "scores"), metric_version, rank)

    def key(style, index, model):
        return f"{model}/{style}/{index:05d}"

    pending = [(key(style, index, model), prompt, path) for style in args.styles
               for index, prompt, images in table[style][1] for model, path in images
               if (key(style, index, model), prompt) not in scores]
    mine = pending[rank::world]
    progress = tqdm(total=len(mine), desc=f"scoring ({metric_version})", unit="img", disable=rank != 0)
    for batch in score_images(scorer, [p for _, _, p in mine], [c for _, c, _ in mine], args.batch_size,
                              args.num_proc, device):
        scores.add([(mine[i][0], mine[i][1], score, error) for i, score, error in batch])
        progress.update(len(batch))
    progress.close()
    barrier()
    if rank != 0:
        return None

    scores.reload()
    results = {}
    for style in args.styles:
        items, stats, unreadable = [], Counter(), []
        count, entries = table[style]
        for index, prompt, images in entries:
            scored = [(scores.get((key(style, index, m), prompt)), m, p) for m, p in images]
            unreadable += [(m, index, p, scores.errors[(key(style, index, m), prompt)]) for m, p in images
                           if (key(style, index, m), prompt) in scores.errors]
            scored = [s for s in scored if s[0] is not None]
            if not scored:
                stats["without image"] += 1
                continue
            score, model, path = min(scored, key=lambda s: (-s[0], s[1]))  # best score; ties -> model name
            stats[model] += 1
            ext = os.path.splitext(path)[1].lower()
            info = {"model": model, "score": score, "metric": metric_version, "style": style, "index": index}
            items.append((item_name(index, count), prompt, f"{model}{ext}", path, info))
        if not items:
            raise UserError(f"style {style}: no prompt has a readable image in {args.repo}")
        output = args.output.replace("{style}", style)
        written, present = write_items(output, items)
        winners = ", ".join(f"{m} {n}" for m, n in stats.most_common() if m != "without image")
        print(f"{style}: {len(items)} prompts (of {count}; {count - len(entries)} blank, "
              f"{stats['without image']} without a readable image); mean best {metric_version} "
              f"{statistics.fmean(i[4]['score'] for i in items):.4f}; winners: {winners}")
        if unreadable:
            model, index, path, error = unreadable[0]
            print(f"{style}: skipped {len(unreadable)} unreadable image(s), e.g. model {model} prompt {index}: "
                  f"{path} ({error})")
        print(f"{style}: wrote {written} item(s) to {output}, {present} already there")
        results[style] = items
    return results


def main(argv=None):
    from accelerate import Accelerator

    args = parse_args(build_parser(), argv)
    accelerator = Accelerator(cpu=cpu_ranks())
    run(args, accelerator.process_index, accelerator.num_processes, accelerator.device, accelerator.wait_for_everyone)


if __name__ == "__main__":
    run_main(main)
