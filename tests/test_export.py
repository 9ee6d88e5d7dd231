"""Shareable checkpoints: the model card in ckpt-N/README.md (its snippet run as written, up
to the dtype and device) and the exported pipeline folder, whose images equal inference.py
on ckpt-N/ema and whose UNet is that checkpoint's, loaded by plain diffusers offline."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from rpo.families import SD15
from rpo.training.card import model_card
from test_train import REPO, run, train_cmd, weights

GEN = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=32)


@pytest.fixture(scope="module")
def trained(kit, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    log, exported = root / "log", root / "exported"
    run(train_cmd(kit, log, "--num_steps", "2", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
                  "--learning_rate", "1e-3", "--export_pipeline", str(exported)))
    return log, exported


def captions(kit):
    folders = sorted(os.listdir(kit["prompts"]))
    return [open(os.path.join(kit["prompts"], d, "caption.txt")).read().strip() for d in folders]


def generate(pipe, prompts):
    """One image per prompt with the benchmark seed (seed 0 + prompt index), DDPM as inference.py's --scheduler DDPM."""
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the kit's config says clip_sample false
    pipe.set_progress_bar_config(disable=True)
    return [np.asarray(pipe(prompt=c, generator=torch.Generator("cpu").manual_seed(p), output_type="pil", **GEN).images[0],
                       dtype=np.int16) for p, c in enumerate(prompts)]


def inference_images(kit, out, unet):
    run([sys.executable, os.path.join(REPO, "inference.py"), "--pretrained_model_name_or_path", kit["sd15"],
         "--unet", str(unet), "--test_dataset_root", kit["prompts"], "--output", str(out), "--scheduler", "DDPM",
         "--num_inference_steps", "3", "--guidance_scale", "3.0", "--num_images_per_prompt", "1", "--resolution", "32",
         "--seed", "0", "--mixed_precision", "no", "--batch_size", "1", "--num_workers", "0"])
    folders = sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d)))
    return [np.asarray(Image.open(os.path.join(out, d, f"{p}.png")).convert("RGB"), dtype=np.int16)
            for p, d in enumerate(folders)]


def test_exported_pipeline_equals_inference_on_ckpt_ema(kit, trained, tmp_path):
    log, exported = trained
    pipe = DiffusionPipeline.from_pretrained(str(exported))  # plain diffusers, offline (conftest)
    assert isinstance(pipe, StableDiffusionPipeline)
    ema = weights(log / "ckpt-2" / "ema")
    unet = load_file(os.path.join(exported, "unet", "diffusion_pytorch_model.safetensors"))
    assert unet.keys() == ema.keys() and all(torch.equal(unet[k], ema[k].to(unet[k].dtype)) for k in ema)
    got = generate(pipe, captions(kit))
    want = inference_images(kit, tmp_path / "bench", log / "ckpt-2" / "ema")
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert np.abs(a - b).max() <= 1
    raw = load_file(os.path.join(log, "ckpt-2", "unet", "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(raw[k], ema[k]) for k in ema)  # EMA and raw weights differ: the check above can fail


@pytest.mark.slow
def test_export_tool_raw_and_refusals(kit, trained, tmp_path):
    log, _ = trained
    out = tmp_path / "raw"
    proc = run([sys.executable, "-m", "tools.export_pipeline", "--checkpoint", str(log / "ckpt-2"), "--output", str(out), "--raw"])
    assert "exported" in proc.stdout
    raw = weights(log / "ckpt-2" / "unet")
    got = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(got[k], raw[k].to(got[k].dtype)) for k in raw)
    (tmp_path / "not_a_ckpt").mkdir()
    for argv, message in ((["--checkpoint", str(log / "ckpt-2"), "--output", str(out)], "already exists and is not empty"),
                          (["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "x")], "no such folder"),
                          (["--checkpoint", str(tmp_path / "not_a_ckpt"), "--output", str(tmp_path / "y")], "holds no")):
        proc = run([sys.executable, "-m", "tools.export_pipeline", *argv], ok=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    # train.py refuses an --export_pipeline folder that is not empty before anything loads
    proc = run(train_cmd(kit, tmp_path / "log2", "--num_steps", "2", "--gradient_accumulation_steps", "2",
                         "--export_pipeline", str(out)), ok=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr.strip().splitlines()[-1]


def test_model_card_names_base_and_step_and_its_snippet_loads(kit, trained):
    log, _ = trained
    text = open(log / "ckpt-2" / "README.md", encoding="utf-8").read()
    front = text.split("---\n")[1]
    meta = yaml.safe_load(front)
    assert meta["base_model"] == kit["sd15"] and meta["library_name"] == "diffusers"
    assert text.count("```") % 2 == 0
    assert "micro-step 2" in text and "| step | 2 micro-steps (1 optimizer updates) |" in text
    assert "| effective batch | 4 pairs per update" in text
    (snippet,) = re.findall(r"```python\n(.*?)```", text, re.S)
    paths = re.findall(r"from_pretrained\('([^']+)'", snippet)
    assert paths == ["ema", kit["sd15"]]  # the checkpoint's own folder relative to the card: no machine path
    assert str(log) not in text
    # run it as written from the card's folder, on the CPU in fp32, without the generation line
    code = snippet.replace("torch.float16", "torch.float32").split('pipe.to("cuda")')[0]
    scope = {}
    here = os.getcwd()
    os.chdir(log / "ckpt-2")
    try:
        exec(code, scope)
    finally:
        os.chdir(here)
    ema = weights(log / "ckpt-2" / "ema")
    state = scope["pipe"].unet.state_dict()
    assert all(torch.equal(state[k], ema[k].float()) for k in ema)


def test_model_card_for_lora_and_sft():
    args = {"pretrained_model_name_or_path": "base/sd15", "batch_size": 4, "gradient_accumulation_steps": 16,
            "learning_rate": 1e-4, "margin": 0.001, "use_ema": True}
    lora = model_card(args, 256, family=SD15, name="ckpt-256", folders=["lora", "lora_ema", "state"], world=4)
    assert "pipe.load_lora_weights('lora_ema')" in lora and "DRO (LoRA)" in lora
    assert "| effective batch | 256 pairs per update (4 x 16 accumulation x 4 processes) |" in lora
    assert "UNet2DConditionModel" not in lora
    sft = model_card({**args, "objective": "sft"}, 16, family=SD15, name="c", folders=["ema", "unet"])
    assert "# c: SFT of `base/sd15`" in sft and "from_pretrained('ema'" in sft
    no_ema = model_card({**args, "use_ema": False}, 16, family=SD15, name="c", folders=["unet"])
    assert "from_pretrained('unet'" in no_ema and "| EMA | off |" in no_ema


@pytest.mark.skipif("--lora_rank" not in open(os.path.join(REPO, "train.py")).read(), reason="train.py has no LoRA yet")
@pytest.mark.slow
def test_lora_checkpoint_exports_with_fused_adapters(kit, tmp_path):
    """Base + fused LoRA (the export) against base + unfused adapters loaded by diffusers."""
    log, out = tmp_path / "log", tmp_path / "exported"
    run(train_cmd(kit, log, "--num_steps", "2", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
                  "--learning_rate", "1e-2", "--lora_rank", "4"))
    assert os.path.isdir(log / "ckpt-2" / "lora_ema")
    run([sys.executable, "-m", "tools.export_pipeline", "--checkpoint", str(log / "ckpt-2"), "--output", str(out)])
    prompts = captions(kit)
    got = generate(DiffusionPipeline.from_pretrained(str(out)), prompts)
    reference = StableDiffusionPipeline.from_pretrained(kit["sd15"], safety_checker=None, requires_safety_checker=False)
    base = generate(reference, prompts)
    reference.load_lora_weights(str(log / "ckpt-2" / "lora_ema"))
    want = generate(reference, prompts)
    for a, b in zip(got, want):
        assert np.abs(a - b).max() <= 1
    assert max(np.abs(a - b).max() for a, b in zip(want, base)) > 0  # the adapters change the images
    assert "load_lora_weights" in open(log / "ckpt-2" / "README.md").read()
