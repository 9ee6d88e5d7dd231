"""Validation during training: generate the validation prompts with the (EMA) UNet, save
the images and a grid under `<logdir>/images/`, log the grid and, with `--score`, the mean
score (the paper's code validates only at checkpoints and only with a score).

Seeds follow the benchmark protocol (seed + prompt index + k * number of prompts, one
generator per image), so the images at every validation are comparable across steps and
independent of the number of processes, which split the work.
"""
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from rpo.generate import make_scheduler, plan, run_jobs, write_captions
from rpo.scores import METRICS

SCORE_CHOICES = METRICS


@dataclass(frozen=True)
class ValidationSettings:
    scheduler: str            # a stock sampler name (rpo.generate.SCHEDULERS)
    num_inference_steps: int
    guidance_scale: float
    resolution: int
    seed: int                 # base seed of the benchmark protocol
    images_per_prompt: int
    batch_size: int           # images per pipeline call and per scoring batch
    sdxl: bool = False


class Validator:
    def __init__(self, *, accelerator, captions, text, vae, schedule, settings, logdir, scorer=None, score_name=None):
        self.accelerator, self.captions, self.text, self.vae = accelerator, list(captions), text, vae
        self.settings, self.logdir, self.scorer, self.score_name = settings, logdir, scorer, score_name
        self.scheduler = make_scheduler(settings.scheduler, schedule)

    def pipeline(self, unet):
        common = dict(vae=self.vae, unet=unet, scheduler=self.scheduler)
        if self.settings.sdxl:
            return StableDiffusionXLPipeline(text_encoder=self.text.encoders[0], text_encoder_2=self.text.encoders[1],
                                             tokenizer=self.text.tokenizers[0], tokenizer_2=self.text.tokenizers[1], **common)
        return StableDiffusionPipeline(text_encoder=self.text.encoders[0], tokenizer=self.text.tokenizers[0],
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False, **common)

    @torch.no_grad()
    def run(self, unet, step):
        """Generate (each rank every world-th image), score, log the mean and a grid."""
        s, acc = self.settings, self.accelerator
        out = os.path.join(self.logdir, "images", f"step-{step}")
        if acc.is_main_process:
            shutil.rmtree(out, ignore_errors=True)  # left by a crashed run: regenerate all, so `plan` lists every image
            write_captions(out, self.captions)
        acc.wait_for_everyone()
        jobs, _ = plan(out, len(self.captions), s.images_per_prompt, s.seed)
        mine = jobs[acc.process_index::acc.num_processes]
        pipe = self.pipeline(unet)
        pipe.set_progress_bar_config(disable=True)
        with acc.autocast():
            run_jobs(pipe, self.captions, mine, s.batch_size, acc.device,
                     num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                     height=s.resolution, width=s.resolution)
        logs = {}
        if self.scorer is not None:
            logs[f"metrics/{self.score_name}"] = self.mean_score(mine)
        acc.wait_for_everyone()
        if acc.is_main_process:
            grid = make_grid([job.path for job in sorted(jobs, key=lambda j: (j.image_index, j.prompt_index))][:16])
            grid.save(os.path.join(self.logdir, "images", f"step-{step}.png"))
            for tracker in acc.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            if logs:
                print(f"step {step}: " + ", ".join(f"{k} = {v:.4f}" for k, v in logs.items()))
        if logs:
            acc.log(logs, step=step)

    def mean_score(self, mine):
        """Mean score over all ranks' images; the scorer visits the GPU only for this."""
        acc, batch = self.accelerator, self.settings.batch_size
        self.scorer.to(acc.device)
        total = torch.zeros(2, device=acc.device)  # (sum, count) over this rank's images
        for start in range(0, len(mine), batch):
            chunk = mine[start:start + batch]
            scores = self.scorer.score([Image.open(job.path).convert("RGB") for job in chunk],
                                       [self.captions[job.prompt_index] for job in chunk])
            total += torch.stack([scores.float().sum(), torch.tensor(float(len(chunk)))]).to(acc.device)
        self.scorer.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        total = acc.reduce(total, "sum")
        return (total[0] / total[1]).item()


def make_grid(paths):
    """The images at `paths` in a near-square grid (first image of each prompt first)."""
    images = [Image.open(path).convert("RGB") for path in paths]
    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid
