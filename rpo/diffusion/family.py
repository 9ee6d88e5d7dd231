"""The seam between the method and a model family: how to noise, the training target, one
prediction, and where the noise schedule comes from (docs/design.md, "Model families").

The loss (`rpo.diffusion.objective`), rollouts and training steps call only this interface,
so another family (the SD3 flow-matching transformer) is one more class here. The first
implementation is the SD1.5/SDXL UNet on a DDPM noise schedule, epsilon or v-prediction.

The noise schedule is the model's own: betas, number of training steps, prediction type and
offsets are read from its `scheduler/scheduler_config.json`; keys that only steer a sampler
(`use_karras_sigmas`, `solver_order`, ...) are ignored, and `clip_sample` is off, because
clipping x0 to [-1, 1] is meant for pixel-space models, not for latents (diffusers' DDPM
default turns it on when a re-saved config lacks the key). Anything rpo cannot use is
refused before any weight loads, naming the file and the key.
"""
import json
import os

import torch
from diffusers import DDPMScheduler

from rpo.cli import UserError

# The keys that define the forward (noising) process and the model's parametrisation.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type", "steps_offset", "timestep_spacing", "rescale_betas_zero_snr")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def read_schedule_config(source, *, subfolder="scheduler", revision=None, cache_dir=None):
    """The noise-schedule keys of a pipeline's scheduler config, checked; (config, where)."""
    if os.path.isdir(source):
        where = os.path.join(source, subfolder, "scheduler_config.json")
        if not os.path.isfile(where):
            raise UserError(f"{source} has no {subfolder}/scheduler_config.json: rpo needs the model's noise schedule from it")
        try:
            with open(where, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {where}: {e}") from None
    else:
        where = f"{source} ({subfolder}/scheduler_config.json)"
        try:
            raw = DDPMScheduler.load_config(source, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the scheduler config of '{source}': {str(e).splitlines()[0] if str(e) else e}. "
                            "Without network access, download it on a connected machine (`hf download <id>`) "
                            "and pass the local folder instead.") from None
    return check_schedule_config(raw, where), where


def check_schedule_config(raw, where):
    """Keep the schedule keys of `raw`; refuse values the DDPM noise process cannot represent."""
    config = {k: raw[k] for k in SCHEDULE_KEYS if k in raw and raw[k] is not None}
    schedule = config.get("beta_schedule", "linear")
    if "trained_betas" not in config and schedule not in BETA_SCHEDULES:
        raise UserError(f"{where}: beta_schedule {schedule!r} is not one of {list(BETA_SCHEDULES)}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise UserError(f"{where}: prediction_type {prediction!r}: rpo trains {' and '.join(PREDICTION_TYPES)} models")
    steps = config.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or steps < 2:
        raise UserError(f"{where}: num_train_timesteps must be an integer >= 2, got {steps!r}")
    config["clip_sample"] = False  # latents are not in [-1, 1]; see the module docstring
    return config


class UNetFamily:
    """SD1.5 / SDXL UNets: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target eps or v.

    `noise_scheduler` is a stock `DDPMScheduler` built from the model's schedule only; its
    `config` is what the per-sample samplers and validation schedulers are built from.
    """

    def __init__(self, schedule_config, *, sdxl=False):
        self.noise_scheduler = DDPMScheduler.from_config(dict(schedule_config))
        self.sdxl = sdxl

    @classmethod
    def from_pretrained(cls, source, *, sdxl=False, revision=None, cache_dir=None):
        config, _ = read_schedule_config(source, revision=revision, cache_dir=cache_dir)
        return cls(config, sdxl=sdxl)

    @property
    def schedule(self):
        return self.noise_scheduler.config

    @property
    def prediction_type(self):
        return self.noise_scheduler.config.prediction_type

    @property
    def num_train_timesteps(self):
        return self.noise_scheduler.config.num_train_timesteps

    def add_noise(self, x0, noise, t):
        return self.noise_scheduler.add_noise(x0, noise, t)

    def target(self, x0, noise, t):
        """What the model is trained to output at the noised x0: eps, or the velocity
        v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 for v-prediction models."""
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        return noise

    @staticmethod
    def predict(model, x, t, cond):
        """One forward pass; `cond` as `conditioning` returns it."""
        return model(x, t, cond["prompt_embeds"], added_cond_kwargs=cond.get("added")).sample

    def conditioning(self, sample, repeat=1):
        """The model's conditioning for buffer rows `sample`, each repeated `repeat` times."""
        cond = {"prompt_embeds": torch.cat([sample["prompt_embeds"]] * repeat)}
        if "pooled_embeds" in sample:  # SDXL: pooled text and size/crop ids
            cond["added"] = {"text_embeds": torch.cat([sample["pooled_embeds"]] * repeat),
                             "time_ids": torch.cat([sample["time_ids"]] * repeat)}
        return cond
