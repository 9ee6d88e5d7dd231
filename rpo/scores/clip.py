"""CLIP score: the raw cosine between open_clip ViT-H-14 `laion2B-s32B-b79K` image and
text features — no x100, no 2.5 factor, no clamp (~0.33-0.36 on SD1.5).

The weights come from the hub repo `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (the same files
as open_clip's `laion2b_s32b_b79k` tag) or a local copy of it, read by the same open_clip
call (`hf-hub:` vs `local-dir:`). The paper's code (basiclab/DiffusionDRO) builds this model with the hpsv2
package's loader and evaluation transform, so images are letterboxed as for HPSv2; for
square images (every generated benchmark image) this equals a centre crop.
"""
import open_clip

from rpo.scores.base import release_version, resolve
from rpo.scores.hpsv2 import OpenClipCosine, build, check_tokenizer

REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class ClipScore(OpenClipCosine):
    name = "clip"

    def __init__(self, model, tokenizer, device):
        super().__init__(model, tokenizer, device)
        self.version = release_version("ViT-H-14-laion2B-s32B-b79K", [self.model], [self.transform, tokenizer])


def load(name="clip", weights_dir=None, device="cpu", **_):
    source, hint = resolve(weights_dir, "clip", REPO, "CLIP score model")
    architecture = ("hf-hub:" if weights_dir is None else "local-dir:") + source
    # require_pretrained: when the config is found but not the weights, open_clip would
    # otherwise warn and carry on with random weights
    model = build(architecture, "CLIP score model", hint, require_pretrained=True)
    tokenizer = check_tokenizer(model, open_clip.get_tokenizer(architecture), architecture)
    return ClipScore(model, tokenizer, device)
