"""The five preference metrics (six scorers), exact to their published definitions
(docs/design.md, "Scorers"; docs/upstream.md, "Scorers" and "Results and evaluation"), behind one registry:

    scorer = load_scorer("hpsv2", weights_dir=None, device="cuda", hps_version="v2.0")
    scores = scorer.score(pil_images, prompts)          # (N,) float32 on the CPU

| name        | value                                            | ~SD1.5    |
|-------------|--------------------------------------------------|-----------|
| pickscore   | logit_scale.exp() * cos, PickScore_v1            | 20-22     |
| hpsv2       | 100 * cos, open_clip ViT-H-14 + HPS v2.0 / v2.1  | 27-29     |
| aestheticv1 | LAION linear head on normalised CLIP ViT-L/14    | 5.9-6.7   |
| aestheticv2 | improved MLP head on the same features           |           |
| clip        | raw cos, open_clip ViT-H-14 laion2B-s32B-b79K    | 0.33-0.36 |
| imagereward | (r - mean) / std, ImageReward-v1.0               |           |

Weights come from the hub by default. With `weights_dir` (`--weights_dir DIR` on the
command line) they are read from one sub-folder per metric — the layout `python -m
rpo.tiny scorers DIR` writes, and the one to fill with the official files for offline use:

    DIR/pickscore/model/        <- hub yuvalkirstain/PickScore_v1 (config.json and the weights file)
    DIR/pickscore/processor/    <- hub laion/CLIP-ViT-H-14-laion2B-s32B-b79K: preprocessor_config.json
                                   and the tokenizer files (vocab.json, merges.txt, tokenizer*.json)
    DIR/hpsv2/                  <- hub xswu/HPSv2: HPS_v2_compressed.pt (v2.0) and/or HPS_v2.1_compressed.pt
    DIR/aestheticv1/clip/       <- hub openai/clip-vit-large-patch14 (config.json, the weights file,
                                   preprocessor_config.json)
    DIR/aestheticv1/sa_0_4_vit_l_14_linear.pth        <- LAION-AI/aesthetic-predictor (GitHub)
    DIR/aestheticv2/clip/       <- the same openai/clip-vit-large-patch14 (a symlink to ../aestheticv1/clip will do)
    DIR/aestheticv2/sac+logos+ava1-l14-linearMSE.pth  <- christophschuhmann/improved-aesthetic-predictor
    DIR/clip/                   <- hub laion/CLIP-ViT-H-14-laion2B-s32B-b79K: open_clip_config.json and
                                   open_clip_model.safetensors (or open_clip_pytorch_model.bin)
    DIR/imagereward/            <- hub THUDM/ImageReward: ImageReward.pt, med_config.json
    DIR/imagereward/tokenizer/  <- hub bert-base-uncased (vocab.txt, tokenizer_config.json)

e.g. `hf download xswu/HPSv2 HPS_v2_compressed.pt --local-dir DIR/hpsv2`. Only the
metrics asked for need their folder. The tiny kit adds two files the real layout does
not need: `hpsv2/open_clip_config.json` (the architecture, otherwise open_clip's built-in
ViT-H-14) and `imagereward/vision_config.json` (otherwise BLIP's ViT-L/16).
"""
import importlib
import os

from rpo.cli import UserError

METRICS = ("pickscore", "hpsv2", "aestheticv1", "aestheticv2", "clip", "imagereward")
HPS_VERSIONS = ("v2.0", "v2.1")
# metric -> the module whose `load(name, weights_dir, device, hps_version)` builds it;
# imported on demand, so that one metric does not import the others' libraries
LOADERS = {"pickscore": "pickscore", "hpsv2": "hpsv2", "aestheticv1": "aesthetic", "aestheticv2": "aesthetic",
           "clip": "clip", "imagereward": "imagereward"}


def load_scorer(name, weights_dir=None, device="cpu", hps_version="v2.0"):
    """Load metric `name` once; its `score(images, prompts)` can then be called freely."""
    if name not in METRICS:
        raise UserError(f"unknown metric '{name}' (choose from {', '.join(METRICS)})")
    if hps_version not in HPS_VERSIONS:
        raise UserError(f"unknown HPSv2 version '{hps_version}' (choose from {', '.join(HPS_VERSIONS)})")
    if weights_dir is not None and not os.path.isdir(weights_dir):
        raise UserError(f"--weights_dir: no such folder: {weights_dir}")
    module = importlib.import_module(f"rpo.scores.{LOADERS[name]}")
    return module.load(name, weights_dir=weights_dir, device=device, hps_version=hps_version)
