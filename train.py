"""Diffusion-DRO training (docs/design.md, "Algorithm" and "Checkpoints").

    accelerate launch train.py --pretrained_model_name_or_path ... --train_dataset ... [options]

One micro-step: (1) refill the replay buffer with rollouts of the current policy from
expert captions, (2) sample policy steps from the buffer and noise the experts at the same
timesteps, (3) the hinge ranking loss on the trainable vs frozen reference denoising errors,
(4) backward with accumulation, clipping, AdamW, EMA. Checkpoints are atomic and resume is
exact: N micro-steps straight equal N/2, stop, --resume, N/2 more.
"""
import argparse

from rpo import families
from rpo.cli import flag, parse_args, run_main
from rpo.diffusion.schedulers import SCHEDULERS, STOCK_SCHEDULERS
from rpo.scores import HPS_VERSIONS
from rpo.training.build import build
from rpo.training.objectives import OBJECTIVES
from rpo.training.validation import SCORE_CHOICES

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
    flag(p, "sdxl", False, "shorthand for --model_family sdxl")
    a("--model_family", choices=families.CHOICES, default="auto",
      help=f"the model family (rpo/families/): {', '.join(families.FAMILIES)}; auto: from the pipeline's "
           "model_index.json; unet: sd15, or sdxl with --sdxl (the name before SDXL was a family)")
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
    a("--objective", choices=list(OBJECTIVES), default="dro",
      help="dro: Diffusion-DRO; sft: the paper's SFT baseline, the plain denoising loss on the same experts (no rollouts)")
    # LoRA (diffusers' LoRA conventions; see README "LoRA and the SFT baseline")
    a("--lora_rank", type=int, default=None, help="train LoRA adapters of this rank on the UNet (SD3: the transformer); None or 0: full fine-tuning")
    a("--lora_alpha", type=float, default=None, help="LoRA scaling numerator (scale alpha/rank); None: the rank")
    a("--lora_target_modules", default=",".join(families.SD15.lora_targets),
      help="comma-separated module names the adapters wrap (peft: a name or its last components); the default is "
           "every family's own default (rpo/families/)")
    flag(p, "save_merged_unet", False, "LoRA: also write ckpt-N/ema (ckpt-N/unet without EMA), the adapter merged into the UNet")
    flag(p, "hinge", True, "hinge ranking loss; --no-hinge: its smooth logistic counterpart")
    a("--margin", type=float, default=0.001)
    # replay buffer
    a("--buffer_mode", choices=["replay", "resample"], default="replay",
      help="replay: the paper's replay buffer of stored trajectories; resample: no buffer, each micro-step rolls the "
           "policy out to a fresh x0 and noises expert and policy x0 with one shared noise at a logit-normal sigma "
           "(flow-matching families; rpo/training/sources/resample.py)")
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


def main():
    args = parse_args(build_parser())
    build(args, build_parser()).run()


if __name__ == "__main__":
    run_main(main)
