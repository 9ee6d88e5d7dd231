"""Every rule between train.py's options, in one table, checked before any weight loads
(docs/design.md, "The run's parts"); and which options a resume may change.

A rule is (predicate over the options, the one line that refuses them). `check` runs the
table, then asks the model family which of the options it cannot serve. Rules about the
distributed engine (`engine`: accelerate's distributed type name) run once the accelerator
exists, still before any model loads.
"""
import math

import torch

from rpo.cli import UserError

POSITIVE = ("batch_size", "num_steps", "gradient_accumulation_steps", "buffer_size", "buffer_batch_size",
            "buffer_batch_accumulation", "buffer_num_inference_steps", "buffer_sample_steps", "buffer_update_steps",
            "checkpointing_steps", "resolution", "score_batch_size", "score_num_images_per_prompt")


def lora_targets(a):
    return [m.strip() for m in a.lora_target_modules.split(",") if m.strip()]


RULES = [
    *[(lambda a, n=n: getattr(a, n) < 1, lambda a, n=n: f"--{n} must be at least 1, got {getattr(a, n)}")
      for n in POSITIVE],
    (lambda a: not math.isfinite(a.learning_rate) or a.learning_rate <= 0,
     lambda a: f"--learning_rate must be a positive number, got {a.learning_rate}"),
    (lambda a: not math.isfinite(a.margin) or a.margin < 0, lambda a: f"--margin must be a number >= 0, got {a.margin}"),
    (lambda a: a.mixed_precision == "fp16" and not torch.cuda.is_available(),
     lambda a: "--mixed_precision fp16 needs a CUDA GPU (fp16 autocast does not run on the CPU): use bf16 or no"),
    (lambda a: a.resolution % 8,
     lambda a: f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {a.resolution}"),
    (lambda a: a.num_steps % a.gradient_accumulation_steps,
     lambda a: f"--num_steps {a.num_steps} must be a multiple of --gradient_accumulation_steps "
               f"{a.gradient_accumulation_steps}: the last partial accumulation would never be applied"),
    (lambda a: a.checkpointing_steps % a.gradient_accumulation_steps,
     lambda a: f"--checkpointing_steps {a.checkpointing_steps} must be a multiple of --gradient_accumulation_steps "
               f"{a.gradient_accumulation_steps}: a checkpoint mid-accumulation would lose gradients"),
    (lambda a: not 0 <= a.random_drop_prompt_probability <= 1,
     lambda a: f"--random_drop_prompt_probability must be in [0, 1], got {a.random_drop_prompt_probability}"),
    (lambda a: not a.hinge and a.margin <= 0,
     lambda a: f"--no-hinge (logistic loss) needs --margin > 0, got {a.margin}"),
    (lambda a: a.fp32_master_weights and a.mixed_precision != "bf16",
     lambda a: "--fp32_master_weights only applies to --mixed_precision bf16"),
    (lambda a: a.cache_latents and a.random_crop,
     lambda a: "--cache_latents needs centre crops: it caches each image and its mirror, not every random crop"),
    (lambda a: a.validation_steps < 0, lambda a: f"--validation_steps must be >= 0, got {a.validation_steps}"),
    (lambda a: a.checkpoints_keep_weights is not None and a.checkpoints_keep_weights < max(1, a.checkpoints_total_limit),
     lambda a: f"--checkpoints_keep_weights {a.checkpoints_keep_weights} must be at least --checkpoints_total_limit "
               f"{a.checkpoints_total_limit} (and >= 1): it would delete resumable states"),
    (lambda a: a.resume and a.overwrite,
     lambda a: "--resume and --overwrite contradict each other: continue the run in --logdir, or delete it"),
    (lambda a: a.lora_rank is not None and a.lora_rank < 0,
     lambda a: f"--lora_rank must be >= 1 (or 0 for full fine-tuning), got {a.lora_rank}"),
    (lambda a: not a.lora_rank and (a.lora_alpha is not None or a.save_merged_unet),
     lambda a: "--lora_alpha and --save_merged_unet need --lora_rank N (LoRA training)"),
    (lambda a: a.lora_rank and a.reference_unet,
     lambda a: "--reference_unet does not apply to LoRA: the reference is the base UNet (--unet or the pipeline's) "
               "with the adapters disabled"),
    (lambda a: a.lora_rank and not lora_targets(a), lambda a: "--lora_target_modules names no module"),
    (lambda a: a.objective == "sft" and a.reference_unet,
     lambda a: "--reference_unet does not apply to --objective sft: the SFT loss has no reference model"),
    (lambda a: a.buffer_mode == "resample" and (a.objective == "sft" or a.truncate_rollouts or a.buffer_sync),
     lambda a: "--buffer_mode resample keeps no buffer: it does not combine with --objective sft, "
               "--truncate_rollouts or --buffer_sync"),
    (lambda a: a.score and not a.validation_steps,
     lambda a: "--score needs --validation_steps N > 0 (the score is computed at each validation)"),
]

# Rules about the distributed engine (accelerate's DistributedType name), checked once it is known.
ENGINE_RULES = [
    # FSDP shards the parameters the EMA would average, and every forward is a collective,
    # so ranks generating different numbers of validation images would hang
    (lambda a, engine: engine == "FSDP" and (a.use_ema or a.validation_steps),
     lambda a: "under FSDP, train.py needs --no-use_ema and --validation_steps 0 "
               "(use DDP or configs/deepspeed_zero2.yaml for EMA and validation)"),
    (lambda a, engine: engine == "FSDP" and a.lora_rank,
     lambda a: "--lora_rank is not supported under FSDP (use DDP or DeepSpeed ZeRO-2: the adapters are small)"),
]


def check(args, family=None):
    """Refuse the first broken rule of `RULES`, then what `family` (a class from
    rpo.families) cannot serve, naming the options."""
    for broken, message in RULES:
        if broken(args):
            raise UserError(message(args))
    if family is not None:
        refused = family.refusals(vars(args))
        if refused:
            raise UserError(f"--model_family {family.name} does not support "
                            + "; ".join(f"{option} ({why})" for option, why in refused.items()))


def check_engine(args, engine):
    for broken, message in ENGINE_RULES:
        if broken(args, engine):
            raise UserError(message(args))


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
