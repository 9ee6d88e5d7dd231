"""ImageReward (Xu et al. 2023), `ImageReward-v1.0` from `THUDM/ImageReward`, computed as
the package's `ImageReward.score`:

    image -> BLIP ViT-L/16 -> tokens;  prompt -> BERT tokenizer (padded to 35, truncated)
    -> BLIP text encoder cross-attending to all image tokens -> [CLS] state -> MLP
    -> (r - 0.16717362830052426) / 1.0333394966054072

The package cannot be built on transformers 5, so its BLIP weights are loaded into
transformers' `BlipVisionModel` / `BlipTextModel` by renaming keys (`rename_blip_key`),
with nothing missing or left over. Images: 224 bicubic resize (PIL) and centre crop, then
RGB, CLIP mean/std — in the package's order.
"""
import json
import os
import pickle
import re

import torch
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from rpo.cli import UserError
from rpo.scores.aesthetic import MLP
from rpo.scores.base import Scorer, check_vocabulary, from_pretrained, hub_file, prepare, release_version, resolve

REPO = "THUDM/ImageReward"
TOKENIZER = "bert-base-uncased"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
# The package hard-codes BLIP's ViT-L/16 at 224 (`create_vit('large', 224)`); a folder may
# override it with `vision_config.json` in the same argument names (the tiny kit does).
VIT_LARGE = {"image_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}

# BLIP's timm-style ViT names -> transformers' BlipVisionModel names (docs/environment.md, "Set A").
VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def rename_vision_key(key):
    for pattern, replacement in VISION_RENAMES:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    raise KeyError(f"unexpected BLIP vision key '{key}'")


def split_checkpoint(state_dict):
    """The package's state dict -> (vision, text, mlp) state dicts in transformers' names.
    BLIP's contrastive projections (`blip.vision_proj`, `blip.text_proj`) are unused by
    the score and dropped, as the package's forward ignores them."""
    vision, text, mlp = {}, {}, {}
    for key, tensor in state_dict.items():
        if key.startswith("blip.visual_encoder."):
            vision[rename_vision_key(key[len("blip.visual_encoder."):])] = tensor
        elif key.startswith("blip.text_encoder."):
            name = key[len("blip.text_encoder."):]
            if not name.endswith("position_ids"):
                text[name] = tensor
        elif key.startswith("mlp."):
            mlp[key[len("mlp."):]] = tensor
    return vision, text, mlp


def vision_config(vit):
    return BlipVisionConfig(
        image_size=vit["image_size"], patch_size=vit["patch_size"], hidden_size=vit["embed_dim"],
        intermediate_size=4 * vit["embed_dim"], num_hidden_layers=vit["depth"], num_attention_heads=vit["num_heads"],
        hidden_act="gelu", layer_norm_eps=1e-6,  # BLIP's ViT: exact GELU, LayerNorm eps 1e-6
    )


def text_config(med, encoder_width):
    """BLIP's `med_config.json` (a BERT config) as a `BlipTextConfig`. `is_decoder=True`
    only makes transformers build the cross-attention layers; the forward runs as an
    encoder (bidirectional self-attention), as the package does."""
    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0), is_decoder=True,
        bos_token_id=med["vocab_size"] - 2, sep_token_id=None,  # BLIP's added [DEC]; generation only
    )


def image_transform(size):
    return Compose([
        Resize(size, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(size),
        to_rgb,
        ToTensor(),
        Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])


def to_rgb(image):  # a named function (not a lambda): the transform must pickle into DataLoader workers
    return image.convert("RGB")


class ImageReward(Scorer):
    name = "imagereward"

    def __init__(self, vision, text, mlp, tokenizer, device):
        super().__init__(image_transform(vision.config.image_size), device)
        self.vision, self.text, self.mlp = prepare(vision, device), prepare(text, device), prepare(mlp, device)
        self.tokenizer = tokenizer
        self.version = release_version("v1.0", [self.vision, self.text, self.mlp], [self.transform, tokenizer])

    @torch.no_grad()
    def score_tensors(self, pixels, prompts):
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt").to(self.device)
        image_embeds = self.vision(pixel_values=pixels.to(self.device)).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        hidden = self.text(input_ids=text.input_ids, attention_mask=text.attention_mask,
                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask).last_hidden_state
        reward = self.mlp(hidden[:, 0, :]).squeeze(-1)
        return ((reward - MEAN) / STD).float().cpu()


def load_tokenizer(source, hint):
    """bert-base-uncased with the two tokens BLIP adds ([DEC] as bos, [ENC]): the ids the
    checkpoint's 30,524-row embedding was trained with."""
    tokenizer = from_pretrained(BertTokenizer, source, "ImageReward tokenizer", hint)
    check_vocabulary(tokenizer, source, 100)  # the real one has 30,522; the tiny kit's a made-up 100+
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load(name="imagereward", weights_dir=None, device="cpu", **_):
    what = "ImageReward checkpoint"
    vit_path = None
    if weights_dir is None:
        _, hint = resolve(None, "imagereward", REPO, what)
        checkpoint_path = hub_file(REPO, "ImageReward.pt", what, hint)
        med_path = hub_file(REPO, "med_config.json", "ImageReward text config", hint)
    else:
        checkpoint_path, hint = resolve(weights_dir, "imagereward", REPO, what, "ImageReward.pt")
        med_path, _ = resolve(weights_dir, "imagereward", REPO, "ImageReward text config", "med_config.json")
        vit_path = os.path.join(weights_dir, "imagereward", "vision_config.json")
    tokenizer_source, tokenizer_hint = resolve(weights_dir, "imagereward/tokenizer", TOKENIZER, "ImageReward tokenizer",
                                               only=("vocab.txt", "tokenizer_config.json"))
    try:
        vit = VIT_LARGE
        if vit_path is not None and os.path.isfile(vit_path):
            with open(vit_path) as f:
                vit = {**VIT_LARGE, **json.load(f)}
        with open(med_path) as f:
            med = json.load(f)
        vision, text, mlp = split_checkpoint(torch.load(checkpoint_path, map_location="cpu", weights_only=True))
        vision_model = BlipVisionModel(vision_config(vit))
        vision_model.load_state_dict(vision, strict=True)
        text_model = BlipTextModel(text_config(med, vit["embed_dim"]), add_pooling_layer=False)
        text_model.load_state_dict(text, strict=True)
        head = MLP(mlp["layers.0.weight"].shape[1])
        head.load_state_dict(mlp, strict=True)
    except (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot load the {what} from {checkpoint_path} ({str(e).splitlines()[0]}); {hint}") from None
    tokenizer = load_tokenizer(tokenizer_source, tokenizer_hint)
    if len(tokenizer) > text_model.config.vocab_size:
        raise UserError(f"ImageReward tokenizer from '{tokenizer_source}' has {len(tokenizer)} tokens, "
                        f"the text model's embedding only {text_model.config.vocab_size}")
    return ImageReward(vision_model, text_model, head, tokenizer, device)
