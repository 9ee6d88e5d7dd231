"""Tiny random stand-ins for the six scorers, in exactly the `weights_dir` layout the
loaders read (see `rpo.scores`), so that tests and the offline demo load them through the
same code as the real weights: `python -m rpo.tiny scorers OUT`.

The models are the real classes with small widths and one layer; the images they see are
the real 224 px inputs (large patches keep them cheap). Tokenizers are real-sized where
the real ones are used with a real vocabulary: the CLIP BPE (49,408 tokens, rebuilt from
open_clip's bundled merges) for PickScore, HPSv2 and CLIP score. No BERT vocabulary
ships offline, so ImageReward gets a small made-up WordPiece `vocab.txt`. Files on disk
use the official formats: HF `save_pretrained` folders, legacy `preprocessor_config.json`,
open_clip's `open_clip_config.json` + safetensors, HPSv2's `{'state_dict': ...}` `.pt`,
the aesthetic heads' plain state dicts, and ImageReward's BLIP-named state dict.
"""
import json
import os
import re

import torch

from rpo.scores.aesthetic import HEADS, MLP
from rpo.scores.hpsv2 import CHECKPOINTS
from rpo.scores.imagereward import text_config, vision_config
from rpo.tiny.pipelines import CAPTIONS, write_clip_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# the preprocessor_config.json of laion/CLIP-ViT-H-14-laion2B-s32B-b79K and
# openai/clip-vit-large-patch14 (the legacy feature-extractor format)
PREPROCESSOR = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                "resample": 3, "size": 224}
OPEN_CLIP = {"embed_dim": 8,
             "vision_cfg": {"image_size": 224, "layers": 1, "width": 16, "head_width": 8, "patch_size": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 4, "heads": 1, "layers": 1}}
BLIP_VIT = {"image_size": 224, "patch_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 4}


def spread(module):
    """Re-draw every weight matrix as N(0, 1/fan_in): the libraries' inits (std 0.02) leave a
    one-layer random model almost blind to its input, and a parity test on scores that
    barely move with the image could not see a wrong image transform."""
    for name, tensor in module.state_dict().items():
        if tensor.dim() >= 2 and tensor.is_floating_point():
            fan_in = tensor[0].numel()
            torch.nn.init.normal_(tensor, std=fan_in ** -0.5)
    return module


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def tiny_hf_clip(text_vocab=49408, projection=8):
    from transformers import CLIPConfig, CLIPModel
    if text_vocab == 49408:
        special = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    else:  # a placeholder text tower that no tokenizer feeds
        special = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    text = dict(vocab_size=text_vocab, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                max_position_embeddings=77, projection_dim=projection, **special)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=224,
                  patch_size=32, projection_dim=projection)
    return spread(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)))


def write_pickscore(out):
    tiny_hf_clip().save_pretrained(os.path.join(out, "model"))
    processor = os.path.join(out, "processor")
    write_clip_tokenizer(processor)   # vocab.json + merges.txt, from which transformers builds the tokenizer
    write_json(os.path.join(processor, "tokenizer_config.json"),
               {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"})
    write_json(os.path.join(processor, "preprocessor_config.json"), PREPROCESSOR)


def tiny_open_clip():
    import open_clip
    return spread(open_clip.model.CLIP(**OPEN_CLIP))


def write_open_clip_config(out):
    write_json(os.path.join(out, "open_clip_config.json"),
               {"model_cfg": OPEN_CLIP, "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}})


def write_hpsv2(out, seed):
    os.makedirs(out, exist_ok=True)
    write_open_clip_config(out)
    for k, filename in enumerate(CHECKPOINTS.values()):   # v2.0 and v2.1: different weights
        torch.manual_seed(seed + k)
        torch.save({"state_dict": tiny_open_clip().state_dict()}, os.path.join(out, filename))


def write_clip(out):
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    write_open_clip_config(out)
    save_file(tiny_open_clip().state_dict(), os.path.join(out, "open_clip_model.safetensors"))


def write_aesthetic(name, out):
    from torch import nn
    clip = os.path.join(out, "clip")
    tiny_hf_clip(text_vocab=64).save_pretrained(clip)
    write_json(os.path.join(clip, "preprocessor_config.json"), PREPROCESSOR)
    head = spread(nn.Linear(8, 1) if name == "aestheticv1" else MLP(8))
    torch.save(head.state_dict(), os.path.join(out, HEADS[name].filename))


# transformers' BlipVisionModel names -> BLIP's timm-style names (the inverse of
# rpo.scores.imagereward.VISION_RENAMES), to write the checkpoint as the package ships it
BLIP_NAMES = [
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
]


def blip_name(key):
    for pattern, replacement in BLIP_NAMES:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    raise KeyError(key)


def bert_vocab():
    """A small WordPiece vocabulary: BERT's special tokens, punctuation, the kit's caption
    words, and single letters (plain and ## continuations) so that any word tokenizes."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = sorted({w for caption in CAPTIONS for w in re.findall(r"[a-z]+", caption.lower())} - set(letters))
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(",.!?'-:;\"()") + [str(d) for d in range(10)]
            + letters + ["##" + c for c in letters] + words)


def write_imagereward(out):
    from transformers import BlipTextModel, BlipVisionModel
    tokenizer_dir = os.path.join(out, "tokenizer")
    os.makedirs(tokenizer_dir, exist_ok=True)
    vocab = bert_vocab()
    with open(os.path.join(tokenizer_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    write_json(os.path.join(tokenizer_dir, "tokenizer_config.json"), {"do_lower_case": True, "model_max_length": 512})
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 4,
           "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2,
           "vocab_size": len(vocab) + 2,  # + BLIP's [DEC] and [ENC]
           "encoder_width": BLIP_VIT["embed_dim"], "add_cross_attention": True}
    write_json(os.path.join(out, "med_config.json"), med)
    write_json(os.path.join(out, "vision_config.json"), BLIP_VIT)
    vision = spread(BlipVisionModel(vision_config(BLIP_VIT)))
    text = spread(BlipTextModel(text_config(med, BLIP_VIT["embed_dim"]), add_pooling_layer=False))
    mlp = spread(MLP(med["hidden_size"]))
    state = {f"blip.visual_encoder.{blip_name(k)}": v for k, v in vision.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    # BLIP's BERT keeps position_ids as a saved buffer, and BLIP_Pretrain its contrastive
    # projections: the real checkpoint has them, so the loader must skip them
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"]).unsqueeze(0)
    state.update({f"blip.vision_proj.{k}": v for k, v in torch.nn.Linear(32, 256).state_dict().items()})
    state.update({f"blip.text_proj.{k}": v for k, v in torch.nn.Linear(32, 256).state_dict().items()})
    state.update({f"mlp.{k}": v for k, v in mlp.state_dict().items()})
    torch.save(state, os.path.join(out, "ImageReward.pt"))


def write_tiny_scorers(out, seed=0):
    """Write all six tiny scorers under `out` (about 8 MB, a few seconds). Same seed, same files."""
    steps = [
        ("pickscore", write_pickscore),
        ("hpsv2", lambda path: write_hpsv2(path, seed * 1000 + 100)),
        ("aestheticv1", lambda path: write_aesthetic("aestheticv1", path)),
        ("aestheticv2", lambda path: write_aesthetic("aestheticv2", path)),
        ("clip", write_clip),
        ("imagereward", write_imagereward),
    ]
    for k, (name, write) in enumerate(steps):
        torch.manual_seed(seed * 1000 + k)
        write(os.path.join(out, name))
    return out
