"""The model card `ckpt-N/README.md`: what a checkpoint is and how to load it in diffusers.

`model_card` is a pure function of the run's options, the step and the checkpoint's
folders, so it can be tested without training; `write_card` is what `save_checkpoint`
(rpo/training/state.py) calls while the checkpoint is still being assembled.
"""
import os

EMA_DECAY = 0.9999  # rpo/training/ema.py's NamedEMA default (diffusers' EMAModel warm-up rule)


def method_of(args, folders):
    """'SFT', 'DRO (LoRA)' or 'DRO (full fine-tune)', from the options and the folders saved."""
    lora = "lora" in folders or "lora_ema" in folders
    if args.get("sft") or str(args.get("method", "")).lower() == "sft" or str(args.get("objective", "")).lower() == "sft":
        return "SFT (LoRA)" if lora else "SFT"
    return "DRO (LoRA)" if lora else "DRO (full fine-tune)"


def model_card(args, step, *, checkpoint, folders, world=1):
    """Markdown for the checkpoint at `checkpoint` (the final path, ckpt-`step`) holding the
    sub-folders `folders`; `args` is the run's options as a dict, `world` its process count."""
    base = args.get("pretrained_model_name_or_path")
    sdxl = bool(args.get("sdxl"))
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    method = method_of(args, folders)
    batch, accumulation = args.get("batch_size"), args.get("gradient_accumulation_steps")
    effective = batch * accumulation * world if isinstance(batch, int) and isinstance(accumulation, int) else None
    updates = step // accumulation if isinstance(accumulation, int) and accumulation else None
    use_ema = bool(args.get("use_ema", True))
    rows = [
        ("base model", f"`{base}`"),
        ("method", method),
        ("step", f"{step} micro-steps" + (f" ({updates} optimizer updates)" if updates is not None else "")),
        ("learning rate", args.get("learning_rate")),
        ("effective batch", f"{effective} pairs per update ({batch} x {accumulation} accumulation x {world} process{'es' if world > 1 else ''})"
         if effective else None),
        ("loss", ("hinge" if args.get("hinge", True) else "logistic") + f", margin {args.get('margin')}"),
        ("replay buffer", f"size {args.get('buffer_size')}, {args.get('buffer_scheduler')} x "
                          f"{args.get('buffer_num_inference_steps')} steps, guidance {args.get('buffer_guidance_scale')}, "
                          f"refill every {args.get('buffer_sample_steps')}, rollout refresh every "
                          f"{args.get('buffer_update_steps')} micro-steps"),
        ("EMA", f"decay {EMA_DECAY} (diffusers' warm-up rule)" if use_ema else "off"),
        ("mixed precision", args.get("mixed_precision")),
        ("resolution", args.get("resolution")),
        ("training data", f"`{args.get('train_dataset')}`"),
    ]
    if method.startswith("SFT"):  # no ranking loss, no rollouts
        rows = [r for r in rows if r[0] not in ("loss", "replay buffer")]
    if args.get("unet"):
        rows.insert(1, ("started from UNet", f"`{args['unet']}`"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
    lora = "lora_ema" if use_ema and "lora_ema" in folders else "lora" if "lora" in folders else None
    weights = "ema" if use_ema and "ema" in folders else "unet"
    if lora is not None:
        folder = os.path.join(checkpoint, lora)
        snippet = (f"import torch\nfrom diffusers import {pipeline}\n\n"
                   f"pipe = {pipeline}.from_pretrained({base!r}, torch_dtype=torch.float16)\n"
                   f"pipe.load_lora_weights({folder!r})\n")
        loads = f"the LoRA adapters in `{lora}/` ({'EMA' if lora == 'lora_ema' else 'raw trained'} weights)"
    else:
        folder = os.path.join(checkpoint, weights)
        snippet = (f"import torch\nfrom diffusers import {pipeline}, UNet2DConditionModel\n\n"
                   f"unet = UNet2DConditionModel.from_pretrained({folder!r}, torch_dtype=torch.float16)\n"
                   f"pipe = {pipeline}.from_pretrained({base!r}, unet=unet, torch_dtype=torch.float16)\n")
        loads = f"the {'EMA' if weights == 'ema' else 'raw trained'} UNet in `{weights}/`"
    snippet += 'pipe.to("cuda")\nimage = pipe("a photo of an astronaut riding a horse").images[0]\n'
    name = os.path.basename(os.path.normpath(checkpoint))
    return f"""---
library_name: diffusers
base_model: {base}
tags:
- stable-diffusion{'-xl' if sdxl else ''}
- text-to-image
- diffusion-dro
---

# {name}: {method} of `{base}`

Preference fine-tuning with Diffusion-DRO (rpo), saved at micro-step {step}.
The snippet loads {loads}.

| setting | value |
|---|---|
{table}

## Load it in diffusers

```python
{snippet}```

A complete pipeline folder: `python -m tools.export_pipeline --checkpoint {checkpoint} --output DIR`.
"""


def write_card(path, *, final, args, step, world=1):
    """Write `path`/README.md (the checkpoint folder being assembled) naming its final path."""
    folders = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    text = model_card(dict(args), step, checkpoint=os.path.abspath(final), folders=folders, world=world)
    with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)
