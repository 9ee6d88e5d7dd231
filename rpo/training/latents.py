"""Cached expert latent distributions (`--cache_latents`).

The VAE encoder is deterministic: what it produces for an expert image is the posterior
N(mean, exp(logvar)), and `latent_dist.sample()` draws from it. So the moments of every
expert image and of its mirror (the only augmentation with a centre crop) can be computed
once; each refill then draws x0 from the cached moments with the same generator call the
fresh encoding makes, which gives the same distribution - and the same numbers up to the
VAE's batch-size rounding - without running the encoder every micro-step (~5 % of a step's
FLOPs at 512 px, docs/design.md, "Cost model").
"""
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


@torch.no_grad()
def encode_moments(vae, dataset, device, dtype, batch_size=8):
    """(N, 2, 2C, h, w): the posterior moments of every item, unflipped [:, 0] and mirrored [:, 1]."""
    moments = []
    keys = [(i, flip) for i in range(len(dataset)) for flip in (False, True)]
    for start in range(0, len(keys), batch_size):
        pixels = torch.stack([dataset.load(i, flip)["pixel_values"] for i, flip in keys[start:start + batch_size]])
        moments.append(vae.encode(pixels.to(device, dtype)).latent_dist.parameters)
    moments = torch.cat(moments)
    return moments.view(len(dataset), 2, *moments.shape[1:])


def sample_latents(moments, index, flipped, generator=None):
    """x0 ~ the cached posterior of items `index` (mirrored where `flipped`), unscaled."""
    chosen = moments[index.to(moments.device), flipped.long().to(moments.device)]
    return DiagonalGaussianDistribution(chosen).sample(generator=generator)
