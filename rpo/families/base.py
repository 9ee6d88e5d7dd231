"""The protocol every model family answers (docs/design.md, "The run's parts").

A family is everything that differs between SD1.5, SDXL, SD3 (and later FLUX) while the
method stays the same: where its parts load from, how captions become conditioning, the
noise process and its rollout sampler, the training input and target, the diffusers
pipeline that validation, inference and export use, the model-card snippet, the default
LoRA targets, and the options it cannot serve. The training loop, the pair sources, the
objectives, validation, inference, export and the card call these methods and never ask
which family they hold.

The noise math itself lives in `rpo/diffusion/` (`UNetFamily`, `FlowMatchFamily`); a
family class inherits it and adds the loading and conditioning answers. One instance is
built from the model's own scheduler config (`Family.from_pretrained`).
"""
import torch

from rpo.models import from_pretrained, load_model


class Family:
    # --- identity (class attributes every family sets)
    name = None                 # the registry name, --model_family NAME
    pipeline_classes = ()       # model_index.json `_class_name` values this family serves
    pipeline_class = None       # the diffusers pipeline class name (validation, inference, export, card)
    denoiser_folder = "unet"    # the pipeline's sub-folder that trains (unet / transformer)
    denoiser_class = None       # its diffusers class
    lora_targets = ()           # default --lora_target_modules
    lora_converts = True        # LoRA keys converted to diffusers' layout before save_lora_weights
    card_tag = "diffusers"      # a hub tag for the card

    # --- options the family cannot serve: {option: (predicate over the options, why)}
    @classmethod
    def refusals(cls, args):
        """[option, ...] of `args` this family cannot serve (checked before any weight loads)."""
        return []

    # --- schedule
    @classmethod
    def from_pretrained(cls, source, *, revision=None, cache_dir=None):
        raise NotImplementedError

    # --- loading
    def load_text(self, source, *, variant=None, dtype=torch.float32, device="cpu", captions=(), keep_encoders=True,
                  **hub):
        """The text encoders on `device`, as one object with `encode(captions) -> (embeds,
        pooled)`; `captions` may be encoded once ahead (families whose encoders are large then
        drop them unless `keep_encoders`)."""
        raise NotImplementedError

    def load_vae(self, source, *, variant=None, dtype=torch.float32, vae=None, **hub):
        raise NotImplementedError

    def load_denoiser(self, source, *, subfolder=None, variant=None, dtype=torch.float32, what=None, revision=None,
                      cache_dir=None):
        """The trainable network: `source` is a pipeline folder or hub id with `subfolder`,
        or a folder of its own (`--unet`) with `subfolder` None."""
        return load_model(self.denoiser_class, source, subfolder, variant, dtype, what or self.denoiser_folder,
                          revision=revision, cache_dir=cache_dir)

    def latent_size(self, vae, resolution):
        """Latent side length for `resolution` pixels (the VAE's downsampling)."""
        return resolution // 2 ** (len(vae.config.block_out_channels) - 1)

    def latent_channels(self, model):
        return model.config.in_channels

    # --- rollouts
    def rollout_sampler(self, name):
        """The per-row sampler the rollouts use (`--buffer_scheduler` NAME where it applies)."""
        raise NotImplementedError

    def rollout_timesteps(self, name, num_steps, batch_size, perturb, generator=None, device="cpu"):
        """(batch_size, num_steps) integer timesteps, strictly decreasing per row."""
        raise NotImplementedError

    def rollout_inputs(self, model, pooled, empty_embeds, batch, resolution):
        """(callable model, cond, negative cond, buffer extras) of one rollout batch: what the
        rollout passes as `added_cond_kwargs` and what each stored trajectory keeps beside its
        text embedding."""
        raise NotImplementedError

    def expert_extras(self, pooled, batch, resolution, device):
        """The buffer extras of an expert batch used without a rollout (SFT)."""
        raise NotImplementedError

    # --- pipelines
    @classmethod
    def pipeline_type(cls):
        import diffusers
        return getattr(diffusers, cls.pipeline_class)

    def validation_pipeline(self, text, vae, model, scheduler):
        """A stock pipeline on the loaded parts (validation during training)."""
        raise NotImplementedError

    @classmethod
    def load_pipeline(cls, source, *, denoiser=None, denoiser_subfolder=None, denoiser_variant=None, variant=None,
                      dtype=torch.float32, safety_checker=False, vae=None, revision=None, cache_dir=None):
        """The stock pipeline from `source`, with `denoiser` (a folder or hub id) in place of the
        pipeline's own (inference.py, tools/export_pipeline.py)."""
        raise NotImplementedError

    text_encoder_folders = ()   # the pipeline's text encoder sub-folders (inference's weight fingerprints)

    @classmethod
    def vae_location(cls, source, vae=None):
        """(source, subfolder) of the VAE `load_vae` reads (inference's weight fingerprints)."""
        return (vae, None) if vae else (source, "vae")

    # --- the model card
    @classmethod
    def card_snippet(cls, base, folder, *, lora):
        """Python that loads the checkpoint sub-folder `folder` (a path relative to the card)
        into a stock pipeline on `base`."""
        pipeline, part = cls.pipeline_class, cls.denoiser_folder
        if lora:
            return (f"import torch\nfrom diffusers import {pipeline}\n\n"
                    f"pipe = {pipeline}.from_pretrained({base!r}, torch_dtype=torch.float16)\n"
                    f"pipe.load_lora_weights({folder!r})\n")
        model = cls.denoiser_class.__name__
        return (f"import torch\nfrom diffusers import {pipeline}, {model}\n\n"
                f"{part} = {model}.from_pretrained({folder!r}, torch_dtype=torch.float16)\n"
                f"pipe = {pipeline}.from_pretrained({base!r}, {part}={part}, torch_dtype=torch.float16)\n")


def pipeline_from(cls, source, what, *, denoiser_name, denoiser, dtype, variant=None, **kwargs):
    """`cls.from_pretrained(source, ...)` with `denoiser` (a loaded model or None) in place."""
    if variant:
        kwargs["variant"] = variant
    if denoiser is not None:
        kwargs[denoiser_name] = denoiser
    pipe = from_pretrained(cls, source, what, dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe

