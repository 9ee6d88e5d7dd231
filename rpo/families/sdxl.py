"""Stable Diffusion XL: two CLIP text encoders (penultimate states concatenated, pooled
projection of the second), size and crop conditioning, the `StableDiffusionXLPipeline`
layout; the hub default VAE is the fp16-fix one (as the paper's code)."""
import os

import torch

from rpo.cli import UserError
from rpo.families.sd15 import SD15
from rpo.models import SDXL_VAE, load_tokenizer, load_vae


class SDXL(SD15):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    pipeline_class = "StableDiffusionXLPipeline"
    card_tag = "stable-diffusion-xl"
    text_encoder_folders = ("text_encoder", "text_encoder_2")
    two_encoders = True

    def rollout_inputs(self, model, pooled, empty_embeds, batch, resolution):
        """Rollouts use the pipeline's default size conditioning (what generation sees);
        the stored trajectory keeps the expert's own size and crop ids for training."""
        b, res, device = pooled.shape[0], resolution, pooled.device
        default_ids = torch.tensor([res, res, 0, 0, res, res], device=device).repeat(b, 1)
        cond = {"text_embeds": pooled, "time_ids": default_ids}
        neg = None
        if empty_embeds is not None:
            neg = {"text_embeds": empty_embeds[1].expand(b, -1), "time_ids": default_ids}
        return model, cond, neg, self.expert_extras(pooled, batch, resolution, device)

    def expert_extras(self, pooled, batch, resolution, device):
        b = pooled.shape[0]
        ids = torch.cat([batch["original_size"], batch["crop_top_left"], torch.tensor([[resolution, resolution]] * b)], 1)
        return {"pooled_embeds": pooled, "time_ids": ids.to(device)}

    def validation_pipeline(self, text, vae, model, scheduler):
        return self.pipeline_type()(text_encoder=text.encoders[0], text_encoder_2=text.encoders[1],
                                    tokenizer=text.tokenizers[0], tokenizer_2=text.tokenizers[1], vae=vae, unet=model,
                                    scheduler=scheduler)

    @classmethod
    def pipeline_parts(cls, source, *, variant, dtype, vae, hub):
        return {"tokenizer": load_tokenizer(source, **hub),
                "tokenizer_2": load_tokenizer(source, "tokenizer_2", "text_encoder_2", **hub),
                "vae": load_vae(source, True, variant, dtype, vae=vae, **hub)}

    @classmethod
    def pipeline_extras(cls, safety_checker):
        if safety_checker:
            raise UserError("--safety_checker: the SDXL pipeline has no safety checker")
        return {"add_watermarker": False}  # the invisible watermark would alter pixels depending on an optional package

    @classmethod
    def vae_location(cls, source, vae=None):
        if vae is None and not os.path.isdir(source):  # rpo.models.load_vae: the fp16-fix VAE for a hub SDXL
            return SDXL_VAE, None
        return super().vae_location(source, vae)
