"""The paper's pair source: a replay buffer of the policy's rollouts (docs/design.md,
"Algorithm", steps 1-2). Each micro-step refills the buffer when due (`--buffer_sample_steps`)
and samples `--batch_size` (trajectory, step) picks; the expert half is noised at the same
timesteps with fresh noise. With truncated rollouts the refill returns the picks itself."""
import torch


class ReplayPairs:
    name = "replay"
    rolls_out = True

    truncatable = True  # one pick per trajectory where `truncation_applies`

    def __init__(self, *, refiller, params, batch_size, sample_steps):
        self.refiller, self.params = refiller, params
        self.batch_size, self.sample_steps = batch_size, sample_steps

    @staticmethod
    def expert_batch_size(args):
        return args.buffer_batch_size  # experts feed rollout batches

    @classmethod
    def from_options(cls, args, *, refiller, params, family):
        return cls(refiller=refiller, params=params, batch_size=args.batch_size, sample_steps=args.buffer_sample_steps)

    def draw(self, step, state):
        """(sample, expert noise) for micro-step `step`. Draws: the refill's (when due), then
        the buffer's pick from `cpu_gen` (unless the truncated refill made it), then the
        expert noise from `dev_gen`."""
        picks = None
        if len(state.buffer) == 0 or step % self.sample_steps == 0:
            picks = self.refiller.refill(model=self.params.rollout_model, state=state)
        sample = picks if picks is not None else state.buffer.sample(self.batch_size, generator=state.cpu_gen)
        noise = torch.randn(sample["x0"].shape, generator=state.dev_gen, device=self.refiller.device)
        return sample, noise
