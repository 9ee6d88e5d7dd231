"""Models and data as researchers bring them, built without `rpo.tiny`.

`write_independent_sd15` writes a small SD1.5-class pipeline the way a derivative or a
test pipeline on the hub looks: a byte-level CLIP tokenizer (no merges, 514 tokens), a
text encoder whose embedding has exactly that many rows, a VAE that downsamples 2x (as
the hub's tiny test pipelines do, not 8x), and one of three scheduler configs that differ
from stock SD1.5 in ways that matter to a trainer:

- "pndm":   a PNDMScheduler saved by diffusers, so its config has *no* `clip_sample`
            (PNDM has no such option); a DDPMScheduler made from it defaults to clipping.
- "karras": a DPMSolverMultistepScheduler with `use_karras_sigmas: true`.
- "vpred":  an SD2.x-v style DDIMScheduler with `prediction_type: v_prediction` (and a
            UNet with linear attention projections, as SD2.x has).

`write_imagefolder_experts` writes expert images of non-square sizes in the `datasets`
"imagefolder" layout: the images plus `metadata.jsonl` (or `metadata.csv`) holding
`file_name` and `text`.
"""
import csv
import json
import os

import numpy as np
import torch
from PIL import Image

CAPTIONS = ["a cat on a red sofa", "two boats at dawn", "a blue door, photo", "snow on pine trees",
            "a bowl of lemons", "a dog running on sand", "an old clock tower", "green hills under clouds"]
SCHEDULER_KINDS = ("pndm", "karras", "vpred")
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def byte_to_unicode():
    """GPT-2/CLIP's table from the 256 byte values to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_byte_tokenizer(out, vocab=514):
    """A CLIP tokenizer with no merges: every byte alone and at a word's end, plus the two
    specials (2 * 256 + 2 = 514 tokens). `vocab` > 514 appends unused filler tokens."""
    from transformers import CLIPTokenizer
    if vocab < 514:
        raise ValueError("a byte-level CLIP vocabulary needs at least 514 tokens")
    chars = list(byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [f"<|filler{i}|>" for i in range(vocab - 514)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(out, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>")


def scheduler_of(kind):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
    if kind == "pndm":
        return PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    if kind == "karras":
        return DPMSolverMultistepScheduler(**SD_BETAS, use_karras_sigmas=True, steps_offset=1)
    if kind == "vpred":  # stabilityai/stable-diffusion-2-1's scheduler, shape for shape
        return DDIMScheduler(**SD_BETAS, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                             steps_offset=1)
    raise ValueError(f"scheduler must be one of {SCHEDULER_KINDS}, got {kind!r}")


def write_independent_sd15(out, *, scheduler="pndm", vocab=514, seed=0):
    """A StableDiffusionPipeline folder (model_index.json and one folder per part) at `out`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = str(out)
    noise = scheduler_of(scheduler)
    torch.manual_seed(seed)
    tokenizer = write_byte_tokenizer(os.path.join(out, "tokenizer"), vocab)
    hidden = 24
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
        max_position_embeddings=77, projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=4,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=hidden, attention_head_dim=(2, 4),
        use_linear_projection=scheduler == "vpred")
    vae = AutoencoderKL(  # two blocks: latents are half the image side (vae_scale_factor 2)
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32, scaling_factor=0.5)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=noise,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- expert images
def gradient_image(width, height, index, sixteen_bit=False):
    """A deterministic picture: horizontal and vertical ramps and a per-item tint.

    8-bit: RGB. 16-bit: a grayscale 16-bit PNG (mode I;16) whose values use all 16 bits,
    so a conversion that clips to 255 (instead of scaling) shows."""
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    if sixteen_bit:
        values = (x * 0.7 + y * 0.3) * 65535 * (0.5 + 0.5 * ((index % 3) + 1) / 3)
        return Image.fromarray(np.clip(values, 0, 65535).astype(np.uint16))  # uint16 -> mode I;16
    tint = np.array([(37 * index) % 256, (91 * index) % 256, (53 * index) % 256], dtype=np.float64)
    rgb = np.stack([x * 255 + 0 * y, y * 255 + 0 * x, (x + y) * 127.5], axis=-1) * 0.6 + tint * 0.4
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8))


def write_imagefolder_experts(out, sizes=((40, 24), (24, 48)), n=4, sixteen_bit=False, metadata="jsonl",
                              caption_column="text"):
    """`n` images cycling through `sizes` (width, height) and a metadata file; returns
    [(file_name, caption)] in file-name order. The metadata rows are written in reverse
    order, so a reader that kept file order instead of sorting would show it."""
    out = str(out)
    os.makedirs(out, exist_ok=True)
    rows = []
    for i in range(n):
        width, height = sizes[i % len(sizes)]
        name = f"{i:03d}.png"
        gradient_image(width, height, i, sixteen_bit).save(os.path.join(out, name))
        rows.append({"file_name": name, caption_column: CAPTIONS[i % len(CAPTIONS)]})
    write_metadata(out, rows[::-1], metadata)
    return [(r["file_name"], r[caption_column]) for r in rows]


def write_metadata(out, rows, kind="jsonl"):
    if kind == "jsonl":
        with open(os.path.join(out, "metadata.jsonl"), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    else:
        with open(os.path.join(out, "metadata.csv"), "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def write_folder_experts(out, imagefolder):
    """The same experts in rpo's folder-per-item layout (`<name>/caption.txt` + image)."""
    out = str(out)
    names = sorted(f for f in os.listdir(imagefolder) if f.endswith(".png"))
    captions = {}
    with open(os.path.join(imagefolder, "metadata.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            captions[row["file_name"]] = row["text"]
    for name in names:
        folder = os.path.join(out, os.path.splitext(name)[0])
        os.makedirs(folder)
        with open(os.path.join(folder, "caption.txt"), "w", encoding="utf-8") as f:
            f.write(captions[name] + "\n")
        with open(os.path.join(imagefolder, name), "rb") as src, open(os.path.join(folder, name), "wb") as dst:
            dst.write(src.read())
    return out
