"""Memory of Diffusion-DRO training for the SD1.5 UNet under each precision mode.

    python bench/memory.py [--measure] [--latent 16]

Part 1 (always): bytes of weights, gradients, AdamW state and EMA per GPU from parameter
counts of the real architectures (random weights, built on the meta device, so instant).
Part 2 (--measure): peak resident memory of one real micro-step of the full-size SD1.5
UNet (859.5 M parameters, random weights) on the CPU in the default bf16 mode, at a small
latent size: reference forward, trainable forward + backward, AdamW step. The excess over
the static bytes is the activations' share at that latent size.
"""
import argparse
import gc
import resource
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

GiB = 1024 ** 3
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408)


def count(module_fn):
    with torch.device("meta"):
        return sum(p.numel() for p in module_fn().parameters())


def table(unet, vae, text):
    """(mode, rows of (item, GiB on each GPU)) for the precision modes train.py offers."""
    frozen_bf16 = 2 * (vae + text)
    modes = {
        # weights, grads, AdamW m+v, EMA (on GPU unless offloaded), reference, rollout copy
        "bf16 (default, numerics of the paper's code)": (2, 2, 4, 2, 2, 2),
        "bf16 + --fp32_master_weights": (4, 4, 8, 4, 2, 2),
        "fp16 (fp32 master weights, as the paper's code)": (4, 4, 8, 4, 2, 2),
        "no (fp32 everything)": (4, 4, 8, 4, 4, 4),
    }
    out = []
    for mode, (w, g, adam, ema, ref, roll) in modes.items():
        rows = [("trainable weights", w * unet), ("gradients", g * unet), ("AdamW moments", adam * unet),
                ("reference UNet", ref * unet), ("rollout UNet (paper's code; rpo shares it by default)", roll * unet),
                ("EMA (0 on GPU with --offload_ema)", ema * unet), ("text encoder + VAE", frozen_bf16 if w == 2 or ref == 2 else 2 * frozen_bf16)]
        out.append((mode, [(name, b / GiB) for name, b in rows]))
    return out


def max_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def measure(latent, pairs):
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: max RSS must not keep an fp32 copy's peak
    unet = UNet2DConditionModel(**SD15_UNET)
    ref = UNet2DConditionModel(**SD15_UNET).requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    gc.collect()
    base = max_rss_gib()
    x = torch.randn(2 * pairs, 4, latent, latent, dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (2 * pairs,))
    c = torch.randn(2 * pairs, 77, 768, dtype=torch.bfloat16)
    tic = time.perf_counter()
    with torch.no_grad():
        ref(x, t, c)
    loss = unet(x, t, c).sample.float().pow(2).mean()
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - tic
    return base, max_rss_gib(), seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    unet = count(lambda: UNet2DConditionModel(**SD15_UNET))
    vae = count(lambda: AutoencoderKL(**SD15_VAE))
    text = count(lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT)))
    print(f"parameters: UNet {unet / 1e6:.1f} M, VAE {vae / 1e6:.1f} M, text encoder {text / 1e6:.1f} M\n")
    for mode, rows in table(unet, vae, text):
        public = sum(b for _, b in rows)
        ours = public - rows[4][1] - rows[5][1]  # shared rollout model, offloaded EMA
        print(f"| {mode} | " + " | ".join(f"{b:.2f}" for _, b in rows) + f" | {public:.2f} | {ours:.2f} |")
    print("\ncolumns: " + ", ".join(name for name, _ in table(unet, vae, text)[0][1]) +
          ", total as the paper's code (basiclab/DiffusionDRO) holds it, total in rpo's default"
          " (shared rollout, EMA offloaded); GiB per GPU")
    if args.measure:
        base, peak, seconds = measure(args.latent, args.pairs)
        grads_and_adam = (2 + 4) * unet / GiB  # allocated during the step, bf16
        print(f"\nmeasured on the CPU, bf16, latent {args.latent}x{args.latent}, {args.pairs} pairs ({2 * args.pairs} UNet samples), "
              f"one micro-step in {seconds:.1f} s:")
        print(f"  resident after building trainable + reference UNet: {base:.2f} GiB (static count {4 * unet / GiB:.2f})")
        print(f"  peak during the micro-step: {peak:.2f} GiB = + {grads_and_adam:.2f} gradients and AdamW state "
              f"+ {peak - base - grads_and_adam:.2f} activations and workspace")

if __name__ == "__main__":
    main()
