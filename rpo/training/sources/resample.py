"""RealAlign's buffer-less pair source (`--buffer_mode resample`): each micro-step takes the
next expert batch (the loader's batch size, `--batch_size`), rolls each caption out once
with the current rollout model to a policy x0, and noises both halves of a pair with one
shared noise at one level per pair drawn by the family (`family.training_timesteps`). The
policy half's target is then the family's target for the policy's own x0."""
import torch

from rpo.training.rollouts import next_batch


class ResamplePairs:
    name = "resample"
    rolls_out = True

    truncatable = False  # the whole rollout: its end sample is the policy's x0

    def __init__(self, *, refiller, params, family):
        self.refiller, self.params, self.family = refiller, params, family

    @staticmethod
    def expert_batch_size(args):
        return args.batch_size  # one expert batch per micro-step, one rollout each

    @classmethod
    def from_options(cls, args, *, refiller, params, family):
        return cls(refiller=refiller, params=params, family=family)

    def draw(self, step, state):
        """Draws: `cpu_gen` the caption drops and the rollout grid, `dev_gen` the expert x0 and
        x_T; then `cpu_gen` the levels, `dev_gen` the shared noise."""
        refiller, family, device = self.refiller, self.family, self.refiller.device
        batch = next_batch(refiller.batches)
        state.expert_batches_used += 1
        fields = refiller.roll(self.params.rollout_model, batch, refiller.conditioning(batch, state), state, final=True)
        x0 = fields["x0"]
        t = family.training_timesteps(x0.shape[0], generator=state.cpu_gen, device=device)
        noise = torch.randn(x0.shape, generator=state.dev_gen, device=device)
        policy_x0 = fields["x_final"].float()
        sample = {k: v for k, v in fields.items() if k not in ("t", "x_t", "eps", "x_final")}
        # the ranking objective's policy half is (x_t, eps) = its input and target: here the
        # policy's own x0 noised with the expert's noise at the expert's level, and that x0's target
        sample.update(t=t, x_t=family.add_noise(policy_x0, noise, t), eps=family.target(policy_x0, noise, t))
        return sample, noise
