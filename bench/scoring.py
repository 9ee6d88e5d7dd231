"""Images/s of score.py's scoring loop against the bare model forwards on pre-loaded tensors.

"score.py" is `rpo.scores.loop.score_entries`, the loop the script runs: every image read,
hashed and decoded in DataLoader workers, each metric's own transform there, then per
batch every metric's model forward in the main process. "Bare" is those forwards alone:
the same batches of the same images, preprocessed beforehand and held in memory, each
scorer's `score_tensors`. "Data only" is the loop's DataLoader without any forward. Same
scorers (the tiny kit, all six metrics), same batch size; the variants alternate in one
process and the median of the repeats is reported. Images are 512x512 PNGs with noise, the
size and entropy of Stable Diffusion outputs.

    .venv/bin/python bench/scoring.py [--weights_dir DIR] [--images 96] [--batch_size 32] \\
        [--num_workers 2] [--threads 1] [--repeats 3] [--device cpu]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rpo.scores import METRICS, load_scorer  # noqa: E402
from rpo.scores.loop import ImageScoringDataset, collate, score_entries  # noqa: E402
from rpo.tiny.scorers import write_tiny_scorers  # noqa: E402
from rpo.tiny.pipelines import CAPTIONS  # noqa: E402


def write_images(folder, count):
    rng = np.random.default_rng(0)
    entries = []
    for i in range(count):
        gradient = np.linspace(0, 255, 512)[None, :, None] * rng.uniform(0.2, 1.0, size=(1, 1, 3))
        pixels = np.clip(gradient + rng.normal(0, 25, size=(512, 512, 3)), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{i}.png")
        Image.fromarray(pixels).save(path)
        entries.append((path, CAPTIONS[i % len(CAPTIONS)], 0))
    return entries


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights_dir", default=None, help="scorer weights (default: write the tiny kit)")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights_dir or write_tiny_scorers(os.path.join(tmp, "weights"))
        entries = write_images(tmp, args.images)
        scorers = {m: load_scorer(m, weights, args.device) for m in METRICS}
        nothing_cached = [{m: set() for m in METRICS}]
        batches = [list(range(s, min(s + args.batch_size, len(entries)))) for s in range(0, len(entries), args.batch_size)]
        images = [Image.open(path) for path, _, _ in entries]   # pre-loaded inputs of the bare forwards
        preloaded = {m: torch.stack([scorers[m].preprocess(image) for image in images]) for m in METRICS}

        def loop():
            score_entries(entries, scorers, nothing_cached, args.batch_size, args.num_workers)

        def bare():
            for batch in batches:
                prompts = [entries[i][1] for i in batch]
                for m in METRICS:
                    scorers[m].score_tensors(preloaded[m][batch], prompts)

        def data_only():
            dataset = ImageScoringDataset(entries, {m: s.transform for m, s in scorers.items()}, nothing_cached)
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                                 collate_fn=collate, prefetch_factor=4 if args.num_workers else None)
            for _ in loader:
                pass

        times = {"score.py loop": [], "bare forwards": [], "data only": []}
        bare()  # warm-up
        for _ in range(args.repeats):
            times["score.py loop"].append(timed(loop))
            times["bare forwards"].append(timed(bare))
            times["data only"].append(timed(data_only))
    rates = {name: args.images / statistics.median(values) for name, values in times.items()}
    print(f"{args.images} images 512x512 PNG, batch {args.batch_size}, {args.num_workers} workers, "
          f"{args.threads} torch threads, {args.device}, six metrics per image")
    for name, rate in rates.items():
        print(f"  {name:14s} {rate:8.1f} images/s")
    print(f"  ratio score.py / bare: {rates['score.py loop'] / rates['bare forwards']:.2f}")
    print(f"  ratio score.py / slower of (data only, bare): "
          f"{rates['score.py loop'] / min(rates['data only'], rates['bare forwards']):.2f}")


if __name__ == "__main__":
    main()
