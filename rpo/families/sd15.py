"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet on a DDPM noise schedule
(ε or v-prediction), the `StableDiffusionPipeline` layout."""
import torch
from diffusers import UNet2DConditionModel

from rpo.cli import UserError
from rpo.diffusion.family import UNetFamily, read_schedule_config
from rpo.diffusion.schedulers import PerSampleScheduler, make_timesteps
from rpo.families.base import Family, pipeline_from
from rpo.models import hub_options, load_text_encoders, load_tokenizer, load_unet, load_vae

# diffusers' examples/text_to_image/train_text_to_image_lora.py targets the attention projections.
UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


class SD15(UNetFamily, Family):
    name = "sd15"
    pipeline_classes = ("StableDiffusionPipeline",)
    pipeline_class = "StableDiffusionPipeline"
    denoiser_folder, denoiser_class = "unet", UNet2DConditionModel
    lora_targets = UNET_LORA_TARGETS
    card_tag = "stable-diffusion"
    text_encoder_folders = ("text_encoder",)

    @classmethod
    def from_pretrained(cls, source, *, revision=None, cache_dir=None):
        config, _ = read_schedule_config(source, revision=revision, cache_dir=cache_dir)
        return cls(config)

    @classmethod
    def refusals(cls, args):
        # resample noises the policy's own x0 at a continuous level: FlowMatchFamily.training_timesteps
        return {"--buffer_mode resample": "it draws flow-matching noise levels (SD3 and later)"} \
            if args.get("buffer_mode") == "resample" else {}

    # --- loading
    def load_text(self, source, *, variant=None, dtype=torch.float32, device="cpu", captions=(), keep_encoders=True,
                  **hub):
        return load_text_encoders(source, self.two_encoders, variant, dtype, **hub).to(device)

    def load_vae(self, source, *, variant=None, dtype=torch.float32, vae=None, **hub):
        return load_vae(source, self.two_encoders, variant, dtype, vae=vae, **hub)

    two_encoders = False  # SDXL: CLIP-L + CLIP-G (rpo.models.TextEncoders)

    # --- rollouts
    def rollout_sampler(self, name):
        return PerSampleScheduler.from_name(name, self.schedule)

    def rollout_timesteps(self, name, num_steps, batch_size, perturb, generator=None, device="cpu"):
        return make_timesteps(name, self.schedule, num_steps, batch_size, perturb, generator=generator, device=device)

    def rollout_inputs(self, model, pooled, empty_embeds, batch, resolution):
        return model, None, None, {}

    def expert_extras(self, pooled, batch, resolution, device):
        return {}

    # --- pipelines
    def validation_pipeline(self, text, vae, model, scheduler):
        return self.pipeline_type()(text_encoder=text.encoders[0], tokenizer=text.tokenizers[0], vae=vae, unet=model,
                                    scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)

    @classmethod
    def pipeline_parts(cls, source, *, variant, dtype, vae, hub):
        """Tokenizers (checked against their encoders, as training loads them) and the VAE."""
        return {"tokenizer": load_tokenizer(source, **hub),
                "vae": load_vae(source, False, variant, dtype, vae=vae, **hub)}

    @classmethod
    def load_pipeline(cls, source, *, denoiser=None, denoiser_subfolder=None, denoiser_variant=None, variant=None,
                      dtype=torch.float32, safety_checker=False, vae=None, revision=None, cache_dir=None):
        hub = hub_options(revision, cache_dir)
        kwargs = {**cls.pipeline_parts(source, variant=variant, dtype=dtype, vae=vae, hub=hub), **hub}
        model = None if denoiser is None else load_unet(denoiser, subfolder=denoiser_subfolder, variant=denoiser_variant,
                                                        dtype=dtype, what="--unet", cache_dir=cache_dir)
        kwargs.update(cls.pipeline_extras(safety_checker))
        pipe = pipeline_from(cls.pipeline_type(), source, f"{cls.pipeline_class}", denoiser_name="unet",
                             denoiser=model, dtype=dtype, variant=variant, **kwargs)
        if safety_checker and getattr(pipe, "safety_checker", None) is None:
            raise UserError(f"--safety_checker: the pipeline {source} has no safety checker")
        check_unet_fits(pipe, denoiser or source)
        return pipe

    @classmethod
    def pipeline_extras(cls, safety_checker):
        if safety_checker:
            return {}
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}



def check_unet_fits(pipe, unet_source):
    """A UNet of another model family fails deep inside the first step; say so now instead."""
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    text_dim = sum(e.config.hidden_size for e in encoders)
    if pipe.unet.config.cross_attention_dim != text_dim:
        raise UserError(f"--unet {unet_source} does not fit the pipeline: it attends to {pipe.unet.config.cross_attention_dim}-d "
                        f"text features, the text encoder(s) give {text_dim}-d (SD1.5 vs SDXL?)")
    if pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
        raise UserError(f"--unet {unet_source} takes {pipe.unet.config.in_channels} latent channels, "
                        f"the VAE gives {pipe.vae.config.latent_channels}")
