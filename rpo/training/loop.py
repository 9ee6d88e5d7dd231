"""The training loop (docs/design.md, "The run's parts"): one `micro_step` — the pair
source draws a batch, the objective gives a loss, backward with accumulation, clipping and
the optimizer step — and the cadence around it: EMA and logging at each optimizer update,
rollout refresh, checkpoints, validation. The loop calls its parts without asking what they
are; `rpo/training/build.py` turns the options into them.
"""
import contextlib
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rpo.preempt import REQUEUE_EXIT, Preemption
from rpo.training import checkpoint
from rpo.training.plots import append_history, write_plots
from rpo.training.state import save_checkpoint


@dataclass
class Cadence:
    """When things happen, in micro-steps."""
    num_steps: int
    accumulation: int
    rollout_refresh: int      # --buffer_update_steps
    checkpoint: int           # --checkpointing_steps
    validation: int           # --validation_steps (0: never)
    keep: int                 # --checkpoints_total_limit
    keep_weights: int = None  # --checkpoints_keep_weights


def backward_and_step(*, accelerator, loss, params, optimizer, lr_scheduler, max_grad_norm):
    """Inside `accelerator.accumulate`: backward, and at the end of an accumulation clip the
    trainable parameters' gradient norm, step the optimizer and the LR schedule. (accelerate
    makes the optimizer and scheduler steps no-ops mid-accumulation.)"""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_([p for _, p in params.named_trainable()], max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class TrainLoop:
    def __init__(self, *, accelerator, model, params, family, source, objective, optimizer, lr_scheduler, ema, state,
                 cadence, max_grad_norm, logdir, args, batch_size, validator=None, on_end=None):
        self.accelerator, self.model, self.params, self.family = accelerator, model, params, family
        self.source, self.objective, self.optimizer, self.lr_scheduler = source, objective, optimizer, lr_scheduler
        self.ema, self.state, self.cadence, self.max_grad_norm = ema, state, cadence, max_grad_norm
        self.logdir, self.args, self.batch_size, self.validator = logdir, args, batch_size, validator
        self.on_end = on_end  # called on the main process after the last step (e.g. the pipeline export)
        self.guards = contextlib.ExitStack()  # what the run holds until it ends (build: the logdir lock)

    # ------------------------------------------------------------------ one micro-step
    def micro_step(self, step):
        """Draw, loss, backward (and at the end of an accumulation: clip and step); returns the
        objective's statistics as one tensor in `objective.stat_keys` order."""
        acc = self.accelerator
        sample, noise = self.source.draw(step, self.state)
        with acc.accumulate(self.model):
            loss, stats = self.objective(model=self.model, params=self.params, family=self.family, sample=sample,
                                         noise=noise, autocast=acc.autocast)
            backward_and_step(accelerator=acc, loss=loss, params=self.params, optimizer=self.optimizer,
                              lr_scheduler=self.lr_scheduler, max_grad_norm=self.max_grad_norm)
        return torch.stack([stats[k] for k in self.objective.stat_keys])

    # ------------------------------------------------------------------ the run
    def run(self):
        """Train to `num_steps`; on SIGTERM / SIGUSR1 (a scheduler's preemption) finish the
        current accumulation window — a checkpoint mid-window would lose its gradients —
        write a checkpoint there and exit with `REQUEUE_EXIT` (rpo/preempt.py)."""
        with self.guards, Preemption() as preemption:
            self.train(preemption)

    def train(self, preemption):
        acc, c, state = self.accelerator, self.cadence, self.state
        self.finish_interrupted_validation()
        bar = tqdm(range(state.step + 1, c.num_steps + 1), initial=state.step, total=c.num_steps,
                   disable=not acc.is_local_main_process, desc="micro-steps")
        running = torch.zeros(len(self.objective.stat_keys), device=acc.device)
        tic = time.perf_counter()
        for step in bar:
            state.step = step
            running += self.micro_step(step)
            if acc.sync_gradients:
                self.after_update(step, running, time.perf_counter() - tic, bar)
                running.zero_()
                tic = time.perf_counter()
            if step % c.rollout_refresh == 0:
                self.params.refresh_rollout()
            if step % c.checkpoint == 0 or step == c.num_steps:
                self.save(step)
            if self.validator is not None and (step % c.validation == 0 or step == c.num_steps):
                self.validate(step)
            elif step % c.checkpoint == 0 and acc.is_main_process:
                write_plots(self.logdir)
            if step % c.checkpoint == 0 or (self.validator is not None and step % c.validation == 0):
                tic = time.perf_counter()  # seconds_per_step measures training, not saving or validating
            if acc.sync_gradients and step < c.num_steps and preemption.requested_on_any(acc):  # every rank calls it
                self.stop_preempted(step, preemption, bar)
        acc.end_training()
        if acc.is_main_process:
            write_plots(self.logdir)
            print(f"done: {c.num_steps} micro-steps; checkpoints in {self.logdir}")
            if self.on_end is not None:
                self.on_end(checkpoint.final_dir(self.logdir, c.num_steps))

    def stop_preempted(self, step, preemption, bar):
        """The checkpoint of `step` (unless the cadence just wrote it), one line, REQUEUE_EXIT."""
        if step % self.cadence.checkpoint:
            self.save(step)
        bar.close()
        self.accelerator.end_training()
        self.accelerator.print(preemption.message(step))
        raise SystemExit(REQUEUE_EXIT)

    def after_update(self, step, running, seconds, bar):
        """EMA step, then the means of this accumulation's statistics over every rank, logged."""
        acc, world = self.accelerator, self.accelerator.num_processes
        if self.ema is not None:
            self.ema.step(self.params.named_trainable())
        seconds /= self.cadence.accumulation
        means = acc.reduce(running / self.cadence.accumulation, "mean").tolist()
        logs = {f"loss/{k}": v for k, v in zip(self.objective.stat_keys, means)}
        logs.update({"params/lr": self.lr_scheduler.get_last_lr()[0], "params/buffer_size": len(self.state.buffer),
                     "perf/seconds_per_step": seconds, "perf/samples_per_second": self.batch_size * world / seconds})
        acc.log(logs, step=step)
        if acc.is_main_process:
            append_history(self.logdir, {"kind": "train", "step": step, **logs})
        bar.set_postfix(loss=f"{means[0]:.4g}", lr=f"{logs['params/lr']:.2g}")

    def save(self, step):
        save_checkpoint(logdir=self.logdir, accelerator=self.accelerator, model=self.model, params=self.params,
                        ema=self.ema, state=self.state, args=self.args, family=self.family, keep=self.cadence.keep,
                        keep_weights=self.cadence.keep_weights)

    # ------------------------------------------------------------------ validation
    def validate(self, step):
        """Validate with the EMA weights swapped in (what ckpt-N/ema holds), then redraw the plots."""
        with self.ema.swapped_into(self.params.named_trainable()) if self.ema is not None else nullcontext():
            self.validator.run(self.params.trainable, step)
        if self.accelerator.is_main_process:
            write_plots(self.logdir)

    def finish_interrupted_validation(self):
        """Step 0 is the starting model, before any update. ckpt-N is saved before the
        validation of step N runs, so a run killed during it resumes after N: finish that one
        first (only its missing images are made; rpo/training/validation.py)."""
        v, step = self.validator, self.state.step
        if v is None:
            return
        if step == 0 and not os.path.isfile(os.path.join(self.logdir, "images", "step-0.png")):
            self.validate(0)
        elif step and (step % self.cadence.validation == 0 or os.path.isdir(v.folder(step))) and not v.complete(step):
            self.validate(step)
