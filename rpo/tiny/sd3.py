"""Tiny SD3-shaped pipeline (`python -m rpo.tiny sd3 OUT`): a `StableDiffusion3Pipeline`
folder in the real on-disk layout, so the flow-matching path (rpo/diffusion/flow.py)
runs the real loaders offline (docs/design.md, "Working offline", "Model families").

- transformer: `SD3Transformer2DModel`, 16 latent channels, patch 2;
- vae: `AutoencoderKL` with 16 latent channels, SD3's scaling and shift factors and no
  quant convs (as SD3's VAE), four blocks: latent = resolution / 8;
- text_encoder (CLIP-L) and text_encoder_2 (CLIP-G): `CLIPTextModelWithProjection` with
  the real CLIP vocabulary (rpo/tiny/pipelines.py); text_encoder_3: `T5EncoderModel`
  with a small Unigram vocabulary built offline from the kit's captions;
- scheduler: `FlowMatchEulerDiscreteScheduler(shift=3.0)`, SD3's.

Sizes are tied the way the pipeline ties them: the two CLIP hidden states are
concatenated (16 + 16) and zero-padded to T5's width, so T5's d_model = the
transformer's joint_attention_dim = 32 >= 32; the pooled projection is the two CLIP
projections concatenated (16 + 16 = pooled_projection_dim); caption_projection_dim must
be the transformer's inner width (heads x head dim).
"""
import os
import re

import torch

from rpo.tiny.pipelines import CAPTIONS, tiny_text_encoder, write_clip_tokenizer

# stabilityai/stable-diffusion-3-medium-diffusers vae/config.json and scheduler_config.json
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609
SD3_SHIFT = 3.0
CLIP_WIDTH, T5_WIDTH = 16, 32


def tiny_sd3_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32, scaling_factor=SD3_VAE_SCALING,
        shift_factor=SD3_VAE_SHIFT, use_quant_conv=False, use_post_quant_conv=False,
    )


def tiny_sd3_transformer():
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=16,
    )


def t5_vocabulary():
    """(piece, score) pairs of a small Unigram vocabulary: T5's three specials first (pad 0,
    eos 1, unk 2, as in T5), then every word of the kit's captions and single letters (so
    any lower-case text tokenizes), all with the SentencePiece word-start marker."""
    words = sorted({w for c in CAPTIONS for w in re.findall(r"[a-z]+|[^a-z\s]", c.lower())})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789,.")
    pieces = ["\u2581" + w for w in words] + ["\u2581" + c for c in letters] + letters + ["\u2581"]
    seen, vocab = set(), [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    for p in pieces:
        if p not in seen:
            seen.add(p)
            vocab.append((p, -1.0 if len(p) > 2 else -10.0))  # whole words beat spelling out
    return vocab


def write_t5_tokenizer(out, model_max_length=256):
    from transformers import T5Tokenizer
    tokenizer = T5Tokenizer(vocab=t5_vocabulary(), extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(out)
    return T5Tokenizer.from_pretrained(out)  # what the pipeline will read back


def tiny_t5(vocab_size):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def write_sd3(out, seed=0):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    torch.manual_seed(seed)
    clip_tokenizer = write_clip_tokenizer(os.path.join(out, "tokenizer"))
    t5_tokenizer = write_t5_tokenizer(os.path.join(out, "tokenizer_3"))
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT),
        vae=tiny_sd3_vae(), text_encoder=tiny_text_encoder(projection=True, hidden=CLIP_WIDTH), tokenizer=clip_tokenizer,
        text_encoder_2=tiny_text_encoder(projection=True, hidden=CLIP_WIDTH), tokenizer_2=clip_tokenizer,
        text_encoder_3=tiny_t5(len(t5_tokenizer)), tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(out)
