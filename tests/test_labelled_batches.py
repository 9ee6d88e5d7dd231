"""rpo/data/labelled_batches.py: the draw distribution against the binomial expectation,
resume from a batch number, distinct ranks, and refused ratios."""
import itertools
import math

import pytest

from rpo.cli import UserError
from rpo.data.labelled_batches import LabelledBatches

LABELS = [True, False, False, True, False, False, False, False, False, False]   # 2 desirable, 8 not


def draws(sampler, batches):
    return [key for batch in itertools.islice(iter(sampler), batches) for key in batch]


def test_desirable_share_and_uniform_within_a_class():
    keys = draws(LabelledBatches(LABELS, 8, desirable_ratio=0.8, seed=3), 500)   # 4000 draws
    n = len(keys)
    desirable = sum(LABELS[i] for i, _ in keys)
    assert abs(desirable - 0.8 * n) < 5 * math.sqrt(n * 0.8 * 0.2)            # 5 sigma of the binomial
    for i in (0, 3):                                                            # each desirable image: half of them
        count = sum(1 for k, _ in keys if k == i)
        assert abs(count - desirable / 2) < 5 * math.sqrt(desirable / 4)
    undesirable = [k for k, _ in keys if not LABELS[k]]
    assert set(undesirable) == {i for i, d in enumerate(LABELS) if not d}
    assert len({seed for _, seed in keys}) == n                                 # every draw its own augmentation


def test_resume_from_a_batch_number_and_ranks_differ():
    fresh = draws(LabelledBatches(LABELS, 4, seed=1), 10)
    resumed = draws(LabelledBatches(LABELS, 4, seed=1, start=6), 4)
    assert resumed == fresh[6 * 4:]
    other_rank = draws(LabelledBatches(LABELS, 4, seed=1, rank=1, world=2), 10)
    assert other_rank != draws(LabelledBatches(LABELS, 4, seed=1, rank=0, world=2), 10)
    assert draws(LabelledBatches(LABELS, 4, seed=2), 10) != fresh


def test_ratios_that_cannot_be_met_are_refused():
    assert {LABELS[i] for i, _ in draws(LabelledBatches(LABELS, 4, desirable_ratio=1.0), 20)} == {True}
    with pytest.raises(UserError, match="no undesirable image"):
        LabelledBatches([True, True], 2, desirable_ratio=0.5)
    with pytest.raises(UserError, match="within"):
        LabelledBatches(LABELS, 2, desirable_ratio=1.5)
