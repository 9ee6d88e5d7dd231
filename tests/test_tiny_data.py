import filecmp
import json
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

from rpo.tiny import pipelines as tiny
from rpo.cli import UserError
from rpo.data.folders import ExpertDataset, PromptDataset, scan
from rpo.models import load_text_encoders, load_unet


def test_tiny_sd15_loads_offline_and_generates(kit):
    pipe = StableDiffusionPipeline.from_pretrained(kit["sd15"])
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.model_max_length == 77
    assert pipe.vae_scale_factor == 8
    # the real SD1.5 scheduler config (clip_sample false matters for DDPM)
    assert pipe.scheduler.config.clip_sample is False
    images = pipe("a red fox", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3)
    unet = UNet2DConditionModel.from_pretrained(kit["sd15"], subfolder="unet")
    assert unet.config.cross_attention_dim == 32


def test_tokenizer_matches_open_clip(kit):
    import open_clip
    ours = CLIPTokenizer.from_pretrained(kit["sd15"], subfolder="tokenizer")
    text = "an astronaut riding a horse on the moon, digital art!"
    reference = open_clip.get_tokenizer("ViT-L-14")([text])[0]
    ids = ours(text, padding="max_length", max_length=77).input_ids
    end = ids.index(49407) + 1  # SD pads with <|endoftext|>, open_clip with 0: compare up to the end token
    assert end > 10 and ids[:end] == reference.tolist()[:end]


def test_tiny_kit_is_deterministic(tmp_path):
    tiny.write_experts(tmp_path / "a", seed=3)
    tiny.write_experts(tmp_path / "b", seed=3)
    tiny.write_experts(tmp_path / "c", seed=4)
    a = sorted(os.listdir(tmp_path / "a"))
    assert a == sorted(os.listdir(tmp_path / "b"))
    for name in a:
        cmp = filecmp.dircmp(tmp_path / "a" / name, tmp_path / "b" / name)
        assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    different = [n for n in a if filecmp.dircmp(tmp_path / "a" / n, tmp_path / "c" / n).diff_files]
    assert different


def test_expert_dataset_transform(kit):
    data = ExpertDataset(kit["experts"], resolution=32, random_flip=False)
    assert len(data) == 8
    sizes = set()
    for i in range(len(data)):
        item = data[i]
        assert item["pixel_values"].shape == (3, 32, 32)
        assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
        sizes.add(tuple(item["original_size"].tolist()))
        assert item["caption"] == data.items[i].caption and not item["caption"].endswith("\n")
    assert len(sizes) > 1  # the kit has varied sizes
    assert any(i.image.endswith(".jpg") for i in data.items) and any(i.image.endswith(".png") for i in data.items)


def test_flip_is_a_mirror(kit):
    data = ExpertDataset(kit["experts"], resolution=32, random_flip=False)
    # a square original: the centre crop is then symmetric and flip commutes with it
    index = next(i for i in range(len(data)) if len(set(data[i]["original_size"].tolist())) == 1)
    plain = data[index]["pixel_values"]
    flip = ExpertDataset(kit["experts"], resolution=32, random_flip=True)
    seen = set()
    torch.manual_seed(0)
    for _ in range(20):
        x = flip[index]["pixel_values"]
        if torch.equal(x, plain):
            seen.add("same")
        elif torch.allclose(x, plain.flip(-1), atol=1e-6):
            seen.add("mirror")
        else:
            raise AssertionError("flip produced neither the image nor its mirror")
    assert seen == {"same", "mirror"}


def test_bad_datasets_are_named(tmp_path):
    with pytest.raises(UserError, match="not found: .*missing"):
        scan(str(tmp_path / "missing"), need_image=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        scan(str(tmp_path / "empty"), need_image=True)
    item = tmp_path / "nocap" / "0"
    item.mkdir(parents=True)
    with pytest.raises(UserError, match="no caption.txt: .*nocap"):
        scan(str(tmp_path / "nocap"), need_image=False)
    (item / "caption.txt").write_text("a cat\n")
    with pytest.raises(UserError, match="no image"):
        scan(str(tmp_path / "nocap"), need_image=True)
    (item / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match="unreadable image .*x.png"):
        scan(str(tmp_path / "nocap"), need_image=True)
    assert [i.caption for i in PromptDataset(str(tmp_path / "nocap")).items] == ["a cat"]


def test_loaders_give_one_line_errors(tmp_path, kit):
    with pytest.raises(UserError, match="no 'unet/' inside"):
        load_unet(str(tmp_path), subfolder="unet")
    with pytest.raises(UserError, match="cannot load the UNet from 'nobody/no-such-model'.*local folder"):
        load_unet("nobody/no-such-model", subfolder="unet")
    encoders = load_text_encoders(kit["sd15"])
    embeds, pooled = encoders.encode(["a cat", ""])
    assert embeds.shape == (2, 77, 32) and pooled is None


def test_config_file_overrides_defaults_and_rejects_unknown(tmp_path):
    import argparse
    from rpo.cli import flag, parse_args
    def parser():
        p = argparse.ArgumentParser()
        p.add_argument("--lr", type=float, default=1.0)
        p.add_argument("--mode", choices=["a", "b"], default="a")
        flag(p, "use_ema", True, "ema")
        return p
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.5\nuse_ema: false\n")
    args = parse_args(parser(), ["--config", str(cfg)])
    assert args.lr == 0.5 and args.use_ema is False
    args = parse_args(parser(), ["--config", str(cfg), "--lr", "2", "--use_ema"])
    assert args.lr == 2.0 and args.use_ema is True
    (tmp_path / "c.json").write_text(json.dumps({"lrr": 1}))
    with pytest.raises(UserError, match="unknown option 'lrr'"):
        parse_args(parser(), ["--config", str(tmp_path / "c.json")])
    (tmp_path / "d.json").write_text(json.dumps({"mode": "z"}))
    with pytest.raises(UserError, match="'mode' must be one of"):
        parse_args(parser(), ["--config", str(tmp_path / "d.json")])
