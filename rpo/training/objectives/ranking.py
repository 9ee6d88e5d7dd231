"""Diffusion-DRO's objective: the hinge (or logistic) ranking loss of the trainable model's
denoising errors against the frozen reference's, on [expert; policy] pairs
(rpo/diffusion/objective.py `dro_loss`, rpo/diffusion/loss.py `ranking_loss`)."""
from rpo.diffusion.loss import STAT_KEYS
from rpo.diffusion.objective import dro_loss


class Ranking:
    name = "dro"
    stat_keys = STAT_KEYS
    needs_reference = True
    source = None  # the pair source --buffer_mode names (replay or resample)

    def __init__(self, *, margin, hinge):
        self.margin, self.hinge = margin, hinge

    @classmethod
    def from_options(cls, args):
        return cls(margin=args.margin, hinge=args.hinge)

    def __call__(self, *, model, params, family, sample, noise, autocast):
        return dro_loss(model=model, reference=params.reference, family=family, sample=sample, eps_expert=noise,
                        margin=self.margin, hinge=self.hinge, autocast=autocast)
