"""Where a Diffusion-DRO micro-step's time goes: train.py itself, with timers around the
model calls (monkeypatched, so nothing in the loop changes), for several configurations
run alternately in one process (docs/benchmarks.md, "Training step").

    python bench/train_step.py [--steps 12] [--warmup 4] [--resolution 64] [--threads 2]
        [--modes truncate,whole] [--repeats 3]

Runs train.py on the tiny SD1.5 kit on the CPU (fp32) at the paper's buffer settings (batch 4,
buffer 4 refilled at every micro-step, 20-step DPM-Solver++ rollouts) and splits the
steady-state wall time of `--steps` micro-steps into: rollout UNet forwards, reference
forward, trainable forward, backward, VAE encode, text encode, AdamW step, EMA step, and
everything else (per-sample scheduler math, replay buffer, data loading, then the rest:
noise draws, logging, Python). Modes: `truncate` (truncated rollouts, the default where
exact), `whole` (`--no-truncate_rollouts`), `compile`, `channels_last` (each on top of
`truncate`). The modes alternate, in a rotated order each repeat; figures are medians over
repeats.
"""
import argparse
import collections
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

from rpo import models  # noqa: E402
from rpo.diffusion import schedulers  # noqa: E402
from rpo.diffusion.buffer import ReplayBuffer  # noqa: E402
from rpo.tiny.__main__ import KITS  # noqa: E402
from rpo.training import ema, steps  # noqa: E402

MODES = {"truncate": ["--truncate_rollouts"], "whole": ["--no-truncate_rollouts"],
         "compile": ["--truncate_rollouts", "--compile"], "channels_last": ["--truncate_rollouts", "--channels_last"]}

spent = collections.defaultdict(float)
state = {"in_rollout": False, "backwards": 0, "marks": {}}


def timed(phase, fn):
    def wrapper(*args, **kwargs):
        name = phase(*args, **kwargs) if callable(phase) else phase
        tic = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - tic
    return wrapper


def unet_phase(*args, **kwargs):
    if state["in_rollout"]:
        x = args[1] if len(args) > 1 else kwargs["sample"]
        state["rollout_rows"] += x.shape[0]
        return "rollout UNet"
    return "trainable forward" if torch.is_grad_enabled() else "reference forward"


def patch():
    def in_rollout(real):
        def wrapper(*args, **kwargs):
            state["in_rollout"] = True
            try:
                return real(*args, **kwargs)
            finally:
                state["in_rollout"] = False
        return wrapper

    steps.rollout = in_rollout(steps.rollout)
    steps.truncated_rollout = in_rollout(steps.truncated_rollout)
    real_backward = Accelerator.backward

    def backward(self, loss, **kwargs):
        real_backward(self, loss, **kwargs)
        state["backwards"] += 1
        if state["backwards"] in state["mark_at"]:  # snapshot after micro-step `warmup` and at the end
            state["marks"][state["backwards"]] = (time.perf_counter(), dict(spent), state["rollout_rows"])

    UNet2DConditionModel.forward = timed(unet_phase, UNet2DConditionModel.forward)
    AutoencoderKL.encode = timed("VAE encode", AutoencoderKL.encode)
    models.TextEncoders.encode = timed("text encode", models.TextEncoders.encode)
    Accelerator.backward = timed("backward", backward)
    torch.optim.AdamW.step = timed("AdamW step", torch.optim.AdamW.step)
    ema.NamedEMA.step = timed("EMA step", ema.NamedEMA.step)
    for cls in (schedulers.PerSampleDDPM, schedulers.PerSampleDDIM, schedulers.PerSampleDPMSolver):
        cls.step = timed("scheduler math", cls.step)
    ReplayBuffer.push = timed("replay buffer", ReplayBuffer.push)
    ReplayBuffer.sample = timed("replay buffer", ReplayBuffer.sample)
    loader_next = torch.utils.data.dataloader._BaseDataLoaderIter.__next__
    torch.utils.data.dataloader._BaseDataLoaderIter.__next__ = timed("data loading", loader_next)


MODEL = ("rollout UNet", "reference forward", "trainable forward", "backward", "VAE encode", "text encode")
OTHER = ("AdamW step", "EMA step", "scheduler math", "replay buffer", "data loading")


def run_once(work, args, flags):
    spent.clear()
    state.update(in_rollout=False, backwards=0, marks={}, rollout_rows=0,
                 mark_at=(args.warmup, args.warmup + args.steps))
    total = args.warmup + args.steps
    log = os.path.join(work, "log")
    shutil.rmtree(log, ignore_errors=True)
    sys.argv = ["train.py", "--pretrained_model_name_or_path", os.path.join(work, "sd15"),
                "--train_dataset", os.path.join(work, "experts"), "--logdir", log,
                "--resolution", str(args.resolution), "--num_steps", str(total), "--checkpointing_steps", str(total),
                "--batch_size", "4", "--buffer_batch_size", "4", "--buffer_size", "4", "--buffer_batch_accumulation", "1",
                "--buffer_sample_steps", "1", "--buffer_num_inference_steps", str(args.rollout_steps),
                "--buffer_scheduler", "DPMSolver++",
                "--gradient_accumulation_steps", "4", "--buffer_update_steps", "4", "--mixed_precision", "no",
                "--dataloader_num_workers", "1", "--report_to", "tensorboard", *flags]
    with contextlib.redirect_stderr(open(os.devnull, "w")), contextlib.redirect_stdout(open(os.devnull, "w")):
        train.main()
    (t0, s0, r0), (t1, s1, r1) = state["marks"][args.warmup], state["marks"][total]
    phases = {k: s1.get(k, 0.0) - s0.get(k, 0.0) for k in s1}
    return t1 - t0, phases, (r1 - r0) / args.steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rollout_steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="truncate,whole", help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    modes = args.modes.split(",")
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench-train-")
    for kind in ("sd15", "experts"):
        KITS[kind](os.path.join(work, kind))
    patch()
    results = collections.defaultdict(list)
    for r in range(args.repeats):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:  # rotate who goes first
            results[mode].append(run_once(work, args, MODES[mode]))
    print(f"{args.steps} micro-steps after {args.warmup} warm-up, tiny SD1.5 kit, {args.resolution} px, batch 4, buffer 4, "
          f"{args.rollout_steps}-step DPM-Solver++, {torch.get_num_threads()} threads, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, median of {args.repeats} alternating repeats\n")
    print("| mode | ms / micro-step | rollout UNet rows / micro-step | rollout UNet ms | rollout share | "
          "non-model share | vs whole |\n|---|---:|---:|---:|---:|---:|---:|")
    med = {}
    for mode in modes:
        walls = [w / args.steps * 1000 for w, _, _ in results[mode]]
        med[mode] = statistics.median(walls)
    for mode in modes:
        runs = results[mode]
        roll = statistics.median(p.get("rollout UNet", 0.0) / w for w, p, _ in runs)
        nonmodel = statistics.median((w - sum(p.get(k, 0.0) for k in MODEL)) / w for w, p, _ in runs)
        roll_ms = statistics.median(p.get("rollout UNet", 0.0) / args.steps * 1000 for _, p, _ in runs)
        rows = statistics.median(r for _, _, r in runs)
        ratio = f"{med['whole'] / med[mode]:.2f}x" if "whole" in med else "-"
        print(f"| {mode} | {med[mode]:.1f} | {rows:.1f} | {roll_ms:.1f} | {100 * roll:.1f} % | {100 * nonmodel:.1f} % | {ratio} |")
    for mode in modes:  # the phase split of the median run of each mode
        runs = sorted(results[mode], key=lambda run: run[0])
        wall, phases, _ = runs[len(runs) // 2]
        rows = [(k, phases.get(k, 0.0)) for k in MODEL + OTHER]
        other = wall - sum(v for _, v in rows)
        print(f"\n{mode}: {wall / args.steps * 1000:.1f} ms per micro-step\n\n| phase | ms / micro-step | share |\n|---|---:|---:|")
        for name, seconds in rows + [("everything else (noise draws, logging, Python)", other)]:
            print(f"| {name} | {seconds / args.steps * 1000:.1f} | {100 * seconds / wall:.1f} % |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
