"""Run under `accelerate launch --cpu --num_processes N`: one DRO update on a fixed batch of
4 (expert, policy) pairs split across the N processes (and A accumulation micro-steps),
then save the resulting gradient and SGD-updated weights from rank 0.

Used by tests/test_distributed.py: N=2 x batch 2 must equal N=1 x batch 4 (gradients
averaged across ranks, not summed), and so must N=1 x batch 2 x accumulation 2.
"""
import contextlib
import sys

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel

from rpo.diffusion.family import UNetFamily, read_schedule_config
from rpo.diffusion.objective import dro_loss


def fixed_batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "t": torch.randint(0, 1000, (n,), generator=g),
        "x0": torch.randn(n, 4, 4, 4, generator=g),
        "x_t": torch.randn(n, 4, 4, 4, generator=g),
        "eps": torch.randn(n, 4, 4, 4, generator=g),
        "prompt_embeds": torch.randn(n, 77, 32, generator=g),
    }, torch.randn(n, 4, 4, 4, generator=g)


def main(out, pipeline, accumulation):
    accelerator = Accelerator(gradient_accumulation_steps=accumulation)
    assert accelerator.num_processes == int(sys.argv[4]), "launched with the wrong number of processes"
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    unet_ref = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet").requires_grad_(False)
    with torch.no_grad():  # make the trainable model differ from the reference, so the loss is not flat
        for p in unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    family = UNetFamily(read_schedule_config(pipeline)[0])
    optimizer = torch.optim.SGD(unet.parameters(), lr=1.0)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    sample, eps = fixed_batch()
    # rank r takes its contiguous share, then splits it into `accumulation` micro-batches
    share = 4 // accelerator.num_processes
    lo = accelerator.process_index * share
    micro = share // accumulation
    for m in range(accumulation):
        idx = slice(lo + m * micro, lo + (m + 1) * micro)
        with accelerator.accumulate(unet):
            loss, _ = dro_loss(model=unet, reference=lambda: contextlib.nullcontext(unet_ref), family=family,
                               sample={k: v[idx] for k, v in sample.items()}, eps_expert=eps[idx], margin=0.05)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grads = {n: p.grad.detach().clone() for n, p in accelerator.unwrap_model(unet).named_parameters()}
            optimizer.step()
            optimizer.zero_grad()
    if accelerator.is_main_process:
        weights = {n: p.detach().clone() for n, p in accelerator.unwrap_model(unet).named_parameters()}
        torch.save({"grads": grads, "weights": weights}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))  # argv[4]: expected number of processes
