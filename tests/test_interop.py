"""Bring your own model and data: pipelines built without rpo.tiny (tests/interop_kit.py),
single-file checkpoints, --revision/--cache_dir, expert data as metadata image folders
and `datasets` datasets, 16-bit and other image modes. Small sizes keep each case to
seconds; the inference runs are subprocesses of the real script."""
import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import interop_kit
from rpo import generate
from rpo.cli import UserError
from rpo.data.folders import ExpertDataset, to_rgb
from rpo.models import check_pipeline_folder, check_tokenizer, load_text_encoders, load_unet, load_vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESOLUTION = 16


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("independent")
    return {kind: interop_kit.write_independent_sd15(root / kind, scheduler=kind) for kind in interop_kit.SCHEDULER_KINDS}


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------- tokenizer check
def test_byte_level_tokenizer_of_514_tokens_is_accepted(pipelines):
    text = load_text_encoders(pipelines["pndm"])
    tokenizer, encoder = text.tokenizers[0], text.encoders[0]
    assert len(tokenizer) == 514 == encoder.config.vocab_size
    # The kit's vocabulary: byte b alone is id b, at a word's end 256 + b; then the specials.
    ids = tokenizer(["a cat"], padding="max_length", max_length=77).input_ids[0]
    assert ids[:6] == [512, 256 + ord("a"), ord("c"), ord("a"), 256 + ord("t"), 513]
    embeds, pooled = text.encode(["a cat", ""])
    assert embeds.shape == (2, 77, 24) and pooled is None


def offline_stand_in(tmp_path):
    """What transformers 5 returns, offline, for a tokenizer whose files are missing."""
    from transformers import CLIPTokenizer
    os.makedirs(tmp_path / "gone" / "tokenizer")
    return CLIPTokenizer.from_pretrained(str(tmp_path / "gone"), subfolder="tokenizer")


def test_offline_stand_in_tokenizer_is_refused_with_the_download_hint(tmp_path, pipelines, monkeypatch):
    stand_in = offline_stand_in(tmp_path)
    assert len(stand_in) <= 5  # the premise: a stand-in, not an error
    with pytest.raises(UserError) as e:
        check_tokenizer(stand_in, "someone/model")
    message = one_line_error(e)
    assert "cannot load the tokenizer from 'someone/model'" in message and "hf download" in message

    # Both entry points (training's loader, inference's pipeline) run the same check:
    # hand them the stand-in where the real tokenizer would load.
    from transformers import CLIPTokenizer
    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: stand_in))
    for load in (lambda: load_text_encoders(pipelines["pndm"]), lambda: generate.load_pipeline(pipelines["pndm"])):
        with pytest.raises(UserError, match="special tokens only, its files are missing .*hf download"):
            load()


def test_tokenizer_files_missing_from_a_local_folder(tmp_path, pipelines):
    broken = str(tmp_path / "broken")
    shutil.copytree(pipelines["pndm"], broken)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        os.remove(os.path.join(broken, "tokenizer", name))
    with pytest.raises(UserError) as e:
        load_text_encoders(broken)
    assert one_line_error(e) == (f"{os.path.join(broken, 'tokenizer')} holds no tokenizer files "
                                 "(vocab.json and merges.txt, or tokenizer.json)")
    # tokenizer.json alone is a complete tokenizer
    shutil.copy(os.path.join(pipelines["pndm"], "tokenizer", "tokenizer.json"), os.path.join(broken, "tokenizer"))
    assert len(load_text_encoders(broken).tokenizers[0]) == 514


def test_tokenizer_larger_than_the_text_encoder_is_refused_before_weights_load(tmp_path, pipelines):
    mixed = str(tmp_path / "mixed")
    shutil.copytree(pipelines["pndm"], mixed)
    config = os.path.join(mixed, "text_encoder", "config.json")
    values = json.load(open(config))
    values["vocab_size"] = 500
    json.dump(values, open(config, "w"))
    for name in os.listdir(os.path.join(mixed, "text_encoder")):  # no weights: a check after loading would fail otherwise
        if name.endswith(".safetensors"):
            os.remove(os.path.join(mixed, "text_encoder", name))
    with pytest.raises(UserError) as e:
        load_text_encoders(mixed)
    assert "has 514 tokens, but its text encoder embeds only 500" in one_line_error(e)


# --------------------------------------------------------------------------- single files
@pytest.mark.parametrize("name, keys, cls", [
    ("model.safetensors", ["model.diffusion_model.input_blocks.0.0.weight"], "StableDiffusionPipeline"),
    ("xl model.safetensors", ["conditioner.embedders.1.model.ln_final.weight"], "StableDiffusionXLPipeline"),
    ("old.ckpt", None, "StableDiffusionPipeline"),
])
def test_single_file_checkpoint_is_refused_with_the_conversion_command(tmp_path, name, keys, cls, monkeypatch):
    import diffusers
    from safetensors.torch import save_file
    path = str(tmp_path / name)
    if keys:
        save_file({k: torch.zeros(1) for k in keys}, path)
    else:
        torch.save({"state_dict": {}}, path)
    with pytest.raises(UserError) as e:
        check_pipeline_folder(path)
    message = one_line_error(e)
    assert f"--pretrained_model_name_or_path {path} is a single-file checkpoint" in message
    command = message.split("convert it to a diffusers folder once with: ")[1].split(" and pass ")[0]
    suggested = shlex.split(message.split(" and pass --pretrained_model_name_or_path ")[1])[0]
    program, flag, code = shlex.split(command)
    assert (program, flag) == ("python", "-c") and suggested == str(tmp_path / (os.path.splitext(name)[0] + "_diffusers"))

    # The command, run as printed, converts `path` into `suggested` with diffusers' own
    # API (stubbed only where it would read a real checkpoint; setattr fails if it is missing).
    calls = []

    class Converted:
        def save_pretrained(self, out):
            calls.append(("save_pretrained", out))

    def from_single_file(klass, source, **kwargs):
        calls.append((klass.__name__, source, kwargs))
        return Converted()
    monkeypatch.setattr(getattr(diffusers, cls), "from_single_file", classmethod(from_single_file))
    exec(compile(code, "<command>", "exec"), {})
    assert calls == [(cls, path, {}), ("save_pretrained", suggested)]


def test_inference_refuses_a_single_file_in_one_line(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\0" * 16)
    prompts = write_prompts(tmp_path / "prompts")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "inference.py"), "--pretrained_model_name_or_path", str(path),
                           "--test_dataset_root", prompts, "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "StableDiffusionPipeline.from_single_file" in lines[0], proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------- inference
def write_prompts(root, captions=("a cat on a red sofa", "two boats at dawn")):
    for i, caption in enumerate(captions):
        os.makedirs(os.path.join(root, str(i)))
        with open(os.path.join(root, str(i), "caption.txt"), "w") as f:
            f.write(caption + "\n")
    return str(root)


@pytest.mark.parametrize("kind, scheduler", [("pndm", "DDPM"), ("karras", "DPMSolver++"), ("vpred", "DDIM")])
def test_inference_generates_from_independent_pipelines(pipelines, tmp_path, kind, scheduler):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
    captions = ["a cat on a red sofa", "two boats at dawn"]
    prompts = write_prompts(tmp_path / "prompts", captions)
    output = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "inference.py"), "--pretrained_model_name_or_path",
                           pipelines[kind], "--test_dataset_root", prompts, "--output", str(output), "--resolution", "32",
                           "--num_inference_steps", "2", "--num_images_per_prompt", "1", "--mixed_precision", "no",
                           "--scheduler", scheduler, "--num_workers", "1", "--batch_size", "2"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The same images from stock diffusers, loaded and seeded here: seed = prompt index.
    # The stock SD samplers with the pipeline's own schedule; clipping off, as
    # stable-diffusion-v1-5's own scheduler config says (PNDM's config has no such key).
    pipe = StableDiffusionPipeline.from_pretrained(pipelines[kind], safety_checker=None, requires_safety_checker=False)
    stock = {"DDPM": DDPMScheduler, "DPMSolver++": DPMSolverMultistepScheduler, "DDIM": DDIMScheduler}[scheduler]
    extra = {"clip_sample": False} if scheduler in ("DDPM", "DDIM") else {}
    pipe.scheduler = stock.from_config(pipe.scheduler.config, **extra)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if kind == "vpred" else "epsilon")
    assert pipe.scheduler.config.get("use_karras_sigmas", False) == (kind == "karras")
    pipe.set_progress_bar_config(disable=True)
    for p, caption in enumerate(captions):
        expected = pipe(caption, generator=torch.Generator().manual_seed(p), num_inference_steps=2, guidance_scale=7.5,
                        height=32, width=32, output_type="np").images[0]
        expected = (expected * 255).round().astype(int)  # diffusers' numpy_to_pil
        with Image.open(output / str(p) / f"{p}.png") as image:
            got = np.asarray(image).astype(int)
        assert got.shape == (32, 32, 3)
        assert np.abs(got - expected).max() <= 1, (kind, p, np.abs(got - expected).max())


def test_make_scheduler_keeps_the_pipelines_schedule(pipelines):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
    pndm = PNDMScheduler.from_pretrained(pipelines["pndm"], subfolder="scheduler").config
    assert "clip_sample" not in pndm  # the kit's premise
    assert generate.make_scheduler("DDPM", pndm).config.clip_sample is False
    assert generate.make_scheduler("DDIM", pndm).config.clip_sample is False
    vpred = DDIMScheduler.from_pretrained(pipelines["vpred"], subfolder="scheduler").config
    assert generate.make_scheduler("DDPM", vpred).config.prediction_type == "v_prediction"
    karras = DPMSolverMultistepScheduler.from_pretrained(pipelines["karras"], subfolder="scheduler").config
    assert generate.make_scheduler("DPMSolver++", karras).config.use_karras_sigmas is True
    # A config that says clip_sample keeps it.
    assert generate.make_scheduler("DDPM", {**pndm, "clip_sample": True}).config.clip_sample is True


# --------------------------------------------------------------------------- --revision, --cache_dir
@pytest.fixture(scope="module")
def hub_cache(pipelines, tmp_path_factory):
    """A hub cache (the layout huggingface_hub writes) holding `someone/tiny` at two
    revisions: main = the PNDM pipeline, `karras` = the DPM-Solver one."""
    cache = tmp_path_factory.mktemp("cache")
    repo = cache / "models--someone--tiny"
    for ref, kind, commit in (("main", "pndm", "a" * 40), ("karras", "karras", "b" * 40)):
        shutil.copytree(pipelines[kind], repo / "snapshots" / commit)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return str(cache)


def test_revision_and_cache_dir_reach_every_loader(hub_cache):
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler
    pipe = generate.load_pipeline("someone/tiny", cache_dir=hub_cache)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    pipe = generate.load_pipeline("someone/tiny", cache_dir=hub_cache, revision="karras")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    snapshot = os.path.join(hub_cache, "models--someone--tiny", "snapshots", "b" * 40)
    assert len(load_text_encoders("someone/tiny", cache_dir=hub_cache, revision="karras").tokenizers[0]) == 514
    for model, subfolder in ((load_unet("someone/tiny", "unet", cache_dir=hub_cache, revision="karras"), "unet"),
                             (load_vae("someone/tiny", cache_dir=hub_cache, revision="karras"), "vae")):
        weights = model.state_dict()
        from safetensors.torch import load_file
        stored = load_file(os.path.join(snapshot, subfolder, "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(weights[k], stored[k]) for k in stored)
    # Without the cache the id is unknown offline: one line with the download hint.
    with pytest.raises(UserError, match="cannot load the text encoder config from 'someone/tiny'.*hf download"):
        load_text_encoders("someone/tiny", revision="karras")
    with pytest.raises(UserError, match="cannot load"):
        load_text_encoders("someone/tiny", cache_dir=hub_cache, revision="no-such-branch")


# --------------------------------------------------------------------------- expert data
def expected_pixels(image, resolution=RESOLUTION):
    """The documented transform, computed here: shorter side to `resolution` (bilinear,
    antialiased), centre crop, [-1, 1], channels first."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.BILINEAR, reducing_gap=None)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """The same four experts (two non-square sizes) in five layouts."""
    import datasets
    root = tmp_path_factory.mktemp("experts")
    listing = interop_kit.write_imagefolder_experts(root / "jsonl")
    interop_kit.write_imagefolder_experts(root / "csv", metadata="csv")
    interop_kit.write_folder_experts(root / "folders", root / "jsonl")
    paths = [str(root / "jsonl" / name) for name, _ in listing]
    table = datasets.Dataset.from_dict({"picture": paths, "caption": [c for _, c in listing]})
    table = table.cast_column("picture", datasets.Image())
    table.save_to_disk(str(root / "saved"))
    os.makedirs(root / "parquet")
    table.to_parquet(str(root / "parquet" / "train.parquet"))  # read back by load_dataset's parquet builder
    return {"listing": listing, **{k: str(root / k) for k in ("jsonl", "csv", "folders", "saved", "parquet")}}


def sources(experts):
    return {
        "folders": ExpertDataset(experts["folders"], RESOLUTION, random_flip=True, random_crop=True),
        "jsonl": ExpertDataset(experts["jsonl"], RESOLUTION, random_flip=True, random_crop=True),
        "csv": ExpertDataset(experts["csv"], RESOLUTION, random_flip=True, random_crop=True),
        "saved": ExpertDataset(None, RESOLUTION, random_flip=True, random_crop=True, dataset_name=experts["saved"],
                               image_column="picture", caption_column="caption"),
        "parquet": ExpertDataset(None, RESOLUTION, random_flip=True, random_crop=True, dataset_name=experts["parquet"],
                                 image_column="picture", caption_column="caption"),
    }


def test_every_layout_gives_the_same_items(experts):
    listing = experts["listing"]
    for name, data in sources(experts).items():
        assert [item.caption for item in data.items] == [caption for _, caption in listing], name
        data.random_flip = data.random_crop = False
        for index, (file_name, _) in enumerate(listing):
            with Image.open(os.path.join(experts["jsonl"], file_name)) as image:
                expected, size = expected_pixels(image.convert("RGB")), (image.height, image.width)
            item = data[index]
            assert torch.allclose(item["pixel_values"], expected, atol=1e-6), (name, index)
            assert tuple(item["original_size"].tolist()) == size
    assert {size for size in ((24, 40), (48, 24))} == {
        tuple(d["original_size"].tolist()) for d in (sources(experts)["jsonl"][i] for i in range(4))}


def test_every_layout_augments_a_key_the_same_way(experts):
    data = sources(experts)
    keys = [(i, seed) for i in range(4) for seed in (3, 11, 12345)]
    reference = [data["folders"][key] for key in keys]
    assert len({(r["flipped"], tuple(r["crop_top_left"].tolist())) for r in reference}) > 2  # augmentation happens
    for name, dataset in data.items():
        for key, want in zip(keys, reference):
            got = dataset[key]
            assert torch.equal(got["pixel_values"], want["pixel_values"]) and got["flipped"] == want["flipped"], (name, key)


def test_load_dataset_on_an_imagefolder_keeps_its_row_order(experts):
    import datasets
    rows = datasets.load_dataset(experts["jsonl"], split="train")["text"]  # datasets' own imagefolder builder
    data = ExpertDataset(None, RESOLUTION, random_flip=False, dataset_name=experts["jsonl"])
    assert [item.caption for item in data.items] == rows
    by_caption = {caption: name for name, caption in experts["listing"]}
    for index, item in enumerate(data.items):
        with Image.open(os.path.join(experts["jsonl"], by_caption[item.caption])) as image:
            assert torch.allclose(data[index]["pixel_values"], expected_pixels(image.convert("RGB")), atol=1e-6)


def test_dataset_survives_pickling_into_workers(experts):
    data = sources(experts)["saved"]
    keys = [(i, 100 + i) for i in range(4)]
    loader = torch.utils.data.DataLoader(data, sampler=keys, batch_size=2, num_workers=1, collate_fn=list)
    got = [item["pixel_values"] for batch in loader for item in batch]
    assert len(got) == 4 and all(torch.equal(a, data[key]["pixel_values"]) for key, a in zip(keys, got))


# --------------------------------------------------------------------------- image modes
def scaled_16_to_8(values):
    """round(v * 255 / 65535), computed in floating point here."""
    return np.floor(values.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.tile(np.arange(0, 65536, 257 * 3 + 5, dtype=np.uint16), (3, 1))
    values[0, :4] = [0, 128, 32767, 65535]
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    image.save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as reread:
        assert reread.mode in ("I;16", "I")
        got = np.asarray(to_rgb(reread))
    expected = scaled_16_to_8(values)
    assert got.shape == values.shape + (3,) and all((got[..., c] == expected).all() for c in range(3))
    assert list(got[0, :4, 0]) == [0, 0, 127, 255] and got.max() == 255 and 0 < np.median(got) < 255
    # 32-bit integer mode ("I", how other readers hand 16-bit data over) scales the same
    assert (np.asarray(to_rgb(Image.fromarray(values.astype(np.int32))))[..., 1] == expected).all()
    # and both scoring paths decode through it
    from rpo.scores.images import decode_image
    from rpo.scores.loop import ImageScoringDataset
    assert (np.asarray(decode_image(str(tmp_path / "g.png")))[..., 2] == expected).all()
    item = ImageScoringDataset([(str(tmp_path / "g.png"), "a", 0)], {"m": np.asarray}, [{"m": set()}])[0]
    assert item["error"] is None and (item["pixels"]["m"][..., 0] == expected).all()


def test_sixteen_bit_experts_in_an_imagefolder(tmp_path):
    listing = interop_kit.write_imagefolder_experts(tmp_path / "x", sixteen_bit=True)
    data = ExpertDataset(str(tmp_path / "x"), RESOLUTION, random_flip=False)
    for index, (name, _) in enumerate(listing):
        raw = np.asarray(Image.open(tmp_path / "x" / name)).astype(np.uint16)
        assert raw.max() > 255  # really 16-bit data
        rgb = Image.fromarray(np.repeat(scaled_16_to_8(raw)[..., None], 3, axis=-1))
        assert torch.allclose(data[index]["pixel_values"], expected_pixels(rgb), atol=1e-6)


def test_other_modes():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    alpha = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    # LA and RGBA: over white, out = v * a/255 + 255 * (1 - a/255)
    over_white = gray * (alpha / 255.0) + 255.0 * (1 - alpha / 255.0)
    got = np.asarray(to_rgb(Image.fromarray(np.stack([gray, alpha], -1), mode="LA"))).astype(float)
    assert np.abs(got - over_white[..., None]).max() <= 1
    assert got[0, 0, 0] == 255 and got[0, 1, 0] == gray[0, 1]
    rgba = np.stack([gray, 255 - gray, gray // 2, alpha], -1)  # uint8: products below in float
    got = np.asarray(to_rgb(Image.fromarray(rgba, mode="RGBA"))).astype(float)
    for c in range(3):
        assert np.abs(got[..., c] - (rgba[..., c].astype(float) * alpha / 255.0 + 255.0 * (1 - alpha / 255.0))).max() <= 1
    # P: each index looks up its palette colour
    palette = rng.integers(0, 256, 768, dtype=np.uint8)
    p = Image.fromarray(gray, mode="L").convert("P")
    p.putpalette(palette.tolist())
    assert (np.asarray(to_rgb(p)) == palette.reshape(256, 3)[np.asarray(p)]).all()
    # L, and 8-bit RGB unchanged
    assert (np.asarray(to_rgb(Image.fromarray(gray))) == gray[..., None]).all()
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert (np.asarray(to_rgb(Image.fromarray(rgb))) == rgb).all()
    # CMYK: no alpha, 8-bit, Pillow's conversion (C=M=Y=0, K=0 is white; K=255 is black)
    cmyk = np.zeros((1, 2, 4), dtype=np.uint8)
    cmyk[0, 1, 3] = 255
    assert np.asarray(to_rgb(Image.fromarray(cmyk, mode="CMYK"))).tolist() == [[[255, 255, 255], [0, 0, 0]]]


# --------------------------------------------------------------------------- bad data
def imagefolder(tmp_path, rows=None, metadata="jsonl"):
    root = tmp_path / "bad"
    listing = interop_kit.write_imagefolder_experts(root, n=2)
    if rows is not None:
        os.remove(root / "metadata.jsonl")
        if rows:
            interop_kit.write_metadata(str(root), rows, metadata)
        else:
            (root / f"metadata.{metadata}").write_text("")
    return root, listing


@pytest.mark.parametrize("case", ["missing file", "no caption column", "caption not text", "unreadable image",
                                  "empty", "both metadata", "not json", "csv missing file"])
def test_metadata_errors_are_one_line_naming_the_file(tmp_path, case):
    if case == "missing file":
        root, _ = imagefolder(tmp_path, [{"file_name": "000.png", "text": "a"}, {"file_name": "nope.png", "text": "b"}])
        expected = f"{root / 'metadata.jsonl'}, line 2: no such image: {root / 'nope.png'}"
    elif case == "no caption column":
        root, _ = imagefolder(tmp_path, [{"file_name": "000.png", "prompt": "a"}])
        expected = f"{root / 'metadata.jsonl'} has no 'text' column (it has 'file_name', 'prompt'): pass --caption_column"
    elif case == "caption not text":
        root, _ = imagefolder(tmp_path, [{"file_name": "000.png", "text": "a"}, {"file_name": "001.png", "text": 3}])
        expected = f"{root / 'metadata.jsonl'}, line 2: the 'text' of 001.png is not a text (3)"
    elif case == "unreadable image":
        root, _ = imagefolder(tmp_path)
        (root / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        expected = f"unreadable image {root / '001.png'}"
    elif case == "empty":
        root, _ = imagefolder(tmp_path, [])
        expected = f"train dataset is empty: {root / 'metadata.jsonl'} has no rows"
    elif case == "both metadata":
        root, _ = imagefolder(tmp_path)
        interop_kit.write_metadata(str(root), [{"file_name": "000.png", "text": "a"}], "csv")
        expected = f"train dataset {root} holds both metadata.jsonl and metadata.csv: keep one"
    elif case == "not json":
        root, _ = imagefolder(tmp_path)
        with open(root / "metadata.jsonl", "a") as f:
            f.write("{oops\n")
        expected = f"{root / 'metadata.jsonl'}, line 3: not JSON"
    else:
        root, _ = imagefolder(tmp_path, [{"file_name": "000.png", "text": "a"}, {"file_name": "x/1.png", "text": "b"}], "csv")
        expected = f"{root / 'metadata.csv'}, line 3: no such image: {root / 'x' / '1.png'}"
    with pytest.raises(UserError) as e:
        ExpertDataset(str(root), RESOLUTION)
    assert one_line_error(e).startswith(expected), str(e.value)


def test_dataset_errors_are_one_line_naming_the_column(tmp_path, experts):
    import datasets
    with pytest.raises(UserError) as e:
        ExpertDataset(None, RESOLUTION, dataset_name=experts["saved"], caption_column="caption")
    assert one_line_error(e) == (f"--train_dataset_name {experts['saved']} has no column 'image' "
                                 "(it has 'picture', 'caption'): pass --image_column")
    with pytest.raises(UserError, match="has no column 'text'.*pass --caption_column"):
        ExpertDataset(None, RESOLUTION, dataset_name=experts["saved"], image_column="picture")
    empty = datasets.Dataset.from_dict({"image": [], "text": []}, features=datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string")}))
    os.makedirs(tmp_path / "empty")
    empty.to_parquet(str(tmp_path / "empty" / "train.parquet"))
    with pytest.raises(UserError) as e:  # datasets itself refuses an empty split ("corresponds to no data")
        ExpertDataset(None, RESOLUTION, dataset_name=str(tmp_path / "empty"))
    assert one_line_error(e).startswith(f"cannot load --train_dataset_name {tmp_path / 'empty'}: ")
    broken = datasets.Dataset.from_dict({"image": [{"bytes": b"\x89PNG\r\n\x1a\n not really", "path": None}],
                                         "text": ["a"]}, features=empty.features)
    broken.save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(UserError) as e:
        ExpertDataset(None, RESOLUTION, dataset_name=str(tmp_path / "broken"))
    assert one_line_error(e).startswith(f"unreadable image {tmp_path / 'broken'}[0]: ")
    with pytest.raises(UserError) as e:
        ExpertDataset(None, RESOLUTION, dataset_name=str(tmp_path / "nowhere"))
    assert one_line_error(e).startswith(f"cannot load --train_dataset_name {tmp_path / 'nowhere'}: ")
