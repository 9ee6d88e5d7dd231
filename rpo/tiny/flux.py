"""Tiny FLUX.1-shaped pipelines (`python -m rpo.tiny flux OUT`, `python -m rpo.tiny flux-schnell OUT`):
a `FluxPipeline` folder in the real on-disk layout, so the FLUX pieces (rpo/models_flux.py,
rpo/diffusion/flux_flow.py) run the real loaders offline (docs/design.md, "Working offline").

- transformer: `FluxTransformer2DModel` with in_channels = 4 x 16 (2x2-packed 16-channel
  latents), patch_size 1, the rotary axes summing to the head width as FLUX's (16 + 56 + 56
  = 128); "dev" has the guidance embedding (`guidance_embeds=True`), "schnell" has not;
- vae: `AutoencoderKL` with 16 latent channels, FLUX's scaling and shift factors, no quant
  convs (as FLUX's VAE), four blocks: latent = resolution / 8;
- text_encoder: `CLIPTextModel` (FLUX uses only its pooled output) with the real CLIP
  vocabulary; text_encoder_2: `T5EncoderModel` with the kit's small Unigram vocabulary
  (rpo/tiny/sd3.py), tokenizer_2 saved as `T5TokenizerFast` as in the real repositories;
- scheduler: `FlowMatchEulerDiscreteScheduler` with the real scheduler_config.json of
  FLUX.1-dev (dynamic, resolution-dependent shift) or of FLUX.1-schnell (shift 1, static).

Sizes are tied the way the model ties them: T5's d_model = joint_attention_dim; CLIP's
hidden size = pooled_projection_dim; sum(axes_dims_rope) = attention_head_dim.
"""
import os

import torch

from rpo.tiny.pipelines import tiny_text_encoder, write_clip_tokenizer
from rpo.tiny.sd3 import tiny_t5, write_t5_tokenizer

# black-forest-labs/FLUX.1-dev vae/config.json (FLUX.1-schnell's VAE is the same)
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159
# black-forest-labs/FLUX.1-dev and FLUX.1-schnell scheduler/scheduler_config.json
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                              max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
T5_MAX_LENGTH = 512  # FLUX's tokenizer_2 model_max_length and FluxPipeline's max_sequence_length cap
CLIP_WIDTH, T5_WIDTH = 32, 32
VARIANTS = {"dev": (True, FLUX_DEV_SCHEDULER), "schnell": (False, FLUX_SCHNELL_SCHEDULER)}


def tiny_flux_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32, scaling_factor=FLUX_VAE_SCALING,
        shift_factor=FLUX_VAE_SHIFT, use_quant_conv=False, use_post_quant_conv=False,
    )


def tiny_flux_transformer(guidance_embeds):
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )


def write_flux(out, seed=0, variant="dev"):
    """A tiny FluxPipeline folder: `variant` "dev" (guidance embedding, dynamic shift) or
    "schnell" (neither)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import T5TokenizerFast
    guidance_embeds, scheduler = VARIANTS[variant]
    torch.manual_seed(seed)
    clip_tokenizer = write_clip_tokenizer(os.path.join(out, "tokenizer"))
    slow = os.path.join(out, "tokenizer_2")
    write_t5_tokenizer(slow, model_max_length=T5_MAX_LENGTH)
    t5_tokenizer = T5TokenizerFast.from_pretrained(slow)  # converted offline from the slow files
    pipe = FluxPipeline(
        transformer=tiny_flux_transformer(guidance_embeds), scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
        vae=tiny_flux_vae(), text_encoder=tiny_text_encoder(hidden=CLIP_WIDTH), tokenizer=clip_tokenizer,
        text_encoder_2=tiny_t5(len(t5_tokenizer)), tokenizer_2=t5_tokenizer,
    )
    pipe.save_pretrained(out)


def write_flux_schnell(out, seed=0):
    write_flux(out, seed=seed, variant="schnell")
