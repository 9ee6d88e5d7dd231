"""HPSv2 (Wu et al. 2023): `100 * cos(image, text)` of open_clip's ViT-H-14 carrying the
`xswu/HPSv2` checkpoint — `HPS_v2_compressed.pt` (v2.0, the paper's default) or
`HPS_v2.1_compressed.pt` (v2.1) — ~27-29 on SD1.5.

The hpsv2 package builds the model with its LAION weights (a 4 GB download) and then
overwrites every tensor with the checkpoint; here the model is built empty
(`pretrained=None`) and the checkpoint loaded `strict=True` (the package's vendored model
config is identical to open_clip's ViT-H-14). Images go through the package's evaluation
transform (`LetterboxTransform`), not open_clip's usual centre crop.
"""
import contextlib
import logging
import os
import pickle

import open_clip
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from rpo.scores import HPS_VERSIONS
from rpo.cli import UserError
from rpo.scores.base import Scorer, hub_file, prepare, release_version, resolve

REPO = "xswu/HPSv2"
CHECKPOINTS = dict(zip(HPS_VERSIONS, ("HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt")))
ARCHITECTURE = "ViT-H-14"


class LetterboxTransform:
    """The evaluation transform of hpsv2 (`light_augmentation=True`): RGB, a [0, 1]
    tensor, the longer side resized to `size` (bicubic on the tensor, antialiased), zero
    padding to a square, CLIP mean/std. Two inputs on which hpsv2 fails are handled
    instead: an RGBA image (hpsv2 keeps the alpha channel) is converted to RGB, and a
    non-square image whose longer side already equals `size` is padded (hpsv2 skips the
    padding too, and the model then rejects the non-square input)."""

    def __init__(self, size, mean, std):
        self.size, self.mean, self.std = size, list(mean), list(std)
        self.key = ("letterbox", size, tuple(self.mean), tuple(self.std))   # equal keys, equal outputs

    def __call__(self, image):
        pixels = TF.to_tensor(image.convert("RGB"))
        height, width = pixels.shape[1:]
        scale = self.size / float(max(height, width))
        if scale != 1.0:
            pixels = TF.resize(pixels, [round(height * scale), round(width * scale)], InterpolationMode.BICUBIC,
                               antialias=True)
        pad_h, pad_w = self.size - pixels.shape[1], self.size - pixels.shape[2]
        if pad_h or pad_w:
            pixels = TF.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        return TF.normalize(pixels, self.mean, self.std)


def letterbox_for(model):
    cfg = model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return LetterboxTransform(size, cfg["mean"], cfg["std"])


def check_tokenizer(model, tokenizer, source):
    # a model whose vocabulary is smaller than the tokenizer's would fail on the first
    # rare token, or worse, index the wrong embedding (docs/environment.md, "Traps")
    vocab = len(tokenizer.encoder)
    if model.vocab_size != vocab:
        raise UserError(f"open_clip model from '{source}' has a vocabulary of {model.vocab_size}, its tokenizer {vocab}")
    return tokenizer


class OpenClipCosine(Scorer):
    """`scale * cos(image, text)` of an open_clip model: HPSv2 (scale 100) and CLIP score (1)."""

    scale = 1.0

    def __init__(self, model, tokenizer, device):
        super().__init__(letterbox_for(model), device)
        self.model = prepare(model, device)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def score_tensors(self, pixels, prompts):
        text = self.tokenizer(list(prompts)).to(self.device)
        image_features = self.model.encode_image(pixels.to(self.device), normalize=True)
        text_features = self.model.encode_text(text, normalize=True)
        return (self.scale * (image_features * text_features).sum(-1)).float().cpu()


class HPSv2(OpenClipCosine):
    name = "hpsv2"
    scale = 100.0

    def __init__(self, model, tokenizer, device, hps_version):
        super().__init__(model, tokenizer, device)
        self.version = release_version(hps_version, [self.model], [self.transform, tokenizer])


@contextlib.contextmanager
def quiet_logging():
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def build(architecture, what, hint, **kwargs):
    try:
        return open_clip.create_model(architecture, **kwargs)
    except (RuntimeError, OSError, ValueError) as e:
        raise UserError(f"cannot build the {what} from '{architecture}' ({str(e).splitlines()[0]}); {hint}") from None


def load(name="hpsv2", weights_dir=None, device="cpu", hps_version="v2.0"):
    if hps_version not in CHECKPOINTS:
        raise UserError(f"unknown HPSv2 version '{hps_version}' (choose from {', '.join(CHECKPOINTS)})")
    filename = CHECKPOINTS[hps_version]
    what = f"HPSv2 {hps_version} checkpoint"
    source, hint = resolve(weights_dir, "hpsv2", REPO, what, filename)
    path = hub_file(REPO, filename, what, hint) if weights_dir is None else source
    # A folder may carry the architecture as open_clip's `open_clip_config.json` (the tiny
    # kit does); otherwise it is open_clip's built-in ViT-H-14.
    architecture = ARCHITECTURE
    if weights_dir is not None and os.path.isfile(os.path.join(weights_dir, "hpsv2", "open_clip_config.json")):
        architecture = "local-dir:" + os.path.join(weights_dir, "hpsv2")
    with quiet_logging():  # open_clip warns that the model is random: the checkpoint comes next
        model = build(architecture, "HPSv2 model", hint, pretrained=None, load_weights=False)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot load the {what} from {path} ({str(e).splitlines()[0]}); {hint}") from None
    tokenizer = check_tokenizer(model, open_clip.get_tokenizer(architecture), architecture)
    return HPSv2(model, tokenizer, device, hps_version)
