"""Preference data: the pair/label rules (rpo/data/preference_pairs.py) on rows worked out
by hand, `tools.pickapic --mode pairs|labels` on a hand-written Pick-a-Pic dataset (ties,
a duplicate, a reversed choice, a corrupt image, a blank caption), and the readers
(rpo/data/preference.py) in every layout against the transform computed here."""
import glob
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import tools.pickapic as tool
from rpo.cli import UserError
from rpo.data.preference import LabelledDataset, PairDataset
from rpo.data.preference_pairs import Labelled, Pair, build_labels, build_pairs
from test_pickapic import write_dataset

RES = 16


def picture(seed, size=(24, 20)):
    """A JPEG of random pixels (each image distinct), its bytes."""
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


# caption, uid0, uid1, label0, label1 (images by uid in JPEGS; u5 is corrupt)
ROWS = [("cap A", "u1", "u2", 1.0, 0.0),
        ("cap A", "u1", "u2", 1.0, 0.0),   # the same comparison again: a duplicate
        ("cap A", "u2", "u1", 1.0, 0.0),   # the opposite choice: kept
        ("cap B", "u3", "u4", 0.5, 0.5),   # a tie
        ("cap B", "u5", "u4", 0.0, 1.0),   # u5 unreadable
        ("cap C", "u6", "u7", 0.0, 1.0),
        ("", "u8", "u9", 1.0, 0.0)]        # no caption
JPEGS = {f"u{i}": picture(i) for i in range(1, 10)}
JPEGS["u5"] = JPEGS["u5"][:100]


def compact(rows):
    return [(f"s:{i}", [u0, u1, c, l0, l1]) for i, (c, u0, u1, l0, l1) in enumerate(rows)]


def test_pairs_rule_by_hand():
    pairs, skipped, counts = build_pairs(compact(ROWS), lambda uid: uid != "u5")
    assert pairs == [Pair("cap A", "u1", "u2", "s:0"), Pair("cap A", "u2", "u1", "s:2"), Pair("cap C", "u7", "u6", "s:5")]
    assert [(kind, where) for kind, where, _ in skipped] == [("duplicate", "s:1"), ("unreadable", "s:4")]
    assert "u5" in skipped[1][2] and "s:0" in skipped[0][2]
    assert counts == {"rows": 7, "no caption": 1, "ties": 1, "same image": 0, "duplicates": 1, "unreadable": 1,
                      "pairs": 3}
    same, _, counts = build_pairs(compact([("cap", "u1", "u1", 1.0, 0.0)]), lambda uid: True)
    assert same == [] and counts["same image"] == 1


def test_labels_rule_by_hand():
    """Won once = desirable (also if it lost elsewhere: diffusion-kto's gt_label_wi_l); only
    lost = undesirable; only tied = no label; per (image, caption)."""
    images, skipped, counts = build_labels(compact(ROWS), lambda uid: uid != "u5")
    assert images == [Labelled("cap A", "u1", True, "s:0"), Labelled("cap A", "u2", True, "s:0"),
                      Labelled("cap B", "u4", True, "s:3"), Labelled("cap C", "u6", False, "s:5"),
                      Labelled("cap C", "u7", True, "s:5")]
    assert skipped == [("unreadable", "s:4", "image u5")]
    assert counts["tie only"] == 1 and counts["desirable"] == 4 and counts["undesirable"] == 1
    other_caption, _, _ = build_labels(compact([("x", "u1", "u2", 1.0, 0.0), ("y", "u2", "u1", 0.0, 1.0)]),
                                       lambda uid: True)
    assert [(i.caption, i.uid, i.desirable) for i in other_caption] == [("x", "u1", True), ("x", "u2", False),
                                                                        ("y", "u2", False), ("y", "u1", True)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefexport")
    rows = [(c, u0, JPEGS[u0], u1, JPEGS[u1], l0, l1) for c, u0, u1, l0, l1 in ROWS]
    dataset = write_dataset(str(root / "ds"), {"train": rows}, per_shard=3)   # three shards
    return root, dataset


def run_tool(capsys, *argv):
    capsys.readouterr()
    tool.main([*map(str, argv)])
    return capsys.readouterr().out


def read_tree(root):
    out = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        files = {}
        for f in sorted(os.listdir(folder)):
            with open(os.path.join(folder, f), "rb") as h:
                files[f] = h.read()
        out.append((name, files))
    return out


def test_tool_pairs_and_labels(exported, capsys):
    root, dataset = exported
    out = run_tool(capsys, "--dataset", dataset, "--mode", "pairs", "--cache", root / "cache", "--output", root / "pairs")
    assert "skipped (duplicate) row train-00000-of-00003.parquet:1" in out
    assert "skipped (unreadable) row train-00001-of-00003.parquet:1: image u5" in out
    tree = read_tree(root / "pairs")
    assert [name for name, _ in tree] == ["0", "1", "2"]
    for (_, files), (caption, win, lose) in zip(tree, [("cap A", "u1", "u2"), ("cap A", "u2", "u1"),
                                                        ("cap C", "u7", "u6")]):
        assert files["caption.txt"] == f"{caption}\n".encode()
        assert files["win.jpg"] == JPEGS[win] and files["lose.jpg"] == JPEGS[lose]
        info = json.loads(files["info.json"])
        assert (info["win_uid"], info["lose_uid"]) == (win, lose)
    listing, = glob.glob(str(root / "cache" / "pickapic" / "skipped" / "*-train-pairs.jsonl"))
    skipped = [json.loads(line) for line in open(listing)]
    assert [s["reason"] for s in skipped] == ["duplicate", "unreadable"]
    # read back by the trainer's reader
    data = PairDataset(str(root / "pairs"), RES, random_flip=False)
    assert [item.caption for item in data.items] == ["cap A", "cap A", "cap C"]
    # a rerun writes nothing new and reads no shard again
    out = run_tool(capsys, "--dataset", dataset, "--mode", "pairs", "--cache", root / "cache", "--output", root / "pairs")
    assert "wrote 0 item(s)" in out and "3 already there" in out and "[process 0] shard" not in out
    assert read_tree(root / "pairs") == tree

    out = run_tool(capsys, "--dataset", dataset, "--mode", "labels", "--cache", root / "cache", "--output", root / "labels")
    tree = read_tree(root / "labels")
    want = [("cap A", "u1", "desirable"), ("cap A", "u2", "desirable"), ("cap B", "u4", "desirable"),
            ("cap C", "u6", "undesirable"), ("cap C", "u7", "desirable")]
    assert len(tree) == len(want)
    for (_, files), (caption, uid, label) in zip(tree, want):
        assert files["caption.txt"] == f"{caption}\n".encode() and files[f"{uid}.jpg"] == JPEGS[uid]
        assert files["label.txt"] == f"{label}\n".encode()
    assert "skipped (unreadable)" in out and "image u5" in out
    labelled = LabelledDataset(str(root / "labels"), RES, random_flip=False)
    assert [item.desirable for item in labelled.items] == [w[2] == "desirable" for w in want]


# ---- the readers ------------------------------------------------------------------------

def expected(data, flip=False):
    """The documented transform, here: shorter side to RES (bilinear, antialiased), optional
    mirror, centre crop, [-1, 1], channels first."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    scale = RES / min(w, h)
    size = (max(RES, round(w * scale)), max(RES, round(h * scale)))
    image = image.resize(size, Image.BILINEAR, reducing_gap=None)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    left, top = (size[0] - RES) // 2, (size[1] - RES) // 2
    array = np.asarray(image.crop((left, top, left + RES, top + RES)), dtype=np.float32)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1)


PAIRS = [("a fox", "u1", "u2"), ("a ramen bowl", "u3", "u4"), ("a castle", "u6", "u7")]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same three pairs as folders, metadata.jsonl, metadata.csv, a save_to_disk table
    with win/lose columns, and a Pick-a-Pic-schema table (plus a tie, a reversed label)."""
    import datasets
    root = tmp_path_factory.mktemp("layouts")
    for i, (caption, win, lose) in enumerate(PAIRS):
        folder = root / "folders" / f"{i}"
        os.makedirs(folder)
        (folder / "caption.txt").write_text(caption + "\n")
        (folder / "win.jpg").write_bytes(JPEGS[win])
        (folder / "lose.jpg").write_bytes(JPEGS[lose])
    for kind in ("jsonl", "csv"):
        os.makedirs(root / kind / "img")
        lines = []
        for i, (caption, win, lose) in enumerate(PAIRS):
            (root / kind / "img" / f"{i}w.jpg").write_bytes(JPEGS[win])
            (root / kind / "img" / f"{i}l.jpg").write_bytes(JPEGS[lose])
            lines.append({"win_file_name": f"img/{i}w.jpg", "lose_file_name": f"img/{i}l.jpg", "text": caption})
        if kind == "jsonl":
            (root / kind / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        else:
            (root / kind / "metadata.csv").write_text("win_file_name,lose_file_name,text\n" + "".join(
                f'{x["win_file_name"]},{x["lose_file_name"]},"{x["text"]}"\n' for x in lines))
    table = datasets.Dataset.from_dict({"win": [JPEGS[w] for _, w, _ in PAIRS], "lose": [JPEGS[l] for _, _, l in PAIRS],
                                        "text": [c for c, _, _ in PAIRS]})
    table.save_to_disk(str(root / "saved"))
    pap = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": [], "image_0_uid": [], "image_1_uid": []}
    rows = [(PAIRS[0][0], "u1", "u2", 1.0, 0.0), ("a tie", "u8", "u9", 0.5, 0.5), (PAIRS[1][0], "u4", "u3", 0.0, 1.0),
            (PAIRS[2][0], "u7", "u6", 0.0, 1.0)]
    for caption, u0, u1, l0, l1 in rows:
        for key, value in zip(pap, (caption, JPEGS[u0], JPEGS[u1], l0, l1, u0, u1)):
            pap[key].append(value)
    datasets.Dataset.from_dict(pap).save_to_disk(str(root / "pickapic"))
    return {k: str(root / k) for k in ("folders", "jsonl", "csv", "saved", "pickapic")}


def pair_sources(layouts, **kw):
    return {"folders": PairDataset(layouts["folders"], RES, **kw), "jsonl": PairDataset(layouts["jsonl"], RES, **kw),
            "csv": PairDataset(layouts["csv"], RES, **kw),
            "saved": PairDataset(None, RES, dataset_name=layouts["saved"], **kw),
            "pickapic": PairDataset(None, RES, dataset_name=layouts["pickapic"], **kw)}


def test_every_pair_layout_gives_the_documented_pixels(layouts):
    for name, data in pair_sources(layouts, random_flip=False).items():
        assert [item.caption for item in data.items] == [c for c, _, _ in PAIRS], name
        for i, (_, win, lose) in enumerate(PAIRS):
            item = data[i]
            assert item["pixel_values"].shape == (2, 3, RES, RES)
            assert torch.equal(item["pixel_values"][0], expected(JPEGS[win])), (name, i)
            assert torch.equal(item["pixel_values"][1], expected(JPEGS[lose])), (name, i)
            assert item["original_size"].tolist() == [[20, 24], [20, 24]]


def test_flip_and_random_crop_are_the_same_for_both_images(layouts):
    flips, centred = set(), 0
    for name, data in pair_sources(layouts, random_flip=True, random_crop=True).items():
        for seed in range(12):
            item = data[(0, seed)]
            flips.add(item["flipped"])
            assert item["crop_top_left"][0].tolist() == item["crop_top_left"][1].tolist()   # one corner for both
            if item["crop_top_left"][0].tolist() == [0, 1]:   # 24×20 -> 19×16: the centre crop's corner
                centred += 1
                assert torch.equal(item["pixel_values"][0], expected(JPEGS["u1"], item["flipped"]))
                assert torch.equal(item["pixel_values"][1], expected(JPEGS["u2"], item["flipped"]))
    assert flips == {True, False} and centred > 0
    # the same image as win and lose: any crop and flip leave the two halves equal
    same = PairDataset(layouts["folders"], RES, random_flip=True, random_crop=True)
    same.items[0].images = (same.items[0].images[0], same.items[0].images[0])
    corners = set()
    for seed in range(12):
        item = same[(0, seed)]
        corners.add(tuple(item["crop_top_left"][0].tolist()))
        assert torch.equal(item["pixel_values"][0], item["pixel_values"][1])
    assert len(corners) > 1


def test_labelled_layouts(tmp_path):
    import datasets
    want = [("a fox", "u1", True), ("a castle", "u2", False), ("a tiger", "u3", True)]
    for i, (caption, uid, label) in enumerate(want):
        folder = tmp_path / "folders" / f"{i}"
        os.makedirs(folder)
        (folder / "caption.txt").write_text(caption)
        (folder / f"{uid}.jpg").write_bytes(JPEGS[uid])
        (folder / "label.txt").write_text("desirable\n" if label else "undesirable\n")
    os.makedirs(tmp_path / "jsonl")
    lines = []
    for caption, uid, label in want:
        (tmp_path / "jsonl" / f"{uid}.jpg").write_bytes(JPEGS[uid])
        lines.append(json.dumps({"file_name": f"{uid}.jpg", "text": caption, "label": int(label)}) + "\n")
    (tmp_path / "jsonl" / "metadata.jsonl").write_text("".join(lines))
    datasets.Dataset.from_dict({"image": [JPEGS[u] for _, u, _ in want], "text": [c for c, _, _ in want],
                                "label": [lab for _, _, lab in want]}).save_to_disk(str(tmp_path / "saved"))
    for data in (LabelledDataset(str(tmp_path / "folders"), RES, random_flip=False),
                 LabelledDataset(str(tmp_path / "jsonl"), RES, random_flip=False),
                 LabelledDataset(None, RES, random_flip=False, dataset_name=str(tmp_path / "saved"))):
        assert [(item.caption, item.desirable) for item in data.items] == [(c, lab) for c, _, lab in want]
        for i, (_, uid, label) in enumerate(want):
            item = data[i]
            assert item["desirable"] is label
            assert torch.equal(item["pixel_values"][0], expected(JPEGS[uid]))


def bad(tmp_path, name, files):
    root = tmp_path / name
    os.makedirs(root / "0")
    for file, data in files.items():
        (root / "0" / file).write_bytes(data)
    return str(root)


@pytest.mark.parametrize("case, files, message", [
    ("corrupt", {"caption.txt": b"x", "win.jpg": JPEGS["u1"], "lose.jpg": JPEGS["u1"][:80]}, "unreadable image"),
    ("not-utf8", {"caption.txt": b"caf\xe9", "win.jpg": JPEGS["u1"], "lose.jpg": JPEGS["u2"]}, "not UTF-8"),
    ("no-partner", {"caption.txt": b"x", "win.jpg": JPEGS["u1"]}, "has no lose image"),
    ("no-caption", {"win.jpg": JPEGS["u1"], "lose.jpg": JPEGS["u2"]}, "no caption.txt"),
])
def test_bad_pair_folders_are_one_line_naming_the_path(tmp_path, case, files, message):
    root = bad(tmp_path, case, files)
    with pytest.raises(UserError) as error:
        PairDataset(root, RES)
    text = str(error.value)
    assert message in text and os.path.join(root, "0") in text and "\n" not in text


def test_bad_sources_are_one_line_naming_the_path(tmp_path):
    cases = []
    missing = str(tmp_path / "missing")
    cases.append((lambda: PairDataset(missing, RES), "not found", missing))
    os.makedirs(tmp_path / "empty")
    cases.append((lambda: LabelledDataset(str(tmp_path / "empty"), RES), "is empty", str(tmp_path / "empty")))
    no_label = bad(tmp_path, "nolabel", {"caption.txt": b"x", "a.jpg": JPEGS["u1"]})
    cases.append((lambda: LabelledDataset(no_label, RES), "no label.txt", no_label))
    wrong = bad(tmp_path, "wronglabel", {"caption.txt": b"x", "a.jpg": JPEGS["u1"], "label.txt": b"maybe"})
    cases.append((lambda: LabelledDataset(wrong, RES), "desirable or undesirable", os.path.join(wrong, "0", "label.txt")))
    meta = tmp_path / "meta"
    os.makedirs(meta)
    (meta / "w.jpg").write_bytes(JPEGS["u1"])
    (meta / "metadata.jsonl").write_text(json.dumps({"win_file_name": "w.jpg", "lose_file_name": "gone.jpg",
                                                     "text": "x"}) + "\n")
    cases.append((lambda: PairDataset(str(meta), RES), "no such image", str(meta / "gone.jpg")))
    cases.append((lambda: PairDataset(None, RES, dataset_name=str(tmp_path / "nothing")), "cannot load",
                  str(tmp_path / "nothing")))
    for make, message, path in cases:
        with pytest.raises(UserError) as error:
            make()
        text = str(error.value)
        assert message in text and path in text and "\n" not in text, text


def test_tiny_kits_are_read_back_and_deterministic(tmp_path):
    from rpo.tiny.__main__ import KITS
    for kind, reader in (("pairs", PairDataset), ("labels", LabelledDataset)):
        KITS[kind](str(tmp_path / f"{kind}-a"), seed=0)
        KITS[kind](str(tmp_path / f"{kind}-b"), seed=0)
        assert read_tree(tmp_path / f"{kind}-a") == read_tree(tmp_path / f"{kind}-b")
        data = reader(str(tmp_path / f"{kind}-a"), 32)
        assert len(data) >= 6 and data[(0, 1)]["pixel_values"].shape[1:] == (3, 32, 32)
    labels = LabelledDataset(str(tmp_path / "labels-a"), 32).items
    assert {item.desirable for item in labels} == {True, False}


def test_export_killed_mid_stream_resumes_to_the_same_output(exported, capsys, monkeypatch):
    """A kill after the first shard (pass 1) leaves its row index and images; the rerun
    reads only the other shards and writes what an uninterrupted run writes."""
    from rpo.data import preference_export
    root, dataset = exported
    clean = root / "clean"
    run_tool(capsys, "--dataset", dataset, "--mode", "pairs", "--cache", clean / "cache", "--output", clean / "out")
    real, seen = preference_export.store_readable, []

    def dies_in_the_second_shard(row, store):
        seen.append(row["image_0_uid"])
        if len(seen) > 3:          # 3 rows a shard: the 4th row is the second shard's first
            raise KeyboardInterrupt("killed")
        real(row, store)

    monkeypatch.setattr(preference_export, "store_readable", dies_in_the_second_shard)
    killed = root / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_tool(capsys, "--dataset", dataset, "--mode", "pairs", "--cache", killed / "cache", "--output", killed / "out")
    assert not os.path.exists(killed / "out")
    monkeypatch.setattr(preference_export, "store_readable", real)
    out = run_tool(capsys, "--dataset", dataset, "--mode", "pairs", "--cache", killed / "cache", "--output", killed / "out")
    assert "shard 1/3" not in out and "shard 2/3" in out and "shard 3/3" in out
    assert read_tree(killed / "out") == read_tree(clean / "out")


def test_pairs_batch_through_a_dataloader_with_expert_batches(tmp_path):
    """What a pair source will do: ExpertBatches keys, DataLoader workers, default collation;
    a key gives the same pixels in a worker as in this process."""
    from rpo.data.folders import ExpertBatches
    from rpo.tiny.datasets import write_tiny_pairs
    write_tiny_pairs(str(tmp_path / "pairs"))
    data = PairDataset(str(tmp_path / "pairs"), 32, random_flip=True, random_crop=True)
    sampler = ExpertBatches(len(data), batch_size=3, seed=5)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=1)
    batch = next(iter(loader))
    keys = next(iter(ExpertBatches(len(data), batch_size=3, seed=5)))
    assert batch["pixel_values"].shape == (3, 2, 3, 32, 32) and batch["original_size"].shape == (3, 2, 2)
    assert batch["index"].tolist() == [k[0] for k in keys] and len(batch["caption"]) == 3
    for row, key in enumerate(keys):
        assert torch.equal(batch["pixel_values"][row], data[key]["pixel_values"])
