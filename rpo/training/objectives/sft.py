"""The paper's SFT baseline: the plain denoising loss on expert images (no reference, no
policy half; rpo/diffusion/objective.py `sft_loss`)."""
from rpo.diffusion.objective import sft_loss


class SFT:
    name = "sft"
    stat_keys = ("loss", "expert")
    needs_reference = False
    source = "experts"

    @classmethod
    def from_options(cls, args):
        return cls()

    def __call__(self, *, model, params, family, sample, noise, autocast):
        return sft_loss(model=model, family=family, sample=sample, eps_expert=noise, autocast=autocast)
