"""LAION aesthetic predictors on L2-normalised `openai/clip-vit-large-patch14` image
features (the CLIP processor of the same model, PIL bicubic as the published numbers):

- v1 (`aestheticv1`): the linear head `sa_0_4_vit_l_14_linear.pth` (LAION-AI/aesthetic-
  predictor), ~5.9-6.7 on SD1.5 — what the DRO paper's tables report;
- v2 (`aestheticv2`): the "improved" MLP `sac+logos+ava1-l14-linearMSE.pth`
  (christophschuhmann/improved-aesthetic-predictor), what most RL repositories report.

The heads are downloaded once into `~/.cache/rpo/aesthetic/` (atomically, sha256-checked)
and loaded with `weights_only=True`; or read from `weights_dir/aestheticv{1,2}/`.
"""
import os
import pickle
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

from rpo.cli import UserError
from rpo.scores.base import Scorer, cache_dir, download, from_pretrained, load_model, prepare, release_version, resolve
from rpo.scores.pickscore import ImageTransform

CLIP_MODEL = "openai/clip-vit-large-patch14"


@dataclass
class Head:
    filename: str
    url: str
    sha256: str | None   # None: no digest could be pinned (see `download`)


HEADS = {
    "aestheticv1": Head("sa_0_4_vit_l_14_linear.pth",
                        "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth",
                        "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba"),
    "aestheticv2": Head("sac+logos+ava1-l14-linearMSE.pth",
                        "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                        "sac%2Blogos%2Bava1-l14-linearMSE.pth",
                        "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"),
}


class MLP(nn.Module):
    """The improved-aesthetic-predictor MLP — five linear layers and dropout, and no
    activations (commented out in the original, so the whole head is affine). ImageReward
    reuses it on BLIP features. Keys `layers.{0,2,4,6,7}.*` as in the released files."""

    def __init__(self, input_size):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def head_from_state_dict(name, state_dict):
    if name == "aestheticv1":
        head = nn.Linear(state_dict["weight"].shape[1], 1)
    else:
        head = MLP(state_dict["layers.0.weight"].shape[1])
    head.load_state_dict(state_dict, strict=True)
    return head


class Aesthetic(Scorer):
    def __init__(self, name, vision_model, image_processor, head, device):
        super().__init__(ImageTransform(image_processor), device)
        self.name = name
        self.vision_model = prepare(vision_model, device)
        self.head = prepare(head, device)
        self.version = release_version(os.path.splitext(HEADS[name].filename)[0], [self.vision_model, self.head],
                                       [self.transform])

    @torch.no_grad()
    def score_tensors(self, pixels, prompts=None):
        features = self.vision_model(pixel_values=pixels.to(self.device)).image_embeds
        return self.head(F.normalize(features, dim=-1)).squeeze(-1).float().cpu()


def load_head(name, weights_dir):
    head = HEADS[name]
    if weights_dir is None:
        path = os.path.join(cache_dir(), "aesthetic", head.filename)
        hint = f"download {head.url} on a connected machine into {path} (or into WEIGHTS_DIR/{name}/ and pass --weights_dir)"
        download(head.url, path, head.sha256, f"{name} head", hint)
    else:
        path = os.path.join(weights_dir, name, head.filename)
        hint = f"download it from {head.url}"
        if not os.path.isfile(path):
            raise UserError(f"{name} head not found: {path} is missing; {hint}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        return head_from_state_dict(name, state_dict)
    except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot load the {name} head from {path} ({str(e).splitlines()[0]}); {hint}") from None


def load(name, weights_dir=None, device="cpu", **_):
    source, hint = resolve(weights_dir, f"{name}/clip", CLIP_MODEL, f"{name} CLIP ViT-L/14")
    vision_model = load_model(CLIPVisionModelWithProjection, source, f"{name} CLIP ViT-L/14", hint)
    image_processor = from_pretrained(CLIPImageProcessorPil, source, f"{name} CLIP processor", hint)
    return Aesthetic(name, vision_model, image_processor, load_head(name, weights_dir), device)
