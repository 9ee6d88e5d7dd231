"""Diffusion-DRO training (DESIGN §3, §4).

    accelerate launch train.py --pretrained_model_name_or_path ... --train_dataset ... [options]

One micro-step: (1) refill the replay buffer with rollouts of the current policy from
expert captions, (2) sample policy steps from the buffer and noise the experts at the same
timesteps, (3) the hinge ranking loss on the trainable vs frozen reference denoising errors,
(4) backward with accumulation, clipping, AdamW, EMA. Checkpoints are atomic and resume is
exact: N micro-steps straight equal N/2, stop, --resume, N/2 more.
"""
import argparse
import json
import math
import os
import time

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rpo.training import checkpoint
from rpo.diffusion.buffer import ReplayBuffer
from rpo.cli import UserError, cpu_ranks, flag, parse_args, run_main
from rpo.data.folders import ExpertBatches, ExpertDataset, PromptDataset
from rpo.diffusion.objective import dro_loss
from rpo.diffusion.loss import STAT_KEYS as STATS
from rpo.training.latents import encode_moments, sample_latents
from rpo.models import check_pipeline_folder, load_text_encoders, load_unet, load_vae
from rpo.diffusion.rollout import rollout
from rpo.diffusion.schedulers import SCHEDULERS, PerSampleScheduler, make_timesteps
from rpo.scores import load_scorer
from rpo.training.validation import SCORE_CHOICES, Validator

# Options that must not change across a resume: they shape the state being restored.
RESUME_INVARIANTS = ("pretrained_model_name_or_path", "sdxl", "train_dataset", "resolution", "batch_size",
                     "gradient_accumulation_steps", "buffer_size", "buffer_batch_size", "buffer_num_inference_steps",
                     "buffer_sync", "seed", "use_ema", "mixed_precision", "fp32_master_weights")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--logdir", default="./logs/sd15_diffusion-dro", help="TensorBoard logs, training_config.json, ckpt-N/, images/")
    a("--seed", type=int, default=0, help="each rank uses seed + rank; also the base seed of validation images")
    a("--pretrained_model_name_or_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="hub id or local diffusers pipeline folder")
    a("--variant", default=None, help="file variant (e.g. fp16) of every component")
    flag(p, "sdxl", False, "the SDXL path (two text encoders, size conditioning)")
    a("--vae", default=None, help="VAE to use instead of the pipeline's (SDXL default: madebyollin/sdxl-vae-fp16-fix)")
    a("--train_dataset", default="./data/pickapicv2_hpsv2_500", help="expert folder dataset")
    a("--resolution", type=int, default=512, help="resize the shorter side to this, crop a square; latents are resolution/8")
    flag(p, "random_crop", False, "random instead of centred crop")
    flag(p, "random_flip", True, "horizontal flip with p=0.5")
    a("--random_drop_prompt_probability", type=float, default=0.2, help="chance per caption of replacing it by '' at buffer refill")
    # validation
    a("--validation_dataset", default="./data/pickapicv2_test", help="prompt folder dataset for validation")
    a("--validation_steps", type=int, default=0, help="generate (and score) the validation prompts every N micro-steps; 0 = never")
    a("--validation_scheduler", choices=SCHEDULERS, default="DDPM")
    a("--validation_num_inference_steps", type=int, default=50)
    a("--validation_guidance_scale", type=float, default=7.5)
    a("--score", choices=SCORE_CHOICES, default=None, help="metric logged at each validation (None: images only)")
    a("--score_batch_size", type=int, default=4, help="images per validation pipeline call and per scoring batch")
    a("--score_num_images_per_prompt", type=int, default=1)
    a("--hps_version", choices=["v2.0", "v2.1"], default="v2.0", help="HPSv2 checkpoint for --score hpsv2")
    a("--weights_dir", default=None, help="local scorer weights (one sub-folder per metric, as `rpo.tiny scorers` writes)")
    # optimisation
    a("--batch_size", type=int, default=4, help="expert/policy pairs per process per micro-step")
    a("--num_steps", type=int, default=25600, help="number of micro-steps (forward/backward passes), not optimizer updates")
    a("--gradient_accumulation_steps", type=int, default=16)
    flag(p, "gradient_checkpointing", False, "trade compute for activation memory")
    p.add_argument("--no-gradient_checkpoint", dest="gradient_checkpointing", action="store_false", help=argparse.SUPPRESS)
    a("--learning_rate", type=float, default=1e-4)
    flag(p, "scale_lr", False, "multiply the learning rate by accumulation x batch x processes")
    a("--lr_scheduler", default="constant", choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    a("--lr_warmup_steps", type=int, default=0, help="in micro-steps")
    a("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm of the trainable UNet; 0 disables")
    flag(p, "hinge", True, "hinge ranking loss; --no-hinge: its smooth logistic counterpart")
    a("--margin", type=float, default=0.001)
    # replay buffer
    a("--buffer_size", type=int, default=4, help="trajectories kept per process (newest win)")
    a("--buffer_scheduler", choices=SCHEDULERS, default="DPMSolver++", help="rollout sampler")
    a("--buffer_batch_size", type=int, default=4, help="prompts per rollout batch")
    a("--buffer_batch_accumulation", type=int, default=1, help="rollout batches per refill")
    a("--buffer_num_inference_steps", type=int, default=20)
    a("--buffer_guidance_scale", type=float, default=1.0)
    a("--buffer_sample_steps", type=int, default=1, help="refill the buffer every N micro-steps")
    a("--buffer_update_steps", type=int, default=16, help="copy the trainable weights into the rollout model every N micro-steps")
    flag(p, "buffer_perturb_timesteps", True, "each trajectory gets its own random timestep offset")
    flag(p, "buffer_sync", False, "every rank samples from the union of all ranks' trajectories")
    # systems
    flag(p, "cache_latents", False, "encode every expert (and its mirror) once and sample x0 from the cached VAE posteriors; needs centre crops")
    flag(p, "allow_tf32", False, "TF32 matmuls and convolutions on Ampere+ GPUs")
    a("--dataloader_num_workers", type=int, default=8)
    a("--mixed_precision", choices=["no", "fp16", "bf16"], default="bf16")
    flag(p, "fp32_master_weights", False, "under bf16: keep trainable weights, AdamW state and EMA in fp32 (more memory, exact small updates)")
    flag(p, "use_ema", True, "keep an EMA of the trainable weights (what ckpt-N/ema and validation use)")
    flag(p, "offload_ema", True, "keep the EMA in CPU memory")
    a("--checkpointing_steps", type=int, default=1280, help="write ckpt-N every N micro-steps (a multiple of --gradient_accumulation_steps)")
    a("--checkpoints_total_limit", type=int, default=1, help="how many newest checkpoints keep the full resumable state")
    flag(p, "resume", False, "continue from the newest complete checkpoint in --logdir")
    a("--report_to", default="tensorboard", help="accelerate tracker (tensorboard, wandb, ...)")
    return p


def check_args(args):
    """Refuse bad options before anything heavy happens."""
    positive = ("batch_size", "num_steps", "gradient_accumulation_steps", "buffer_size", "buffer_batch_size",
                "buffer_batch_accumulation", "buffer_num_inference_steps", "buffer_sample_steps", "buffer_update_steps",
                "checkpointing_steps", "resolution", "score_batch_size", "score_num_images_per_prompt")
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.resolution % 8:
        raise UserError(f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {args.resolution}")
    if args.num_steps % args.gradient_accumulation_steps:
        raise UserError(f"--num_steps {args.num_steps} must be a multiple of --gradient_accumulation_steps "
                        f"{args.gradient_accumulation_steps}: the last partial accumulation would never be applied")
    if args.checkpointing_steps % args.gradient_accumulation_steps:
        raise UserError(f"--checkpointing_steps {args.checkpointing_steps} must be a multiple of "
                        f"--gradient_accumulation_steps {args.gradient_accumulation_steps}: a checkpoint mid-accumulation would lose gradients")
    if not 0 <= args.random_drop_prompt_probability <= 1:
        raise UserError(f"--random_drop_prompt_probability must be in [0, 1], got {args.random_drop_prompt_probability}")
    if not args.hinge and args.margin <= 0:
        raise UserError(f"--no-hinge (logistic loss) needs --margin > 0, got {args.margin}")
    if args.fp32_master_weights and args.mixed_precision != "bf16":
        raise UserError("--fp32_master_weights only applies to --mixed_precision bf16")
    if args.cache_latents and args.random_crop:
        raise UserError("--cache_latents needs centre crops: it caches each image and its mirror, not every random crop")
    if args.validation_steps < 0:
        raise UserError(f"--validation_steps must be >= 0, got {args.validation_steps}")
    if args.score and not args.validation_steps:
        raise UserError("--score needs --validation_steps N > 0 (the score is computed at each validation)")


def main():
    args = parse_args(build_parser())
    check_args(args)
    # Everything a user can get wrong is checked before any model loads.
    experts = ExpertDataset(args.train_dataset, args.resolution, args.random_flip, args.random_crop)
    prompts = PromptDataset(args.validation_dataset, what="validation dataset") if args.validation_steps else None
    check_pipeline_folder(args.pretrained_model_name_or_path)
    resume_from = checkpoint.latest_resumable(args.logdir) if args.resume else None
    if args.resume and resume_from is None:
        raise UserError(f"--resume: no complete checkpoint with a resumable state in {args.logdir}")

    accelerator = Accelerator(
        cpu=cpu_ranks(),
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to or None, project_config=ProjectConfiguration(project_dir=args.logdir, logging_dir=args.logdir),
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if accelerator.distributed_type == DistributedType.FSDP and (args.use_ema or args.validation_steps):
        # FSDP shards the parameters the EMA would average, and every forward is a collective,
        # so ranks generating different numbers of validation images would hang
        raise UserError("under FSDP, train.py needs --no-use_ema and --validation_steps 0 "
                        "(use DDP or configs/deepspeed_zero2.yaml for EMA and validation)")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # The scorer loads now, before the diffusion models: a missing metric fails at start-up,
    # not after hours. It waits in CPU memory and visits the GPU only while validating.
    scorer = load_scorer(args.score, weights_dir=args.weights_dir, hps_version=args.hps_version) if args.score else None

    # ---------------------------------------------------------------- models
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    # The public code trains in pure bf16 (weights, grads, AdamW state, EMA); fp16 and
    # --fp32_master_weights keep fp32 master weights under autocast instead.
    train_dtype = torch.float32 if args.mixed_precision == "fp16" or args.fp32_master_weights else weight_dtype
    source = args.pretrained_model_name_or_path
    text = load_text_encoders(source, args.sdxl, args.variant, weight_dtype).to(device)
    vae = load_vae(source, args.sdxl, args.variant, weight_dtype, vae=args.vae).to(device)
    unet_ref = load_unet(source, "unet", args.variant, weight_dtype, what="reference UNet").requires_grad_(False).to(device)
    unet = load_unet(source, "unet", args.variant, train_dtype, what="trainable UNet").to(device)
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # The rollout model is the trainable weights as of the last refresh. When every refresh
    # falls right after every optimizer update (accumulation % update_steps == 0, the seed's
    # 16/16), the two are always equal, so rollouts use the trainable UNet itself and the
    # third full UNet of the public code is not needed.
    shared_rollout = args.gradient_accumulation_steps % args.buffer_update_steps == 0
    unet_rollout = None if shared_rollout else load_unet(source, "unet", args.variant, weight_dtype, what="rollout UNet").requires_grad_(False).to(device)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_size = args.resolution // vae_scale  # from --resolution, not unet.config.sample_size (REFERENCE §6.11)
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    buffer_sampler = PerSampleScheduler.from_name(args.buffer_scheduler, noise_scheduler.config)
    if args.buffer_num_inference_steps > noise_scheduler.config.num_train_timesteps:
        raise UserError(f"--buffer_num_inference_steps exceeds the {noise_scheduler.config.num_train_timesteps} training timesteps")

    ema = None
    if args.use_ema:
        ema = EMAModel(unet.parameters(), foreach=True)
        if args.offload_ema:
            ema.to("cpu")

    params = [p for p in unet.parameters() if p.requires_grad]  # a list: clipping must see them (REFERENCE §6.1)
    lr = args.learning_rate * (args.gradient_accumulation_steps * args.batch_size * world if args.scale_lr else 1)
    optimizer = torch.optim.AdamW(params, lr=lr)
    num_updates = math.ceil(args.num_steps / args.gradient_accumulation_steps)
    # accelerate's wrapped scheduler ticks once per process at each optimizer update
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps // args.gradient_accumulation_steps * world,
                                 num_training_steps=num_updates * world)
    if accelerator.state.deepspeed_plugin is not None:  # no DataLoader is prepared: DeepSpeed needs the batch size
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch_size
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    raw_unet = accelerator.unwrap_model(unet)

    # ---------------------------------------------------------------- state
    buffer_size = args.buffer_size * (world if args.buffer_sync else 1)
    buffer = ReplayBuffer(buffer_size, device=device)
    # Dedicated generators (saved in checkpoints) make every random draw reproducible on resume.
    cpu_gen = torch.Generator().manual_seed(args.seed + rank)
    dev_gen = torch.Generator(device).manual_seed(args.seed + rank + 7919)
    start_step, expert_batches_used = 0, 0
    if resume_from is not None:
        start_step, expert_batches_used = load_state(resume_from[1], args, accelerator, ema, buffer, cpu_gen, dev_gen)
        accelerator.step = start_step
    if unet_rollout is not None:
        saved = os.path.join(resume_from[1], "state", "rollout_unet.safetensors") if resume_from else None
        unet_rollout.load_state_dict(load_file(saved) if saved and os.path.exists(saved) else raw_unet.state_dict())
    rollout_unet = raw_unet if unet_rollout is None else unet_rollout
    if accelerator.is_main_process:
        checkpoint.clean_temporaries(args.logdir)  # what a crash mid-save left behind

    moments = None
    if args.cache_latents:  # before the loader: it then skips decoding pixels
        moments = encode_moments(vae, experts, device, weight_dtype)
        experts.load_pixels = False
    batches = ExpertBatches(len(experts), args.buffer_batch_size, args.seed, rank, world, start=expert_batches_used)
    loader = iter(torch.utils.data.DataLoader(experts, batch_sampler=batches, num_workers=args.dataloader_num_workers,
                                              pin_memory=device.type == "cuda", persistent_workers=False))
    validator = Validator(args, accelerator, prompts, text, vae, noise_scheduler, scorer) if prompts else None
    empty_embeds = text.encode([""]) if args.buffer_guidance_scale != 1.0 else None

    if accelerator.is_main_process:
        os.makedirs(args.logdir, exist_ok=True)
        if resume_from is None:
            with open(os.path.join(args.logdir, "training_config.json"), "w") as f:
                json.dump(vars(args), f, indent=2)
        accelerator.init_trackers("rpo", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    def refill():
        """Roll out the current policy from a batch of expert captions and push the trajectories."""
        nonlocal expert_batches_used
        n = args.buffer_batch_accumulation
        if len(buffer) == 0:
            n = max(math.ceil(args.batch_size / args.buffer_batch_size), n)
        for _ in range(n):
            batch = next(loader)
            expert_batches_used += 1
            b = len(batch["caption"])
            drop = torch.rand(b, generator=cpu_gen) < args.random_drop_prompt_probability
            captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
            embeds, pooled = text.encode(captions)
            if moments is not None:
                x0 = sample_latents(moments, batch["index"], batch["flipped"], dev_gen) * vae.config.scaling_factor
            else:
                with torch.no_grad():
                    pixels = batch["pixel_values"].to(device, weight_dtype)
                    x0 = vae.encode(pixels).latent_dist.sample(generator=dev_gen) * vae.config.scaling_factor
            x_T = torch.randn((b, raw_unet.config.in_channels, latent_size, latent_size), generator=dev_gen, device=device)
            grid = make_timesteps(args.buffer_scheduler, noise_scheduler.config, args.buffer_num_inference_steps, b,
                                  args.buffer_perturb_timesteps, generator=cpu_gen, device=device)
            extras, cond, neg_cond = {}, None, None
            if args.sdxl:
                # rollouts use the pipeline's default size conditioning, training the expert's own
                res = args.resolution
                default_ids = torch.tensor([res, res, 0, 0, res, res], device=device).repeat(b, 1)
                cond = {"text_embeds": pooled, "time_ids": default_ids}
                if empty_embeds is not None:
                    neg_cond = {"text_embeds": empty_embeds[1].expand(b, -1), "time_ids": default_ids}
                extras = {"pooled_embeds": pooled,
                          "time_ids": torch.cat([batch["original_size"], batch["crop_top_left"],
                                                 torch.tensor([[res, res]] * b)], 1).to(device)}
            neg = empty_embeds[0].expand(b, -1, -1) if empty_embeds is not None else None
            with accelerator.autocast():
                traj = rollout(rollout_unet, buffer_sampler, x_T, grid, embeds, args.buffer_guidance_scale, neg, cond, neg_cond,
                               generator=dev_gen)
            fields = dict(prompt_embeds=embeds, x0=x0, t=traj.t, x_t=traj.x_t, eps=traj.eps, **extras)
            if args.buffer_sync and world > 1:
                fields = {k: accelerator.gather(v.contiguous()) for k, v in fields.items()}
            buffer.push(**fields)

    def micro_step():
        """Sample (expert, policy) pairs at shared timesteps and take one ranking-loss backward."""
        sample = buffer.sample(args.batch_size, generator=cpu_gen)
        eps_expert = torch.randn(sample["x0"].shape, generator=dev_gen, device=device)
        with accelerator.accumulate(unet):
            loss, stats = dro_loss(unet, unet_ref, sample, eps_expert, noise_scheduler, args.margin, args.hinge,
                                   accelerator.autocast)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return torch.stack([stats[k] for k in STATS])

    # ---------------------------------------------------------------- loop
    bar = tqdm(range(start_step + 1, args.num_steps + 1), initial=start_step, total=args.num_steps,
               disable=not accelerator.is_local_main_process, desc="micro-steps")
    running = torch.zeros(len(STATS), device=device)
    tic = time.perf_counter()
    for step in bar:
        if len(buffer) == 0 or step % args.buffer_sample_steps == 0:
            refill()
        running += micro_step()
        if accelerator.sync_gradients:
            if ema is not None:
                ema_step(ema, raw_unet, device, args.offload_ema)
            seconds = (time.perf_counter() - tic) / args.gradient_accumulation_steps
            means = accelerator.reduce(running / args.gradient_accumulation_steps, "mean").tolist()
            logs = {f"loss/{k}": v for k, v in zip(STATS, means)}
            logs.update({"params/lr": lr_scheduler.get_last_lr()[0], "params/buffer_size": len(buffer),
                         "perf/seconds_per_step": seconds, "perf/samples_per_second": args.batch_size * world / seconds})
            accelerator.log(logs, step=step)
            bar.set_postfix(loss=f"{means[0]:.4g}", lr=f"{logs['params/lr']:.2g}")
            running.zero_()
            tic = time.perf_counter()
        if unet_rollout is not None and step % args.buffer_update_steps == 0:
            unet_rollout.load_state_dict(raw_unet.state_dict())
        if step % args.checkpointing_steps == 0 or step == args.num_steps:
            save_checkpoint(step, args, accelerator, unet, ema, buffer, cpu_gen, dev_gen, expert_batches_used, unet_rollout)
        if validator is not None and (step % args.validation_steps == 0 or step == args.num_steps):
            with ema_weights(ema, raw_unet):
                validator.run(raw_unet, step)
        if step % args.checkpointing_steps == 0 or (validator is not None and step % args.validation_steps == 0):
            tic = time.perf_counter()  # seconds_per_step measures training, not saving or validating
    accelerator.end_training()
    if accelerator.is_main_process:
        print(f"done: {args.num_steps} micro-steps; checkpoints in {args.logdir}")


def ema_step(ema, unet, device, offload):
    """One EMA update. An offloaded EMA visits the GPU for it (as in the public code); the
    copy back is blocking, so the CPU copy is complete before anything reads or saves it."""
    if offload and device.type != "cpu":
        ema.to(device, non_blocking=True)
        ema.step(unet.parameters())
        ema.to("cpu")
    else:
        ema.step(unet.parameters())


class ema_weights:
    """Context: the EMA weights swapped into `unet`, the trained ones restored after."""

    def __init__(self, ema, unet):
        self.ema, self.unet = ema, unet

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.unet.parameters())
            self.ema.copy_to(self.unet.parameters())

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.unet.parameters())


def save_checkpoint(step, args, accelerator, unet, ema, buffer, cpu_gen, dev_gen, expert_batches_used, unet_rollout=None):
    """ckpt-<step>/{unet, ema, state/}: assembled in a temporary folder, renamed when complete."""
    path = checkpoint.tmp_dir(args.logdir, step)
    if accelerator.is_main_process:
        checkpoint.begin(args.logdir, step)
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(unet)  # on every rank: a collective under DeepSpeed ZeRO-3 / FSDP
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(unet)
        raw.save_pretrained(os.path.join(path, "unet"), state_dict=weights)
        if ema is not None:
            # the EMA's shadow parameters under the UNet's names: a plain UNet folder, no model copy
            ema_weights = {name: shadow for (name, _), shadow in zip(raw.named_parameters(), ema.shadow_params)}
            raw.save_pretrained(os.path.join(path, "ema"), state_dict={**weights, **ema_weights})
    state = os.path.join(path, "state")
    accelerator.save_state(state)
    torch.save({"buffer": buffer.state_dict(), "cpu_gen": cpu_gen.get_state(), "dev_gen": dev_gen.get_state()},
               os.path.join(state, f"rank{accelerator.process_index}.pt"))
    if unet_rollout is not None and accelerator.is_main_process:  # the lagging rollout weights, for exact resume
        save_file({k: v.contiguous() for k, v in unet_rollout.state_dict().items()}, os.path.join(state, "rollout_unet.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trainer = {"step": step, "expert_batches_used": expert_batches_used, "world": accelerator.num_processes,
                   "args": {k: v for k, v in vars(args).items()}}
        if ema is not None:
            trainer["ema"] = ema.state_dict()
        torch.save(trainer, os.path.join(state, "trainer.pt"))  # written last: marks the state complete
        checkpoint.commit(args.logdir, step, args.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def load_state(ckpt, args, accelerator, ema, buffer, cpu_gen, dev_gen):
    """Restore everything `save_checkpoint` wrote; refuse a resume that would be silently wrong."""
    state = os.path.join(ckpt, "state")
    trainer = torch.load(os.path.join(state, "trainer.pt"), weights_only=True)
    if trainer["world"] != accelerator.num_processes:
        raise UserError(f"--resume: {ckpt} was written by {trainer['world']} processes, this run has "
                        f"{accelerator.num_processes}; each rank's data shard and replay buffer are part of the state")
    for name in RESUME_INVARIANTS:
        saved, now = trainer["args"].get(name), getattr(args, name)
        if saved != now:
            raise UserError(f"--resume: --{name} was {saved!r} in {ckpt}, now {now!r}")
    accelerator.load_state(state)
    if ema is not None:
        ema.load_state_dict(trainer["ema"])
        ema.to("cpu" if args.offload_ema else accelerator.device)
    mine = torch.load(os.path.join(state, f"rank{accelerator.process_index}.pt"), weights_only=True)
    buffer.load_state_dict(mine["buffer"])
    cpu_gen.set_state(mine["cpu_gen"])
    dev_gen.set_state(mine["dev_gen"])
    if accelerator.is_main_process:
        print(f"resumed from {ckpt} at micro-step {trainer['step']}")
    return trainer["step"], trainer["expert_batches_used"]


if __name__ == "__main__":
    run_main(main)
