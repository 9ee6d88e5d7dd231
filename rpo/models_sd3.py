"""SD3 / SD3.5 pipeline parts: the transformer, and the three text encoders
(CLIP-L, CLIP-G, T5) with a caption cache (docs/design.md, "Model families").

Captions are encoded by the stock `StableDiffusion3Pipeline.encode_prompt` (on a pipeline
holding only the text parts), so training sees exactly the embeddings inference feeds the
transformer: the CLIP penultimate states concatenated, zero-padded to T5's width and
joined with T5's states along the sequence; pooled = both CLIP projections concatenated.
T5 is large (4.7 B parameters in SD3's T5-XXL), so training encodes every caption it will
need once at start-up (`precompute`) and can then drop the encoders (`release_encoders`).
"""
import torch

from rpo.models import from_pretrained, hub_options, load_model, load_tokenizer

MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s default for T5


def load_transformer(source, subfolder="transformer", variant=None, dtype=torch.float32, what="transformer", *,
                     revision=None, cache_dir=None):
    from diffusers import SD3Transformer2DModel
    return load_model(SD3Transformer2DModel, source, subfolder, variant, dtype, what, revision=revision,
                      cache_dir=cache_dir)


class SD3TextEncoders:
    """`encode(captions) -> (prompt_embeds (B, L, D), pooled (B, P))`, as TextEncoders
    (rpo/models.py) returns them, from a cache when the caption was precomputed."""

    def __init__(self, pipe, max_sequence_length=MAX_SEQUENCE_LENGTH):
        self.pipe = pipe  # a StableDiffusion3Pipeline with only tokenizers and text encoders
        self.max_sequence_length = max_sequence_length
        self.cache = {}  # caption -> (embeds (L, D), pooled (P,)) on the CPU
        self.device = torch.device("cpu")

    @property
    def encoders(self):
        return [e for e in (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3) if e is not None]

    def to(self, device=None, dtype=None):
        if device is not None:
            self.device = torch.device(device)
        for encoder in self.encoders:
            encoder.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def _encode(self, captions):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(captions), prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
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
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            setattr(self.pipe, name, None)

    def pipeline(self, transformer, vae, scheduler):
        """A StableDiffusion3Pipeline on these text parts (validation during training); needs the
        encoders (not released), since a pipeline call encodes its prompts itself."""
        from diffusers import StableDiffusion3Pipeline
        if self.pipe.text_encoder_3 is None:
            raise RuntimeError("SD3TextEncoders.pipeline: the text encoders were released")
        p = self.pipe
        return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=p.text_encoder,
                                        tokenizer=p.tokenizer, text_encoder_2=p.text_encoder_2, tokenizer_2=p.tokenizer_2,
                                        text_encoder_3=p.text_encoder_3, tokenizer_3=p.tokenizer_3)

    def encode(self, captions):
        captions = list(captions)
        missing = [c for c in captions if c not in self.cache]
        if missing:
            if self.pipe.text_encoder_3 is None:
                raise RuntimeError(f"SD3TextEncoders: caption {missing[0]!r} was not precomputed and the encoders are released")
            self.precompute(missing)
        embeds = torch.stack([self.cache[c][0] for c in captions]).to(self.device)
        pooled = torch.stack([self.cache[c][1] for c in captions]).to(self.device)
        return embeds, pooled


def load_sd3_text_encoders(source, variant=None, dtype=torch.float32, *, revision=None, cache_dir=None):
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel, T5TokenizerFast
    hub = hub_options(revision, cache_dir)
    kw = {"variant": variant, **hub} if variant else hub
    tokenizers = [load_tokenizer(source, "tokenizer", "text_encoder", **hub),
                  load_tokenizer(source, "tokenizer_2", "text_encoder_2", **hub),
                  from_pretrained(T5TokenizerFast, source, "tokenizer 3 (T5)", subfolder="tokenizer_3", **hub)]
    encoders = [from_pretrained(CLIPTextModelWithProjection, source, "text encoder (CLIP-L)", subfolder="text_encoder",
                                dtype=dtype, **kw),
                from_pretrained(CLIPTextModelWithProjection, source, "text encoder 2 (CLIP-G)",
                                subfolder="text_encoder_2", dtype=dtype, **kw),
                from_pretrained(T5EncoderModel, source, "text encoder 3 (T5)", subfolder="text_encoder_3", dtype=dtype,
                                **kw)]
    for encoder in encoders:
        encoder.requires_grad_(False).eval()
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, text_encoder=encoders[0],
                                    tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
                                    text_encoder_3=encoders[2], tokenizer_3=tokenizers[2])
    return SD3TextEncoders(pipe)
