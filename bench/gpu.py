"""One-GPU benchmark of the full-size SD1.5 training step, inference and scoring, offline
(random weights, real architectures). Run by bench/gpu.sh; `--tiny` runs tiny configs on
the CPU (tests/test_gpu_bench.py), so the script does not fail on first contact with a GPU.

    bash bench/gpu.sh [--out DIR] [--tiny] [--steps 16] [--warmup 4]

Measures (docs/benchmarks.md, "GPU"):
- seconds per DRO micro-step at the paper's per-GPU settings (512 px, bf16, batch 4, buffer 4
  refilled every micro-step, 20-step DPM-Solver++ rollouts, accumulation 16, offloaded EMA),
  split into rollout UNet / train (dro_micro_step) / other (text, VAE, data, EMA), for
  truncated vs whole rollouts and --compile on vs off (rpo.training.steps, the library's own
  Refiller and dro_micro_step);
- peak GPU memory per mode (torch.cuda.max_memory_allocated) against README's 24 GB table;
- achieved TFLOP/s (FLOPs counted with torch's FlopCounterMode: one UNet row, one
  dro_micro_step, one VAE encode) against a measured bf16 matmul peak;
- inference images/s: 50-step DDPM, CFG 7.5, batch 4, VAE decode;
- scorer images/s: the ViT-H-14 CLIP architecture (open_clip, pretrained=None), image and
  text towers, batch 32.
Writes <out>/gpu.json and <out>/gpu.md.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from accelerate import Accelerator  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from rpo.diffusion.rollout import predict_noise  # noqa: E402
from rpo.families import SD15  # noqa: E402
from rpo.training import rollouts  # noqa: E402
from rpo.training.ema import NamedEMA  # noqa: E402
from rpo.training.loop import TrainLoop  # noqa: E402
from rpo.training.objectives import Ranking  # noqa: E402
from rpo.training.sources import ReplayPairs  # noqa: E402
from rpo.training.parametrisation import FullFineTune  # noqa: E402
from rpo.training.speed import speed_up  # noqa: E402
from rpo.training.state import TrainState  # noqa: E402

# stable-diffusion-v1-5: unet/config.json, text_encoder/config.json (CLIP ViT-L/14 text), vae/config.json
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type="epsilon", steps_offset=1, clip_sample=False, set_alpha_to_one=False)
VIT_H_14 = "ViT-H-14"

TINY_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
TINY_TEXT = dict(CLIP_L_TEXT, vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, projection_dim=32,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
TINY_VAE = dict(SD_VAE, sample_size=64, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8)
TINY_CLIP = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16),
                 text_cfg=dict(context_length=77, vocab_size=1000, width=32, heads=2, layers=2))


class Text:
    """The CLIP text encoder on fixed pseudo-token ids (no tokenizer files offline): the
    encoder's real cost and output shape, as rpo.models.TextEncoders.encode returns them."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    @torch.no_grad()
    def encode(self, captions):
        vocab = self.model.config.vocab_size
        ids = torch.tensor([[(hash(c) + 31 * i) % (vocab - 2) + 1 for i in range(77)] for c in captions], device=self.device)
        return self.model(ids).last_hidden_state, None


class Experts:
    def __init__(self, batch, resolution, device):
        self.batch, self.resolution, self.device, self.n = batch, resolution, device, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        g = torch.Generator().manual_seed(self.n)
        return {"caption": [f"expert {self.n} {i}" for i in range(self.batch)],
                "pixel_values": torch.rand(self.batch, 3, self.resolution, self.resolution, generator=g) * 2 - 1}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device, dtype, n, iters):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    tic = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - tic) / 1e12


def train_mode(cfg, args, device, *, truncate, compile):
    """Seconds per micro-step and its split for one configuration, with freshly built models."""
    torch.manual_seed(0)
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg["precision"],
                      gradient_accumulation_steps=cfg["accumulation"])
    dtype = torch.bfloat16 if cfg["precision"] == "bf16" else torch.float32
    unet = UNet2DConditionModel(**cfg["unet"]).to(device, dtype).train()
    reference = UNet2DConditionModel(**cfg["unet"]).to(device, dtype).requires_grad_(False)
    reference.load_state_dict(unet.state_dict())
    text = Text(CLIPTextModel(CLIPTextConfig(**cfg["text"])).to(device, dtype).eval(), device)
    vae = AutoencoderKL(**cfg["vae"]).to(device, dtype).eval()
    family = SD15(SD15_SCHEDULE)
    params = FullFineTune(trainable=unet, reference=reference)
    ema = NamedEMA(params.named_trainable(), offload=True)
    optimizer = torch.optim.AdamW([p for _, p in params.named_trainable()], lr=1e-4)
    model, optimizer, lr_scheduler = acc.prepare(unet, optimizer, get_scheduler("constant", optimizer))
    speed_up([unet, reference], compile=compile)
    B, T = cfg["batch"], cfg["rollout_steps"]
    exact, why = rollouts.truncation_applies(buffer_size=B, sample_steps=1, pair_batch_size=B, rollout_batch_size=B,
                                          batches_per_refill=1, sync=False, world=1)
    assert exact, why
    settings = rollouts.RolloutSettings(scheduler="DPMSolver++", num_steps=T, batch_size=B, batches_per_refill=1,
                                     min_trajectories=B, guidance_scale=1.0, perturb_timesteps=True,
                                     drop_prompt_probability=0.2, resolution=cfg["resolution"],
                                     latent_size=cfg["resolution"] // 8, truncate=truncate)
    refiller = rollouts.Refiller(batches=Experts(B, cfg["resolution"], device), text=text, vae=vae, family=family,
                                 settings=settings, accelerator=acc, weight_dtype=dtype)
    state = TrainState.fresh(seed=0, rank=0, buffer_size=B, device=device)

    def loop_on(source):
        return TrainLoop(accelerator=acc, model=model, params=params, family=family, source=source,
                         objective=Ranking(margin=0.001, hinge=True), optimizer=optimizer, lr_scheduler=lr_scheduler,
                         ema=None, state=state, cadence=None, max_grad_norm=1.0, logdir=None, args={}, batch_size=B)
    loop = loop_on(ReplayPairs(refiller=refiller, params=params, batch_size=B, sample_steps=1))
    timers = {"rollout": 0.0}

    def timed_rollout(real):
        def wrapper(*a, **k):
            sync(device)
            tic = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                sync(device)
                timers["rollout"] += time.perf_counter() - tic
        return wrapper

    saved = rollouts.rollout, rollouts.truncated_rollout
    rollouts.rollout, rollouts.truncated_rollout = timed_rollout(saved[0]), timed_rollout(saved[1])

    def micro_step():
        """The whole micro-step; returns its seconds outside the rollouts."""
        rolled = timers["rollout"]
        sync(device)
        tic = time.perf_counter()
        loop.micro_step(state.step + 1)
        state.step += 1
        sync(device)
        if acc.sync_gradients:
            ema.step(params.named_trainable())
        return time.perf_counter() - tic - (timers["rollout"] - rolled)

    try:
        for _ in range(args.warmup):
            micro_step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timers["rollout"], rows0, train, walls = 0.0, refiller.unet_rows, 0.0, []
        for _ in range(args.steps):
            sync(device)
            tic = time.perf_counter()
            train += micro_step()
            walls.append(time.perf_counter() - tic)
        rows = (refiller.unet_rows - rows0) / args.steps
    finally:
        rollouts.rollout, rollouts.truncated_rollout = saved
    wall = sum(walls)
    out = {"truncate": truncate, "compile": compile, "seconds_per_micro_step": wall / args.steps,
           "median_seconds_per_micro_step": statistics.median(walls),
           "rollout_s": timers["rollout"] / args.steps, "train_s": train / args.steps,
           "other_s": (wall - timers["rollout"] - train) / args.steps, "rollout_unet_rows": rows,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None}
    if not compile:  # FLOPs of the pieces (eager: the counter sees every op); the compiled math is the same
        x = torch.randn(1, 4, cfg["resolution"] // 8, cfg["resolution"] // 8, device=device, dtype=dtype)
        c = torch.randn(1, 77, cfg["unet"]["cross_attention_dim"], device=device, dtype=dtype)
        with torch.no_grad(), acc.autocast():
            row = count_flops(lambda: unet(x, torch.tensor([500], device=device), encoder_hidden_states=c))
            pixels = torch.randn(B, 3, cfg["resolution"], cfg["resolution"], device=device, dtype=dtype)
            vae_flops = count_flops(lambda: vae.encode(pixels))
        drawn = loop.source.draw(state.step + 1, state)  # the training part alone: a source handing out this draw
        train_flops = count_flops(lambda: loop_on(SimpleNamespace(draw=lambda step, state: drawn)).micro_step(1))
        out["flops"] = {"unet_row": row, "dro_micro_step": train_flops, "vae_encode": vae_flops}
    del unet, reference, model, optimizer, params, ema, refiller, state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


@torch.no_grad()
def inference(cfg, args, device):
    dtype = torch.bfloat16 if cfg["precision"] == "bf16" else torch.float32
    unet = UNet2DConditionModel(**cfg["unet"]).to(device, dtype).eval()
    vae = AutoencoderKL(**cfg["vae"]).to(device, dtype).eval()
    text = Text(CLIPTextModel(CLIPTextConfig(**cfg["text"])).to(device, dtype).eval(), device)
    B, side = cfg["batch"], cfg["resolution"] // 8
    sched = DDPMScheduler.from_config(SD15_SCHEDULE)
    sched.set_timesteps(cfg["inference_steps"])

    def images():
        cond, _ = text.encode([f"prompt {i}" for i in range(B)])
        neg, _ = text.encode([""] * B)
        x = torch.randn(B, 4, side, side, device=device, dtype=dtype)
        for t in sched.timesteps:
            tt = torch.full((B,), int(t), device=device)
            eps = predict_noise(unet, x, tt, cond, 7.5, neg)
            x = sched.step(eps, t, x).prev_sample
        return vae.decode(x / vae.config.scaling_factor).sample

    images()  # warm-up
    sync(device)
    tic = time.perf_counter()
    for _ in range(args.inference_batches):
        images()
    sync(device)
    return B * args.inference_batches / (time.perf_counter() - tic)


@torch.no_grad()
def scorer(cfg, args, device):
    import open_clip
    dtype = torch.bfloat16 if cfg["precision"] == "bf16" else torch.float32
    if cfg["clip"] == VIT_H_14:
        model = open_clip.create_model(VIT_H_14, pretrained=None)
    else:
        model = open_clip.CLIP(**cfg["clip"])
    model = model.to(device, dtype).eval()
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    n = cfg["score_batch"]
    pixels = torch.randn(n, 3, size, size, device=device, dtype=dtype)
    tokens = torch.randint(1, 1000, (n, 77), device=device)

    def score():
        image, text = model.encode_image(pixels), model.encode_text(tokens)
        return (image / image.norm(dim=-1, keepdim=True) * text / text.norm(dim=-1, keepdim=True)).sum(-1)

    score()
    sync(device)
    tic = time.perf_counter()
    for _ in range(args.score_batches):
        score()
    sync(device)
    return n * args.score_batches / (time.perf_counter() - tic)


def markdown(result):
    r = result
    peak = r["matmul_peak_tflops"]
    lines = [f"# GPU bench ({r['device']}, torch {r['torch']}, {'tiny configs' if r['tiny'] else 'full-size SD1.5'})", "",
             f"Settings: {r['settings']}", "", f"matmul peak (measured; bf16 on a GPU): {peak:.1f} TFLOP/s", "",
             "| truncate | compile | s / micro-step | rollout s | train s | other s | rollout UNet rows | peak GiB | "
             "TFLOP/s | of peak |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in r["modes"]:
        mem = f"{m['peak_memory_gib']:.2f}" if m["peak_memory_gib"] is not None else "-"
        lines.append(f"| {m['truncate']} | {m['compile']} | {m['seconds_per_micro_step']:.3f} | {m['rollout_s']:.3f} | "
                     f"{m['train_s']:.3f} | {m['other_s']:.3f} | {m['rollout_unet_rows']:.1f} | {mem} | "
                     f"{m['tflops']:.1f} | {100 * m['tflops'] / peak:.0f} % |")
    lines += ["", "README's 24 GB table: bf16 default 8.39 GiB static (rpo), activations on top.", "",
              f"Inference ({r['settings']['inference_steps']}-step DDPM, CFG 7.5, batch {r['settings']['batch']}, VAE decode): "
              f"{r['inference_images_per_s']:.2f} images/s", "",
              f"Scorer ({r['scorer']}, image + text towers, batch {r['settings']['score_batch']}): "
              f"{r['scorer_images_per_s']:.1f} images/s", ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("bench", "out", time.strftime("gpu-%Y%m%d-%H%M%S")))
    p.add_argument("--tiny", action="store_true", help="tiny configs, few steps (CPU smoke run)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--steps", type=int, default=None, help="timed micro-steps per mode (default 16, tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed micro-steps per mode (default 4, tiny 1)")
    p.add_argument("--modes", default=None,
                   help="comma-separated: whole, truncate, each optionally +compile (default whole,truncate,truncate+compile; "
                        "tiny: whole,truncate, since inductor on a CPU takes minutes)")
    p.add_argument("--inference_batches", type=int, default=None)
    p.add_argument("--score_batches", type=int, default=None)
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny
    args.steps = args.steps or (2 if tiny else 16)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 4)
    args.inference_batches = args.inference_batches or (1 if tiny else 3)
    args.score_batches = args.score_batches or (1 if tiny else 10)
    cfg = dict(unet=TINY_UNET if tiny else SD15_UNET, text=TINY_TEXT if tiny else CLIP_L_TEXT,
               vae=TINY_VAE if tiny else SD_VAE, clip=TINY_CLIP if tiny else VIT_H_14,
               resolution=64 if tiny else 512, batch=4, rollout_steps=4 if tiny else 20, accumulation=2 if tiny else 16,
               inference_steps=3 if tiny else 50, score_batch=4 if tiny else 32,
               precision="bf16" if device.type == "cuda" else "no")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    peak = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                       256 if tiny else 8192, 3 if tiny else 50)
    print(f"matmul peak {peak:.1f} TFLOP/s", flush=True)
    modes = []
    for name in (args.modes or ("whole,truncate" if tiny else "whole,truncate,truncate+compile")).split(","):
        parts = name.split("+")
        if parts[0] not in ("whole", "truncate") or not set(parts[1:]) <= {"compile"}:
            raise SystemExit(f"bad mode {name!r}")
        tic = time.perf_counter()
        m = train_mode(cfg, args, device, truncate=parts[0] == "truncate", compile="compile" in parts)
        m["mode"], m["build_and_run_s"] = name, time.perf_counter() - tic
        modes.append(m)
        print(f"{name}: {m['seconds_per_micro_step']:.3f} s/micro-step ({m['build_and_run_s']:.0f} s)", flush=True)
    flops = next((m["flops"] for m in modes if "flops" in m), None)
    for m in modes:
        if flops is None:
            m["tflops"] = float("nan")
            continue
        per_step = m["rollout_unet_rows"] * flops["unet_row"] + flops["dro_micro_step"] + flops["vae_encode"]
        m["micro_step_tflop"] = per_step / 1e12
        m["tflops"] = per_step / m["seconds_per_micro_step"] / 1e12
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "tiny": tiny, "matmul_peak_tflops": peak, "modes": modes,
              "settings": {k: v for k, v in cfg.items() if k not in ("unet", "text", "vae", "clip")},
              "scorer": VIT_H_14 if not tiny else "tiny CLIP",
              "inference_images_per_s": inference(cfg, args, device)}
    result["scorer_images_per_s"] = scorer(cfg, args, device)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = markdown(result)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {args.out}/gpu.json and gpu.md")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
