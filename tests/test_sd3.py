"""Flow matching (SD3 / SD3.5) on the tiny SD3 kit: the kit loads in the stock pipeline, the
per-row Euler sampler equals the stock FlowMatchEulerDiscreteScheduler row by row, the buffer
holds what the formulas say, the ranking loss recomputed by hand, the reference stays the
base transformer, train.py resumes bit for bit, and train -> inference -> score runs.
"""
import contextlib
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rpo.tiny.__main__ import KITS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIFT = 3.0


@pytest.fixture(scope="module")
def sd3kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3kit")
    paths = {}
    for kind in ("sd3", "experts", "prompts"):
        paths[kind] = str(root / kind)
        KITS[kind](paths[kind], seed=0)
    return paths


def test_tiny_kit_is_a_stock_sd3_pipeline(sd3kit):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5TokenizerFast
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3kit["sd3"])
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == SHIFT
    assert pipe.vae.config.latent_channels == 16
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)  # SD3's VAE
    # the T5 tokenizer reloads offline on its own and knows the kit's words (no unknown tokens)
    t5 = T5TokenizerFast.from_pretrained(os.path.join(sd3kit["sd3"], "tokenizer_3"))
    ids = t5("a red fox sitting in fresh snow").input_ids
    assert t5.unk_token_id not in ids and ids[-1] == t5.eos_token_id and len(ids) == 8  # 7 words + </s>
    image = pipe("a red fox", height=32, width=32, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_per_row_euler_equals_stock_scheduler_on_each_row():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from rpo.diffusion.flow import PerRowFlowEuler, flow_timesteps
    config = dict(FlowMatchEulerDiscreteScheduler(shift=SHIFT).config)
    T, B = 6, 3
    grid = flow_timesteps(config, T, B, True, generator=torch.Generator().manual_seed(1))
    assert len({tuple(r) for r in grid.tolist()}) == B  # the rows really differ
    sampler = PerRowFlowEuler(config)
    sampler.set_timesteps(grid)
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(B, 16, 2, 2, generator=g), torch.randn(T, B, 16, 2, 2, generator=g)
    ours = x.clone()
    for k in range(T):
        ours = sampler.step(v[k], k, ours)
    for i in range(B):
        stock = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
        # the row's unshifted sigmas: the stock scheduler applies the shift itself
        shifted = grid[i].double() / 1000
        stock.set_timesteps(sigmas=(shifted / (SHIFT - (SHIFT - 1) * shifted)).tolist())
        assert torch.allclose(stock.timesteps.double(), grid[i].double(), atol=1e-3)
        xi = x[i:i + 1].clone()
        for k in range(T):
            xi = stock.step(v[k, i:i + 1], stock.timesteps[k], xi).prev_sample
        assert torch.allclose(xi, ours[i:i + 1], atol=1e-6, rtol=0), (xi - ours[i:i + 1]).abs().max()


def test_timestep_grids():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from rpo.diffusion.flow import flow_timesteps
    config = dict(FlowMatchEulerDiscreteScheduler(shift=SHIFT).config)
    stock = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    stock.set_timesteps(20)
    plain = flow_timesteps(config, 20, 2, False)
    assert plain.dtype == torch.long and torch.equal(plain[0], stock.timesteps.round().long()) and torch.equal(*plain)
    # perturbed: sigma_ik = 1 - (k + u_i) / T, u_i ~ U[0, 1) from the generator, shifted, to integers
    got = flow_timesteps(config, 20, 3, True, generator=torch.Generator().manual_seed(5))
    u = torch.rand((3, 1), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    base = 1 - (torch.arange(20, dtype=torch.float64) + u) / 20
    want = (1000 * SHIFT * base / (1 + (SHIFT - 1) * base)).round().clamp(1, 1000).long()
    assert torch.equal(got, want)
    assert int(got.min()) >= 1 and int(got.max()) <= 1000


def build_refill(sd3kit, *, steps=3, batch=2):
    from accelerate import Accelerator
    from rpo.data.folders import ExpertBatches, ExpertDataset
    from rpo.families import SD3
    from rpo.models import load_vae
    from rpo.models_sd3 import load_sd3_text_encoders, load_transformer
    from rpo.training.rollouts import Refiller, RolloutSettings
    from rpo.training.state import TrainState
    acc = Accelerator(cpu=True)
    family = SD3.from_pretrained(sd3kit["sd3"])
    text, vae = load_sd3_text_encoders(sd3kit["sd3"]), load_vae(sd3kit["sd3"])
    experts = ExpertDataset(sd3kit["experts"], 32, False, False)
    batches = iter(torch.utils.data.DataLoader(experts, batch_sampler=ExpertBatches(len(experts), batch)))
    settings = RolloutSettings(scheduler="FlowMatchEuler", num_steps=steps, batch_size=batch, batches_per_refill=1,
                               min_trajectories=batch, guidance_scale=1.0, perturb_timesteps=True,
                               drop_prompt_probability=0.0, resolution=32, latent_size=4)
    refiller = Refiller(batches=batches, text=text, vae=vae, family=family, accelerator=acc, weight_dtype=torch.float32,
                        settings=settings)
    state = TrainState.fresh(seed=0, rank=0, buffer_size=4, device="cpu")
    return dict(family=family, text=text, vae=vae, refiller=refiller, state=state, acc=acc,
                model=load_transformer(sd3kit["sd3"]), experts=experts)


def test_buffer_loss_and_targets_recomputed_by_hand(sd3kit):
    from rpo.diffusion.objective import dro_loss
    from rpo.models_sd3 import load_transformer
    b = build_refill(sd3kit)
    model, family, state = b["model"], b["family"], b["state"]
    b["refiller"].refill(model=model, state=state)
    data = state.buffer.data
    t, x_t, v = data["t"], data["x_t"], data["eps"]
    assert t.dtype == torch.long and int(t.max()) <= 1000 and int(t[:, 0].min()) > 900  # starts near sigma = 1
    with torch.no_grad():
        for k in range(t.shape[1]):
            # the stored output is the transformer's velocity at (x_k, t_k) with the stored conditioning
            direct = model(hidden_states=x_t[:, k], timestep=t[:, k], encoder_hidden_states=data["prompt_embeds"],
                           pooled_projections=data["pooled_embeds"]).sample
            assert torch.allclose(direct, v[:, k], atol=1e-5)
            if k + 1 < t.shape[1]:  # Euler: x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v_k, sigma = t / 1000
                dt = ((t[:, k + 1] - t[:, k]).float() / 1000).view(-1, 1, 1, 1)
                assert torch.allclose(x_t[:, k + 1], x_t[:, k] + dt * v[:, k], atol=1e-5)
    # the caption conditioning is the stock SD3 pipeline's encode_prompt of the expert captions
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3kit["sd3"], transformer=None, vae=None)
    captions = [b["experts"].items[i].caption for i in range(len(b["experts"].items))]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False)
    assert embeds.shape[1:] == data["prompt_embeds"].shape[1:]  # 77 CLIP + 256 T5 tokens
    for row in range(len(t)):  # batch composition moves T5's attention kernels by ~1e-5
        match = [i for i in range(len(captions)) if torch.allclose(embeds[i], data["prompt_embeds"][row], atol=1e-4)]
        assert match and torch.allclose(pooled[match[0]], data["pooled_embeds"][row], atol=1e-5)

    sample = state.buffer.sample(2, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(sample["x0"].shape, generator=torch.Generator().manual_seed(4))
    reference = load_transformer(sd3kit["sd3"]).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():  # move the model off the reference: a loss away from its kink
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    margin = 0.05
    loss, stats = dro_loss(model=model, reference=lambda: contextlib.nullcontext(reference), family=family,
                           sample=sample, eps_expert=eps, margin=margin)

    # by hand: sigma = t / 1000, x_E = (1 - sigma) x0 + sigma eps', expert target eps' - x0;
    # policy input and target: the stored x_k and velocity; errors: mean over C, H, W
    sigma = (sample["t"].float() / 1000).view(-1, 1, 1, 1)
    x0 = sample["x0"]
    x_e = (1 - sigma) * x0 + sigma * eps

    def err(m, x, target):
        out = m(hidden_states=x, timestep=sample["t"], encoder_hidden_states=sample["prompt_embeds"],
                pooled_projections=sample["pooled_embeds"]).sample
        return ((out.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    with torch.no_grad():
        l_e, l_p = err(model, x_e, eps - x0), err(model, sample["x_t"], sample["eps"])
        r_e, r_p = err(reference, x_e, eps - x0), err(reference, sample["x_t"], sample["eps"])
    d = (l_e - r_e) - (l_p - r_p)
    want = torch.clamp(d + margin, min=0).mean()
    assert want > 0
    assert torch.allclose(loss.detach(), want, atol=1e-6, rtol=1e-5), (loss, want)


def test_reference_stays_the_base_transformer(sd3kit):
    from diffusers.optimization import get_scheduler
    from rpo.models_sd3 import load_transformer
    from loop_helpers import micro_step
    from rpo.training.objectives import Ranking
    from rpo.training.parametrisation import FullFineTune
    from rpo.training.sources import ReplayPairs
    b = build_refill(sd3kit)
    model = b["model"].train()
    params = FullFineTune(trainable=model, reference=load_transformer(sd3kit["sd3"]).requires_grad_(False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lr_scheduler = get_scheduler("constant", optimizer)
    source = ReplayPairs(refiller=b["refiller"], params=params, batch_size=2, sample_steps=1)
    for step in (1, 2):
        micro_step(accelerator=b["acc"], model=model, params=params, family=b["family"], source=source,
                   objective=Ranking(margin=0.05, hinge=True), optimizer=optimizer, lr_scheduler=lr_scheduler,
                   state=b["state"], step=step)
    base = load_file(os.path.join(sd3kit["sd3"], "transformer", "diffusion_pytorch_model.safetensors"))
    ref, trained = params.reference_model.state_dict(), model.state_dict()
    assert base.keys() == ref.keys()
    assert all(torch.equal(base[k], ref[k]) for k in base)
    assert any(not torch.equal(base[k], trained[k]) for k in base)  # the trainable one did move


def train_cmd(sd3kit, logdir, *extra, pipeline=None):
    return [sys.executable, os.path.join(REPO, "train.py"), "--pretrained_model_name_or_path", pipeline or sd3kit["sd3"],
            "--train_dataset", sd3kit["experts"], "--logdir", str(logdir), "--resolution", "32", "--batch_size", "2",
            "--buffer_batch_size", "2", "--buffer_size", "4", "--buffer_num_inference_steps", "4",
            "--mixed_precision", "no", "--dataloader_num_workers", "0", "--report_to", "none", *extra]


def run(cmd, ok=True):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if ok and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def test_wrong_model_family_is_one_line(sd3kit, kit, tmp_path):
    proc = run(train_cmd(sd3kit, tmp_path / "a", "--model_family", "sd3", pipeline=kit["sd15"]), ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--model_family sd3" in proc.stderr and "StableDiffusionPipeline" in proc.stderr
    proc = run(train_cmd(sd3kit, tmp_path / "b", "--model_family", "unet"), ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "StableDiffusion3Pipeline" in proc.stderr
    assert not os.path.exists(tmp_path / "a" / "ckpt-4")


@pytest.mark.slow
def test_sd3_resume_is_exact(sd3kit, tmp_path):
    # accumulation 2, rollout refresh every 4: a lagging rollout copy, part of the state
    common = ("--gradient_accumulation_steps", "2", "--checkpointing_steps", "4", "--buffer_update_steps", "4",
              "--learning_rate", "1e-3", "--checkpoints_total_limit", "2")
    run(train_cmd(sd3kit, tmp_path / "straight", "--num_steps", "8", *common))
    run(train_cmd(sd3kit, tmp_path / "split", "--num_steps", "4", *common))
    proc = run(train_cmd(sd3kit, tmp_path / "split", "--num_steps", "8", "--resume", "latest", *common))
    assert "resumed from" in proc.stdout + proc.stderr
    for sub in ("unet", "ema"):
        a = load_file(tmp_path / "straight" / "ckpt-8" / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "split" / "ckpt-8" / sub / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    before = load_file(os.path.join(sd3kit["sd3"], "transformer", "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(before[k], a[k]) for k in before)
    state = torch.load(tmp_path / "split" / "ckpt-8" / "state" / "rank0.pt", weights_only=True)
    assert state["buffer"]["tensors"]["x_t"].shape[1:] == (4, 16, 4, 4)  # T = 4 steps of 16-channel latents


@pytest.mark.slow
def test_train_inference_score_on_the_tiny_sd3_kit(sd3kit, scorer_weights, tmp_path):
    import json

    import numpy as np
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from PIL import Image
    run(train_cmd(sd3kit, tmp_path / "run", "--num_steps", "2", "--gradient_accumulation_steps", "1",
                  "--checkpointing_steps", "2", "--buffer_update_steps", "1"))
    ema = tmp_path / "run" / "ckpt-2" / "ema"
    out = tmp_path / "images"
    run([sys.executable, os.path.join(REPO, "inference.py"), "--pretrained_model_name_or_path", sd3kit["sd3"],
         "--unet", str(ema), "--test_dataset_root", sd3kit["prompts"], "--output", str(out), "--num_inference_steps", "3",
         "--num_images_per_prompt", "2", "--resolution", "32", "--mixed_precision", "no", "--num_workers", "1",
         "--guidance_scale", "4.0", "--seed", "10"])
    captions = sorted(os.listdir(sd3kit["prompts"]))
    n = len(captions)
    # image k of prompt p has seed 10 + p + k * n (rpo/generate.py); recompute one with the stock pipeline
    p, k = 1, 1
    seed = 10 + p + k * n
    caption = open(os.path.join(sd3kit["prompts"], captions[p], "caption.txt")).read().strip()
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3kit["sd3"], transformer=SD3Transformer2DModel.from_pretrained(ema))
    want = pipe(caption, height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(seed)).images[0]
    folder = [d for d in os.listdir(out) if os.path.isdir(out / d) and
              open(out / d / "caption.txt").read().strip() == caption][0]
    got = Image.open(out / folder / f"{seed}.png")
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1
    # the trained transformer makes other images than the base one
    base = StableDiffusion3Pipeline.from_pretrained(sd3kit["sd3"])(
        caption, height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed)).images[0]
    assert np.abs(np.asarray(base, dtype=int) - np.asarray(want, dtype=int)).max() > 0
    run([sys.executable, os.path.join(REPO, "score.py"), "--clip", "--dir", str(out), "--weights_dir", scorer_weights,
         "--output", str(tmp_path / "scores"), "--num_workers", "0"])
    with open(tmp_path / "scores" / "scores.json") as f:
        table = json.load(f)
    assert table["dirs"][0]["images"] == 2 * n and table["dirs"][0]["failed"] == 0
    assert table["dirs"][0]["metrics"]["clip"]["count"] == 2 * n


@pytest.mark.slow
def test_validation_at_step_0_is_the_stock_pipeline(sd3kit, tmp_path):
    import numpy as np
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image
    run(train_cmd(sd3kit, tmp_path / "run", "--num_steps", "1", "--gradient_accumulation_steps", "1",
                  "--checkpointing_steps", "1", "--buffer_update_steps", "1", "--validation_steps", "1",
                  "--validation_dataset", sd3kit["prompts"], "--validation_num_inference_steps", "3",
                  "--validation_guidance_scale", "4.0", "--seed", "3"))
    # step 0 is the base model; image 0 of prompt p has seed 3 + p (rpo/generate.py)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3kit["sd3"])
    folder = tmp_path / "run" / "images" / "step-0" / "1"
    caption = open(folder / "caption.txt").read().strip()
    want = pipe(caption, height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(3 + 1)).images[0]
    got = Image.open(folder / "4.png")
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1


def test_truncated_rollout_records_what_the_whole_rollout_records(sd3kit):
    # truncation (on by default at the paper's buffer settings) with the flow sampler: each row's
    # recorded step is the whole rollout's step stop[i]
    from diffusers import FlowMatchEulerDiscreteScheduler
    from rpo.diffusion.flow import PerRowFlowEuler, TransformerAsDenoiser, flow_timesteps
    from rpo.diffusion.rollout import rollout, truncated_rollout
    from rpo.models_sd3 import load_transformer
    model = TransformerAsDenoiser(load_transformer(sd3kit["sd3"]))
    config = dict(FlowMatchEulerDiscreteScheduler(shift=SHIFT).config)
    g = torch.Generator().manual_seed(0)
    grid = flow_timesteps(config, 4, 3, True, generator=g)
    x_T = torch.randn(3, 16, 4, 4, generator=g)
    embeds, pooled = torch.randn(3, 5, 32, generator=g), torch.randn(3, 32, generator=g)
    cond = {"pooled_projections": pooled}
    whole = rollout(model, PerRowFlowEuler(config), x_T, grid, embeds, added_cond_kwargs=cond)
    stop = torch.tensor([2, -1, 0])
    picks = truncated_rollout(model, PerRowFlowEuler(config), x_T, grid, embeds, stop, added_cond_kwargs=cond)
    for i, k in ((0, 2), (2, 0)):
        assert picks.t[i] == grid[i, k]
        assert torch.allclose(picks.x_t[i], whole.x_t[i, k], atol=1e-6)
        assert torch.allclose(picks.eps[i], whole.eps[i, k], atol=1e-5)
    assert picks.unet_rows == 3 + 1


def test_lora_reference_is_the_base_transformer_with_adapters_disabled(sd3kit):
    """LoRA on the SD3 transformer: the default targets exist in SD3Transformer2DModel, and the
    reference (adapters disabled) equals a separately loaded base transformer bit for bit
    after the adapters moved off zero."""
    from rpo.models_sd3 import load_transformer
    from rpo.families import SD3
    from rpo.training.parametrisation import LoRAFineTune, lora_targets_matched
    base = load_transformer(sd3kit["sd3"])
    assert all(n > 0 for n in lora_targets_matched(base, SD3.lora_targets).values())
    params = LoRAFineTune(base=load_transformer(sd3kit["sd3"]), rank=4, target_modules=SD3.lora_targets,
                          component="transformer", pipeline_class=SD3.pipeline_class, converts=SD3.lora_converts)
    with torch.no_grad():
        for _, p in params.named_trainable():
            p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 4, 4, generator=g), torch.tensor([100, 900])
    embeds, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g)

    def out(m):
        return m(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample
    with torch.no_grad():
        with params.reference() as ref:
            got = out(ref)
        want, adapted = out(base), out(params.trainable)
    assert torch.equal(got, want)
    assert not torch.equal(adapted, want)  # the adapters are back on after the context
    assert all(p.requires_grad for _, p in params.named_trainable())
    assert all(not p.requires_grad for n, p in params.trainable.named_parameters() if ".lora_" not in n)


@pytest.mark.slow
def test_sd3_lora_resume_and_stock_pipeline_load_lora_weights(sd3kit, tmp_path):
    """--lora_rank on SD3: 4 + --resume latest + 4 = 8 straight bit for bit (with a lagging
    rollout adapter); a stock StableDiffusion3Pipeline + load_lora_weights(ckpt-8/lora_ema)
    makes validation's images; the base pipeline does not."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image
    lora_file = "pytorch_lora_weights.safetensors"
    common = ("--lora_rank", "4", "--lora_alpha", "8", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "4",
              "--buffer_update_steps", "4", "--learning_rate", "3e-2", "--checkpoints_total_limit", "2",
              "--validation_steps", "8", "--validation_dataset", sd3kit["prompts"], "--validation_num_inference_steps",
              "3", "--validation_guidance_scale", "4.0", "--score_batch_size", "2", "--seed", "3")
    run(train_cmd(sd3kit, tmp_path / "straight", "--num_steps", "8", *common))
    run(train_cmd(sd3kit, tmp_path / "split", "--num_steps", "4", *common))
    proc = run(train_cmd(sd3kit, tmp_path / "split", "--num_steps", "8", "--resume", "latest", *common))
    assert "resumed from" in proc.stdout + proc.stderr
    for sub in ("lora", "lora_ema"):
        a = load_file(tmp_path / "straight" / "ckpt-8" / sub / lora_file)
        b = load_file(tmp_path / "split" / "ckpt-8" / sub / lora_file)
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
        assert all(k.startswith("transformer.") for k in a)
    assert any(torch.count_nonzero(v) for k, v in a.items() if "lora_B" in k)  # B moved off its zero init
    assert not any(os.path.exists(tmp_path / "straight" / "ckpt-8" / d) for d in ("unet", "ema"))  # adapters only

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3kit["sd3"])
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path / "straight" / "images" / "step-8" / "1"
    caption = open(folder / "caption.txt").read().strip()

    def generate():  # image 0 of prompt 1 has seed 3 + 1 (rpo/generate.py)
        return np.asarray(pipe(caption, height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
                               generator=torch.Generator().manual_seed(4)).images[0], dtype=int)
    base = generate()
    pipe.load_lora_weights(str(tmp_path / "straight" / "ckpt-8" / "lora_ema"))
    got = np.asarray(Image.open(folder / "4.png"), dtype=int)
    assert np.abs(generate() - got).max() <= 1
    assert np.abs(base - got).max() > 1  # the adapters change the image: the check can fail


def test_resample_sigma_is_logit_normal_then_shifted():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from rpo.diffusion.flow import FlowMatchFamily
    family = FlowMatchFamily(dict(FlowMatchEulerDiscreteScheduler(shift=SHIFT).config))
    t = family.training_timesteps(20000, generator=torch.Generator().manual_seed(0)).double()
    shifted = t / 1000
    sigma = shifted / (SHIFT - (SHIFT - 1) * shifted)  # undo SD3's shift s·σ / (1 + (s − 1)σ)
    u = torch.log(sigma / (1 - sigma))
    # N(0, 1): the standard errors of mean and std over 20000 draws are ~0.007 and ~0.005
    assert abs(u.mean().item()) < 0.03 and abs(u.std().item() - 1) < 0.03, (u.mean(), u.std())
    assert 0 < shifted.min() and shifted.max() < 1
    assert (shifted > 0.5).double().mean() > 0.7  # the shift moves the median sigma 0.5 up to 0.75
    # the draws are the generator's N(0, 1) (float64), through sigmoid and the shift
    u0 = torch.randn((20000,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = 1000 * SHIFT * torch.sigmoid(u0) / (1 + (SHIFT - 1) * torch.sigmoid(u0))
    assert torch.allclose(t, want.float().double(), atol=0, rtol=0)


def test_resample_micro_step_loss_recomputed_by_hand(sd3kit):
    """--buffer_mode resample: the trainer's loss equals the ranking loss written out from the
    drawn σ, ε, the expert x0 and the policy rollout's end x0 (shared ε and σ per pair,
    velocity targets ε − x0 of each half)."""
    from diffusers.optimization import get_scheduler
    from rpo.models_sd3 import load_transformer
    from loop_helpers import micro_step
    from rpo.training.objectives import Ranking
    from rpo.training.parametrisation import FullFineTune
    from rpo.training.sources import ResamplePairs
    b = build_refill(sd3kit)
    model, family, refiller, state = b["model"].train(), b["family"], b["refiller"], b["state"]
    reference = load_transformer(sd3kit["sd3"]).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():  # off the reference: a loss away from the hinge's kink
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    params = FullFineTune(trainable=model, reference=reference)
    seen = {}
    roll, draw = refiller.roll, family.training_timesteps

    def recording_roll(*a, **k):
        seen["fields"] = roll(*a, **k)
        seen["dev"] = state.dev_gen.get_state()  # ε is the next device draw
        return seen["fields"]

    def recording_draw(*a, **k):
        seen["t"] = draw(*a, **k)
        return seen["t"]
    refiller.roll, family.training_timesteps = recording_roll, recording_draw
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    margin = 0.05
    stats = micro_step(accelerator=b["acc"], model=model, params=params, family=family,
                       source=ResamplePairs(refiller=refiller, params=params, family=family),
                       objective=Ranking(margin=margin, hinge=True), optimizer=optimizer,
                       lr_scheduler=get_scheduler("constant", optimizer), state=state)
    assert len(state.buffer) == 0  # nothing is stored
    f, t = seen["fields"], seen["t"]
    x0_e = f["x0"]
    # the policy x0 is the end of its Euler rollout: x_T-1 + (0 − σ_T-1) v_T-1
    x0_p = f["x_t"][:, -1] + (0 - f["t"][:, -1].float() / 1000).view(-1, 1, 1, 1) * f["eps"][:, -1]
    assert torch.allclose(f["x_final"], x0_p, atol=1e-5)
    eps = torch.randn(x0_e.shape, generator=torch.Generator().set_state(seen["dev"]))
    assert t.dtype == torch.float32 and (t != t.round()).all()  # continuous sigma, one per pair
    sigma = (t / 1000).view(-1, 1, 1, 1)
    x_e, x_p = (1 - sigma) * x0_e + sigma * eps, (1 - sigma) * x0_p + sigma * eps

    def err(m, x, target):
        out = m(hidden_states=x, timestep=t, encoder_hidden_states=f["prompt_embeds"],
                pooled_projections=f["pooled_embeds"]).sample
        return ((out.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    # the micro-step updated the model: recompute with a fresh copy at the pre-step weights
    trained_before = load_transformer(sd3kit["sd3"])
    with torch.no_grad():
        for p in trained_before.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        l_e, l_p = err(trained_before, x_e, eps - x0_e), err(trained_before, x_p, eps - x0_p)
        r_e, r_p = err(reference, x_e, eps - x0_e), err(reference, x_p, eps - x0_p)
    want = torch.clamp((l_e - r_e) - (l_p - r_p) + margin, min=0).mean()
    assert want > 0
    assert torch.allclose(stats[0], want, atol=1e-6, rtol=1e-5), (stats[0], want)


def test_resample_refused_on_unet_models_in_one_line(kit, tmp_path):
    proc = run(train_cmd({"experts": kit["experts"]}, tmp_path / "a", "--buffer_mode", "resample",
                         pipeline=kit["sd15"]), ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--model_family sd15 does not support --buffer_mode resample" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sd3_resample_trains_and_resumes_exactly(sd3kit, tmp_path, lora):
    common = ("--buffer_mode", "resample", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "4",
              "--buffer_update_steps", "4", "--learning_rate", "1e-3", "--checkpoints_total_limit", "2",
              *(("--lora_rank", "4") if lora else ()))
    run(train_cmd(sd3kit, tmp_path / "straight", "--num_steps", "8", *common))
    run(train_cmd(sd3kit, tmp_path / "split", "--num_steps", "4", *common))
    proc = run(train_cmd(sd3kit, tmp_path / "split", "--num_steps", "8", "--resume", "latest", *common))
    assert "resumed from" in proc.stdout + proc.stderr
    files = ({"lora": "lora/pytorch_lora_weights.safetensors", "lora_ema": "lora_ema/pytorch_lora_weights.safetensors"}
             if lora else {"unet": "unet/diffusion_pytorch_model.safetensors", "ema": "ema/diffusion_pytorch_model.safetensors"})
    for sub, name in files.items():
        a = load_file(tmp_path / "straight" / "ckpt-8" / name)
        b = load_file(tmp_path / "split" / "ckpt-8" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    if lora:  # the adapters moved off their start (B = 0)
        assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k or "lora_up" in k)
    else:
        before = load_file(os.path.join(sd3kit["sd3"], "transformer", "diffusion_pytorch_model.safetensors"))
        assert any(not torch.equal(before[k], a[k]) for k in before)
