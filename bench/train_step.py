"""Where a Diffusion-DRO micro-step's time goes: train.py itself, with timers around the
model calls (monkeypatched, so nothing in the loop changes).

    python bench/train_step.py [--steps 12] [--warmup 4] [--resolution 64] [--threads 2]

Runs train.py on the tiny SD1.5 kit on the CPU (fp32) and splits the steady-state wall
time of `--steps` micro-steps into: rollout UNet forwards, reference forward, trainable
forward, backward, VAE encode, text encode, AdamW step, EMA step, and everything else
(per-sample scheduler math, replay buffer, data loading, then the rest: noise draws,
logging, Python).
"""
import argparse
import collections
import contextlib
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from rpo import models
from rpo.diffusion import schedulers
from rpo.tiny.__main__ import KITS  # noqa: E402
from rpo.diffusion.buffer import ReplayBuffer  # noqa: E402

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
        return "rollout UNet"
    return "trainable forward" if torch.is_grad_enabled() else "reference forward"


def patch(warmup, steps):
    real_rollout = train.rollout

    def rollout(*args, **kwargs):
        state["in_rollout"] = True
        try:
            return real_rollout(*args, **kwargs)
        finally:
            state["in_rollout"] = False

    real_backward = Accelerator.backward

    def backward(self, loss, **kwargs):
        real_backward(self, loss, **kwargs)
        state["backwards"] += 1
        if state["backwards"] in (warmup, warmup + steps):  # snapshot after micro-step `warmup` and at the end
            state["marks"][state["backwards"]] = (time.perf_counter(), dict(spent))

    train.rollout = rollout
    UNet2DConditionModel.forward = timed(unet_phase, UNet2DConditionModel.forward)
    AutoencoderKL.encode = timed("VAE encode", AutoencoderKL.encode)
    models.TextEncoders.encode = timed("text encode", models.TextEncoders.encode)
    Accelerator.backward = timed("backward", backward)
    torch.optim.AdamW.step = timed("AdamW step", torch.optim.AdamW.step)
    EMAModel.step = timed("EMA step", EMAModel.step)
    for cls in (schedulers.PerSampleDDPM, schedulers.PerSampleDDIM, schedulers.PerSampleDPMSolver):
        cls.step = timed("scheduler math", cls.step)
    ReplayBuffer.push = timed("replay buffer", ReplayBuffer.push)
    ReplayBuffer.sample = timed("replay buffer", ReplayBuffer.sample)
    loader_next = torch.utils.data.dataloader._BaseDataLoaderIter.__next__
    torch.utils.data.dataloader._BaseDataLoaderIter.__next__ = timed("data loading", loader_next)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench-train-")
    for kind in ("sd15", "experts"):
        KITS[kind](os.path.join(work, kind))
    patch(args.warmup, args.steps)
    total = args.warmup + args.steps
    sys.argv = ["train.py", "--pretrained_model_name_or_path", os.path.join(work, "sd15"),
                "--train_dataset", os.path.join(work, "experts"), "--logdir", os.path.join(work, "log"),
                "--resolution", str(args.resolution), "--num_steps", str(total), "--checkpointing_steps", str(total),
                "--gradient_accumulation_steps", "4", "--buffer_update_steps", "4", "--mixed_precision", "no",
                "--dataloader_num_workers", "1", "--report_to", "tensorboard"]
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        train.main()
    (t0, s0), (t1, s1) = state["marks"][args.warmup], state["marks"][total]
    wall = t1 - t0
    phases = {k: s1.get(k, 0.0) - s0.get(k, 0.0) for k in s1}
    # the backward wrapper's time includes nothing but autograd; forward phases exclude it
    model = ("rollout UNet", "reference forward", "trainable forward", "backward", "VAE encode", "text encode")
    rows = [(k, phases.get(k, 0.0)) for k in model + ("AdamW step", "EMA step", "scheduler math", "replay buffer", "data loading")]
    other = wall - sum(v for _, v in rows)
    print(f"{args.steps} micro-steps after {args.warmup} warm-up, tiny SD1.5 kit, {args.resolution} px, "
          f"{torch.get_num_threads()} threads: {wall / args.steps * 1000:.1f} ms per micro-step\n")
    print("| phase | ms / micro-step | share |\n|---|---:|---:|")
    for name, seconds in rows + [("everything else (noise draws, logging, Python)", other)]:
        print(f"| {name} | {seconds / args.steps * 1000:.1f} | {100 * seconds / wall:.1f} % |")
    print(f"\nmodel compute {100 * sum(phases.get(k, 0.0) for k in model) / wall:.1f} %, "
          f"not model compute {100 * (wall - sum(phases.get(k, 0.0) for k in model)) / wall:.1f} %")


if __name__ == "__main__":
    main()
