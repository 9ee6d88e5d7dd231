
import pytest
import torch
from diffusers import AutoencoderKL

from rpo.data.folders import ExpertDataset
from rpo.training.latents import encode_moments, sample_latents
from test_train import run, train_cmd, weights


def test_cached_moments_sample_like_fresh_encoding(kit):
    vae = AutoencoderKL.from_pretrained(kit["sd15"], subfolder="vae")
    data = ExpertDataset(kit["experts"], 32, random_flip=True)
    moments = encode_moments(vae, data, "cpu", torch.float32, batch_size=3)
    assert moments.shape == (len(data), 2, 8, 4, 4)
    index, flipped = torch.tensor([0, 3, 5, 3]), torch.tensor([False, True, False, False])
    pixels = torch.stack([data.load(int(i), bool(f))["pixel_values"] for i, f in zip(index, flipped)])
    fresh = vae.encode(pixels).latent_dist
    cached = sample_latents(moments, index, flipped, torch.Generator().manual_seed(7))
    direct = fresh.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(cached, direct, rtol=1e-5, atol=1e-5)
    # mirrored moments are those of the mirrored image, not of the original
    assert not torch.allclose(moments[3, 0], moments[3, 1])
    # and over many draws the samples have the posterior's mean and std
    many = sample_latents(moments, index.repeat(500), flipped.repeat(500), torch.Generator().manual_seed(1))
    many = many.view(500, 4, *many.shape[1:])
    torch.testing.assert_close(many.mean(0), fresh.mean, atol=0.15 * fresh.std.max().item() + 1e-3, rtol=0)
    torch.testing.assert_close(many.std(0), fresh.std, rtol=0.15, atol=1e-4)


@pytest.mark.slow
def test_training_with_cached_latents_matches_fresh_encoding(kit, tmp_path):
    # same RNG stream either way: the weights after two updates agree up to VAE batch rounding
    common = ("--num_steps", "2", "--gradient_accumulation_steps", "1", "--checkpointing_steps", "2",
              "--buffer_update_steps", "1", "--no-use_ema")
    run(train_cmd(kit, tmp_path / "fresh", *common))
    run(train_cmd(kit, tmp_path / "cached", "--cache_latents", *common))
    a, b = weights(tmp_path / "fresh" / "ckpt-2" / "unet"), weights(tmp_path / "cached" / "ckpt-2" / "unet")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    proc = run(train_cmd(kit, tmp_path / "bad", "--cache_latents", "--random_crop"), ok=False)
    assert proc.returncode == 2 and "--cache_latents needs centre crops" in proc.stderr
