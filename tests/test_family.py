"""The model-family seam: the noise schedule read from the model's own scheduler config
(sampler-only keys ignored, clip_sample off, bad values refused naming file and key), and the
expert targets for epsilon and v-prediction against the formulas computed here."""
import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from rpo.cli import UserError
from rpo.diffusion.family import UNetFamily, read_schedule_config
from rpo.diffusion.objective import dro_loss

SD15 = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "steps_offset": 1, "skip_prk_steps": True, "set_alpha_to_one": False}


def write_config(tmp_path, config):
    (tmp_path / "scheduler").mkdir(parents=True, exist_ok=True)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return str(tmp_path)


def alphas_bar(T=1000, b0=0.00085, b1=0.012):
    betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float64) ** 2  # "scaled_linear"
    return torch.cumprod(1 - betas, 0)


def test_sampler_keys_ignored_and_clip_sample_off(tmp_path):
    source = write_config(tmp_path, {**SD15, "use_karras_sigmas": True, "solver_order": 3, "clip_sample": True,
                                     "algorithm_type": "sde-dpmsolver++"})
    config, where = read_schedule_config(source)
    assert where.endswith("scheduler/scheduler_config.json")
    assert config == {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False}
    family = UNetFamily(config)
    assert family.noise_scheduler.config.clip_sample is False
    torch.testing.assert_close(family.noise_scheduler.alphas_cumprod.double(), alphas_bar(), rtol=1e-6, atol=1e-7)
    # a config re-saved without clip_sample: still off (diffusers' DDPM default would clip latents)
    source = write_config(tmp_path / "b", {k: v for k, v in SD15.items()})
    assert read_schedule_config(source)[0]["clip_sample"] is False


@pytest.mark.parametrize("change, message", [
    ({"prediction_type": "sample"}, "prediction_type 'sample'"),
    ({"beta_schedule": "karras"}, "beta_schedule 'karras'"),
    ({"num_train_timesteps": 1}, "num_train_timesteps must be"),
])
def test_unusable_schedule_is_refused_naming_file_and_key(tmp_path, change, message):
    source = write_config(tmp_path, {**SD15, **change})
    with pytest.raises(UserError) as e:
        read_schedule_config(source)
    assert message in str(e.value) and "scheduler/scheduler_config.json" in str(e.value)


def test_missing_or_corrupt_config_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no scheduler/scheduler_config.json"):
        read_schedule_config(str(tmp_path))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(UserError, match="cannot read"):
        read_schedule_config(str(tmp_path))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_noising_and_expert_target_match_the_formulas(tmp_path, prediction):
    family = UNetFamily(read_schedule_config(write_config(tmp_path, {**SD15, "prediction_type": prediction}))[0])
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ab = alphas_bar()[t].view(-1, 1, 1, 1).float()
    torch.testing.assert_close(family.add_noise(x0, eps, t), ab.sqrt() * x0 + (1 - ab).sqrt() * eps, rtol=1e-5, atol=1e-6)
    want = eps if prediction == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
    torch.testing.assert_close(family.target(x0, eps, t), want, rtol=1e-5, atol=1e-6)


class Echo(torch.nn.Module):
    """A stand-in 'UNet' whose output is a fixed linear function of its input (so the test
    can compute its errors by hand), with the diffusers call signature."""

    def __init__(self, scale):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, x, t, encoder_hidden_states, added_cond_kwargs=None):
        return type("Out", (), {"sample": self.scale * x})()


def test_v_prediction_dro_loss_uses_velocity_for_experts_and_stored_output_for_policy(tmp_path):
    family = UNetFamily(read_schedule_config(write_config(tmp_path, {**SD15, "prediction_type": "v_prediction"}))[0])
    g = torch.Generator().manual_seed(1)
    n = 2
    sample = {"t": torch.tensor([100, 700]), "x0": torch.randn(n, 4, 4, 4, generator=g),
              "x_t": torch.randn(n, 4, 4, 4, generator=g), "eps": torch.randn(n, 4, 4, 4, generator=g),
              "prompt_embeds": torch.randn(n, 7, 8, generator=g)}
    eps_e = torch.randn(n, 4, 4, 4, generator=g)
    model, ref = Echo(0.9), Echo(0.5)
    loss, stats = dro_loss(model=model, reference=lambda: contextlib.nullcontext(ref), family=family, sample=sample,
                           eps_expert=eps_e, margin=0.01)
    ab = alphas_bar()[sample["t"]].view(-1, 1, 1, 1).float()
    x_e = ab.sqrt() * sample["x0"] + (1 - ab).sqrt() * eps_e
    v = ab.sqrt() * eps_e - (1 - ab).sqrt() * sample["x0"]

    def err(scale, x, target):
        return F.mse_loss(scale * x, target, reduction="none").mean((1, 2, 3))
    d = (err(0.9, x_e, v) - err(0.5, x_e, v)) - (err(0.9, sample["x_t"], sample["eps"]) - err(0.5, sample["x_t"], sample["eps"]))
    want = torch.clamp(d + 0.01, min=0).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert stats["expert"].item() == pytest.approx(err(0.9, x_e, v).mean().item(), rel=1e-5)
