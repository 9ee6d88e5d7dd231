"""Expert images only (the SFT baseline): the next expert batch, captions dropped with the
rollout's probability, t uniform over the training timesteps, fresh noise. No rollouts."""
import torch

from rpo.training.rollouts import next_batch


class ExpertSamples:
    name = "experts"
    rolls_out = False

    truncatable = False

    def __init__(self, *, refiller, family):
        self.refiller, self.family = refiller, family  # the refiller's expert encoding, never its rollouts

    @staticmethod
    def expert_batch_size(args):
        return args.batch_size

    @classmethod
    def from_options(cls, args, *, refiller, params, family):
        return cls(refiller=refiller, family=family)

    def draw(self, step, state):
        """Draws: `cpu_gen` the caption drops, `dev_gen` x0 (VAE or cached posteriors), `cpu_gen`
        t, `dev_gen` the noise."""
        r, device = self.refiller, self.refiller.device
        batch = next_batch(r.batches)
        state.expert_batches_used += 1
        b = len(batch["caption"])
        drop = torch.rand(b, generator=state.cpu_gen) < r.settings.drop_prompt_probability
        embeds, pooled = r.text.encode(["" if d else c for c, d in zip(batch["caption"], drop.tolist())])
        sample = {"prompt_embeds": embeds, "x0": r.expert_latents(batch, state.dev_gen)}
        sample.update(self.family.expert_extras(pooled, batch, r.settings.resolution, device))
        sample["t"] = torch.randint(0, self.family.num_train_timesteps, (b,), generator=state.cpu_gen).to(device)
        noise = torch.randn(sample["x0"].shape, generator=state.dev_gen, device=device)
        return sample, noise
