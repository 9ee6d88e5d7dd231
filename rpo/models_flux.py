"""FLUX.1 pipeline parts: detection, the transformer, the two text encoders (CLIP-L pooled,
T5 sequence) with a caption cache, and the latent geometry the transformer expects
(docs/design.md, "FLUX").

Captions are encoded by the stock `FluxPipeline.encode_prompt` on a pipeline holding only
the text parts, so training sees exactly what inference feeds the transformer: T5's last
hidden states as the sequence (`encoder_hidden_states`, padded to `max_sequence_length`)
and CLIP's pooled output (`pooled_projections`). T5-XXL is 4.7 B parameters, so training
encodes every caption once (`precompute`) and can then drop the encoders
(`release_encoders`), as for SD3 (rpo/models_sd3.py).

Latents. The VAE's 16-channel latent z is normalised as the pipeline un-normalises it before
decoding: x = (z − shift_factor) · scaling_factor. The transformer sees x in 2×2 patches,
"packed" to (B, h/2 · w/2, 4C) tokens with position ids (0, row, col) per token and
(0, 0, 0) per text token. rpo keeps latents *unpacked* (B, 16, h, w) everywhere else
(buffer, noising, loss, VAE), and packs only around the transformer call: packing is a
permutation, so noising, the Euler step and a per-sample MSE are the same in either form
(tests/test_flux.py). Every pack/unpack/ids call is the pipeline's own static method.

Resolution-dependent shift. FLUX.1-dev's scheduler has `use_dynamic_shifting`: the σ grid
is shifted by μ, linear in the image's token count between (base_image_seq_len, base_shift)
and (max_image_seq_len, max_shift), by diffusers' `calculate_shift` — all four read from the
model's scheduler config.
"""
import torch

from rpo.models import from_pretrained, hub_options, load_model, load_tokenizer
from rpo.models import pipeline_class_name

FLUX_PIPELINE_CLASSES = ("FluxPipeline",)
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.__call__'s default (and maximum) T5 length


def is_flux(source, **hub):
    return pipeline_class_name(source, **hub) in FLUX_PIPELINE_CLASSES


def load_flux_transformer(source, subfolder="transformer", variant=None, dtype=torch.float32, what="transformer", *,
                          revision=None, cache_dir=None):
    from diffusers import FluxTransformer2DModel
    return load_model(FluxTransformer2DModel, source, subfolder, variant, dtype, what, revision=revision,
                      cache_dir=cache_dir)


# --------------------------------------------------------------------------- latent geometry
def _pipe():
    from diffusers import FluxPipeline
    return FluxPipeline


def vae_scale_factor(vae_config):
    """Pixels per latent cell, as FluxPipeline computes it: 2 ** (len(block_out_channels) − 1)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def latent_size(resolution, vae_config):
    """Latent side for a `resolution`-pixel side, as `FluxPipeline.prepare_latents` rounds it
    (a multiple of 2, so the 2×2 packing tiles it)."""
    f = vae_scale_factor(vae_config)
    return 2 * (int(resolution) // (f * 2))


def normalise_latents(z, vae_config):
    """VAE latent -> model space: (z − shift) · scale (the inverse of the pipeline's decode)."""
    return (z - (vae_config.get("shift_factor") or 0.0)) * vae_config["scaling_factor"]


def denormalise_latents(x, vae_config):
    """Model space -> VAE latent, exactly as FluxPipeline does before `vae.decode`."""
    return x / vae_config["scaling_factor"] + (vae_config.get("shift_factor") or 0.0)


def pack_latents(x):
    """(B, C, h, w) -> (B, h/2 · w/2, 4C): `FluxPipeline._pack_latents`."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 patches: latent height and width must be even, got {h}x{w}")
    return _pipe()._pack_latents(x, b, c, h, w)


def unpack_latents(packed, h, w):
    """(B, h/2 · w/2, 4C) -> (B, C, h, w): `FluxPipeline._unpack_latents` (given in latent
    cells, i.e. with vae_scale_factor 1)."""
    return _pipe()._unpack_latents(packed, h, w, 1)


def image_ids(h, w, device=None, dtype=torch.float32):
    """(h/2 · w/2, 3) position ids of the packed image tokens: `FluxPipeline._prepare_latent_image_ids`."""
    return _pipe()._prepare_latent_image_ids(None, h // 2, w // 2, device, dtype)


def text_ids(seq_len, device=None, dtype=torch.float32):
    """(seq_len, 3) zeros: the text tokens' position ids, as `FluxPipeline.encode_prompt` returns them."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)


def image_seq_len(h, w):
    """Tokens of a packed (h, w) latent: what the dynamic shift is a function of."""
    return (h // 2) * (w // 2)


def dynamic_shift_mu(scheduler_config, seq_len):
    """μ of the resolution-dependent shift for `seq_len` image tokens: diffusers'
    `calculate_shift` with base/max sequence lengths and shifts from the scheduler config
    (missing keys take the scheduler class's defaults, never a constant written here)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    config = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config)).config
    return calculate_shift(seq_len, config["base_image_seq_len"], config["max_image_seq_len"],
                           config["base_shift"], config["max_shift"])


# --------------------------------------------------------------------------- text encoders
class FluxTextEncoders:
    """`encode(captions) -> (prompt_embeds (B, L, D), pooled (B, P))`, as SD3TextEncoders,
    from a cache when the caption was precomputed. The text position ids are zeros
    (`text_ids(L)`), so they are not cached."""

    def __init__(self, pipe, max_sequence_length=MAX_SEQUENCE_LENGTH):
        self.pipe = pipe  # a FluxPipeline with only tokenizers and text encoders
        self.max_sequence_length = max_sequence_length
        self.cache = {}  # caption -> (embeds (L, D), pooled (P,)) on the CPU
        self.device = torch.device("cpu")

    @property
    def encoders(self):
        return [e for e in (self.pipe.text_encoder, self.pipe.text_encoder_2) if e is not None]

    def to(self, device=None, dtype=None):
        if device is not None:
            self.device = torch.device(device)
        for encoder in self.encoders:
            encoder.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def _encode(self, captions):
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=list(captions), prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        return embeds, pooled

    def precompute(self, captions, batch_size=16):
        """Encode every distinct caption of `captions` once into the cache."""
        todo = sorted({c for c in captions if c not in self.cache})
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            embeds, pooled = self._encode(chunk)
            for c, e, p in zip(chunk, embeds.cpu(), pooled.cpu()):
                self.cache[c] = (e, p)

    def release_encoders(self):
        """Drop the encoders (the cache stays); encoding a caption not cached then fails."""
        for name in ("text_encoder", "text_encoder_2"):
            setattr(self.pipe, name, None)

    def pipeline(self, transformer, vae, scheduler):
        """A FluxPipeline on these text parts (validation, export); needs the encoders, since a
        pipeline call encodes its prompts itself."""
        from diffusers import FluxPipeline
        if self.pipe.text_encoder_2 is None:
            raise RuntimeError("FluxTextEncoders.pipeline: the text encoders were released")
        p = self.pipe
        return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=p.text_encoder,
                            tokenizer=p.tokenizer, text_encoder_2=p.text_encoder_2, tokenizer_2=p.tokenizer_2)

    def encode(self, captions):
        captions = list(captions)
        missing = [c for c in captions if c not in self.cache]
        if missing:
            if self.pipe.text_encoder_2 is None:
                raise RuntimeError(f"FluxTextEncoders: caption {missing[0]!r} was not precomputed and the encoders "
                                   "are released")
            self.precompute(missing)
        embeds = torch.stack([self.cache[c][0] for c in captions]).to(self.device)
        pooled = torch.stack([self.cache[c][1] for c in captions]).to(self.device)
        return embeds, pooled


def load_flux_text_encoders(source, variant=None, dtype=torch.float32, max_sequence_length=MAX_SEQUENCE_LENGTH, *,
                            revision=None, cache_dir=None):
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel, T5EncoderModel, T5TokenizerFast
    hub = hub_options(revision, cache_dir)
    kw = {"variant": variant, **hub} if variant else hub
    clip_tokenizer = load_tokenizer(source, "tokenizer", "text_encoder", **hub)
    t5_tokenizer = from_pretrained(T5TokenizerFast, source, "tokenizer 2 (T5)", subfolder="tokenizer_2", **hub)
    clip = from_pretrained(CLIPTextModel, source, "text encoder (CLIP-L)", subfolder="text_encoder", dtype=dtype, **kw)
    t5 = from_pretrained(T5EncoderModel, source, "text encoder 2 (T5)", subfolder="text_encoder_2", dtype=dtype, **kw)
    for encoder in (clip, t5):
        encoder.requires_grad_(False).eval()
    pipe = FluxPipeline(transformer=None, scheduler=None, vae=None, text_encoder=clip, tokenizer=clip_tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    return FluxTextEncoders(pipe, max_sequence_length=max_sequence_length)
