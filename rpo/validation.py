"""Validation during training: generate the validation prompts with the (EMA) UNet, save
the images and a grid under `<logdir>/images/`, log the grid and, with `--score`, the mean
score (DESIGN §3; the public code validates only at checkpoints and only with a score).

Seeds follow the benchmark protocol (seed + prompt index + k * number of prompts, one
generator per image), so the images at every validation are comparable across steps and
independent of the number of processes, which split the work.
"""
import os

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from rpo.cli import UserError

SCORE_CHOICES = ("pickscore", "hpsv2", "aestheticv1", "aestheticv2", "clip", "imagereward")
VALIDATION_SCHEDULERS = {"DDPM": DDPMScheduler, "DDIM": DDIMScheduler, "DPMSolver++": DPMSolverMultistepScheduler}


def load_validation_scorer(name, weights_dir):
    """Load the scorer at start-up, so a missing metric fails now and not after hours of training."""
    try:
        from rpo.scores import load_scorer
    except ImportError:
        raise UserError(f"--score {name}: the scorer registry (rpo.scores) is not available in this install") from None
    return load_scorer(name, weights_dir=weights_dir)


class Validator:
    def __init__(self, args, accelerator, prompts, text, vae, noise_scheduler, scorer=None):
        self.args, self.accelerator, self.prompts = args, accelerator, prompts
        self.text, self.vae, self.scorer = text, vae, scorer
        self.scheduler = VALIDATION_SCHEDULERS[args.validation_scheduler].from_config(noise_scheduler.config)
        n, k = len(prompts), args.score_num_images_per_prompt
        # (prompt index, image index, seed) of every image; each rank takes every world-th one.
        self.work = [(p, i, args.seed + p + i * n) for p in range(n) for i in range(k)]

    def pipeline(self, unet):
        common = dict(vae=self.vae, unet=unet, scheduler=self.scheduler)
        if self.args.sdxl:
            return StableDiffusionXLPipeline(text_encoder=self.text.encoders[0], text_encoder_2=self.text.encoders[1],
                                             tokenizer=self.text.tokenizers[0], tokenizer_2=self.text.tokenizers[1], **common)
        return StableDiffusionPipeline(text_encoder=self.text.encoders[0], tokenizer=self.text.tokenizers[0],
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False, **common)

    @torch.no_grad()
    def run(self, unet, step):
        args, acc = self.args, self.accelerator
        pipe = self.pipeline(unet)
        pipe.set_progress_bar_config(disable=True)
        out = os.path.join(args.logdir, "images", f"step-{step}")
        digits = len(str(len(self.prompts) - 1))
        mine = self.work[acc.process_index::acc.num_processes]
        scores = []
        for start in range(0, len(mine), args.score_batch_size):
            chunk = mine[start:start + args.score_batch_size]
            captions = [self.prompts[p]["caption"] for p, _, _ in chunk]
            generators = [torch.Generator(acc.device).manual_seed(seed) for _, _, seed in chunk]
            with acc.autocast():
                images = pipe(captions, num_inference_steps=args.validation_num_inference_steps,
                              guidance_scale=args.validation_guidance_scale, generator=generators,
                              height=args.resolution, width=args.resolution).images
            for (p, _, seed), caption, image in zip(chunk, captions, images):
                folder = os.path.join(out, f"{p:0{digits}d}")
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, "caption.txt"), "w") as f:
                    f.write(caption + "\n")
                image.save(os.path.join(folder, f"{seed}.png"))
            if self.scorer is not None:
                scores.append(self.scorer.score(images, captions).float().cpu())
        acc.wait_for_everyone()
        logs = {}
        if self.scorer is not None:
            local = torch.cat(scores) if scores else torch.zeros(0)
            total = acc.reduce(torch.tensor([local.sum().item(), float(len(local))], device=acc.device), "sum")
            logs[f"metrics/{args.score}"] = (total[0] / total[1]).item()
        if acc.is_main_process:
            grid = self.grid(out, digits)
            grid.save(os.path.join(args.logdir, "images", f"step-{step}.png"))
            for tracker in acc.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            if logs:
                print(f"step {step}: " + ", ".join(f"{k} = {v:.4f}" for k, v in logs.items()))
        if logs:
            acc.log(logs, step=step)

    def grid(self, out, digits, max_images=16):
        """Up to 16 validation images (first image of each prompt first), in a near-square grid."""
        paths = [os.path.join(out, f"{p:0{digits}d}", f"{seed}.png") for p, _, seed in sorted(self.work, key=lambda w: (w[1], w[0]))]
        images = [Image.open(path).convert("RGB") for path in paths[:max_images]]
        cols = int(np.ceil(np.sqrt(len(images))))
        rows = int(np.ceil(len(images) / cols))
        w, h = images[0].size
        grid = Image.new("RGB", (cols * w, rows * h))
        for i, image in enumerate(images):
            grid.paste(image, ((i % cols) * w, (i // cols) * h))
        return grid
