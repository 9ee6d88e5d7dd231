"""Diffusion-DRO training (docs/design.md, "Algorithm" and "Checkpoints").

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
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from rpo.io import write_json
from rpo.cli import UserError, check_writable, cpu_ranks, flag, parse_args, run_main
from rpo.data.folders import ExpertBatches, ExpertDataset, PromptDataset
from rpo.diffusion.family import UNetFamily, read_schedule_config
from rpo.diffusion.flow import FlowMatchFamily, read_flow_schedule
from rpo.diffusion.loss import STAT_KEYS as STATS
from rpo.diffusion.schedulers import SCHEDULERS, PerSampleScheduler
from rpo.generate import SCHEDULERS as STOCK_SCHEDULERS, check_unet_path
from rpo.models import DTYPES, check_pipeline_folder, load_text_encoders, load_unet, load_vae, offline_unless_hub_reachable
from rpo.models_sd3 import load_sd3_text_encoders, load_transformer, resolve_model_family
from rpo.scores import HPS_VERSIONS, load_scorer
from rpo.training import checkpoint
from rpo.training.ema import NamedEMA
from rpo.training.latents import encode_moments
from rpo.training.parametrisation import LORA_TARGET_MODULES, FullFineTune, LoRAFineTune, lora_targets_matched
from rpo.training.speed import speed_up, unets_of
from rpo.training.state import TrainState, check_resume, load_checkpoint, read_trainer, save_checkpoint
from rpo.training.steps import (SFT_STAT_KEYS, Refiller, RolloutSettings, dro_micro_step, resample_micro_step,
                                sft_micro_step, truncation_applies)
from rpo.training.plots import append_history, truncate_history, write_plots
from rpo.training.validation import SCORE_CHOICES, ValidationSettings, Validator, trackers_of

# What a resume may change. Every option not listed here shapes the state being restored
# (models, data order, buffer shapes, precision, the LR schedule) and is refused when changed,
# naming it; these take effect from the resumed step on, and the change is printed.
RESUME_CHANGEABLE = (
    "num_steps", "checkpointing_steps", "checkpoints_total_limit", "checkpoints_keep_weights",
    "validation_dataset", "validation_steps", "validation_scheduler", "validation_num_inference_steps",
    "validation_guidance_scale", "score", "score_batch_size", "score_num_images_per_prompt", "hps_version", "weights_dir",
    "learning_rate", "max_grad_norm", "margin", "hinge", "random_drop_prompt_probability", "random_flip", "random_crop",
    "buffer_guidance_scale", "buffer_perturb_timesteps", "buffer_scheduler", "buffer_batch_accumulation",
    "gradient_checkpointing", "allow_tf32", "offload_ema", "dataloader_num_workers", "report_to", "export_pipeline",
    "truncate_rollouts", "compile", "channels_last",
)
RESUME_IGNORED = ("logdir", "resume", "overwrite", "config")  # how to find the run, not what it is


def resume_invariants(parser):
    return tuple(a.dest for a in parser._actions
                 if a.dest != "help" and a.dest not in RESUME_CHANGEABLE and a.dest not in RESUME_IGNORED)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--logdir", default="./logs/sd15_diffusion-dro", help="TensorBoard logs, training_config.json, ckpt-N/, images/")
    a("--seed", type=int, default=0, help="each rank uses seed + rank; also the base seed of validation images")
    a("--pretrained_model_name_or_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="hub id or local diffusers pipeline folder")
    a("--variant", default=None, help="file variant (e.g. fp16) of every component")
    a("--unet", default=None, help="UNet folder (or hub id) to start the trainable and rollout models from, e.g. an SFT "
                                   "checkpoint's ckpt-N/ema; None: the pipeline's UNet")
    a("--reference_unet", default=None, help="UNet folder (or hub id) of the frozen reference; None: the pipeline's UNet")
    flag(p, "sdxl", False, "the SDXL path (two text encoders, size conditioning)")
    a("--model_family", choices=["auto", "unet", "sd3"], default="auto",
      help="unet: SD1.5/SDXL; sd3: SD3/SD3.5 flow matching (rpo/diffusion/flow.py); auto: from model_index.json")
    a("--vae", default=None, help="VAE to use instead of the pipeline's (SDXL default: madebyollin/sdxl-vae-fp16-fix)")
    a("--revision", default=None, help="hub revision (branch, tag or commit) of the pipeline")
    a("--cache_dir", default=None, help="where hub downloads are cached; None: the hub's default")
    a("--train_dataset", default="./data/pickapicv2_hpsv2_500",
      help="expert data: a folder dataset (one sub-folder per item with caption.txt and an image) or an image folder "
           "with metadata.jsonl/metadata.csv (file_name + --caption_column)")
    a("--train_dataset_name", default=None, help="a `datasets` dataset (hub id or local path) to take the experts from "
                                                 "instead of --train_dataset; split 'train'")
    a("--image_column", default="image", help="image column of --train_dataset_name")
    a("--caption_column", default="text", help="caption column of --train_dataset_name or of an image folder's metadata")
    a("--resolution", type=int, default=512, help="resize the shorter side to this, crop a square; latents are resolution/8")
    flag(p, "random_crop", False, "random instead of centred crop")
    flag(p, "random_flip", True, "horizontal flip with p=0.5")
    a("--random_drop_prompt_probability", type=float, default=0.2, help="chance per caption of replacing it by '' at buffer refill")
    # validation
    a("--validation_dataset", default="./data/pickapicv2_test", help="prompt folder dataset for validation")
    a("--validation_steps", type=int, default=0, help="generate (and score) the validation prompts every N micro-steps; 0 = never")
    a("--validation_scheduler", choices=list(STOCK_SCHEDULERS), default="DDPM", help="stock diffusers sampler of the validation images")
    a("--validation_num_inference_steps", type=int, default=50)
    a("--validation_guidance_scale", type=float, default=7.5)
    a("--score", choices=SCORE_CHOICES, default=None, help="metric logged at each validation (None: images only)")
    a("--score_batch_size", type=int, default=4, help="images per validation pipeline call and per scoring batch")
    a("--score_num_images_per_prompt", type=int, default=1)
    a("--hps_version", choices=HPS_VERSIONS, default="v2.0", help="HPSv2 checkpoint for --score hpsv2")
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
    a("--objective", choices=["dro", "sft"], default="dro",
      help="dro: Diffusion-DRO; sft: the paper's SFT baseline, the plain denoising loss on the same experts (no rollouts)")
    # LoRA (diffusers' LoRA conventions; see README "LoRA and the SFT baseline")
    a("--lora_rank", type=int, default=None, help="train LoRA adapters of this rank on the UNet (SD3: the transformer); None or 0: full fine-tuning")
    a("--lora_alpha", type=float, default=None, help="LoRA scaling numerator (scale alpha/rank); None: the rank")
    a("--lora_target_modules", default=",".join(LORA_TARGET_MODULES),
      help="comma-separated module names the adapters wrap (peft: a name or its last components)")
    flag(p, "save_merged_unet", False, "LoRA: also write ckpt-N/ema (ckpt-N/unet without EMA), the adapter merged into the UNet")
    flag(p, "hinge", True, "hinge ranking loss; --no-hinge: its smooth logistic counterpart")
    a("--margin", type=float, default=0.001)
    # replay buffer
    a("--buffer_mode", choices=["replay", "resample"], default="replay",
      help="replay: the paper's replay buffer of stored trajectories; resample: no buffer, each micro-step rolls the "
           "policy out to a fresh x0 and noises expert and policy x0 with one shared noise at a logit-normal sigma "
           "(SD3 only; rpo/training/steps.py resample_micro_step)")
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
    flag(p, "truncate_rollouts", None, "roll each trajectory out only up to the step the micro-step samples from it; "
                                       "default: on where that is exact in distribution (README, 'Truncated rollouts')")
    # systems
    flag(p, "cache_latents", False, "encode every expert (and its mirror) once and sample x0 from the cached VAE posteriors; needs centre crops")
    flag(p, "compile", False, "torch.compile the UNets (rollout, trainable, reference); the first steps compile")
    flag(p, "channels_last", False, "channels-last memory format for the UNets (faster convolutions on recent GPUs)")
    flag(p, "allow_tf32", False, "TF32 matmuls and convolutions on Ampere+ GPUs")
    a("--dataloader_num_workers", type=int, default=8)
    a("--mixed_precision", choices=["no", "fp16", "bf16"], default="bf16")
    flag(p, "fp32_master_weights", False, "under bf16: keep trainable weights, AdamW state and EMA in fp32 (more memory, exact small updates)")
    flag(p, "use_ema", True, "keep an EMA of the trainable weights (what ckpt-N/ema and validation use)")
    flag(p, "offload_ema", True, "keep the EMA in CPU memory")
    a("--checkpointing_steps", type=int, default=1280, help="write ckpt-N every N micro-steps (a multiple of --gradient_accumulation_steps)")
    a("--checkpoints_total_limit", type=int, default=1, help="how many newest checkpoints keep the full resumable state")
    a("--checkpoints_keep_weights", type=int, default=None,
      help="delete whole checkpoints (weights too) beyond the newest N (diffusers' meaning of a limit); None keeps every checkpoint's weights")
    a("--resume", nargs="?", const="latest", default=None, metavar="latest|CKPT",
      help="continue from a checkpoint folder, or 'latest' (the newest resumable one in --logdir; a fresh start when there is none)")
    p.add_argument("--no-resume", dest="resume", action="store_const", const=None, help=argparse.SUPPRESS)
    flag(p, "overwrite", False, "delete the checkpoints and images already in --logdir and start fresh")
    a("--report_to", default="tensorboard", help="accelerate tracker(s), comma-separated (tensorboard, wandb, ...), "
                                                 "'all' (every installed one) or 'none'")
    a("--export_pipeline", default=None, metavar="DIR",
      help="at the end, write the last checkpoint as a complete diffusers pipeline folder (tools/export_pipeline.py)")
    return p


def check_args(args):
    """Refuse bad options before anything heavy happens."""
    positive = ("batch_size", "num_steps", "gradient_accumulation_steps", "buffer_size", "buffer_batch_size",
                "buffer_batch_accumulation", "buffer_num_inference_steps", "buffer_sample_steps", "buffer_update_steps",
                "checkpointing_steps", "resolution", "score_batch_size", "score_num_images_per_prompt")
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not math.isfinite(args.learning_rate) or args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be a positive number, got {args.learning_rate}")
    if not math.isfinite(args.margin) or args.margin < 0:
        raise UserError(f"--margin must be a number >= 0, got {args.margin}")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a CUDA GPU (fp16 autocast does not run on the CPU): use bf16 or no")
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
    if args.checkpoints_keep_weights is not None and args.checkpoints_keep_weights < max(1, args.checkpoints_total_limit):
        raise UserError(f"--checkpoints_keep_weights {args.checkpoints_keep_weights} must be at least "
                        f"--checkpoints_total_limit {args.checkpoints_total_limit} (and >= 1): it would delete resumable states")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: continue the run in --logdir, or delete it")
    if args.lora_rank is not None and args.lora_rank < 0:
        raise UserError(f"--lora_rank must be >= 1 (or 0 for full fine-tuning), got {args.lora_rank}")
    if not args.lora_rank and (args.lora_alpha is not None or args.save_merged_unet):
        raise UserError("--lora_alpha and --save_merged_unet need --lora_rank N (LoRA training)")
    if args.lora_rank and args.reference_unet:
        raise UserError("--reference_unet does not apply to LoRA: the reference is the base UNet (--unet or the "
                        "pipeline's) with the adapters disabled")
    if args.lora_rank and not [m for m in args.lora_target_modules.split(",") if m.strip()]:
        raise UserError("--lora_target_modules names no module")
    if args.objective == "sft" and args.reference_unet:
        raise UserError("--reference_unet does not apply to --objective sft: the SFT loss has no reference model")
    if args.buffer_mode == "resample" and (args.objective == "sft" or args.truncate_rollouts or args.buffer_sync):
        raise UserError("--buffer_mode resample keeps no buffer: it does not combine with --objective sft, "
                        "--truncate_rollouts or --buffer_sync")
    if args.score and not args.validation_steps:
        raise UserError("--score needs --validation_steps N > 0 (the score is computed at each validation)")
    trackers_of(args.report_to)  # an unknown or uninstalled tracker fails now, not after the weights load
    if args.export_pipeline:
        from tools.export_pipeline import check_export_output
        check_export_output(args.export_pipeline)


def main():
    args = parse_args(build_parser())
    check_args(args)
    # without network a hub id would cost minutes of retries: switch to offline at once instead
    offline_unless_hub_reachable([p for p in (args.pretrained_model_name_or_path, args.unet, args.reference_unet, args.vae,
                                              args.train_dataset_name) if p is not None]
                                 + ([args.weights_dir] if args.score else []))
    # Everything a user can get wrong is checked before any model loads.
    check_writable(args.logdir, "--logdir")
    experts = ExpertDataset(None if args.train_dataset_name else args.train_dataset, args.resolution, args.random_flip,
                            args.random_crop, dataset_name=args.train_dataset_name, image_column=args.image_column,
                            caption_column=args.caption_column, cache_dir=args.cache_dir)
    prompts = PromptDataset(args.validation_dataset, what="validation dataset") if args.validation_steps else None
    check_pipeline_folder(args.pretrained_model_name_or_path, sdxl=args.sdxl)
    check_unet_path(args.unet, what="--unet")
    check_unet_path(args.reference_unet, what="--reference_unet")
    flow = sd3_family(args)  # SD3 / SD3.5 flow matching; its unsupported options refused here
    if args.buffer_mode == "resample" and not flow:  # its σ draw is the flow family's (FlowMatchFamily.training_timesteps)
        raise UserError("--buffer_mode resample is implemented for --model_family sd3 only")
    if flow:
        schedule = read_flow_schedule(args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir)
    else:
        schedule, _ = read_schedule_config(args.pretrained_model_name_or_path, revision=args.revision,
                                           cache_dir=args.cache_dir)
    resume_from = checkpoint.resolve_resume(args.logdir, args.resume)  # verifies the state's checksums
    trainer = read_trainer(resume_from[1]) if resume_from else None

    accelerator = Accelerator(
        cpu=cpu_ranks(),
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers_of(args.report_to), project_config=ProjectConfiguration(project_dir=args.logdir, logging_dir=args.logdir),
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if trainer is not None:
        parser = build_parser()
        check_resume(trainer, path=resume_from[1], world=world, args=vars(args), invariants=resume_invariants(parser),
                     defaults={a.dest: a.default for a in parser._actions})
    elif accelerator.is_main_process:
        checkpoint.check_fresh_logdir(args.logdir, args.overwrite)
    if accelerator.distributed_type == DistributedType.FSDP and (args.use_ema or args.validation_steps):
        # FSDP shards the parameters the EMA would average, and every forward is a collective,
        # so ranks generating different numbers of validation images would hang
        raise UserError("under FSDP, train.py needs --no-use_ema and --validation_steps 0 "
                        "(use DDP or configs/deepspeed_zero2.yaml for EMA and validation)")
    if accelerator.distributed_type == DistributedType.FSDP and args.lora_rank:
        raise UserError("--lora_rank is not supported under FSDP (use DDP or DeepSpeed ZeRO-2: the adapters are small)")
    if args.lora_rank:
        check_lora_targets(args, flow)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # The scorer loads now, before the diffusion models: a missing metric fails at start-up,
    # not after hours. It waits in CPU memory and visits the GPU only while validating.
    scorer = load_scorer(args.score, weights_dir=args.weights_dir, hps_version=args.hps_version) if args.score else None

    # ---------------------------------------------------------------- models
    weight_dtype = DTYPES[args.mixed_precision]
    # The paper's code trains in pure bf16 (weights, grads, AdamW state, EMA); fp16 and
    # --fp32_master_weights keep fp32 master weights under autocast instead.
    train_dtype = torch.float32 if args.mixed_precision == "fp16" or args.fp32_master_weights else weight_dtype
    source = args.pretrained_model_name_or_path
    family = FlowMatchFamily(schedule) if flow else UNetFamily(schedule, sdxl=args.sdxl)
    hub = {"revision": args.revision, "cache_dir": args.cache_dir}
    if flow:  # every expert caption (and "" for dropped prompts) encoded once; T5 then leaves memory
        text = load_sd3_text_encoders(source, args.variant, weight_dtype, **hub).to(device)
        text.precompute([item.caption for item in experts.items] + [""])
        if not args.validation_steps:  # validation's pipeline calls encode their prompts themselves
            text.release_encoders()
    else:
        text = load_text_encoders(source, args.sdxl, args.variant, weight_dtype, **hub).to(device)
    vae = load_vae(source, args.sdxl, args.variant, weight_dtype, vae=args.vae, **hub).to(device)

    def load(path, dtype, what):  # a UNet folder of its own, or the pipeline's
        if flow:  # sd3_family refuses --unet/--reference_unet: the pipeline's transformer
            return load_transformer(source, "transformer", args.variant, dtype, what=what.replace("UNet", "transformer"),
                                    **hub)
        if path:
            return load_unet(path, None, None, dtype, what=what, cache_dir=args.cache_dir)
        return load_unet(source, "unet", args.variant, dtype, what=what, **hub)
    unet = load(args.unet, train_dtype, "trainable UNet (--unet)").to(device)
    sft, lora, resample = args.objective == "sft", bool(args.lora_rank), args.buffer_mode == "resample"
    # LoRA's reference is the base with adapters disabled; SFT has no reference
    reference = None if sft or lora else load(args.reference_unet, weight_dtype, "reference UNet").requires_grad_(False).to(device)
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # A lagging rollout model needs its own copy; see rpo/training/parametrisation.py.
    lagging = args.gradient_accumulation_steps % args.buffer_update_steps != 0 and not sft  # SFT runs no rollouts
    if lora:
        params = LoRAFineTune(base=unet, rank=args.lora_rank, alpha=args.lora_alpha, lagging=lagging,
                              target_modules=lora_target_list(args), save_merged=args.save_merged_unet, seed=args.seed,
                              component="transformer" if flow else "unet")
    else:
        rollout_copy = load(args.unet, weight_dtype, "rollout UNet").requires_grad_(False).to(device) if lagging else None
        params = FullFineTune(trainable=unet, reference=reference, rollout=rollout_copy)
    latent_size = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)  # from --resolution (docs/upstream.md, defect 11)
    if args.buffer_num_inference_steps > family.num_train_timesteps:
        raise UserError(f"--buffer_num_inference_steps exceeds the {family.num_train_timesteps} training timesteps")

    ema = NamedEMA(params.named_trainable(), offload=args.offload_ema) if args.use_ema else None
    lr = args.learning_rate * (args.gradient_accumulation_steps * args.batch_size * world if args.scale_lr else 1)
    optimizer = torch.optim.AdamW([p for _, p in params.named_trainable()], lr=lr)
    num_updates = math.ceil(args.num_steps / args.gradient_accumulation_steps)
    # accelerate's wrapped scheduler ticks once per process at each optimizer update
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps // args.gradient_accumulation_steps * world,
                                 num_training_steps=num_updates * world)
    if accelerator.state.deepspeed_plugin is not None:  # no DataLoader is prepared: DeepSpeed needs the batch size
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch_size
    model, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    # ---------------------------------------------------------------- state
    state = TrainState.fresh(seed=args.seed, rank=rank, buffer_size=args.buffer_size * (world if args.buffer_sync else 1),
                             device=device)
    if trainer is not None:
        load_checkpoint(path=resume_from[1], trainer=trainer, accelerator=accelerator, params=params, ema=ema, state=state)
        accelerator.step = state.step
        accelerator.print(f"resumed from {resume_from[1]} at micro-step {state.step}")
        for name in RESUME_CHANGEABLE:
            if trainer["args"].get(name) != getattr(args, name):
                accelerator.print(f"--resume: --{name} changed from {trainer['args'].get(name)!r} to {getattr(args, name)!r}")
        set_learning_rate(optimizer, lr_scheduler, lr)  # the restored optimizer and scheduler hold the old one
    else:
        params.refresh_rollout()
        if args.resume == "latest":
            accelerator.print(f"--resume latest: no resumable checkpoint in {args.logdir}, starting fresh")
    if accelerator.is_main_process:
        checkpoint.clean_temporaries(args.logdir)  # what a crash mid-save left behind
        record_start(args, resume_from)
        accelerator.init_trackers("rpo", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        truncate_history(args.logdir, state.step)  # lines a killed run wrote after its checkpoint come again

    moments = None
    if args.cache_latents:  # before the loader: it then skips decoding pixels
        moments = encode_moments(vae, experts, device, weight_dtype)
        experts.load_pixels = False
    batches = ExpertBatches(len(experts), args.batch_size if sft or resample else args.buffer_batch_size, args.seed, rank, world, start=state.expert_batches_used)
    loader = iter(torch.utils.data.DataLoader(experts, batch_sampler=batches, num_workers=args.dataloader_num_workers,
                                              pin_memory=device.type == "cuda", persistent_workers=False))
    speed_up(unets_of(params), compile=args.compile, channels_last=args.channels_last)
    exact, why = truncation_applies(buffer_size=args.buffer_size, sample_steps=args.buffer_sample_steps,
                                    pair_batch_size=args.batch_size, rollout_batch_size=args.buffer_batch_size,
                                    batches_per_refill=args.buffer_batch_accumulation, sync=args.buffer_sync, world=world)
    truncate = exact and args.truncate_rollouts is not False and not resample
    if args.truncate_rollouts and not exact:
        accelerator.print(f"--truncate_rollouts: rollouts stay whole, truncation would not be exact: {why}")
    refiller = Refiller(batches=loader, text=text, vae=vae, family=family, accelerator=accelerator, weight_dtype=weight_dtype,
                        sampler=family.sampler() if flow else PerSampleScheduler.from_name(args.buffer_scheduler,
                                                                                            family.schedule),
                        moments=moments,
                        settings=RolloutSettings(
                            scheduler=args.buffer_scheduler, num_steps=args.buffer_num_inference_steps,
                            batch_size=args.buffer_batch_size, batches_per_refill=args.buffer_batch_accumulation,
                            min_trajectories=args.batch_size, guidance_scale=args.buffer_guidance_scale,
                            perturb_timesteps=args.buffer_perturb_timesteps,
                            drop_prompt_probability=args.random_drop_prompt_probability, resolution=args.resolution,
                            latent_size=latent_size, sdxl=args.sdxl, sync=args.buffer_sync, truncate=truncate))
    validator = None
    if prompts is not None:
        validator = Validator(accelerator=accelerator, captions=[item.caption for item in prompts.items], text=text, vae=vae,
                              schedule=family.schedule, logdir=args.logdir, scorer=scorer, score_name=args.score,
                              settings=ValidationSettings(
                                  scheduler=args.validation_scheduler, num_inference_steps=args.validation_num_inference_steps,
                                  guidance_scale=args.validation_guidance_scale, resolution=args.resolution, seed=args.seed,
                                  images_per_prompt=args.score_num_images_per_prompt, batch_size=args.score_batch_size,
                                  sdxl=args.sdxl),
                              on_score=lambda step, logs: append_history(args.logdir, {"kind": "validation", "step": step, **logs}))
    if accelerator.is_main_process:
        print_summary(args, len(experts), world, num_updates, state.step, validator)
    validate = dict(validator=validator, ema=ema, params=params, logdir=args.logdir, main=accelerator.is_main_process)
    if validator is not None:
        # Step 0 is the starting model, before any update. ckpt-N is saved before the validation
        # of step N runs, so a run killed during it resumes after N: finish that one first
        # (only its missing images are made; rpo/training/validation.py).
        if state.step == 0 and not os.path.isfile(os.path.join(args.logdir, "images", "step-0.png")):
            run_validation(step=0, **validate)
        elif (state.step and (state.step % args.validation_steps == 0 or os.path.isdir(validator.folder(state.step)))
              and not validator.complete(state.step)):
            run_validation(step=state.step, **validate)

    # ---------------------------------------------------------------- loop
    bar = tqdm(range(state.step + 1, args.num_steps + 1), initial=state.step, total=args.num_steps,
               disable=not accelerator.is_local_main_process, desc="micro-steps")
    stat_keys = SFT_STAT_KEYS if sft else STATS
    running = torch.zeros(len(stat_keys), device=device)
    tic = time.perf_counter()
    for step in bar:
        state.step = step
        if sft:
            running += sft_micro_step(accelerator=accelerator, model=model, params=params, family=family, refiller=refiller,
                                      state=state, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                      max_grad_norm=args.max_grad_norm)
        elif resample:
            running += resample_micro_step(accelerator=accelerator, model=model, params=params, family=family,
                                           refiller=refiller, state=state, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           margin=args.margin, hinge=args.hinge, max_grad_norm=args.max_grad_norm)
        else:
            if len(state.buffer) == 0 or step % args.buffer_sample_steps == 0:
                refiller.refill(model=params.rollout_model, state=state)
            running += dro_micro_step(accelerator=accelerator, model=model, params=params, family=family, state=state,
                                      batch_size=args.batch_size, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                      margin=args.margin, hinge=args.hinge, max_grad_norm=args.max_grad_norm)
        if accelerator.sync_gradients:
            if ema is not None:
                ema.step(params.named_trainable())
            seconds = (time.perf_counter() - tic) / args.gradient_accumulation_steps
            means = accelerator.reduce(running / args.gradient_accumulation_steps, "mean").tolist()
            logs = {f"loss/{k}": v for k, v in zip(stat_keys, means)}
            logs.update({"params/lr": lr_scheduler.get_last_lr()[0], "params/buffer_size": len(state.buffer),
                         "perf/seconds_per_step": seconds, "perf/samples_per_second": args.batch_size * world / seconds})
            accelerator.log(logs, step=step)
            if accelerator.is_main_process:
                append_history(args.logdir, {"kind": "train", "step": step, **logs})
            bar.set_postfix(loss=f"{means[0]:.4g}", lr=f"{logs['params/lr']:.2g}")
            running.zero_()
            tic = time.perf_counter()
        if step % args.buffer_update_steps == 0:
            params.refresh_rollout()
        if step % args.checkpointing_steps == 0 or step == args.num_steps:
            save_checkpoint(logdir=args.logdir, accelerator=accelerator, model=model, params=params, ema=ema, state=state,
                            args=vars(args), keep=args.checkpoints_total_limit, keep_weights=args.checkpoints_keep_weights)
        if validator is not None and (step % args.validation_steps == 0 or step == args.num_steps):
            run_validation(step=step, **validate)
        elif step % args.checkpointing_steps == 0 and accelerator.is_main_process:
            write_plots(args.logdir)
        if step % args.checkpointing_steps == 0 or (validator is not None and step % args.validation_steps == 0):
            tic = time.perf_counter()  # seconds_per_step measures training, not saving or validating
    accelerator.end_training()
    if accelerator.is_main_process:
        write_plots(args.logdir)
        print(f"done: {args.num_steps} micro-steps; checkpoints in {args.logdir}")
        if args.export_pipeline:
            from tools.export_pipeline import export
            export(checkpoint.final_dir(args.logdir, args.num_steps), args.export_pipeline, base=args.pretrained_model_name_or_path)
            print(f"exported {checkpoint.final_dir(args.logdir, args.num_steps)} as a pipeline -> {args.export_pipeline}")


def run_validation(*, validator, ema, params, step, logdir, main):
    """Validate with the EMA weights swapped in (what ckpt-N/ema holds), then redraw the plots."""
    with ema.swapped_into(params.named_trainable()) if ema is not None else nullcontext():
        validator.run(params.trainable, step)
    if main:
        write_plots(logdir)


def print_summary(args, examples, world, num_updates, start, validator):
    """What this run will do and where its outputs go, printed once at start-up."""
    effective = args.batch_size * args.gradient_accumulation_steps * world
    remaining = args.num_steps - start
    lines = [f"training: {examples} expert examples; effective batch {effective} = {args.batch_size} per process x "
             f"{args.gradient_accumulation_steps} accumulation x {world} process{'es' if world > 1 else ''}",
             f"  {args.num_steps} micro-steps = {num_updates} optimizer updates"
             + (f"; resuming at micro-step {start}, {remaining} to go" if start else ""),
             f"  checkpoints every {args.checkpointing_steps} micro-steps -> {os.path.join(args.logdir, 'ckpt-N')}",
             f"  history -> {os.path.join(args.logdir, 'history.jsonl')}, plots -> {os.path.join(args.logdir, 'plots')}"]
    if validator is not None:
        lines.append(f"  validation of {validator.num_images()} images at step 0 and every {args.validation_steps} "
                     f"micro-steps -> {os.path.join(args.logdir, 'images')}")
    if args.export_pipeline:
        lines.append(f"  at the end, a diffusers pipeline -> {args.export_pipeline}")
    tqdm.write("\n".join(lines))


def set_learning_rate(optimizer, lr_scheduler, lr):
    """Make `lr` the base learning rate of a restored optimizer and LR scheduler (both
    remember the one they were saved with), keeping the schedule's position."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, lmbda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * lmbda(scheduler.last_epoch)


def lora_target_list(args):
    return [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]


def sd3_family(args):
    """Whether the run is SD3 / SD3.5 flow matching (`--model_family`, auto: model_index.json's
    class); refuses, before any weight loads, what the flow path does not do yet."""
    kind = resolve_model_family(args.model_family, args.pretrained_model_name_or_path, sdxl=args.sdxl,
                                revision=args.revision, cache_dir=args.cache_dir)
    if kind != "sd3":
        return False
    unsupported = {"--objective sft": args.objective == "sft", "--save_merged_unet": args.save_merged_unet,
                   "--unet": bool(args.unet),
                   "--reference_unet": bool(args.reference_unet), "--vae": bool(args.vae),
                   "--export_pipeline": bool(args.export_pipeline)}
    used = [name for name, on in unsupported.items() if on]
    if used:
        raise UserError(f"--model_family sd3 does not support {', '.join(used)} yet (README, 'SD3.5 Medium')")
    return True


def check_lora_targets(args, flow=False):
    """Refuse --lora_target_modules entries that name no module of the UNet (the SD3
    transformer when `flow`), from its config alone (built on the meta device: no weights read)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    hub = {"revision": args.revision, "cache_dir": args.cache_dir}
    if flow:  # sd3_family refuses --unet: always the pipeline's transformer
        cls, what = SD3Transformer2DModel, "transformer"
        config = cls.load_config(args.pretrained_model_name_or_path, subfolder="transformer", **hub)
    else:
        cls, what = UNet2DConditionModel, "UNet"
        if args.unet:
            config = cls.load_config(args.unet, cache_dir=args.cache_dir)
        else:
            config = cls.load_config(args.pretrained_model_name_or_path, subfolder="unet", **hub)
    with torch.device("meta"):
        arch = cls.from_config(config)
    unmatched = [t for t, n in lora_targets_matched(arch, lora_target_list(args)).items() if n == 0]
    if unmatched:
        raise UserError(f"--lora_target_modules: {', '.join(unmatched)} names no module of the {what} "
                        f"(e.g. {', '.join(LORA_TARGET_MODULES)})")


def record_start(args, resume_from):
    """Append this start (fresh or resumed, with every option) to <logdir>/training_config.json."""
    path = os.path.join(args.logdir, "training_config.json")
    runs = []
    if resume_from is not None and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        runs = old.get("runs", []) if isinstance(old, dict) and "runs" in old else [{"resumed_from": None, "args": old}]
    runs.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from": resume_from[1] if resume_from else None,
                 "args": vars(args)})
    os.makedirs(args.logdir, exist_ok=True)
    write_json(path, {"runs": runs}, indent=2)


if __name__ == "__main__":
    run_main(main)
