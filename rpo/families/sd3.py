"""Stable Diffusion 3 / 3.5: an MMDiT transformer trained by flow matching (velocity
target, Euler rollouts on SD3's shifted σ grid), three text encoders (CLIP-L, CLIP-G, T5)
whose caption embeddings training caches once, the `StableDiffusion3Pipeline` layout."""
import torch
from diffusers import SD3Transformer2DModel

from rpo.cli import UserError
from rpo.diffusion.flow import FlowMatchFamily, read_flow_schedule
from rpo.families.base import Family, pipeline_from
from rpo.models import hub_options, load_tokenizer, load_vae
from rpo.models_sd3 import load_sd3_text_encoders, load_transformer

# diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py: the joint attention projections
SD3_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


class SD3(FlowMatchFamily, Family):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_folder, denoiser_class = "transformer", SD3Transformer2DModel
    lora_targets = SD3_LORA_TARGETS
    lora_converts = False  # the SD3 LoRA example saves peft's state dict unconverted
    card_tag = "stable-diffusion-3"
    text_encoder_folders = ("text_encoder", "text_encoder_2", "text_encoder_3")

    @classmethod
    def from_pretrained(cls, source, *, revision=None, cache_dir=None):
        return cls(read_flow_schedule(source, revision=revision, cache_dir=cache_dir))

    @classmethod
    def refusals(cls, args):
        """What the flow path does not do yet (README, 'SD3.5 Medium')."""
        why = "not implemented for the SD3 transformer yet (README, 'SD3.5 Medium')"
        unsupported = {"--objective sft": args.get("objective") == "sft",
                       "--save_merged_unet": args.get("save_merged_unet"),
                       "--unet": bool(args.get("unet")), "--reference_unet": bool(args.get("reference_unet")),
                       "--vae": bool(args.get("vae")), "--export_pipeline": bool(args.get("export_pipeline"))}
        return {name: why for name, on in unsupported.items() if on}

    # --- loading
    def load_text(self, source, *, variant=None, dtype=torch.float32, device="cpu", captions=(), keep_encoders=True,
                  **hub):
        """Every caption training needs (and "" for dropped prompts) is encoded once; T5 then
        leaves memory unless a validation pipeline will encode its own prompts."""
        text = load_sd3_text_encoders(source, variant, dtype, **hub).to(device)
        text.precompute(list(captions) + [""])
        if not keep_encoders:
            text.release_encoders()
        return text

    def load_vae(self, source, *, variant=None, dtype=torch.float32, vae=None, **hub):
        return load_vae(source, False, variant, dtype, vae=vae, **hub)

    # --- rollouts
    def rollout_sampler(self, name):
        return self.sampler()

    def rollout_timesteps(self, name, num_steps, batch_size, perturb, generator=None, device="cpu"):
        return FlowMatchFamily.rollout_timesteps(self, num_steps, batch_size, perturb, generator=generator,
                                                 device=device)

    def rollout_inputs(self, model, pooled, empty_embeds, batch, resolution):
        """The pooled embedding conditions the transformer and is stored with each trajectory."""
        cond, neg, extras = self.rollout_conditioning(pooled, empty_embeds, pooled.shape[0])
        return self.denoiser(model), cond, neg, extras

    def expert_extras(self, pooled, batch, resolution, device):
        return {"pooled_embeds": pooled}

    # --- pipelines
    def validation_pipeline(self, text, vae, model, scheduler):
        return text.pipeline(model, vae, scheduler)

    @classmethod
    def load_pipeline(cls, source, *, denoiser=None, denoiser_subfolder=None, denoiser_variant=None, variant=None,
                      dtype=torch.float32, safety_checker=False, vae=None, revision=None, cache_dir=None):
        if safety_checker:
            raise UserError(f"{source} is an SD3 pipeline: --safety_checker does not apply")
        hub = hub_options(revision, cache_dir)
        kwargs = {"tokenizer": load_tokenizer(source, **hub),
                  "tokenizer_2": load_tokenizer(source, "tokenizer_2", "text_encoder_2", **hub), **hub}
        model = None if denoiser is None else load_transformer(denoiser, denoiser_subfolder, denoiser_variant, dtype,
                                                               what="--unet (SD3 transformer)", cache_dir=cache_dir)
        pipe = pipeline_from(cls.pipeline_type(), source, "SD3 pipeline", denoiser_name="transformer", denoiser=model,
                             dtype=dtype, variant=variant, **kwargs)
        if pipe.transformer.config.in_channels != pipe.vae.config.latent_channels:
            raise UserError(f"the transformer takes {pipe.transformer.config.in_channels} latent channels, "
                            f"the VAE gives {pipe.vae.config.latent_channels}")
        return pipe
