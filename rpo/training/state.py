"""The resumable training state and the checkpoint that holds it (docs/design.md, "Checkpoints").

`<logdir>/ckpt-N/`:
    unet/          the trainable weights (a diffusers model folder)
    ema/           the EMA weights, same layout (what inference and the paper's numbers use)
    (LoRA runs: lora/ and lora_ema/ instead, `pipe.load_lora_weights` folders; with
    --save_merged_unet also ema/ (unet/ without EMA), the adapter merged into the base UNet)
    state/         only in the newest --checkpoints_total_limit checkpoints:
        (accelerate's save_state: model, optimizer, LR scheduler, RNG states)
        rank<r>.pt              this rank's replay buffer and generators
        rollout_unet.safetensors the lagging rollout weights, when there is such a copy
        trainer.pt              step, data position, world size, arguments, EMA; its
                                presence marks the state complete
        SHA256SUMS.json         size and sha256 of every file above, checked before a resume

`TrainState` is what changes during training besides the weights and the optimizer; every
random draw comes from its two generators, so a resumed run repeats the same numbers.
"""
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from rpo.cli import UserError
from rpo.diffusion.buffer import ReplayBuffer
from rpo.training import checkpoint
from rpo.training.card import write_card


@dataclass
class TrainState:
    step: int
    expert_batches_used: int
    buffer: ReplayBuffer
    cpu_gen: torch.Generator
    dev_gen: torch.Generator

    @classmethod
    def fresh(cls, *, seed, rank, buffer_size, device):
        device = torch.device(device)
        return cls(step=0, expert_batches_used=0, buffer=ReplayBuffer(buffer_size, device=device),
                   cpu_gen=torch.Generator().manual_seed(seed + rank),
                   dev_gen=torch.Generator(device).manual_seed(seed + rank + 7919))

    def rank_state_dict(self):
        return {"buffer": self.buffer.state_dict(), "cpu_gen": self.cpu_gen.get_state(), "dev_gen": self.dev_gen.get_state()}

    def load_rank_state_dict(self, state):
        self.buffer.load_state_dict(state["buffer"])
        self.cpu_gen.set_state(state["cpu_gen"])
        self.dev_gen.set_state(state["dev_gen"])


def save_checkpoint(*, logdir, accelerator, model, params, ema, state, args, family, keep, keep_weights=None):
    """Write `ckpt-<state.step>` (all ranks call this): assembled in a temporary folder and
    renamed when complete. `model` is the prepared (wrapped) model, `params` its
    parametrisation, `args` a dict of the run's options, `family` the model family (the card)."""
    step = state.step
    path = checkpoint.tmp_dir(logdir, step)
    if accelerator.is_main_process:
        checkpoint.begin(logdir, step)
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(model)  # on every rank: a collective under DeepSpeed ZeRO-3 / FSDP
    # weights, EMA, AdamW's two moments: a full disk is one line naming what the write needs
    needed = checkpoint.tensor_bytes(weights) * (4 if ema is not None else 3)
    with checkpoint.disk_guard(logdir, step, needed):
        if accelerator.is_main_process:
            params.save_weights(os.path.join(path, params.weights_dir), weights=weights)
            if ema is not None:
                params.save_weights(os.path.join(path, params.ema_dir), weights=weights, ema_shadows=ema.named_shadows())
            if params.save_merged:  # LoRA --save_merged_unet: a plain UNet folder of what inference uses
                shadows = ema.named_shadows() if ema is not None else None
                params.save_merged_unet(os.path.join(path, "ema" if ema is not None else "unet"), weights=weights,
                                        ema_shadows=shadows)
        state_dir = os.path.join(path, "state")
        accelerator.save_state(state_dir)
        torch.save(state.rank_state_dict(), os.path.join(state_dir, f"rank{accelerator.process_index}.pt"))
        rollout = params.rollout_state()
        if rollout is not None and accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in rollout.items()}, os.path.join(state_dir, "rollout_unet.safetensors"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            trainer = {"step": step, "expert_batches_used": state.expert_batches_used,
                       "world": accelerator.num_processes, "args": dict(args)}
            if ema is not None:
                trainer["ema"] = ema.state_dict()
            torch.save(trainer, os.path.join(state_dir, "trainer.pt"))  # marks the state complete
            checkpoint.write_checksums(state_dir)  # what resume verifies before it loads anything
            write_card(path, final=checkpoint.final_dir(logdir, step), args=args, family=family, step=step,
                       world=accelerator.num_processes)
            checkpoint.commit(logdir, step, keep, keep_weights)
    accelerator.wait_for_everyone()
    return checkpoint.final_dir(logdir, step)


def read_trainer(path):
    """The `trainer.pt` of checkpoint `path` (step, data position, world, arguments, EMA)."""
    return checkpoint.load_torch(os.path.join(path, "state", "trainer.pt"))


def check_resume(trainer, *, path, world, args, invariants, defaults=None):
    """Refuse a resume that would be silently wrong: another world size, or a changed option
    that shapes the state being restored. An option the checkpoint does not record (it
    predates the option) counts as its default, `defaults[name]`."""
    defaults = defaults or {}
    if trainer["world"] != world:
        raise UserError(f"--resume: {path} was written by {trainer['world']} processes, this run has {world}; "
                        "each rank's data shard and replay buffer are part of the state")
    for name in invariants:
        saved, now = trainer["args"].get(name, defaults.get(name)), args.get(name)
        if saved != now:
            raise UserError(f"--resume: --{name} was {saved!r} in {path}, now {now!r}")


def load_checkpoint(*, path, trainer, accelerator, params, ema, state):
    """Restore what `save_checkpoint` wrote into the prepared objects and `state`."""
    state_dir = os.path.join(path, "state")
    checkpoint.load_accelerator_state(accelerator, state_dir)  # a forged pickle: one line naming the file
    if ema is not None:
        ema.load_state_dict(trainer["ema"], device=accelerator.device)
    state.load_rank_state_dict(checkpoint.load_torch(os.path.join(state_dir, f"rank{accelerator.process_index}.pt")))
    state.step, state.expert_batches_used = trainer["step"], trainer["expert_batches_used"]
    rollout = os.path.join(state_dir, "rollout_unet.safetensors")
    params.load_rollout_state(load_file(rollout) if os.path.exists(rollout) else None)
    check_finite(params, ema, state_dir)


def check_finite(params, ema, state_dir):
    """Refuse NaN/inf weights (a checkpoint written after the run diverged, or one without
    checksums that was damaged): training on from them would only spread them."""
    for name, p in params.named_trainable():
        if not torch.isfinite(p).all():
            raise UserError(f"--resume: {state_dir} holds non-finite weights ({name}); resume from an earlier checkpoint")
    if ema is not None:
        for name, v in ema.named_shadows().items():
            if not torch.isfinite(v).all():
                raise UserError(f"--resume: the EMA in {state_dir}/trainer.pt holds non-finite values ({name})")
