"""Tiny SD1.5/SDXL pipelines and the small expert and prompt folder datasets.

The models are the real classes (diffusers, transformers) built from small configs with
random weights. The CLIP tokenizer is the real 49,408-token vocabulary, rebuilt offline
from the BPE file open_clip ships. Same seed, same files.
"""
import gzip
import json
import os
import random

import torch

CAPTIONS = [
    "a red fox sitting in fresh snow, golden hour",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen with a soft boiled egg, studio photo",
    "a lighthouse on a cliff during a storm, oil painting",
    "a cyberpunk street market at night, neon lights",
    "a watercolor of cherry blossoms over a quiet river",
    "a cute robot watering plants in a greenhouse",
    "portrait of an old sailor with a pipe, dramatic lighting",
    "a castle made of candy floating in pink clouds",
    "a minimalist poster of a mountain and the sun",
    "a tiger made of origami paper, macro shot",
    "an ancient library with endless bookshelves, concept art",
]


# --------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode():
    # The byte <-> printable-character table of GPT-2/CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(out):
    """The real CLIP tokenizer (49,408 tokens), from open_clip's bundled BPE merges."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(out, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt"), model_max_length=77,
                              pad_token="<|endoftext|>")
    assert len(tokenizer) == 49408, len(tokenizer)
    return tokenizer


# --------------------------------------------------------------------------- models
SD15_SCHEDULER = dict(  # stable-diffusion-v1-5/scheduler/scheduler_config.json
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
)


def tiny_vae():
    from diffusers import AutoencoderKL
    # Four blocks: the same 8x downsampling as the real VAE, so latent = resolution / 8.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64, scaling_factor=0.18215,
    )


def tiny_text_encoder(projection=False, hidden=32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def write_sd15(out, seed=0):
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(), tokenizer=write_clip_tokenizer(os.path.join(out, "tokenizer")),
        unet=unet, scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)


def write_sdxl(out, seed=0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=4,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size/crop ids + pooled text
    )
    tokenizer = write_clip_tokenizer(os.path.join(out, "tokenizer"))
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(), text_encoder_2=tiny_text_encoder(projection=True),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading"),
    )
    pipe.save_pretrained(out)


# --------------------------------------------------------------------------- datasets
def random_image(rng, width, height):
    """A smooth random picture (gradient plus a few shapes), so VAEs see structure."""
    from PIL import Image, ImageDraw
    c0 = [rng.randrange(256) for _ in range(3)]
    c1 = [rng.randrange(256) for _ in range(3)]
    image = Image.linear_gradient("L").resize((width, height))
    image = Image.merge("RGB", [image.point(lambda v, a=a, b=b: a + (b - a) * v // 255) for a, b in zip(c0, c1)])
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(1, 4)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(4, max(5, width // 2)), y0 + rng.randrange(4, max(5, height // 2))
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    return image


def write_experts(out, seed=0, count=8):
    """Expert folder dataset: `OUT/<i>/caption.txt` + one image of varied size and format."""
    rng = random.Random(seed)
    digits = len(str(count - 1))
    for i in range(count):
        folder = os.path.join(out, f"{i:0{digits}d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "caption.txt"), "w") as f:
            f.write(CAPTIONS[i % len(CAPTIONS)] + "\n")
        width, height = rng.choice([(64, 64), (96, 64), (64, 80), (128, 96), (72, 72)])
        ext = "jpg" if i % 4 == 3 else "png"
        random_image(rng, width, height).save(os.path.join(folder, f"{i:0{digits}d}.{ext}"))


def write_prompts(out, seed=0, count=4):
    """Prompt folder dataset (validation / inference): `OUT/<i>/caption.txt` only."""
    rng = random.Random(seed + 1)
    captions = rng.sample(CAPTIONS, count)
    digits = len(str(count - 1))
    for i, caption in enumerate(captions):
        folder = os.path.join(out, f"{i:0{digits}d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "caption.txt"), "w") as f:
            f.write(caption + "\n")
