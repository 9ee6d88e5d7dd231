"""train.py end to end on the tiny kit (CPU, fp32): exact resume, atomic checkpoints,
the defects of the paper's code (basiclab/DiffusionDRO, docs/upstream.md) not repeated, bad input refused before models load."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(kit, logdir, *extra):
    return [sys.executable, os.path.join(REPO, "train.py"),
            "--pretrained_model_name_or_path", kit["sd15"], "--train_dataset", kit["experts"],
            "--validation_dataset", kit["prompts"], "--logdir", str(logdir),
            "--resolution", "32", "--batch_size", "2", "--buffer_batch_size", "2", "--buffer_size", "4",
            "--buffer_num_inference_steps", "4", "--mixed_precision", "no", "--dataloader_num_workers", "0",
            "--report_to", "tensorboard", *extra]


def run(cmd, ok=True):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if ok and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def weights(path):
    return load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_is_exact(kit, tmp_path):
    # buffer_update_steps 4 with accumulation 2: the rollout copy lags the trainable weights,
    # the harder case (its weights are part of the state); DDIM rollouts (docs/upstream.md, defect 5).
    common = ("--gradient_accumulation_steps", "2", "--checkpointing_steps", "4", "--buffer_update_steps", "4",
              "--buffer_scheduler", "DDIM", "--learning_rate", "1e-3", "--checkpoints_total_limit", "2")
    run(train_cmd(kit, tmp_path / "straight", "--num_steps", "8", *common))
    # the split run loads data in 2 worker processes: batches are a function of (seed, rank,
    # batch number), so the number of workers must not matter either
    workers = ("--dataloader_num_workers", "2")
    run(train_cmd(kit, tmp_path / "split", "--num_steps", "4", *common, *workers))
    # a crash mid-save leaves a temporary folder; resume must ignore it
    os.makedirs(tmp_path / "split" / ".tmp-ckpt-6" / "state")
    proc = run(train_cmd(kit, tmp_path / "split", "--num_steps", "8", "--resume", *common, *workers))
    assert "resumed from" in proc.stdout + proc.stderr and "ckpt-4" in proc.stdout + proc.stderr
    for sub in ("unet", "ema"):
        assert_same_weights(tmp_path / "straight" / "ckpt-8" / sub, tmp_path / "split" / "ckpt-8" / sub)
    # the trained weights moved away from the pretrained ones
    before = weights(os.path.join(kit["sd15"], "unet"))
    after = weights(tmp_path / "straight" / "ckpt-8" / "unet")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "split" / ".tmp-ckpt-6").exists()
    # the replay buffer is part of the state, not rebuilt empty (docs/upstream.md, defect 9)
    state = torch.load(tmp_path / "split" / "ckpt-8" / "state" / "rank0.pt", weights_only=True)
    assert state["buffer"]["tensors"]["x_t"].shape[0] == 4


def test_ckpt_ema_loads_as_unet_and_limit_keeps_newest_state(kit, tmp_path):
    from diffusers import UNet2DConditionModel
    run(train_cmd(kit, tmp_path, "--num_steps", "4", "--gradient_accumulation_steps", "1", "--checkpointing_steps", "2",
                  "--buffer_update_steps", "1"))
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "ckpt-4" / "ema")
    assert unet.config.cross_attention_dim == 32
    assert (tmp_path / "ckpt-4" / "state" / "trainer.pt").exists()
    assert (tmp_path / "ckpt-2" / "unet").exists() and not (tmp_path / "ckpt-2" / "state").exists()
    assert (tmp_path / "training_config.json").exists()


@pytest.mark.slow
def test_gradient_clipping_reaches_the_weights(kit, tmp_path):
    # AdamW is scale invariant except for eps: clipping the gradient norm to 1e-12 makes the
    # update ~lr * g / eps, orders of magnitude smaller than the unclipped ~lr. The public
    # code's clipping saw an exhausted iterator and never happened (docs/upstream.md, defect 1).
    common = ("--num_steps", "1", "--gradient_accumulation_steps", "1", "--checkpointing_steps", "1",
              "--buffer_update_steps", "1", "--learning_rate", "1e-2", "--no-use_ema")
    run(train_cmd(kit, tmp_path / "free", "--max_grad_norm", "0", *common))
    run(train_cmd(kit, tmp_path / "clipped", "--max_grad_norm", "1e-12", *common))
    before = weights(os.path.join(kit["sd15"], "unet"))
    def change(run_dir):
        after = weights(run_dir / "ckpt-1" / "unet")
        return max((after[k] - before[k]).abs().max().item() for k in before)
    free, clipped = change(tmp_path / "free"), change(tmp_path / "clipped")
    assert free > 1e-3
    assert clipped < free / 100


def test_latent_size_follows_resolution(kit, tmp_path):
    # the tiny UNet's sample_size is 8 (64 px); --resolution 48 must give 6x6 latents on both
    # halves (the paper's code took the size from the UNet config and crashed, docs/upstream.md, defect 11)
    run(train_cmd(kit, tmp_path, "--num_steps", "1", "--gradient_accumulation_steps", "1", "--checkpointing_steps", "1",
                  "--buffer_update_steps", "1", "--resolution", "48"))
    state = torch.load(tmp_path / "ckpt-1" / "state" / "rank0.pt", weights_only=True)["buffer"]["tensors"]
    assert state["x0"].shape[-2:] == (6, 6) and state["x_t"].shape[-2:] == (6, 6)


@pytest.mark.parametrize("extra, message", [
    (("--resolution", "30"), "--resolution must be a multiple of 8"),
    (("--batch_size", "0"), "--batch_size must be at least 1, got 0"),
    (("--checkpointing_steps", "3"), "--checkpointing_steps 3 must be a multiple of --gradient_accumulation_steps 2"),
    (("--num_steps", "5"), "--num_steps 5 must be a multiple of --gradient_accumulation_steps 2"),
    (("--score", "aesthetic"), "invalid choice"),
    (("--pretrained_model_name_or_path", "nobody/no-such-model"), "cannot load the scheduler config of 'nobody/no-such-model'"),
    (("--train_dataset", "/no/such/folder"), "train dataset folder not found: /no/such/folder"),
    (("--resume", "/no/such/ckpt-4"), "--resume /no/such/ckpt-4: not a checkpoint folder"),
    (("--resume", "--overwrite"), "--resume and --overwrite contradict each other"),
    (("--learning_rate", "nan"), "--learning_rate must be a positive number, got nan"),
    (("--mixed_precision", "fp16"), "--mixed_precision fp16 needs a CUDA GPU"),
    (("--logdir", "/proc/version/log"), "--logdir /proc/version/log: /proc/version is a file, not a folder"),
    (("--validation_steps", "2", "--validation_dataset", "/no/prompts"), "validation dataset folder not found: /no/prompts"),
    (("--pretrained_model_name_or_path", "/tmp"), "is not a diffusers pipeline folder"),
    (("--buffer_scheduler", "Euler"), "invalid choice"),
])
def test_bad_input_is_one_clear_line(kit, tmp_path, extra, message):
    proc = run(train_cmd(kit, tmp_path / "log", "--gradient_accumulation_steps", "2", *extra), ok=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "{" not in proc.stderr.strip().splitlines()[-1]


def test_corrupt_image_is_named(kit, tmp_path):
    import shutil
    data = tmp_path / "experts"
    shutil.copytree(kit["experts"], data)
    bad = sorted(data.glob("*/*.png"))[0]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    proc = run(train_cmd(kit, tmp_path / "log", "--train_dataset", str(data)), ok=False)
    assert proc.returncode == 2 and f"unreadable image {bad}" in proc.stderr


@pytest.mark.slow
def test_sigkill_then_resume_finishes_with_same_weights(kit, tmp_path):
    common = ("--gradient_accumulation_steps", "1", "--checkpointing_steps", "2", "--buffer_update_steps", "1",
              "--learning_rate", "1e-3")
    run(train_cmd(kit, tmp_path / "straight", "--num_steps", "8", *common))
    proc = subprocess.Popen(train_cmd(kit, tmp_path / "killed", "--num_steps", "8", *common), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "ckpt-4").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "killed" / "ckpt-4").exists() and not (tmp_path / "killed" / "ckpt-8").exists()  # killed mid-run
    run(train_cmd(kit, tmp_path / "killed", "--num_steps", "8", "--resume", *common))
    assert_same_weights(tmp_path / "straight" / "ckpt-8" / "ema", tmp_path / "killed" / "ckpt-8" / "ema")
    assert not [n for n in os.listdir(tmp_path / "killed") if n.startswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["pickscore", "hpsv2", "aestheticv1", "aestheticv2", "clip", "imagereward"])
def test_every_score_choice_validates(kit, tmp_path, scorer_weights, metric):
    # the paper's code accepted aestheticv1/v2 and crashed at the first checkpoint (docs/upstream.md, defect 7)
    proc = run(train_cmd(kit, tmp_path, "--num_steps", "1", "--gradient_accumulation_steps", "1",
                         "--checkpointing_steps", "1", "--buffer_update_steps", "1", "--validation_steps", "1",
                         "--validation_num_inference_steps", "2", "--validation_scheduler", "DDIM",
                         "--score", metric, "--weights_dir", scorer_weights))
    assert re.search(rf"validated step 1: .*metrics/{metric} = -?\d+\.\d+", proc.stdout), proc.stdout[-2000:]
    assert (tmp_path / "images" / "step-1.png").exists()


def test_missing_scorer_weights_fail_at_start(kit, tmp_path):
    (tmp_path / "weights").mkdir()
    proc = run(train_cmd(kit, tmp_path / "log", "--validation_steps", "2", "--gradient_accumulation_steps", "2",
                         "--score", "aestheticv2", "--weights_dir", str(tmp_path / "weights")), ok=False)
    assert proc.returncode == 2 and str(tmp_path / "weights") in proc.stderr
    assert not (tmp_path / "log" / "ckpt-2").exists()


def test_sdxl_with_guidance_and_options(kit, tmp_path):
    # SDXL conditioning (pooled text, size/crop ids), classifier-free guidance with
    # per-sample timesteps (the paper's code failed, docs/upstream.md, defect 6), DDIM rollouts, random
    # crops, the logistic loss and gradient checkpointing
    from rpo.tiny import pipelines as tiny
    tiny.write_sdxl(str(tmp_path / "sdxl"))
    cmd = train_cmd(kit, tmp_path / "log", "--num_steps", "2", "--gradient_accumulation_steps", "1",
                    "--checkpointing_steps", "2", "--buffer_update_steps", "1", "--buffer_guidance_scale", "3.0",
                    "--buffer_scheduler", "DDIM", "--no-hinge", "--gradient_checkpointing", "--random_crop")
    cmd[cmd.index("--pretrained_model_name_or_path") + 1] = str(tmp_path / "sdxl")
    run(cmd + ["--sdxl"])
    tensors = torch.load(tmp_path / "log" / "ckpt-2" / "state" / "rank0.pt", weights_only=True)["buffer"]["tensors"]
    assert tensors["pooled_embeds"].shape == (4, 32) and tensors["time_ids"].shape == (4, 6)
    assert (tensors["time_ids"][:, 4:] == 32).all()  # target size = --resolution
    from diffusers import UNet2DConditionModel
    assert UNet2DConditionModel.from_pretrained(tmp_path / "log" / "ckpt-2" / "ema").config.addition_embed_type == "text_time"


def test_public_flag_spellings_parse(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    import train
    parser = train.build_parser()
    # the paper's code's negative form is misspelt; both spellings work
    assert parser.parse_args(["--gradient_checkpointing", "--no-gradient_checkpoint"]).gradient_checkpointing is False
    assert parser.parse_args(["--no-gradient_checkpointing"]).gradient_checkpointing is False
    assert parser.parse_args(["--no-buffer_sync", "--no-hinge"]).hinge is False


@pytest.mark.slow
def test_config_file_for_train(kit, tmp_path):
    import json
    (tmp_path / "good.yaml").write_text("resolution: 48\nbuffer_scheduler: DDIM\nnum_steps: 2\n")
    cmd = train_cmd(kit, tmp_path / "log", "--config", str(tmp_path / "good.yaml"), "--gradient_accumulation_steps", "1",
                    "--checkpointing_steps", "2", "--buffer_update_steps", "1")
    i = cmd.index("--resolution")
    del cmd[i:i + 2]  # the file sets it
    run(cmd)
    with open(tmp_path / "log" / "training_config.json") as f:
        config = json.load(f)["runs"][-1]["args"]
    assert (config["resolution"], config["buffer_scheduler"], config["num_steps"]) == (48, "DDIM", 2)
    (tmp_path / "bad.yaml").write_text("buffer_sizee: 8\n")
    proc = run(train_cmd(kit, tmp_path / "log2", "--config", str(tmp_path / "bad.yaml")), ok=False)
    assert proc.returncode == 2 and "unknown option 'buffer_sizee'" in proc.stderr


@pytest.mark.slow
def test_resume_latest_logdir_rules_and_run_log(kit, tmp_path):
    import json
    log = tmp_path / "log"
    common = ("--gradient_accumulation_steps", "2", "--checkpointing_steps", "2", "--buffer_update_steps", "2")
    # --resume latest on an empty logdir: a fresh start, and it says so
    proc = run(train_cmd(kit, log, "--num_steps", "4", "--resume", "latest", "--checkpoints_keep_weights", "1", *common))
    assert "starting fresh" in proc.stdout + proc.stderr
    # diffusers' meaning of a limit: ckpt-2 deleted whole, ckpt-4 kept
    assert not (log / "ckpt-2").exists() and (log / "ckpt-4" / "ema").exists()
    # a fresh run into a logdir with checkpoints is refused, and nothing is touched
    before = sorted(os.listdir(log))
    proc = run(train_cmd(kit, log, "--num_steps", "4", *common), ok=False)
    assert proc.returncode == 2 and "already holds checkpoints (ckpt-4)" in proc.stderr and "--overwrite" in proc.stderr
    assert sorted(os.listdir(log)) == before
    # --resume with the checkpoint's path continues it; the run log records both starts
    run(train_cmd(kit, log, "--num_steps", "6", "--resume", str(log / "ckpt-4"), *common))
    with open(log / "training_config.json") as f:
        runs = json.load(f)["runs"]
    assert [r["resumed_from"] for r in runs] == [None, str(log / "ckpt-4")]
    assert [r["args"]["num_steps"] for r in runs] == [4, 6]
    # --overwrite starts again from scratch: the old checkpoints are gone
    run(train_cmd(kit, log, "--num_steps", "2", "--overwrite", *common))
    assert sorted(n for n in os.listdir(log) if n.startswith("ckpt-")) == ["ckpt-2"]
    with open(log / "training_config.json") as f:
        assert len(json.load(f)["runs"]) == 1


def flip_bytes(path, offset=4096, count=4096):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.slow
def test_corrupted_state_is_refused_and_latest_falls_back(kit, tmp_path):
    log = tmp_path / "log"
    common = ("--gradient_accumulation_steps", "2", "--checkpointing_steps", "2", "--buffer_update_steps", "2",
              "--checkpoints_total_limit", "2")
    run(train_cmd(kit, log, "--num_steps", "4", *common))
    flip_bytes(log / "ckpt-4" / "state" / "model.safetensors")
    # the damaged checkpoint named explicitly: one line naming the file, exit 2
    proc = run(train_cmd(kit, log, "--num_steps", "6", "--resume", str(log / "ckpt-4"), *common), ok=False)
    assert proc.returncode == 2 and "model.safetensors does not match the checksum" in proc.stderr
    assert proc.stderr.count("\n") <= 2 and "Traceback" not in proc.stderr
    # latest: skips it, says so, resumes from ckpt-2, and trains on finite weights
    proc = run(train_cmd(kit, log, "--num_steps", "6", "--resume", "latest", *common))
    out = proc.stdout + proc.stderr
    assert "skipping" in out and "falling back to" in out and "resumed from" in out and "ckpt-2 at micro-step 2" in out
    w = weights(log / "ckpt-6" / "unet")
    assert all(torch.isfinite(v).all() for v in w.values())
    # a truncated trainer.pt: named, not a traceback
    trainer = log / "ckpt-6" / "state" / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:100])
    proc = run(train_cmd(kit, log, "--num_steps", "8", "--resume", str(log / "ckpt-6"), *common), ok=False)
    assert proc.returncode == 2 and "trainer.pt has 100 bytes" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_resume_option_classes(kit, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log = tmp_path / "log"
    common = ("--gradient_accumulation_steps", "2", "--checkpointing_steps", "2", "--buffer_update_steps", "2")
    run(train_cmd(kit, log, "--num_steps", "4", "--learning_rate", "1e-4", *common))
    # an option that shapes the state: refused, naming it
    proc = run(train_cmd(kit, log, "--num_steps", "8", "--resume", "latest", "--seed", "1", *common), ok=False)
    assert proc.returncode == 2 and "--resume: --seed was 0" in proc.stderr and "now 1" in proc.stderr
    # one that may change: it takes effect (the optimizer's lr, as logged), and the log says so
    proc = run(train_cmd(kit, log, "--num_steps", "8", "--resume", "latest", "--learning_rate", "0.5", *common))
    assert "--learning_rate changed from 0.0001 to 0.5" in proc.stdout + proc.stderr
    events = EventAccumulator(str(log / "rpo")).Reload()  # accelerate logs under the project name
    lrs = {e.step: e.value for e in events.Scalars("params/lr")}
    assert lrs[2] == pytest.approx(1e-4) and lrs[4] == pytest.approx(1e-4)
    assert lrs[6] == pytest.approx(0.5) and lrs[8] == pytest.approx(0.5)


def test_image_unreadable_during_training_is_one_line_naming_it(kit, tmp_path):
    """An expert image that breaks after the start-up check (here: truncated on disk) stops
    training with one line naming the file, also when it was read in a DataLoader worker."""
    import shutil
    from rpo.cli import UserError
    from rpo.data.folders import ExpertBatches, ExpertDataset
    from rpo.training.rollouts import next_batch
    experts = tmp_path / "experts"
    shutil.copytree(kit["experts"], experts)
    data = ExpertDataset(str(experts), 32)
    for item in data.items:  # every image truncated, so the first batch meets one
        with open(item.image, "r+b") as f:
            f.truncate(40)
    loader = iter(torch.utils.data.DataLoader(data, batch_sampler=ExpertBatches(len(data), 2), num_workers=1))
    with pytest.raises(UserError) as e:
        next_batch(loader)
    message = str(e.value)
    assert "\n" not in message and "cannot be read any more" in message
    assert any(item.image in message for item in data.items)
