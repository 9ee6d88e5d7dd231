"""Scheduler cost of one 20-step DPM-Solver++ rollout with per-sample timesteps.

Vectorised `rpo.diffusion.schedulers.PerSampleScheduler` against the way of the paper's code (basiclab/DiffusionDRO):
a Python loop over samples, each stepping a stock diffusers DPMSolverMultistepScheduler on its own row
(here one stock scheduler per sample, which is what the paper's code's state swapping
amounts to, minus the swapping, and with each sample's own sigmas). The UNet is a
stand-in (0.1 * x), so only scheduler work is timed. Both run side by side in one
process, alternating, and must agree.

    .venv/bin/python bench/scheduler_step.py [--device cuda] [--threads 1] [--batch_sizes 4 16 64]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rpo.diffusion.schedulers import PerSampleScheduler, make_timesteps, stock_scheduler  # noqa: E402
from rpo.tiny.pipelines import SD15_SCHEDULER  # noqa: E402


def unet(x, t):
    return 0.1 * x


def vectorised(grid, x):
    scheduler = PerSampleScheduler.from_name("DPMSolver++", SD15_SCHEDULER)
    scheduler.set_timesteps(grid)
    for k in range(grid.shape[1]):
        x = scheduler.step(unet(x, grid[:, k]), k, x)
    return x


def per_sample_loop(grid, x):
    schedulers = []
    for row in grid.tolist():
        scheduler = stock_scheduler("DPMSolver++", SD15_SCHEDULER)
        scheduler.set_timesteps(timesteps=row, device=x.device)
        schedulers.append(scheduler)
    for k in range(grid.shape[1]):
        eps = unet(x, grid[:, k])
        x = torch.cat([s.step(eps[i:i + 1], s.timesteps[k], x[i:i + 1]).prev_sample for i, s in enumerate(schedulers)])
    return x


def milliseconds(fn, grid, x, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(grid, x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each; the median is reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (on the shared 2-core dev box a second thread costs ~6 ms per op)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{args.steps}-step DPM-Solver++ trajectory, 4x64x64 latents, stand-in UNet, {where}, "
          f"torch {torch.__version__}")
    print("| batch | per-sample loop (ms) | vectorised (ms) | speedup | max abs diff |")
    print("|---:|---:|---:|---:|---:|")
    for batch in args.batch_sizes:
        grid = make_timesteps("DPMSolver++", SD15_SCHEDULER, args.steps, batch, perturb=True,
                              generator=torch.Generator().manual_seed(0), device=device)
        x = torch.randn(batch, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
        times, outputs = {vectorised: [], per_sample_loop: []}, {}
        for repeat in range(args.repeats + 1):  # the first round is warm-up
            for fn in times:
                ms, outputs[fn] = milliseconds(fn, grid, x, device)
                if repeat:
                    times[fn].append(ms)
        diff = (outputs[vectorised] - outputs[per_sample_loop]).abs().max().item()
        loop_ms, vec_ms = statistics.median(times[per_sample_loop]), statistics.median(times[vectorised])
        print(f"| {batch} | {loop_ms:.1f} | {vec_ms:.1f} | {loop_ms / vec_ms:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
