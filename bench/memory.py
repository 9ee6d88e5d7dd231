"""Memory of Diffusion-DRO training for the SD1.5 UNet under each precision mode, and for
SD1.5 / SDXL with full fine-tuning or LoRA.

    python bench/memory.py [--measure] [--latent 16] [--measure_sdxl_lora]

Part 1 (always): bytes of weights, gradients, AdamW state and EMA per GPU from parameter
counts of the real architectures (random weights, built on the meta device, so instant).
Part 2 (--measure): peak resident memory of one real micro-step of the full-size SD1.5
UNet (859.5 M parameters, random weights) on the CPU in the default bf16 mode, at a small
latent size: reference forward, trainable forward + backward, AdamW step. The excess over
the static bytes is the activations' share at that latent size.
Part 3 (always): SD1.5 and SDXL, full fine-tuning and LoRA (rank 4 on diffusers' default
targets, the adapter counted by adding it with peft to the meta-device UNet), bf16 default.
Part 5 (always): SD3.5 Medium, full fine-tuning and LoRA (rank 4 on the same targets): the
transformer built on the meta device from SD35M_TRANSFORMER, the text encoders from their
configs, in the default bf16 mode.
Part 6 (always): FLUX.1-dev and FLUX.1-schnell LoRA over a bf16, an 8-bit or an NF4 frozen base,
at 512 and 1024 px: static bytes from parameter counts (transformer built on the meta device
from FLUX_DEV_TRANSFORMER), plus the activations one trainable forward saves for backward,
counted on the meta device (no memory, no compute) with and without gradient checkpointing.
Part 4 (--measure_sdxl_lora): the same micro-step for the full-size SDXL UNet (2.567 B
parameters, random weights) with a rank-4 LoRA: one bf16 UNet, the reference being the base
with adapters disabled.
"""
import argparse
import gc
import os
import resource
import sys
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # rpo, from a checkout

GiB = 1024 ** 3
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408)


# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the architecture keys)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
                 block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
# the second text encoder of SDXL (OpenCLIP ViT-bigG/14 text tower, text_encoder_2/config.json)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu")


# stabilityai/stable-diffusion-3.5-medium transformer/config.json (the architecture keys); every
# key is an SD3Transformer2DModel.__init__ argument (diffusers 0.42.1). Layers 0..12 of 24 are
# MMDiT-X blocks with a second self-attention (dual_attention_layers).
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# SD3's VAE: SD1.5's layout with 16 latent channels and no quant convs (vae/config.json)
SD3_VAE = dict(SD15_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
# text_encoder_3: the encoder of google/t5-v1_1-xxl (text_encoder_3/config.json)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu")


# black-forest-labs/FLUX.1-dev transformer/config.json (the architecture keys); every value
# but guidance_embeds is FluxTransformer2DModel.__init__'s default in diffusers 0.42.1
# (tests/test_flux.py checks it). FLUX.1-schnell: the same without the guidance embedding.
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_SCHNELL_TRANSFORMER = dict(FLUX_DEV_TRANSFORMER, guidance_embeds=False)
FLUX_T5_LENGTH = 512  # FluxPipeline's max_sequence_length (dev's default; schnell is often run at 256)
# (bytes per weight, bytes per output row) of a quantized nn.Linear: torchao 0.18 int8 weight-only
# (Int8Tensor: int8 qdata + one float32 scale per output row; tests/test_flux.py checks both on the
# tiny kit) and bitsandbytes NF4 (4 bit + one fp32 absmax per block of 64, BitsAndBytesConfig's
# default bnb_4bit_use_double_quant=False). Other parameters and all biases stay bf16.
FLUX_BASES = {"bf16": None, "8-bit (torchao int8)": (1.0, 4), "NF4 (bitsandbytes)": (0.5 + 4 / 64, 0)}


def quantized_bytes(params, linear_weights, linear_rows, base):
    """Bytes of a transformer with `params` parameters whose nn.Linear weights (`linear_weights`
    elements in `linear_rows` output rows) are stored as FLUX_BASES[base]; the rest bf16."""
    if FLUX_BASES[base] is None:
        return 2 * params
    per_weight, per_row = FLUX_BASES[base]
    return per_weight * linear_weights + per_row * linear_rows + 2 * (params - linear_weights)


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


def lora_count(unet_config, rank=4, targets=None):
    """Parameters of a rank-`rank` LoRA adapter on the UNet, as peft adds it (meta device)."""
    from peft import LoraConfig
    from rpo.families.sd15 import UNET_LORA_TARGETS as LORA_TARGET_MODULES
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets or LORA_TARGET_MODULES),
                                    init_lora_weights=True), adapter_name="policy")
    return sum(p.numel() for n, p in unet.named_parameters() if ".lora_" in n)


def family_table(rank=4):
    """(name, static GiB rows) for SD1.5/SDXL x full/LoRA in the default bf16 mode, rpo's
    layout: shared rollout model, EMA offloaded (0 on the GPU), reference = a second UNet for
    full fine-tuning, the base itself (adapters disabled) for LoRA. Text encoders + VAE bf16."""
    from transformers import CLIPTextModelWithProjection
    vae = count(lambda: AutoencoderKL(**SD15_VAE))  # SDXL's VAE has SD1.5's architecture
    text_l = count(lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT)))
    text_g = count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)))
    out = []
    for model, config, frozen in (("SD1.5", SD15_UNET, vae + text_l), ("SDXL", SDXL_UNET, vae + text_l + text_g)):
        unet = count(lambda: UNet2DConditionModel(**config))
        adapter = lora_count(config, rank)
        for kind in ("full", f"LoRA r{rank}"):
            if kind == "full":  # trainable, grads, AdamW m+v, reference
                rows = (2 * unet, 2 * unet, 4 * unet, 2 * unet)
            else:  # base (also the reference), adapter, its grads, its AdamW m+v
                rows = (2 * unet + 2 * adapter, 2 * adapter, 4 * adapter, 0)
            out.append((f"{model} {kind}", unet, adapter, [b / GiB for b in (*rows, 2 * frozen)]))
    return out


def sd3_table(rank=4):
    """SD3.5 Medium rows as `family_table`'s, plus the parameter counts of the parts. The
    text encoders (CLIP-L, CLIP-G, T5-XXL) sit on the GPU only while train.py encodes the
    expert captions at start-up, before the transformer loads; they are then freed unless
    --validation_steps keeps them for the validation pipeline (rpo/models_sd3.py)."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel
    from rpo.families.sd15 import UNET_LORA_TARGETS as LORA_TARGET_MODULES
    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD35M_TRANSFORMER)
        params = sum(p.numel() for p in model.parameters())
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGET_MODULES),
                                     init_lora_weights=True), adapter_name="policy")
        adapter = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    parts = {"CLIP-L": count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SD15_TEXT, projection_dim=768))),
             "CLIP-G": count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))),
             "T5-XXL encoder": count(lambda: T5EncoderModel(T5Config(**T5_XXL))),
             "VAE": count(lambda: AutoencoderKL(**SD3_VAE))}
    text = parts["CLIP-L"] + parts["CLIP-G"] + parts["T5-XXL encoder"]
    rows = []
    for kind in ("full", f"LoRA r{rank}"):
        if kind == "full":  # trainable, grads, AdamW m+v, reference
            static = (2 * params, 2 * params, 4 * params, 2 * params)
        else:  # base (also the reference), adapter, its grads, its AdamW m+v
            static = (2 * params + 2 * adapter, 2 * adapter, 4 * adapter, 0)
        rows.append((f"SD3.5-M {kind}", [b / GiB for b in (*static, 2 * parts["VAE"], 2 * text)]))
    return params, adapter, parts, rows


def flux_parts():
    """Parameter counts of FLUX.1's frozen parts other than the transformer: CLIP-L (text
    model only: FLUX uses its pooled output), the T5-XXL encoder, the 16-channel VAE."""
    from transformers import T5Config, T5EncoderModel
    return {"CLIP-L": count(lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT))),
            "T5-XXL encoder": count(lambda: T5EncoderModel(T5Config(**T5_XXL))),
            "VAE": count(lambda: AutoencoderKL(**SD3_VAE))}


class _FlashLikeAttention(torch.autograd.Function):
    """What flash / memory-efficient attention keeps for backward (q, k, v, out and a float32
    log-sum-exp per query), not the L x L weights the math fallback would save on the meta device."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("meta-device accounting only")


def _flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None or is_causal:
        raise NotImplementedError("FLUX attention has no mask")
    return _FlashLikeAttention.apply(query, key, value)


def flux_saved_bytes(model, px, samples=1, text_len=FLUX_T5_LENGTH):
    """(all, per block) bytes of the tensors one forward of `model` (meta device, bf16, frozen base
    + adapter) saves for backward at `px` x `px`, parameters excluded: the activations. Counted by
    storage, so views are counted once; each block's share is what it saved first."""
    import torch.nn.functional as F
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("flux_saved_bytes: nothing trains (add the adapter first), so a forward saves nothing")
    c = model.config
    tokens = (px // 16) ** 2  # 8x VAE, then 2x2 packing
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen, owner, current = {}, {}, [None]

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params and storage._cdata not in seen:
            seen[storage._cdata] = storage.nbytes()
            owner[storage._cdata] = current[0]
        return t
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    hooks = [b.register_forward_pre_hook(lambda m, a, k=i: current.__setitem__(0, k)) for i, b in enumerate(blocks)]
    hooks += [b.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)) for b in blocks]
    kw = dict(device="meta", dtype=torch.bfloat16)
    inputs = dict(hidden_states=torch.empty(samples, tokens, c.in_channels, **kw),
                  encoder_hidden_states=torch.empty(samples, text_len, c.joint_attention_dim, **kw),
                  pooled_projections=torch.empty(samples, c.pooled_projection_dim, **kw),
                  timestep=torch.empty(samples, device="meta"), img_ids=torch.empty(tokens, 3, device="meta"),
                  txt_ids=torch.empty(text_len, 3, device="meta"),
                  guidance=torch.empty(samples, device="meta") if c.guidance_embeds else None)
    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _flash_like_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**inputs)
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    per_block = [0] * len(blocks)
    for key, nbytes in seen.items():
        if owner[key] is not None:
            per_block[owner[key]] += nbytes
    return sum(seen.values()), per_block, tokens


def flux_activation_gib(model, px, samples):
    """(without, with gradient checkpointing) GiB of activations of one trainable forward on
    `samples` samples. Checkpointing (diffusers checkpoints each block) keeps each block's
    inputs — the image and text streams, (tokens + text) x width bf16 — instead of what the
    blocks save, and recomputes one block at a time in backward."""
    total, per_block, tokens = flux_saved_bytes(model, px, samples)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    stream = samples * (tokens + FLUX_T5_LENGTH) * width * 2
    checkpointed = total - sum(per_block) + len(per_block) * stream + max(per_block)
    return total / GiB, checkpointed / GiB


def flux_table(rank=4, samples=2):
    """FLUX.1-dev / schnell rows: (name, transformer params, adapter params, rows of
    (base, px, static GiB columns, activations without / with checkpointing))."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    from rpo.families.sd15 import UNET_LORA_TARGETS as LORA_TARGET_MODULES
    out = []
    for name, config in (("FLUX.1-dev", FLUX_DEV_TRANSFORMER), ("FLUX.1-schnell", FLUX_SCHNELL_TRANSFORMER)):
        torch.set_default_dtype(torch.bfloat16)  # built in bf16 (a .to() would warn about fp32 modules: it has none)
        try:
            with torch.device("meta"):
                model = FluxTransformer2DModel(**config).requires_grad_(False)
        finally:
            torch.set_default_dtype(torch.float32)
        params = sum(p.numel() for p in model.parameters())
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        linear_weights = sum(m.weight.numel() for m in linears)
        rows_out = sum(m.weight.shape[0] for m in linears)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGET_MODULES),
                                     init_lora_weights=True), adapter_name="policy")
        adapter = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        activations = {px: flux_activation_gib(model, px, samples) for px in (512, 1024)}
        rows = []
        for base in FLUX_BASES:
            weights = quantized_bytes(params, linear_weights, rows_out, base)
            # adapters in fp32 (weights, grads, AdamW m+v); the reference is the base, adapters off
            static = (weights, 4 * adapter, 4 * adapter, 8 * adapter)
            for px in (512, 1024):
                rows.append((base, px, [b / GiB for b in static], activations[px]))
        out.append((name, params, adapter, rows))
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


def measure_sdxl_lora(latent, pairs, rank=4):
    """One micro-step of the full-size SDXL UNet with a rank-`rank` LoRA in bf16 on the CPU:
    reference forward (adapters disabled), trainable forward + backward, AdamW step."""
    from peft import LoraConfig
    from rpo.families.sd15 import UNET_LORA_TARGETS as LORA_TARGET_MODULES
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    unet = UNet2DConditionModel(**SDXL_UNET).requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGET_MODULES), init_lora_weights=True),
                     adapter_name="policy")
    unet.to(torch.bfloat16)
    adapter = [p for n, p in unet.named_parameters() if ".lora_" in n]
    opt = torch.optim.AdamW(adapter, lr=1e-4)
    gc.collect()
    base = max_rss_gib()
    n = 2 * pairs
    x = torch.randn(n, 4, latent, latent, dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (n,))
    c = torch.randn(n, 77, 2048, dtype=torch.bfloat16)
    added = {"text_embeds": torch.randn(n, 1280, dtype=torch.bfloat16),
             "time_ids": torch.tensor([[8 * latent, 8 * latent, 0, 0, 8 * latent, 8 * latent]] * n, dtype=torch.bfloat16)}
    tic = time.perf_counter()
    with torch.no_grad():
        unet.disable_adapters()
        unet(x, t, c, added_cond_kwargs=added)
        unet.enable_adapters()
    loss = unet(x, t, c, added_cond_kwargs=added).sample.float().pow(2).mean()
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - tic
    return base, max_rss_gib(), seconds, sum(p.numel() for p in adapter)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--measure_sdxl_lora", action="store_true")
    parser.add_argument("--rank", type=int, default=4)
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
    print("\n| model | UNet params | LoRA params | UNet (+ adapter) weights | grads | AdamW | reference | text enc + VAE | total |")
    for name, unet_n, adapter_n, rows in family_table(args.rank):
        print(f"| {name} | {unet_n / 1e6:.1f} M | {adapter_n / 1e6:.2f} M | " + " | ".join(f"{b:.2f}" for b in rows)
              + f" | {sum(rows):.2f} |")
    print("(bf16, GiB per GPU, rpo's default layout: shared rollout model, EMA offloaded; activations come on top)")
    params, adapter, parts, rows = sd3_table(args.rank)
    print(f"\nSD3.5 Medium: transformer {params / 1e6:.1f} M, LoRA r{args.rank} {adapter / 1e6:.2f} M, "
          + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in parts.items()))
    print("| model | weights (+ adapter) | grads | AdamW | reference | VAE | total, encoders freed | "
          "text encoders (kept with --validation_steps) | total, encoders kept |")
    for name, r in rows:
        print(f"| {name} | " + " | ".join(f"{b:.2f}" for b in r[:5]) + f" | {sum(r[:5]):.2f} | {r[5]:.2f} | "
              f"{sum(r):.2f} |")
    print(f"(bf16, GiB per GPU; at start-up the encoders alone ({rows[0][1][5]:.2f}) are on the GPU while the "
          "captions are encoded, before the transformer loads; activations come on top)")
    parts = flux_parts()
    flux = flux_table(args.rank)
    print(f"\nFLUX.1: transformer dev {flux[0][1] / 1e6:.1f} M, schnell {flux[1][1] / 1e6:.1f} M, LoRA r{args.rank} "
          f"{flux[0][2] / 1e6:.2f} M (fp32); " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in parts.items()))
    print("| model | base | px | base weights | adapter | grads | AdamW | VAE | static total | activations | "
          "activations, gradient checkpointing | total, checkpointing |")
    vae = 2 * parts["VAE"] / GiB
    for name, _, _, rows in flux:
        for base, px, static, (act, act_ckpt) in rows:
            total = sum(static) + vae
            print(f"| {name} LoRA r{args.rank} | {base} | {px} | " + " | ".join(f"{b:.2f}" for b in static) +
                  f" | {vae:.2f} | {total:.2f} | {act:.2f} | {act_ckpt:.2f} | {total + act_ckpt:.2f} |")
    print(f"(GiB per GPU; activations of one trainable forward on 2 samples (--batch_size 1: an expert and a policy "
          f"sample) at {FLUX_T5_LENGTH} T5 tokens, flash attention; text encoders "
          f"({2 * (parts['CLIP-L'] + parts['T5-XXL encoder']) / GiB:.2f} in bf16) are freed after the captions are "
          "encoded; CUDA context and workspace come on top)")
    if args.measure_sdxl_lora:
        base, peak, seconds, adapter_n = measure_sdxl_lora(args.latent, args.pairs, args.rank)
        print(f"\nmeasured: SDXL UNet + LoRA r{args.rank} ({adapter_n / 1e6:.2f} M adapter parameters), CPU, bf16, "
              f"latent {args.latent}x{args.latent}, {args.pairs} pairs ({2 * args.pairs} UNet samples), one micro-step in {seconds:.1f} s:")
        print(f"  resident after building the UNet with its adapter: {base:.2f} GiB; peak during the micro-step: {peak:.2f} GiB "
              f"(+ {peak - base:.2f} activations, adapter gradients, AdamW state and workspace)")
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
