"""LoRA DRO (rpo.training.parametrisation.LoRAFineTune) and the SFT baseline
(rpo.training.steps.sft_micro_step), checked against independent computations: a separately
loaded base UNet, a stock diffusers pipeline with `load_lora_weights`, the EMA recomputed from
the saved adapter sequence, and an MSE loss written out in the test."""
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from test_ema_export import expected_ema
from test_train import run, train_cmd
from rpo.families import SD15

LORA_FILE = "pytorch_lora_weights.safetensors"


def lora(path):
    return load_file(os.path.join(path, LORA_FILE))


def unet_of(kit):
    return UNet2DConditionModel.from_pretrained(os.path.join(kit["sd15"], "unet"))


def inputs(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 4, 4, generator=g), torch.tensor([10, 700][:n]), torch.randn(n, 77, 32, generator=g))


def buffer_sample(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return {"t": torch.tensor([50, 600][:b]), "x0": torch.randn(b, 4, 4, 4, generator=g),
            "x_t": torch.randn(b, 4, 4, 4, generator=g), "eps": torch.randn(b, 4, 4, 4, generator=g),
            "prompt_embeds": torch.randn(b, 77, 32, generator=g)}


def test_reference_is_the_base_with_adapters_disabled(kit):
    """Reference errors of the adapted model with adapters disabled equal those of a separately
    loaded base UNet, bit for bit, after the adapters moved away from zero."""
    from rpo.diffusion.loss import per_sample_mse
    from rpo.diffusion.objective import pair_batch
    from rpo.training.parametrisation import LoRAFineTune
    family = SD15.from_pretrained(kit["sd15"])
    params = LoRAFineTune(base=unet_of(kit), rank=4, target_modules=SD15.lora_targets)
    base = unet_of(kit)
    with torch.no_grad():
        for _, p in params.named_trainable():
            p.normal_(0, 0.5)
    sample, eps = buffer_sample(), torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    b = pair_batch(family, sample, eps)
    with torch.no_grad():
        with params.reference() as ref:
            ref_err = per_sample_mse(family.predict(ref, b["x"], b["t"], b["cond"]), b["target"])
        base_err = per_sample_mse(family.predict(base, b["x"], b["t"], b["cond"]), b["target"])
        adapted_err = per_sample_mse(family.predict(params.trainable, b["x"], b["t"], b["cond"]), b["target"])
    assert torch.equal(ref_err, base_err)
    assert not torch.equal(adapted_err, base_err)  # the adapters are back on after the context
    assert all(p.requires_grad for _, p in params.named_trainable())


def test_step0_output_equals_the_base_and_b_is_zero(kit):
    from rpo.training.parametrisation import LoRAFineTune
    params = LoRAFineTune(base=unet_of(kit), rank=4, target_modules=SD15.lora_targets, alpha=8)
    named = dict(params.named_trainable())
    assert named and all(torch.count_nonzero(p) == 0 for n, p in named.items() if ".lora_B." in n)
    assert all(torch.count_nonzero(p) > 0 for n, p in named.items() if ".lora_A." in n)
    x, t, c = inputs()
    with torch.no_grad():
        assert torch.equal(params.trainable(x, t, c).sample, unet_of(kit)(x, t, c).sample)


def test_lagging_rollout_adapter(kit):
    """The lagging rollout model is a frozen second adapter: it keeps its weights while the
    trainable adapter changes, and equals it after a refresh."""
    from rpo.training.parametrisation import LoRAFineTune
    params = LoRAFineTune(base=unet_of(kit), rank=4, target_modules=SD15.lora_targets, lagging=True)
    x, t, c = inputs()
    base = unet_of(kit)
    with torch.no_grad():
        for _, p in params.named_trainable():
            p.normal_(0, 0.5)
        assert torch.equal(params.rollout_model(x, t, c).sample, base(x, t, c).sample)  # still B = 0
        params.refresh_rollout()
        want = params.trainable(x, t, c).sample
        assert torch.equal(params.rollout_model(x, t, c).sample, want)
        assert not torch.equal(want, base(x, t, c).sample)
    assert all(p.requires_grad for _, p in params.named_trainable())
    assert not any(p.requires_grad for n, p in params.trainable.named_parameters() if ".rollout." in n)


def test_gradients_only_on_adapter_parameters(kit):
    from rpo.diffusion.objective import dro_loss
    from rpo.training.parametrisation import LoRAFineTune
    family = SD15.from_pretrained(kit["sd15"])
    params = LoRAFineTune(base=unet_of(kit), rank=4, target_modules=SD15.lora_targets, lagging=True)
    loss, _ = dro_loss(model=params.trainable, reference=params.reference, family=family, sample=buffer_sample(),
                       eps_expert=torch.randn(2, 4, 4, 4), margin=10.0)  # a large margin: the hinge is active
    loss.backward()
    trainable = {n for n, _ in params.named_trainable()}
    with_grad = {n for n, p in params.trainable.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(".lora_A.policy." in n or ".lora_B.policy." in n for n in with_grad)
    # B = 0 at the start: A gets a zero gradient, B a nonzero one
    assert any(p.grad.abs().sum() > 0 for n, p in params.named_trainable() if ".lora_B." in n)


@pytest.mark.slow
def test_lora_run_resume_ema_and_stock_pipeline(kit, tmp_path):
    """8 micro-steps straight = 4 + --resume latest + 4, bit for bit, with a lagging rollout
    adapter; lora_ema is the EMA of the saved adapter sequence; a stock pipeline with
    load_lora_weights(ckpt-8/lora_ema) reproduces the validation images, and the merged UNet
    the same."""
    common = ("--lora_rank", "4", "--lora_alpha", "8", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
              "--buffer_update_steps", "4", "--learning_rate", "1e-2", "--checkpoints_total_limit", "4",
              "--validation_steps", "8", "--validation_num_inference_steps", "3", "--validation_guidance_scale", "3.0",
              "--score_batch_size", "2", "--save_merged_unet")
    run(train_cmd(kit, tmp_path / "straight", "--num_steps", "8", *common))
    run(train_cmd(kit, tmp_path / "split", "--num_steps", "4", *common))
    proc = run(train_cmd(kit, tmp_path / "split", "--num_steps", "8", "--resume", "latest", *common))
    assert "resumed from" in proc.stdout + proc.stderr
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert (split / "ckpt-4" / "state" / "rollout_unet.safetensors").exists()
    for sub in ("lora", "lora_ema"):
        a, b = lora(straight / "ckpt-8" / sub), lora(split / "ckpt-8" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    # the rollout adapter's weights at ckpt-6 lag (refreshed at step 4), and came back on resume
    rollout = load_file(split / "ckpt-6" / "state" / "rollout_unet.safetensors")
    rollout_straight = load_file(straight / "ckpt-6" / "state" / "rollout_unet.safetensors")
    assert all(torch.equal(rollout[k], rollout_straight[k]) for k in rollout)

    sequence = [lora(straight / f"ckpt-{2 * u}" / "lora") for u in range(1, 5)]
    assert any(torch.count_nonzero(v) for k, v in sequence[-1].items() if "lora.up" in k or "lora_B" in k)
    ema, want = lora(straight / "ckpt-8" / "lora_ema"), expected_ema(sequence, torch.float64)
    assert ema.keys() == want.keys()
    assert max((ema[k].double() - want[k]).abs().max().item() for k in want) < 1e-6
    assert max((ema[k] - sequence[-1][k]).abs().max().item() for k in want) > 1e-5

    from diffusers import DDPMScheduler
    pipe = StableDiffusionPipeline.from_pretrained(kit["sd15"], safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    base_pipe_unet = pipe.unet
    val = straight / "images" / "step-8"
    images = sorted((root, name) for root, _, files in os.walk(val) for name in files if name.endswith(".png"))
    assert images

    def generate(root, name):
        with open(os.path.join(root, "caption.txt"), encoding="utf-8") as f:
            caption = f.read().strip()
        out = pipe(prompt=[caption], generator=[torch.Generator().manual_seed(int(name[:-4]))], num_inference_steps=3,
                   guidance_scale=3.0, height=32, width=32, output_type="np").images[0]
        return np.round(out * 255).astype(np.int16)

    base_images = [generate(*job) for job in images]
    pipe.load_lora_weights(str(straight / "ckpt-8" / "lora_ema"))
    for (root, name), base_image in zip(images, base_images):
        got = np.asarray(Image.open(os.path.join(root, name)), dtype=np.int16)
        assert np.abs(generate(root, name) - got).max() <= 1, name
        assert np.abs(base_image - got).max() > 1  # the adapters change the images: the check can fail
    pipe.unload_lora_weights()
    pipe.unet = UNet2DConditionModel.from_pretrained(straight / "ckpt-8" / "ema")  # --save_merged_unet
    root, name = images[0]
    assert np.abs(generate(root, name) - np.asarray(Image.open(os.path.join(root, name)), dtype=np.int16)).max() <= 1
    assert base_pipe_unet is not pipe.unet


def test_sft_gradient_equals_mse_written_out(kit):
    """One SFT micro-step's gradient equals autograd of torch's mse_loss on the same inputs:
    the caption drop, x0 from the VAE, t and noise drawn from copies of the state's generators."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from rpo.data.folders import ExpertDataset
    from rpo.models import load_text_encoders, load_vae
    from rpo.training.parametrisation import FullFineTune
    from loop_helpers import micro_step
    from rpo.training.objectives import SFT
    from rpo.training.rollouts import Refiller, RolloutSettings
    from rpo.training.sources import ExpertSamples
    from rpo.training.state import TrainState
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)  # the first micro-step keeps its gradients
    family = SD15.from_pretrained(kit["sd15"])
    text = load_text_encoders(kit["sd15"], False, None, torch.float32)
    vae = load_vae(kit["sd15"], False, None, torch.float32)
    data = ExpertDataset(kit["experts"], 32, False, False)
    batch = torch.utils.data.default_collate([data[i] for i in range(3)])
    unet = unet_of(kit).train()
    params = FullFineTune(trainable=unet, reference=None)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    model, opt = acc.prepare(unet, opt)
    settings = RolloutSettings(scheduler="DDIM", num_steps=4, batch_size=3, batches_per_refill=1, min_trajectories=3,
                               guidance_scale=1.0, perturb_timesteps=False, drop_prompt_probability=0.5, resolution=32,
                               latent_size=4)
    refiller = Refiller(batches=iter([batch]), text=text, vae=vae, family=family, settings=settings,
                        accelerator=acc, weight_dtype=torch.float32)
    state = TrainState.fresh(seed=3, rank=0, buffer_size=4, device="cpu")
    cpu, dev = torch.Generator(), torch.Generator()
    cpu.set_state(state.cpu_gen.get_state())
    dev.set_state(state.dev_gen.get_state())
    stats = micro_step(accelerator=acc, model=model, params=params, family=family,
                       source=ExpertSamples(refiller=refiller, family=family), objective=SFT(), optimizer=opt,
                       lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), state=state, max_grad_norm=0.0)
    got = {n: p.grad.clone() for n, p in unet.named_parameters()}
    assert state.expert_batches_used == 1 and len(state.buffer) == 0  # no rollouts, no buffer

    drop = torch.rand(3, generator=cpu) < 0.5
    embeds, _ = text.encode(["" if d else c for c, d in zip(batch["caption"], drop.tolist())])
    with torch.no_grad():
        x0 = vae.encode(batch["pixel_values"]).latent_dist.sample(generator=dev) * vae.config.scaling_factor
    t = torch.randint(0, 1000, (3,), generator=cpu)
    eps = torch.randn(x0.shape, generator=dev)
    # the noising written out from the schedule's betas (scaled_linear: linspace of square roots)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    ref_unet = unet_of(kit).train()
    loss = F.mse_loss(ref_unet(x_t, t, embeds).sample, eps) / 2  # accelerate divides by the accumulation steps
    loss.backward()
    assert abs(stats[0].item() - 2 * loss.item()) < 1e-5
    for n, p in ref_unet.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-7), n
    assert any(p.grad.abs().sum() > 0 for p in ref_unet.parameters())


@pytest.mark.slow
def test_sft_run_resume_is_exact_and_rolls_nothing_out(kit, tmp_path):
    common = ("--objective", "sft", "--lora_rank", "2", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
              "--learning_rate", "1e-2", "--buffer_update_steps", "4")
    run(train_cmd(kit, tmp_path / "straight", "--num_steps", "4", *common))
    run(train_cmd(kit, tmp_path / "split", "--num_steps", "2", *common))
    run(train_cmd(kit, tmp_path / "split", "--num_steps", "4", "--resume", *common))
    for sub in ("lora", "lora_ema"):
        a, b = lora(tmp_path / "straight" / "ckpt-4" / sub), lora(tmp_path / "split" / "ckpt-4" / sub)
        assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "straight" / "ckpt-4" / "state" / "rank0.pt", weights_only=True)
    assert state["buffer"]["tensors"] == {} or state["buffer"]["tensors"]["x_t"].shape[0] == 0
    assert not (tmp_path / "straight" / "ckpt-4" / "state" / "rollout_unet.safetensors").exists()
    trained = lora(tmp_path / "straight" / "ckpt-4" / "lora")
    assert any(torch.count_nonzero(v) for k, v in trained.items() if "lora.up" in k or "lora_B" in k)
    import json
    with open(tmp_path / "straight" / "history.jsonl", encoding="utf-8") as f:
        logged = [json.loads(line) for line in f if line.strip()]
    train_rows = [r for r in logged if r.get("kind") == "train"]
    assert [r["step"] for r in train_rows] == [2, 4]
    assert all("loss/loss" in r and "loss/expert" in r and "loss/policy" not in r for r in train_rows)


def test_sdxl_lora_runs_and_loads_in_the_sdxl_pipeline(kit, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from rpo.tiny import pipelines as tiny
    sdxl = str(tmp_path / "sdxl")
    tiny.write_sdxl(sdxl)
    log = tmp_path / "log"
    cmd = train_cmd(kit, log, "--sdxl", "--lora_rank", "4", "--num_steps", "2", "--gradient_accumulation_steps", "1",
                    "--checkpointing_steps", "2", "--buffer_update_steps", "1", "--learning_rate", "1e-2")
    cmd[cmd.index("--pretrained_model_name_or_path") + 1] = sdxl
    run(cmd)
    trained = lora(log / "ckpt-2" / "lora")
    assert any(torch.count_nonzero(v) for k, v in trained.items() if "lora.up" in k or "lora_B" in k)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(log / "ckpt-2" / "lora"))
    assert any(".lora_B." in k for k in pipe.unet.state_dict()) and len(pipe.unet.state_dict()) > len(before)


@pytest.mark.parametrize("extra, message", [
    (("--lora_rank", "4", "--lora_target_modules", "to_q,no_such_proj"), "no_such_proj names no module"),
    (("--lora_alpha", "8",), "need --lora_rank"),
    (("--lora_rank", "4", "--reference_unet", "x"), "--reference_unet does not apply to LoRA"),
    (("--objective", "sft", "--reference_unet", "x"), "--reference_unet does not apply to --objective sft"),
    (("--lora_rank", "-1",), "--lora_rank must be >= 1"),
])
def test_bad_lora_input_is_one_line(kit, tmp_path, extra, message):
    proc = run(train_cmd(kit, tmp_path, "--num_steps", "2", "--gradient_accumulation_steps", "1", *extra), ok=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert message in lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_inference_lora_equals_validation_and_is_fingerprinted(kit, tmp_path):
    import json
    from test_train import REPO
    log, out = tmp_path / "log", tmp_path / "out"
    run(train_cmd(kit, log, "--lora_rank", "4", "--num_steps", "4", "--gradient_accumulation_steps", "2",
                  "--checkpointing_steps", "4", "--buffer_update_steps", "2", "--learning_rate", "1e-2",
                  "--validation_steps", "4", "--validation_num_inference_steps", "3", "--validation_guidance_scale", "3.0",
                  "--score_batch_size", "2"))
    def infer(lora_dir, output, ok=True):
        return run([os.sys.executable, os.path.join(REPO, "inference.py"), "--pretrained_model_name_or_path", kit["sd15"],
                    "--lora", str(lora_dir), "--test_dataset_root", kit["prompts"], "--output", str(output),
                    "--scheduler", "DDPM", "--num_inference_steps", "3", "--guidance_scale", "3.0",
                    "--num_images_per_prompt", "1", "--resolution", "32", "--seed", "0", "--mixed_precision", "no",
                    "--batch_size", "2", "--num_workers", "0"], ok=ok)
    infer(log / "ckpt-4" / "lora_ema", out)
    val = log / "images" / "step-4"
    pairs = [(root, name) for root, _, files in os.walk(val) for name in files if name.endswith(".png")]
    assert pairs
    for root, name in pairs:
        a = np.asarray(Image.open(os.path.join(root, name)), dtype=np.int16)
        b = np.asarray(Image.open(os.path.join(out, os.path.relpath(root, val), name)), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name
    import hashlib
    with open(log / "ckpt-4" / "lora_ema" / LORA_FILE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(out / "manifest.json", encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["settings"]["lora"]["files"] == {LORA_FILE: digest}
    # other adapter weights into the same output: refused, one line
    proc = infer(log / "ckpt-4" / "lora", out, ok=False)
    assert proc.returncode != 0 and "lora" in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    proc = infer(tmp_path / "missing", tmp_path / "out2", ok=False)
    assert proc.returncode != 0 and "--lora" in proc.stderr.strip().splitlines()[-1]
