"""Load the parts of a Stable Diffusion (1.5 or XL) pipeline and encode prompts.

Hub ids stay the defaults; a local folder in the diffusers layout (what `python -m
rpo.tiny sd15 OUT` writes) goes through exactly the same `from_pretrained` calls. A model
that cannot be found (no network, a typo, a folder that is not a pipeline) becomes one
`UserError` line saying what was needed and how to pass a local path.
"""
import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from rpo.cli import UserError

SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"


def from_pretrained(cls, source, what, **kwargs):
    """`cls.from_pretrained(source, **kwargs)`, with a one-line error when it is missing."""
    subfolder = kwargs.get("subfolder")
    if os.path.isdir(source):
        where = os.path.join(source, subfolder) if subfolder else source
        if not os.path.isdir(where):
            raise UserError(f"{what}: {source} is not a diffusers pipeline folder (no '{subfolder}/' inside)")
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        hint = (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__).rstrip(".")
        raise UserError(
            f"cannot load the {what} from '{source}'"
            + (f" (subfolder '{subfolder}')" if subfolder else "")
            + f": {hint}. Without network access, download it on a connected machine "
            "(`hf download <id>`) and pass the local folder instead."
        ) from None


def check_tokenizer(tokenizer, source):
    # transformers 5 offline may hand back a 2-5 token tokenizer instead of raising
    # (ENVIRONMENT.md, traps): a real CLIP vocabulary has 49,408 entries.
    if len(tokenizer) < 1000:
        raise UserError(f"cannot load the tokenizer from '{source}': got {len(tokenizer)} tokens, its files are missing "
                        "(no network?). Download the model on a connected machine (`hf download <id>`) and pass the local folder instead.")
    return tokenizer


def load_unet(source, subfolder=None, variant=None, dtype=torch.float32, what="UNet"):
    kwargs = {"dtype": dtype}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if variant:
        kwargs["variant"] = variant
    return from_pretrained(UNet2DConditionModel, source, what, **kwargs)


@dataclass
class TextEncoders:
    """One (SD1.5) or two (SDXL) CLIP text encoders with their tokenizers."""
    tokenizers: list
    encoders: list
    sdxl: bool

    def to(self, device=None, dtype=None):
        for encoder in self.encoders:
            encoder.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, captions):
        """Caption embeddings as the pipelines compute them.

        SD1.5: the last hidden state (B, 77, 768), pooled None.
        SDXL: the penultimate hidden states of both encoders concatenated (B, 77, 2048),
        pooled = the projected pooled output of encoder 2 (B, 1280).
        """
        device = self.encoders[0].device
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            if not self.sdxl:
                return encoder(ids)[0], None
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (encoder 2 is last)
        return torch.cat(hidden, dim=-1), pooled


def load_text_encoders(source, sdxl=False, variant=None, dtype=torch.float32):
    kw = {"variant": variant} if variant else {}
    tokenizers = [check_tokenizer(from_pretrained(CLIPTokenizer, source, "tokenizer", subfolder="tokenizer"), source)]
    encoders = [from_pretrained(CLIPTextModel, source, "text encoder", subfolder="text_encoder", dtype=dtype, **kw)]
    if sdxl:
        tokenizers.append(check_tokenizer(from_pretrained(CLIPTokenizer, source, "tokenizer 2", subfolder="tokenizer_2"), source))
        encoders.append(from_pretrained(CLIPTextModelWithProjection, source, "text encoder 2",
                                        subfolder="text_encoder_2", dtype=dtype, **kw))
    for encoder in encoders:
        encoder.requires_grad_(False).eval()
    return TextEncoders(tokenizers, encoders, sdxl)


def load_vae(source, sdxl=False, variant=None, dtype=torch.float32, vae=None):
    """The pipeline's VAE; for SDXL the fp16-fix VAE (as the public code), unless `vae` names another."""
    if vae is None and sdxl and not os.path.isdir(source):
        vae = SDXL_VAE
    if vae is not None:
        model = from_pretrained(AutoencoderKL, vae, "VAE", dtype=dtype)
    else:
        kw = {"variant": variant} if variant else {}
        model = from_pretrained(AutoencoderKL, source, "VAE", subfolder="vae", dtype=dtype, **kw)
    return model.requires_grad_(False).eval()


def check_pipeline_folder(source):
    """Refuse early a local path that is not a diffusers pipeline (before any weight loads)."""
    if os.path.exists(source) and not os.path.isfile(os.path.join(source, "model_index.json")):
        raise UserError(f"--pretrained_model_name_or_path {source} is not a diffusers pipeline folder (no model_index.json)")
