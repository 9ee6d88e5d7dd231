"""Which Pick-a-Pic rows become preference data (docs/design.md, "Preference data"):
labelled pairs for Diffusion-DPO, labelled single images for Diffusion-KTO.

Pure functions over the tool's compact rows `[uid_0, uid_1, caption, label_0, label_1]`
(rpo/data/pickapic.py `compact_row`), each with where it came from (shard, row), so the
Pick-a-Pic tool can decide after streaming, from its row index alone, without images.

Pairs (the rule of SalesforceAIResearch/DiffusionDPO, train.py: rows labelled 0.5/0.5
are dropped, `label_0 == 1` makes jpg_0 the winner):
- a row without caption, a tie, or one image compared with itself is not a pair;
- a pair whose image is unreadable is skipped (`readable(uid)` is False), named;
- a duplicate — the same caption, winner and loser as an earlier row — is skipped, named;
  the same two images with the opposite choice (another user) is kept: a real disagreement.

Labelled images (the rule of jacklishufan/diffusion-kto, `--policy gt_label_wi_l`, its
default): one item per unique (image, caption); desirable when the image won at least one
non-tie row of that caption, undesirable when it only lost; an image seen only in ties
carries no label and is left out; unreadable images are skipped, named.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    caption: str
    win: str      # uid of the preferred image
    lose: str     # uid of the other image
    where: str    # "<shard>:<row>" of the row it comes from (the first, for a repeated comparison)


@dataclass(frozen=True)
class Labelled:
    caption: str
    uid: str
    desirable: bool
    where: str    # the first row the image appears in with this caption


def choice(label_0, label_1):
    """0 or 1, the side the user chose; None for a tie or a missing label."""
    if label_0 is None or label_1 is None or float(label_0) == float(label_1):
        return None
    return 0 if float(label_0) > float(label_1) else 1


def build_pairs(rows, readable):
    """`rows`: [(where, compact row)] in dataset order -> (pairs, skipped, counts).
    skipped: [(kind, where, detail)], kind 'duplicate' or 'unreadable'."""
    pairs, skipped, seen = [], [], {}
    counts = {"rows": 0, "no caption": 0, "ties": 0, "same image": 0, "duplicates": 0, "unreadable": 0,
              "pairs": 0}
    for where, (uid_0, uid_1, caption, label_0, label_1) in rows:
        counts["rows"] += 1
        side = choice(label_0, label_1)
        if not caption:
            counts["no caption"] += 1
        elif side is None:
            counts["ties"] += 1
        elif uid_0 == uid_1:
            counts["same image"] += 1
        else:
            win, lose = (uid_0, uid_1) if side == 0 else (uid_1, uid_0)
            bad = [uid for uid in (win, lose) if not readable(uid)]
            key = (caption, win, lose)
            if bad:
                counts["unreadable"] += 1
                skipped.append(("unreadable", where, f"image {bad[0]}"))
            elif key in seen:
                counts["duplicates"] += 1
                skipped.append(("duplicate", where, f"same caption, winner {win} and loser {lose} as row {seen[key]}"))
            else:
                seen[key] = where
                pairs.append(Pair(caption, win, lose, where))
    counts["pairs"] = len(pairs)
    return pairs, skipped, counts


def build_labels(rows, readable):
    """`rows`: [(where, compact row)] in dataset order -> (images, skipped, counts); images
    in order of first appearance. skipped: [('unreadable', where, detail)], one per image."""
    first, won, lost = {}, set(), set()
    counts = {"rows": 0, "no caption": 0, "ties": 0, "images": 0, "tie only": 0, "unreadable": 0,
              "desirable": 0, "undesirable": 0}
    for where, (uid_0, uid_1, caption, label_0, label_1) in rows:
        counts["rows"] += 1
        if not caption:
            counts["no caption"] += 1
            continue
        side = choice(label_0, label_1)
        counts["ties"] += side is None
        for s, uid in enumerate((uid_0, uid_1)):
            first.setdefault((uid, caption), where)
            if side is not None and uid_0 != uid_1:
                (won if s == side else lost).add((uid, caption))
    images, skipped = [], []
    for key, where in first.items():
        counts["images"] += 1
        if key not in won and key not in lost:
            counts["tie only"] += 1
        elif not readable(key[0]):
            counts["unreadable"] += 1
            skipped.append(("unreadable", where, f"image {key[0]}"))
        else:
            images.append(Labelled(key[1], key[0], key in won, where))
            counts["desirable" if key in won else "undesirable"] += 1
    return images, skipped, counts
