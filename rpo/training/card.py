"""The model card `ckpt-N/README.md`: what a checkpoint is and how to load it in diffusers.

`model_card` is a pure function of the run's options, the model family, the step and the
checkpoint's folders, so it can be tested without training; `write_card` is what
`save_checkpoint` (rpo/training/state.py) calls while the checkpoint is still being assembled.
The snippet names the weights by their path relative to the card (it runs from the
checkpoint folder, wherever the checkpoint was copied or uploaded); the family writes it.
"""
import os

EMA_DECAY = 0.9999  # rpo/training/ema.py's NamedEMA default (diffusers' EMAModel warm-up rule)


def method_of(args, folders):
    """'SFT', 'DRO (LoRA)' or 'DRO (full fine-tune)', from the options and the folders saved."""
    lora = "lora" in folders or "lora_ema" in folders
    if args.get("sft") or str(args.get("method", "")).lower() == "sft" or str(args.get("objective", "")).lower() == "sft":
        return "SFT (LoRA)" if lora else "SFT"
    return "DRO (LoRA)" if lora else "DRO (full fine-tune)"


def model_card(args, step, *, family, name, folders, world=1):
    """Markdown for the checkpoint `name` (ckpt-`step`) holding the sub-folders `folders`;
    `args` is the run's options as a dict, `family` its model family, `world` its process count."""
    base = args.get("pretrained_model_name_or_path")
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
        rows.insert(1, (f"started from {family.denoiser_folder}", f"`{args['unet']}`"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
    lora = "lora_ema" if use_ema and "lora_ema" in folders else "lora" if "lora" in folders else None
    weights = "ema" if use_ema and "ema" in folders else "unet"
    if lora is not None:
        snippet = family.card_snippet(base, lora, lora=True)
        loads = f"the LoRA adapters in `{lora}/` ({'EMA' if lora == 'lora_ema' else 'raw trained'} weights)"
    else:
        snippet = family.card_snippet(base, weights, lora=False)
        loads = f"the {'EMA' if weights == 'ema' else 'raw trained'} {family.denoiser_folder} in `{weights}/`"
    snippet += 'pipe.to("cuda")\nimage = pipe("a photo of an astronaut riding a horse").images[0]\n'
    return f"""---
library_name: diffusers
base_model: {base}
tags:
- {family.card_tag}
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

From this folder (paths are relative to this card):

```python
{snippet}```

A complete pipeline folder: `python -m tools.export_pipeline --checkpoint {name} --output DIR`
(from the run's log folder).
"""


def write_card(path, *, final, args, family, step, world=1):
    """Write `path`/README.md (the checkpoint folder being assembled, renamed to `final`)."""
    folders = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    text = model_card(dict(args), step, family=family, name=os.path.basename(os.path.normpath(final)), folders=folders,
                      world=world)
    with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)
