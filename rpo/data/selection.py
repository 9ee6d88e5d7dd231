"""Which scored images become expert data: the top K overall, or the top N per caption.

Candidates are unique (uid, caption) pairs with a score. The order is total, so a
selection never depends on the order candidates arrive in: higher score first, then uid,
then caption (both ascending) to break exact ties.

`select` is the pure function the tools use for their final answer. `RunningSelection`
gives the same answer incrementally, candidate by candidate; the Pick-a-Pic tool uses it
while streaming to keep the bytes of every image that might end up selected, so the
final pass need not read the 335 GB dataset a second time.

The preferred rule (`--preferred`, implicit feedback): an image counts as preferred when
the user chose it — its label is exactly 1 — in at least one row where it appears.
A tie (labels 0.5/0.5) is not a choice, so a tie alone never makes an image preferred;
an image that ties in one row and wins in another is preferred.
"""
import heapq
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    score: float
    uid: str
    caption: str
    order: int = field(default=0, compare=False)  # first appearance in the dataset (per-caption output order)

    def rank_key(self):
        return (-self.score, self.uid, self.caption)


def is_preferred(label):
    """True when the user chose this image in this row (label exactly 1; ties are 0.5)."""
    return label is not None and float(label) == 1.0


def select(candidates, top, per_caption=False):
    """The selected candidates, in output order.

    Global (`per_caption=False`): the `top` best, best first.
    Per caption: the `top` best of each caption; captions in order of first appearance
    (`Candidate.order`, the smallest of the caption's candidates), best first within one.
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    ranked = sorted(candidates, key=Candidate.rank_key)
    if not per_caption:
        return ranked[:top]
    groups = {}
    for candidate in ranked:
        group = groups.setdefault(candidate.caption, [])
        if len(group) < top:
            group.append(candidate)
    first_seen = {}
    for candidate in ranked:
        first_seen[candidate.caption] = min(first_seen.get(candidate.caption, candidate.order), candidate.order)
    return [c for caption in sorted(groups, key=lambda cap: (first_seen[cap], cap)) for c in groups[caption]]


class _WorstFirst:
    """Heap entry whose heap top is the worst kept candidate."""
    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __lt__(self, other):
        return self.key > other.key


class RunningSelection:
    """The same set `select` would return, maintained one candidate at a time."""

    def __init__(self, top, per_caption=False):
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        self.top = top
        self.per_caption = per_caption
        self.heaps = {}       # group (caption, or None for global) -> heap of _WorstFirst
        self.members = set()  # (uid, caption) currently selected
        self.offered = set()  # (uid, caption) ever offered: a pair is considered once

    def offer(self, score, uid, caption):
        """Consider one candidate; True if it is in the selection now."""
        pair = (uid, caption)
        if pair in self.offered:
            return pair in self.members
        self.offered.add(pair)
        heap = self.heaps.setdefault(caption if self.per_caption else None, [])
        entry = _WorstFirst((-score, uid, caption))
        if len(heap) < self.top:
            heapq.heappush(heap, entry)
        elif entry.key < heap[0].key:
            worst = heapq.heapreplace(heap, entry)
            self.members.discard(worst.key[1:])
        else:
            return False
        self.members.add(pair)
        return True
