"""Build an expert (training) or reference (test) folder dataset from Pick-a-Pic.

    accelerate launch --multi_gpu --num_processes 8 -m tools.pickapic \
        --cache ./data/cache --version v2 --split train --score hpsv2 --top 500 \
        --batch_size 64 --no-preferred --output ./data/pickapicv2_hpsv2_nopreferred_500

Every image of the split is scored against its caption with `--score`; the `--top` best
(overall, or per unique caption with `--per_caption`) are written as a folder dataset:
`<output>/<i>/caption.txt`, the original image bytes as `<uid>.jpg`, and `info.json`.

How it avoids holding 335 GB: the split is read one parquet shard at a time (streamed,
into memory), the shards are divided between processes (shard j goes to process
j mod N), and each process keeps on disk only the bytes of images that enter its running
top-K. The final selection is always a subset of those, so the output is written without
reading the dataset again (images missing after an interruption are re-read from their
shard only).

Resuming: scores are appended to a JSONL cache after every batch, and each finished shard
is recorded; a rerun skips finished shards, never rescores a (uid, caption) pair, and
completes a partial output. `--preferred` keeps only images the user chose (label 1 in at
least one row); a tie (0.5/0.5) is not a choice, so tied images are kept only with
`--no-preferred` (see rpo/data/selection.py). Unreadable images are skipped, counted and
reported.

`--mode pairs` writes every labelled pair instead (`<i>/caption.txt`, `win.jpg`, `lose.jpg`,
`info.json`; ties dropped, duplicates and unreadable images named and skipped), for
Diffusion-DPO; `--mode labels` every image with its label (`<i>/caption.txt`, `<uid>.jpg`,
`label.txt` = desirable or undesirable, `info.json`), for Diffusion-KTO. Nothing is scored
(rpo/data/preference_export.py).
"""
import argparse
import contextlib
import os
import statistics
from collections import Counter

from rpo.data import pickapic
from rpo.cli import UserError, check_writable, cpu_ranks, flag, parse_args, run_main
from rpo.scores.images import score_images
from rpo.data.items import image_extension, item_name, write_items
from rpo.data import preference_export
from rpo.data.score_cache import ScoreCache
from rpo.lock import DirectoryLock
from rpo.models import offline_unless_hub_reachable
from rpo.scores import HPS_VERSIONS, METRICS, load_scorer
from rpo.data.selection import Candidate, RunningSelection, is_preferred, select

ALIASES = {"aesthetic": "aestheticv1"}  # the name the paper's code (basiclab/DiffusionDRO) uses for Aesthetic v1


def build_parser():
    p = argparse.ArgumentParser(prog="python -m tools.pickapic", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("experts",) + preference_export.MODES, default="experts",
                   help="experts: the --top best images by --score; pairs: every labelled pair (preferred, other) "
                        "for DPO; labels: every image labelled desirable/undesirable for KTO (no scoring)")
    p.add_argument("--cache", default="./data/cache", help="folder for score caches and resume state")
    p.add_argument("--version", choices=("v1", "v2"), default="v2", help="Pick-a-Pic version (sets the default --dataset)")
    p.add_argument("--dataset", default=None,
                   help="hub dataset id or local folder in the same layout (default yuvalkirstain/pickapic_<version>)")
    p.add_argument("--split", default="train", help="train, validation, test, validation_unique, test_unique")
    p.add_argument("--score", default="pickscore", help=f"metric: {', '.join(METRICS)} ('aesthetic' = aestheticv1)")
    p.add_argument("--hps_version", choices=HPS_VERSIONS, default="v2.0", help="HPSv2 checkpoint for --score hpsv2")
    p.add_argument("--weights_dir", default=None, help="local scorer weights (offline); default: the hub")
    p.add_argument("--top", type=int, default=500, help="images to keep (per caption with --per_caption)")
    flag(p, "preferred", True, "keep only images the user chose (label 1); a tie is not a choice")
    flag(p, "per_caption", False, "keep the --top best images of each unique caption")
    p.add_argument("--output", default=None, help="output folder (default ./data/pickapic<version>_<score>_...)")
    p.add_argument("--num_proc", type=int, default=8, help="image decoding workers per process")
    p.add_argument("--batch_size", type=int, default=64, help="images scored at once per process")
    return p


def check_args(args):
    args.score = ALIASES.get(args.score, args.score)
    if args.score not in METRICS:
        raise UserError(f"--score must be one of {', '.join(METRICS)} (or 'aesthetic'), got {args.score!r}")
    for name in ("top", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_proc < 0:
        raise UserError(f"--num_proc must be >= 0, got {args.num_proc}")
    args.dataset = args.dataset or pickapic.hub_id(args.version)
    if args.output is None and args.mode != "experts":
        args.output = f"./data/pickapic{args.version}_{args.split}_{args.mode}"
    if args.output is None:
        kind = "preferred" if args.preferred else "nopreferred"
        suffix = "_per_caption" if args.per_caption else ""
        args.output = f"./data/pickapic{args.version}_{args.score}_{kind}_{args.top}{suffix}"
    check_writable(args.output, "--output")  # before hours of scoring
    check_writable(args.cache, "--cache")
    return args


def observations(rows):
    """(uid, caption, label, side) for both images of each row with a caption."""
    for uid0, uid1, caption, label0, label1 in rows:
        if caption:
            yield uid0, caption, label0, 0
            yield uid1, caption, label1, 1


def score_shard(rows, scores, scorer, args, device):
    """Score every (uid, caption) of `rows` not in the cache yet; append results per batch."""
    pending, seen = [], set()
    for row in rows:
        caption = (row["caption"] or "").strip()
        for side in (0, 1):
            pair = (row[f"image_{side}_uid"], caption)
            if caption and pair not in scores and pair not in seen:
                seen.add(pair)
                pending.append((pair, row[f"jpg_{side}"]))
    captions = [pair[1] for pair, _ in pending]
    for batch in score_images(scorer, [data for _, data in pending], captions, args.batch_size, args.num_proc, device):
        scores.add([(*pending[i][0], score, error) for i, score, error in batch])
    return len(pending)


def process_shards(args, shards, scores, index, store, scorer, rank, world, device):
    """This process's share of the work: score its unfinished shards, keep possible winners."""
    done = index.load()

    def finished(name):
        return name in done and all(pair in scores for pair in ((u, c) for u, c, _, _ in observations(done[name])))

    running = RunningSelection(args.top, args.per_caption)
    for path in shards:  # what earlier runs already saw raises the bar for what is worth keeping
        if finished(pickapic.shard_name(path)):
            for uid, caption, label, _ in observations(done[pickapic.shard_name(path)]):
                if scores.get((uid, caption)) is not None and (not args.preferred or is_preferred(label)):
                    running.offer(scores.get((uid, caption)), uid, caption)
    mine = [(j, path) for j, path in enumerate(shards) if j % world == rank and not finished(pickapic.shard_name(path))]
    for count, (j, path) in enumerate(mine):
        rows = pickapic.read_shard(path)
        scored = score_shard(rows, scores, scorer, args, device)
        for row in rows:
            for uid, caption, label, side in observations([pickapic.compact_row(row)]):
                score = scores.get((uid, caption))
                if score is None or (args.preferred and not is_preferred(label)):
                    continue
                if running.offer(score, uid, caption) and not store.has(uid):
                    store.put(uid, row[f"jpg_{side}"])
        index.add(pickapic.shard_name(path), [pickapic.compact_row(row) for row in rows])
        print(f"[process {rank}] shard {j + 1}/{len(shards)} ({count + 1}/{len(mine)} of mine): "
              f"{len(rows)} rows, {scored} images scored", flush=True)


def finish(args, shards, scores, index, store, metric_version):
    """Main process: select from the complete cache and write the folder dataset."""
    scores.reload()
    done = index.load()
    candidates, where, stats = {}, {}, Counter()
    for j, path in enumerate(shards):
        name = pickapic.shard_name(path)
        if name not in done:
            raise UserError(f"shard {name} was not processed (did another process fail?); rerun to complete it")
        for row in done[name]:
            stats["rows"] += 1
            stats["blank captions"] += not row[2]
            stats["ties"] += row[3] is not None and row[4] is not None and float(row[3]) == float(row[4])
        for uid, caption, label, _ in observations(done[name]):
            stats["images"] += 1
            pair = (uid, caption)
            where.setdefault(uid, (j, path))
            score = scores.get(pair)
            if score is not None and pair not in candidates and (not args.preferred or is_preferred(label)):
                candidates[pair] = Candidate(score, uid, caption, order=stats["images"])
    unreadable = sorted({pair for pair in scores.errors if pair[0] in where})
    if stats["rows"] == 0:
        raise UserError(f"--split {args.split} of {args.dataset} has no rows")
    if not candidates:
        raise UserError(f"no image of --split {args.split} qualifies (readable, with a caption"
                        + (", chosen by the user" if args.preferred else "") + ")")
    chosen = select(list(candidates.values()), args.top, args.per_caption)

    refetch = sorted({where[c.uid] for c in chosen if not store.has(c.uid)})
    wanted = {c.uid for c in chosen}
    for _, path in refetch:  # images not kept while streaming (e.g. killed between score and keep)
        for row in pickapic.read_shard(path):
            for side in (0, 1):
                if row[f"image_{side}_uid"] in wanted and not store.has(row[f"image_{side}_uid"]):
                    store.put(row[f"image_{side}_uid"], row[f"jpg_{side}"])

    items = []
    for i, c in enumerate(chosen):
        image = store.path(c.uid)
        info = {"uid": c.uid, "score": c.score, "metric": metric_version, "dataset": args.dataset, "split": args.split}
        items.append((item_name(i, len(chosen)), c.caption, f"{pickapic.safe_name(c.uid)}.{image_extension(image)}",
                      image, info))
    written, present = write_items(args.output, items)

    print(f"{args.dataset} [{args.split}]: {stats['rows']} rows ({stats['ties']} ties, {stats['blank captions']} "
          f"without caption), {len(candidates)} candidate images" + (" chosen by the user" if args.preferred else ""))
    if unreadable:
        print(f"skipped {len(unreadable)} unreadable image(s), e.g. {unreadable[0][0]}: {scores.errors[unreadable[0]]}")
    print(f"selected {len(chosen)} by {metric_version} (mean {statistics.fmean(c.score for c in chosen):.4f}, "
          f"lowest {min(c.score for c in chosen):.4f}); re-read {len(refetch)} shard(s) for images; "
          f"wrote {written} item(s) to {args.output}, {present} already there")
    return chosen


def run_preference(args, shards, rank, world, barrier):
    """--mode pairs|labels: no scorer; rpo/data/preference_export.py."""
    root = os.path.join(args.cache, "pickapic")
    index = preference_export.preference_index(root, args.dataset, args.split, rank)
    store = pickapic.ImageStore(os.path.join(root, "images"))
    preference_export.stream_shards(shards, index, store, rank, world)
    barrier()
    if rank == 0:
        return preference_export.finish(args.mode, shards, index, store, root, args.dataset, args.split, args.output)


def run(args, rank=0, world=1, device="cpu", barrier=lambda: None):
    args = check_args(args)
    # one writer per --output: the main process holds it while any process works for it
    with DirectoryLock(args.output, what="--output") if rank == 0 else contextlib.nullcontext():
        return build(args, rank, world, device, barrier)


def build(args, rank, world, device, barrier):
    """Score this process's shards (or, --mode pairs|labels, export them); on the main
    process, select and write the output."""
    offline_unless_hub_reachable([args.dataset] + ([args.weights_dir] if args.mode == "experts" else []))
    shards = pickapic.list_shards(args.dataset, args.split)
    if args.mode != "experts":
        return run_preference(args, shards, rank, world, barrier)
    scorer = load_scorer(args.score, weights_dir=args.weights_dir, device=device, hps_version=args.hps_version)
    metric_version = f"{scorer.name}-{scorer.version}"
    root = os.path.join(args.cache, "pickapic")
    scores = ScoreCache(os.path.join(root, "scores"), metric_version, rank)
    index = pickapic.RowIndex(os.path.join(root, "rows", pickapic.dataset_tag(args.dataset)), args.split, rank)
    store = pickapic.ImageStore(os.path.join(root, "images"))
    process_shards(args, shards, scores, index, store, scorer, rank, world, device)
    barrier()
    if rank == 0:
        return finish(args, shards, scores, index, store, metric_version)


def main(argv=None):
    from accelerate import Accelerator

    args = parse_args(build_parser(), argv)
    accelerator = Accelerator(cpu=cpu_ranks())
    run(args, accelerator.process_index, accelerator.num_processes, accelerator.device, accelerator.wait_for_everyone)


if __name__ == "__main__":
    run_main(main)
