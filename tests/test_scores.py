"""Each scorer against an independent computation of its published formula on the tiny
weights (features from the library classes called directly, heads applied as raw matrix
products from the weight files), the tiny kit, and the loading errors."""
import argparse
import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rpo.cli import UserError
from rpo.scores import METRICS, load_scorer
from rpo.scores.base import download, sha256_of
from rpo.scores.hpsv2 import LetterboxTransform
from rpo.tiny.scorers import write_tiny_scorers
from rpo.tiny.pipelines import CAPTIONS, random_image

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


@pytest.fixture(scope="module")
def images():
    rng = random.Random(7)
    sizes = [(512, 512), (300, 200), (64, 80), (224, 224), (150, 400)]
    return [random_image(rng, w, h) for w, h in sizes]


@pytest.fixture(scope="module")
def prompts():
    return CAPTIONS[:5]


def close(a, b, tol=1e-5):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.all(np.abs(a - b) <= tol * np.maximum(1.0, np.abs(b))), np.abs(a - b).max()


def clip_pixels_pil(image, size=224):
    """CLIP's published preprocessing by hand: shorter side to `size` with PIL bicubic,
    centre crop, [0, 1], CLIP mean/std."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    resized = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                           Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    crop = resized.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - CLIP_MEAN) / CLIP_STD


# --------------------------------------------------------------------------- kit
def test_tiny_kit_layout_size_and_determinism(scorer_weights, tmp_path):
    expected = [
        "pickscore/model/config.json", "pickscore/processor/preprocessor_config.json", "pickscore/processor/vocab.json",
        "hpsv2/HPS_v2_compressed.pt", "hpsv2/HPS_v2.1_compressed.pt", "hpsv2/open_clip_config.json",
        "aestheticv1/clip/config.json", "aestheticv1/sa_0_4_vit_l_14_linear.pth",
        "aestheticv2/clip/config.json", "aestheticv2/sac+logos+ava1-l14-linearMSE.pth",
        "clip/open_clip_config.json", "clip/open_clip_model.safetensors",
        "imagereward/ImageReward.pt", "imagereward/med_config.json", "imagereward/tokenizer/vocab.txt",
    ]
    for name in expected:
        assert os.path.isfile(os.path.join(scorer_weights, name)), name
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(scorer_weights) for f in files)
    assert total < 10 * 2 ** 20, f"tiny scorers take {total / 2 ** 20:.1f} MB"

    def digest(root):
        return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
                for d, _, files in os.walk(root) for f in files}
    write_tiny_scorers(str(tmp_path / "again"), seed=0)
    write_tiny_scorers(str(tmp_path / "other"), seed=1)
    same = digest(scorer_weights)
    assert digest(str(tmp_path / "again")) == same
    other = digest(str(tmp_path / "other"))
    assert other["hpsv2/HPS_v2_compressed.pt"] != same["hpsv2/HPS_v2_compressed.pt"]
    assert other["imagereward/ImageReward.pt"] != same["imagereward/ImageReward.pt"]


def test_tokenizers_have_real_vocabularies(scorer_weights):
    import open_clip
    pick = load_scorer("pickscore", scorer_weights)
    assert len(pick.tokenizer) == 49408 == pick.model.config.text_config.vocab_size
    hps = load_scorer("hpsv2", scorer_weights)
    text = "an astronaut riding a horse on the moon, digital art!"
    ids = pick.tokenizer(text).input_ids
    assert hps.tokenizer([text])[0][:len(ids)].tolist() == ids  # the HF and open_clip BPE agree
    assert open_clip.get_tokenizer("ViT-H-14")([text]).tolist() == hps.tokenizer([text]).tolist()
    reward = load_scorer("imagereward", scorer_weights)
    with open(os.path.join(scorer_weights, "imagereward", "med_config.json")) as f:
        assert len(reward.tokenizer) == json.load(f)["vocab_size"] == reward.text.config.vocab_size
    encoded = reward.tokenizer(["a red fox sitting in fresh snow"], padding="max_length", max_length=35)
    assert len(encoded.input_ids[0]) == 35 and 1 not in encoded.input_ids[0][1:7]  # no [UNK] for kit words


# --------------------------------------------------------------------------- formulas
def test_pickscore_is_logit_scale_times_cosine(scorer_weights, images, prompts):
    from transformers import CLIPModel, CLIPTokenizer
    scorer = load_scorer("pickscore", scorer_weights)
    pixels = torch.stack([clip_pixels_pil(image) for image in images])
    ours_pixels = torch.stack([scorer.preprocess(image) for image in images])
    assert torch.allclose(ours_pixels, pixels, atol=1e-5)  # PIL bicubic, not torchvision's
    model = CLIPModel.from_pretrained(os.path.join(scorer_weights, "pickscore", "model")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(scorer_weights, "pickscore", "processor"))
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=pixels).pooler_output.double()
        text = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_features = model.get_text_features(**text).pooler_output.double()
    cosine = (image_features * text_features).sum(-1) / (image_features.norm(dim=-1) * text_features.norm(dim=-1))
    expected = float(model.logit_scale.detach().exp()) * cosine
    ok, worst = close(scorer.score(images, prompts), expected)
    assert ok, worst
    assert expected.std() > 0.1  # the tiny model does see its input


@pytest.mark.parametrize("version", ["v2.0", "v2.1"])
def test_hpsv2_is_100_cosine_of_the_checkpoint(scorer_weights, images, prompts, version):
    import open_clip
    scorer = load_scorer("hpsv2", scorer_weights, hps_version=version)
    assert scorer.version.startswith(version + "-")
    model = open_clip.create_model("local-dir:" + os.path.join(scorer_weights, "hpsv2"), load_weights=False,
                                   output_dict=True)
    filename = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}[version]
    model.load_state_dict(torch.load(os.path.join(scorer_weights, "hpsv2", filename), weights_only=True)["state_dict"])
    model.eval()
    pixels = torch.stack([scorer.preprocess(image) for image in images])
    with torch.no_grad():
        out = model(pixels, open_clip.get_tokenizer("ViT-H-14")(prompts))
    expected = 100 * (out["image_features"].double() * out["text_features"].double()).sum(-1)
    ok, worst = close(scorer.score(images, prompts), expected)
    assert ok, worst


def test_hpsv2_versions_differ(scorer_weights, images, prompts):
    v20 = load_scorer("hpsv2", scorer_weights, hps_version="v2.0")
    v21 = load_scorer("hpsv2", scorer_weights, hps_version="v2.1")
    assert v20.version != v21.version
    assert not torch.allclose(v20.score(images, prompts), v21.score(images, prompts))


def test_hpsv2_letterbox_transform():
    """hpsv2's evaluation transform: longer side to 224, zero padding (black before
    normalisation), no crop."""
    transform = LetterboxTransform(224, CLIP_MEAN.flatten().tolist(), CLIP_STD.flatten().tolist())
    image = Image.new("RGB", (448, 224), (255, 255, 255))       # wide: 224 x 112 after resize
    pixels = transform(image)
    assert pixels.shape == (3, 224, 224)
    black = (-CLIP_MEAN / CLIP_STD).expand(3, 56, 224)
    white = ((1 - CLIP_MEAN) / CLIP_STD).expand(3, 112, 224)
    assert torch.allclose(pixels[:, :56], black, atol=1e-6) and torch.allclose(pixels[:, -56:], black, atol=1e-6)
    assert torch.allclose(pixels[:, 56:-56], white, atol=1e-5)
    tall = transform(Image.new("RGB", (100, 224), (255, 255, 255)))  # already 224 high: padded, not resized
    assert tall.shape == (3, 224, 224) and torch.allclose(tall[:, :, :62], black[:, :1, :1].expand(3, 224, 62))


def test_aesthetic_heads_on_normalised_vit_features(scorer_weights, images):
    from transformers import CLIPModel
    for name, filename in (("aestheticv1", "sa_0_4_vit_l_14_linear.pth"),
                           ("aestheticv2", "sac+logos+ava1-l14-linearMSE.pth")):
        scorer = load_scorer(name, scorer_weights)
        model = CLIPModel.from_pretrained(os.path.join(scorer_weights, name, "clip")).eval()
        pixels = torch.stack([clip_pixels_pil(image) for image in images])
        with torch.no_grad():
            features = model.get_image_features(pixel_values=pixels).pooler_output.double()
        features = features / features.norm(dim=-1, keepdim=True)
        state = {k: v.double() for k, v in torch.load(os.path.join(scorer_weights, name, filename)).items()}
        if name == "aestheticv1":
            expected = features @ state["weight"].T + state["bias"]
        else:  # the improved MLP: five affine layers and nothing in between
            x = features
            for layer in (0, 2, 4, 6, 7):
                x = x @ state[f"layers.{layer}.weight"].T + state[f"layers.{layer}.bias"]
            expected = x
        ok, worst = close(scorer.score(images, ["unused"] * len(images)), expected.squeeze(-1))
        assert ok, (name, worst)


def test_clip_score_is_raw_cosine(scorer_weights, images, prompts):
    import open_clip
    from safetensors.torch import load_file
    scorer = load_scorer("clip", scorer_weights)
    model = open_clip.create_model("local-dir:" + os.path.join(scorer_weights, "clip"), load_weights=False)
    model.load_state_dict(load_file(os.path.join(scorer_weights, "clip", "open_clip_model.safetensors")))
    model.eval()
    pixels = torch.stack([scorer.preprocess(image) for image in images])
    with torch.no_grad():
        image_features = model.encode_image(pixels).double()
        text_features = model.encode_text(open_clip.get_tokenizer("ViT-H-14")(prompts)).double()
    expected = (image_features * text_features).sum(-1) / (image_features.norm(dim=-1) * text_features.norm(dim=-1))
    values = scorer.score(images, prompts)
    ok, worst = close(values, expected)
    assert ok, worst
    assert values.abs().max() <= 1.0


def test_imagereward_weights_mlp_and_normalisation(scorer_weights, images, prompts):
    scorer = load_scorer("imagereward", scorer_weights)
    checkpoint = torch.load(os.path.join(scorer_weights, "imagereward", "ImageReward.pt"))
    # the renamed BLIP tensors are the checkpoint's tensors
    vision = scorer.vision.state_dict()
    for blip, ours in [("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
                       ("patch_embed.proj.weight", "embeddings.patch_embedding.weight"),
                       ("blocks.0.attn.qkv.weight", "encoder.layers.0.self_attn.qkv.weight"),
                       ("blocks.0.attn.proj.bias", "encoder.layers.0.self_attn.projection.bias"),
                       ("blocks.0.norm2.weight", "encoder.layers.0.layer_norm2.weight"), ("norm.bias", "post_layernorm.bias")]:
        assert torch.equal(vision[ours], checkpoint[f"blip.visual_encoder.{blip}"]), blip
    assert torch.equal(scorer.text.state_dict()["encoder.layer.0.crossattention.self.key.weight"],
                       checkpoint["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"])
    # reward = MLP([CLS]) as five affine maps from the file, then the package's mean/std
    pixels = torch.stack([scorer.preprocess(image) for image in images])
    text = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_tokens = scorer.vision(pixel_values=pixels).last_hidden_state
        cls = scorer.text(input_ids=text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_tokens,
                          encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
    x = cls.double()
    for layer in (0, 2, 4, 6, 7):
        x = x @ checkpoint[f"mlp.layers.{layer}.weight"].double().T + checkpoint[f"mlp.layers.{layer}.bias"].double()
    expected = (x.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    ok, worst = close(scorer.score(images, prompts), expected)
    assert ok, worst
    assert expected.std() > 0.05


def test_imagereward_preprocess_order():
    """Resize and crop before the RGB conversion, as the package does: a palette image is
    then resized with nearest neighbour (PIL's rule for 'P'), which the order makes visible."""
    from rpo.scores.imagereward import image_transform
    image = random_image(random.Random(3), 300, 200).convert("P", palette=Image.ADAPTIVE)
    expected = image.resize((336, 224), Image.BICUBIC).crop((56, 0, 280, 224)).convert("RGB")
    expected = (torch.from_numpy(np.asarray(expected, dtype=np.float32) / 255).permute(2, 0, 1) - CLIP_MEAN) / CLIP_STD
    assert torch.allclose(image_transform(224)(image), expected, atol=1e-5)


def test_score_shapes_and_batch_independence(scorer_weights, images, prompts):
    for name in METRICS:
        scorer = load_scorer(name, scorer_weights)
        together = scorer.score(images, prompts)
        assert together.shape == (len(images),) and together.dtype == torch.float32
        one_by_one = torch.cat([scorer.score([i], [p]) for i, p in zip(images, prompts)])
        ok, worst = close(together, one_by_one)
        assert ok, (name, worst)
        assert scorer.score([], []).shape == (0,)


# --------------------------------------------------------------------------- errors
def test_unknown_metric_and_version():
    with pytest.raises(UserError, match="pickscore, hpsv2, aestheticv1, aestheticv2, clip, imagereward"):
        load_scorer("aesthetic")
    with pytest.raises(UserError, match="v2.0, v2.1"):
        load_scorer("hpsv2", hps_version="v3")


@pytest.mark.parametrize("name", METRICS)
def test_missing_weights_offline_is_one_line(name, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no downloaded aesthetic head
    # (HF_HUB_OFFLINE=1 is set for the whole session in conftest.py)
    with pytest.raises(UserError) as error:
        load_scorer(name)
    message = str(error.value)
    assert "\n" not in message and ("hf download" in message or "download https" in message)
    # with an empty weights_dir: the exact sub-folder to fill
    (tmp_path / "weights").mkdir()
    with pytest.raises(UserError) as error:
        load_scorer(name, weights_dir=str(tmp_path / "weights"))
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "weights" / name) in message


def test_missing_part_names_the_path_and_the_download(scorer_weights, tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(scorer_weights, weights)
    shutil.rmtree(weights / "pickscore" / "processor")
    with pytest.raises(UserError, match=r"pickscore/processor is missing.*hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        load_scorer("pickscore", str(weights))
    os.remove(weights / "hpsv2" / "HPS_v2.1_compressed.pt")
    load_scorer("hpsv2", str(weights), hps_version="v2.0")  # the other version is still there
    with pytest.raises(UserError, match=r"HPS_v2.1_compressed.pt is missing.*hf download xswu/HPSv2 HPS_v2.1_compressed.pt"):
        load_scorer("hpsv2", str(weights), hps_version="v2.1")
    checkpoint = torch.load(weights / "hpsv2" / "HPS_v2_compressed.pt", weights_only=True)
    checkpoint["args"] = argparse.Namespace(lr=1e-5)   # not plain tensors: refused by weights_only=True
    torch.save(checkpoint, weights / "hpsv2" / "HPS_v2_compressed.pt")
    with pytest.raises(UserError, match="cannot load the HPSv2 v2.0 checkpoint.*Weights only load failed"):
        load_scorer("hpsv2", str(weights), hps_version="v2.0")
    with open(weights / "imagereward" / "ImageReward.pt", "r+b") as f:
        f.truncate(1000)  # a half-downloaded checkpoint
    with pytest.raises(UserError, match="cannot load the ImageReward checkpoint"):
        load_scorer("imagereward", str(weights))
    with pytest.raises(UserError, match="no such folder"):
        load_scorer("clip", str(tmp_path / "nowhere"))


def test_open_clip_weights_missing_is_an_error_not_random(scorer_weights, tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(scorer_weights, weights)
    os.remove(weights / "clip" / "open_clip_model.safetensors")   # config alone must not give a random model
    with pytest.raises(UserError, match="CLIP score model"):
        load_scorer("clip", str(weights))


def test_download_is_atomic_and_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    source = tmp_path / "head.pth"
    torch.save({"weight": torch.ones(1, 8), "bias": torch.zeros(1)}, source)
    digest = sha256_of(source)
    target = tmp_path / "cache" / "head.pth"
    with pytest.raises(UserError, match="expected 0000"):
        download(source.as_uri(), str(target), "0" * 64, "test head", "hint")
    assert not target.parent.exists() or os.listdir(target.parent) == []   # nothing half-written left
    download(source.as_uri(), str(target), digest, "test head", "hint")
    assert sha256_of(target) == digest
    source.unlink()
    assert download(source.as_uri(), str(target), digest, "test head", "hint") == str(target)  # downloaded once
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline"):
        download(source.as_uri(), str(tmp_path / "other.pth"), digest, "test head", "hint")


def test_metrics_sharing_a_transform_get_identical_inputs(scorer_weights, images):
    """score.py preprocesses once per distinct transform `key`: equal keys must mean equal tensors."""
    scorers = {m: load_scorer(m, scorer_weights) for m in METRICS}
    keys = {m: getattr(s.transform, "key", None) for m, s in scorers.items()}
    assert keys["pickscore"] == keys["aestheticv1"] == keys["aestheticv2"] != keys["hpsv2"] == keys["clip"]
    assert keys["imagereward"] is None
    for image in images:
        assert torch.equal(scorers["pickscore"].preprocess(image), scorers["aestheticv2"].preprocess(image))
        assert torch.equal(scorers["hpsv2"].preprocess(image), scorers["clip"].preprocess(image))


def test_scorer_moves_between_devices(scorer_weights):
    # train.py keeps the validation scorer in CPU memory and moves it to the GPU to score:
    # `to` must reach every model the scorer holds (the meta device stands in for a GPU)
    from rpo.scores import load_scorer
    for metric in ("imagereward", "aestheticv2"):
        scorer = load_scorer(metric, weights_dir=scorer_weights).to("meta")
        modules = [v for v in vars(scorer).values() if isinstance(v, torch.nn.Module)]
        assert modules and scorer.device.type == "meta"
        assert all(p.is_meta for m in modules for p in m.parameters())
