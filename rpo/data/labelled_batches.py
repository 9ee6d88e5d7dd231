"""The order labelled images (Diffusion-KTO) are drawn in: desirable ones with a fixed
probability, resumable from a batch number alone.

Diffusion-KTO's trainer (jacklishufan/diffusion-kto, train_kto_sd_v1.5.py) draws with
replacement through a WeightedRandomSampler whose class weights make a draw desirable with
probability `--positive_ratio` (0.5 by default, 0.8 in its published command
exps/example.sh), whatever the classes' sizes. Here the same distribution — each draw
desirable with probability `desirable_ratio`, then an image of that class uniformly — comes
from a generator seeded by (seed, rank, batch number), so batch n is a pure function of
them, as `rpo.data.folders.ExpertBatches` makes it for experts: resuming at batch n needs
nothing but n. Keys are `(index, augmentation seed)`, what LabelledDataset takes.
"""
import torch

from rpo.cli import UserError

KTO_DESIRABLE_RATIO = 0.8   # exps/example.sh's --positive_ratio


class LabelledBatches(torch.utils.data.Sampler):
    def __init__(self, desirable, batch_size, desirable_ratio=KTO_DESIRABLE_RATIO, seed=0, rank=0, world=1, start=0):
        if not 0.0 <= desirable_ratio <= 1.0:
            raise UserError(f"the desirable ratio must be within [0, 1], got {desirable_ratio}")
        self.classes = {True: [i for i, d in enumerate(desirable) if d], False: [i for i, d in enumerate(desirable) if not d]}
        for label, share in ((True, desirable_ratio), (False, 1.0 - desirable_ratio)):
            if share > 0 and not self.classes[label]:
                raise UserError(f"the labelled images hold no {'desirable' if label else 'undesirable'} image, but "
                                f"{share:.0%} of the draws should be one")
        self.batch_size, self.ratio = batch_size, desirable_ratio
        self.seed, self.rank, self.world, self.start = seed, rank, world, start

    def batch(self, number):
        """Batch `number` of this rank: [(index, augmentation seed)]."""
        rng = torch.Generator().manual_seed(((self.seed * 1000003 + number) * 1000003 + self.rank) % 2**63)
        keys = []
        for j in range(self.batch_size):
            label = bool(torch.rand((), generator=rng) < self.ratio)
            pool = self.classes[label]
            index = pool[int(torch.randint(0, len(pool), (), generator=rng))]
            keys.append((index, ((self.seed * 1000003 + number) * 1000003 + j) * self.world + self.rank))
        return keys

    def __iter__(self):
        number = self.start
        while True:
            yield self.batch(number)
            number += 1

    def __len__(self):  # endless; DataLoader only needs this for len(loader)
        return 2**62
