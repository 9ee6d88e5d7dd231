"""The training library driven in-process: refill -> micro-step -> checkpoint -> load.

The micro-step is checked against the DRO update computed in the test by hand: the same
buffer draw and noise (from copies of the state's generators), the errors as plain
`F.mse_loss`, the hinge written out, autograd, gradient clipping and a stock
`torch.optim.AdamW` on a separate copy of the model. The checkpoint is checked by loading it
into freshly built objects and comparing every piece with what was saved.
"""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler

from rpo.data.folders import ExpertBatches, ExpertDataset
from rpo.families import SD15
from rpo.models import load_text_encoders, load_unet, load_vae
from rpo.training.ema import NamedEMA
from rpo.training.loop import TrainLoop
from rpo.training.objectives import Ranking
from rpo.training.parametrisation import FullFineTune
from rpo.training.rollouts import Refiller, RolloutSettings
from rpo.training.sources import ReplayPairs
from rpo.training.state import TrainState, load_checkpoint, read_trainer, save_checkpoint

MARGIN, LR, CLIP = 0.05, 1e-3, 0.5


@pytest.fixture(params=["tiny-kit", "v-prediction"])
def pipeline(request, kit, tmp_path_factory):
    """The tiny kit's SD1.5 (epsilon) and an independently built v-prediction pipeline."""
    if request.param == "tiny-kit":
        return kit["sd15"]
    from interop_kit import write_independent_sd15
    return write_independent_sd15(tmp_path_factory.mktemp("vpred"), scheduler="vpred")


def build(kit, pipeline, *, accumulation=1):
    torch.manual_seed(0)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    family = SD15.from_pretrained(pipeline)
    text, vae = load_text_encoders(pipeline), load_vae(pipeline)
    unet = load_unet(pipeline, "unet")
    with torch.no_grad():  # move the trainable model off the reference, so the loss is not at its kink
        for p in unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    params = FullFineTune(trainable=unet, reference=load_unet(pipeline, "unet").requires_grad_(False))
    ema = NamedEMA(params.named_trainable())
    optimizer = torch.optim.AdamW([p for _, p in params.named_trainable()], lr=LR)
    lr_scheduler = get_scheduler("constant", optimizer)
    model, optimizer, lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    experts = ExpertDataset(kit["experts"], 4 * vae_scale, False, False)
    batches = iter(torch.utils.data.DataLoader(experts, batch_sampler=ExpertBatches(len(experts), 2)))
    settings = RolloutSettings(scheduler="DDIM", num_steps=3, batch_size=2, batches_per_refill=1, min_trajectories=2,
                               guidance_scale=1.0, perturb_timesteps=True, drop_prompt_probability=0.0,
                               resolution=4 * vae_scale, latent_size=4)
    refiller = Refiller(batches=batches, text=text, vae=vae, family=family, accelerator=acc, weight_dtype=torch.float32,
                        settings=settings)
    state = TrainState.fresh(seed=0, rank=0, buffer_size=4, device="cpu")
    return dict(acc=acc, family=family, params=params, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler,
                model=model, refiller=refiller, state=state)


def micro_step(o, batch_size=2):
    """TrainLoop.micro_step on the replay source; the test refills itself (the source
    refills only an empty buffer here)."""
    source = ReplayPairs(refiller=o["refiller"], params=o["params"], batch_size=batch_size, sample_steps=10**9)
    loop = TrainLoop(accelerator=o["acc"], model=o["model"], params=o["params"], family=o["family"], source=source,
                     objective=Ranking(margin=MARGIN, hinge=True), optimizer=o["optimizer"],
                     lr_scheduler=o["lr_scheduler"], ema=None, state=o["state"], cadence=None, max_grad_norm=CLIP,
                     logdir=None, args={}, batch_size=batch_size)
    return loop.micro_step(1)


def hand_update(o, pipeline, batch_size=2):
    """The DRO update of docs/design.md ("Algorithm", steps 2-4) written out on a copy; the
    expert target as the model's own scheduler config says (eps or the velocity)."""
    with open(os.path.join(pipeline, "scheduler", "scheduler_config.json")) as f:
        prediction = json.load(f).get("prediction_type", "epsilon")
    state, family = o["state"], o["family"]
    cpu_gen, dev_gen = torch.Generator().set_state(state.cpu_gen.get_state()), torch.Generator().set_state(state.dev_gen.get_state())
    sample = state.buffer.sample(batch_size, generator=cpu_gen)
    eps = torch.randn(sample["x0"].shape, generator=dev_gen)
    ab = family.noise_scheduler.alphas_cumprod[sample["t"]].view(-1, 1, 1, 1)
    x_expert = ab.sqrt() * sample["x0"] + (1 - ab).sqrt() * eps
    target = eps if prediction == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * sample["x0"]
    trainable = copy.deepcopy(o["params"].trainable)
    reference = o["params"].reference_model
    cond = sample["prompt_embeds"]

    def errors(model):
        e = F.mse_loss(model(x_expert, sample["t"], cond).sample, target, reduction="none").mean((1, 2, 3))
        p = F.mse_loss(model(sample["x_t"], sample["t"], cond).sample, sample["eps"], reduction="none").mean((1, 2, 3))
        return e, p
    with torch.no_grad():
        ref_e, ref_p = errors(reference)
    e, p = errors(trainable)
    loss = torch.clamp(((e - ref_e) - (p - ref_p)) + MARGIN, min=0).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(trainable.parameters()), CLIP)
    opt = torch.optim.AdamW(list(trainable.parameters()), lr=LR)
    opt.step()
    return loss.item(), trainable


def test_refill_micro_step_checkpoint_load_in_process(kit, pipeline, tmp_path):
    o = build(kit, pipeline)
    o["refiller"].refill(model=o["params"].rollout_model, state=o["state"])
    buf = o["state"].buffer
    assert len(buf) == 2 and o["state"].expert_batches_used == 1
    t = buf.data["t"]
    assert t.shape == (2, 3) and bool((t[:, :-1] > t[:, 1:]).all())  # each row its own decreasing grid
    ratio = 1000 // 3
    assert bool(((t - t[:, :1] + ratio * torch.arange(3)) == 0).all())  # spaced by the grid ratio, offset per row

    before = {k: v.clone() for k, v in o["params"].trainable.state_dict().items()}
    want_loss, want_model = hand_update(o, pipeline)
    stats = micro_step(o)
    assert stats[0].item() == pytest.approx(want_loss, rel=1e-5, abs=1e-8)
    assert want_loss > 0  # the hinge is active: the update is not trivially zero
    got = o["params"].trainable.state_dict()
    moved = 0
    for k, v in want_model.state_dict().items():
        # Adam's first step is lr * g / (|g| + eps): where |g| is near eps, float rounding of
        # the batched vs the separate forwards moves it by up to a fraction of lr
        torch.testing.assert_close(got[k], v, rtol=0, atol=0.05 * LR)
        moved += int(((got[k] - before[k]).abs() > 0.5 * LR).sum())
    assert moved > 0  # the update is real: many weights moved by about lr
    o["ema"].step(o["params"].named_trainable())
    o["state"].step = 1

    path = save_checkpoint(logdir=str(tmp_path), accelerator=o["acc"], model=o["model"], params=o["params"], ema=o["ema"],
                           state=o["state"], args={"seed": 0}, family=o["family"], keep=1)
    # a fresh set of objects, loaded from the checkpoint, holds the same state
    fresh = build(kit, pipeline)
    load_checkpoint(path=path, trainer=read_trainer(path), accelerator=fresh["acc"], params=fresh["params"],
                    ema=fresh["ema"], state=fresh["state"])
    assert fresh["state"].step == 1 and fresh["state"].expert_batches_used == 1
    for k, v in o["state"].buffer.data.items():
        assert torch.equal(fresh["state"].buffer.data[k], v), k
    assert torch.equal(fresh["state"].cpu_gen.get_state(), o["state"].cpu_gen.get_state())
    assert torch.equal(fresh["state"].dev_gen.get_state(), o["state"].dev_gen.get_state())
    for k, v in o["params"].trainable.state_dict().items():
        assert torch.equal(fresh["params"].trainable.state_dict()[k], v), k
    for k, v in o["ema"].named_shadows().items():
        assert torch.equal(fresh["ema"].named_shadows()[k], v), k
    assert fresh["optimizer"].state_dict()["state"].keys() == o["optimizer"].state_dict()["state"].keys()
    # and the next micro-step of both is the same
    assert torch.equal(micro_step(fresh), micro_step(o))
