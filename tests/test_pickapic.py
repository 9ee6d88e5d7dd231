"""tools.pickapic: selection against an independent computation, preferred/tie rule,
per-caption, resume after a kill, multi-process sharding, and bad input."""
import glob
import io
import json
import os
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tools.pickapic as tool
from rpo.cli import UserError, parse_args
from rpo.data.folders import ExpertDataset, PromptDataset
from rpo.data.score_cache import ScoreCache
from rpo.data.selection import Candidate, RunningSelection, is_preferred, select
from rpo.tiny.datasets import write_tiny_pickapic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


from fake_scorer import FakeScorer, Killed, fake_value  # noqa: E402


@pytest.fixture(autouse=True)
def fake_scorer(monkeypatch):
    FakeScorer.scored, FakeScorer.fail_after = 0, None
    monkeypatch.setattr(tool, "load_scorer", lambda name, **kw: FakeScorer())


@pytest.fixture(scope="module")
def pap(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pickapic"))
    write_tiny_pickapic(path, seed=0)
    return path


def run_tool(*argv):
    return tool.main([*map(str, argv)])


def read_split(dataset, split):
    rows = []
    for path in sorted(glob.glob(os.path.join(dataset, "data", f"{split}-*.parquet"))):
        rows += pq.read_table(path).to_pylist()
    return rows


def expected_selection(rows, top, preferred, per_caption):
    """Brute force, straight from the parquet rows: [(uid, caption, jpeg bytes)] in output order."""
    score, data, chosen, first = {}, {}, set(), {}
    for row in rows:
        caption = row["caption"].strip()
        first.setdefault(caption, len(first))
        for side in (0, 1):
            uid = row[f"image_{side}_uid"]
            score[(uid, caption)] = fake_value(Image.open(io.BytesIO(row[f"jpg_{side}"])), caption)
            data[uid] = row[f"jpg_{side}"]
            if row[f"label_{side}"] == 1.0:
                chosen.add((uid, caption))
    pairs = [p for p in score if not preferred or p in chosen]
    ranked = sorted(pairs, key=lambda p: (-score[p], p[0], p[1]))
    if per_caption:
        ranked = [p for cap in sorted(first, key=first.get) for p in [q for q in ranked if q[1] == cap][:top]]
    else:
        ranked = ranked[:top]
    return [(uid, caption, data[uid]) for uid, caption in ranked]


def read_output(root):
    """[(uid, caption, image bytes)] in folder order, through rpo.data.folders as train.py reads it."""
    items = ExpertDataset(root, resolution=16).items
    out = []
    for item in items:
        with open(item.image, "rb") as f:
            out.append((os.path.splitext(os.path.basename(item.image))[0], item.caption, f.read()))
    return out


def tree(root):
    """{relative path: bytes} of every file under root."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def jpeg(gray, size=16):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (gray, gray, gray)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_dataset(root, split_rows, per_shard=100):
    """A local Pick-a-Pic-layout dataset from {split: [(caption, uid0, jpg0, uid1, jpg1, label0, label1)]}."""
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    for split, rows in split_rows.items():
        dicts = [dict(caption=c, image_0_uid=u0, jpg_0=j0, image_1_uid=u1, jpg_1=j1, label_0=l0, label_1=l1,
                      best_image_uid=u0 if l0 > l1 else u1 if l1 > l0 else "") for c, u0, j0, u1, j1, l0, l1 in rows]
        shards = max(1, -(-len(dicts) // per_shard))
        schema = pa.schema([("caption", pa.string()), ("image_0_uid", pa.string()), ("jpg_0", pa.binary()),
                            ("image_1_uid", pa.string()), ("jpg_1", pa.binary()), ("label_0", pa.float64()),
                            ("label_1", pa.float64()), ("best_image_uid", pa.string())])
        for s in range(shards):
            with pq.ParquetWriter(os.path.join(root, "data", f"{split}-{s:05d}-of-{shards:05d}.parquet"), schema) as w:
                if dicts:  # an empty split is a file with the schema and no row group
                    w.write_table(pa.Table.from_pylist(dicts[s * per_shard:(s + 1) * per_shard], schema=schema))
    return root


# --------------------------------------------------------------------------- pure selection
def brute_force(cands, top, per_caption):
    ranked = sorted(cands, key=lambda c: (-c.score, c.uid, c.caption))
    if not per_caption:
        return ranked[:top]
    order = {}
    for c in sorted(cands, key=lambda c: c.order):
        order.setdefault(c.caption, len(order))
    return [c for cap in sorted(order, key=order.get) for c in [d for d in ranked if d.caption == cap][:top]]


@pytest.mark.parametrize("per_caption", [False, True])
@pytest.mark.parametrize("top", [1, 3, 50])
def test_select_and_running_selection_match_brute_force(per_caption, top):
    rng = random.Random(top * 2 + per_caption)
    # coarse scores force exact ties, which the uid must break the same way everywhere
    cands = [Candidate(float(rng.randrange(5)), f"u{rng.randrange(10**6):06d}", f"cap{rng.randrange(4)}", order=i)
             for i in range(40)]
    want = brute_force(cands, top, per_caption)
    assert select(cands, top, per_caption) == want
    assert select(list(reversed(cands)), top, per_caption) == want  # arrival order never matters
    running = RunningSelection(top, per_caption)
    for c in rng.sample(cands, len(cands)):
        running.offer(c.score, c.uid, c.caption)
        running.offer(c.score, c.uid, c.caption)  # offering a pair twice changes nothing
    assert running.members == {(c.uid, c.caption) for c in want}


def test_preferred_means_label_exactly_one():
    assert is_preferred(1.0) and is_preferred(1)
    assert not is_preferred(0.5) and not is_preferred(0.0) and not is_preferred(None)


# --------------------------------------------------------------------------- the tool
def test_top_k_no_preferred_matches_independent_computation(pap, tmp_path, capsys):
    out = tmp_path / "out"
    run_tool("--cache", tmp_path / "cache", "--dataset", pap, "--version", "v2", "--split", "train", "--score", "hpsv2",
             "--top", 7, "--batch_size", 5, "--no-preferred", "--num_proc", 0, "--output", out)
    got = read_output(out)
    want = expected_selection(read_split(pap, "train"), 7, preferred=False, per_caption=False)
    assert got == want
    assert sorted(os.listdir(out)) == [str(i) for i in range(7)]
    info = json.loads((out / "0" / "info.json").read_text())
    assert info["uid"] == want[0][0] and info["metric"] == "fake-1"
    assert info["score"] == pytest.approx(fake_value(Image.open(io.BytesIO(want[0][2])), want[0][1]), abs=1e-5)
    report = capsys.readouterr().out
    assert "selected 7" in report and "re-read 0 shard(s)" in report  # winners were kept while streaming


def test_preferred_keeps_only_chosen_images_and_ties_are_not_chosen(pap, tmp_path):
    out = tmp_path / "out"
    run_tool("--cache", tmp_path / "cache", "--dataset", pap, "--split", "train", "--top", 1000, "--preferred",
             "--num_proc", 0, "--output", out)
    rows = read_split(pap, "train")
    assert any(r["label_0"] == 0.5 for r in rows)  # the tiny kit has ties
    assert read_output(out) == expected_selection(rows, 1000, preferred=True, per_caption=False)


def test_tie_rule_on_hand_made_rows(tmp_path):
    # brightness sets the fake score: the tie-only and loser images are the brightest
    dataset = write_dataset(str(tmp_path / "ds"), {"train": [
        ("a cat", "tie-then-win", jpeg(200), "loser1", jpeg(10), 0.5, 0.5),   # tie: not a choice...
        ("a cat", "tie-then-win", jpeg(200), "loser2", jpeg(20), 1.0, 0.0),   # ...but chosen here: preferred
        ("a dog", "tie-only-a", jpeg(250), "tie-only-b", jpeg(240), 0.5, 0.5),
        ("a dog", "lost-only", jpeg(230), "winner", jpeg(30), 0.0, 1.0),
    ]})
    run_tool("--cache", tmp_path / "c", "--dataset", dataset, "--split", "train", "--top", 10, "--preferred",
             "--num_proc", 0, "--output", tmp_path / "pref")
    assert [uid for uid, _, _ in read_output(tmp_path / "pref")] == ["tie-then-win", "winner"]
    run_tool("--cache", tmp_path / "c", "--dataset", dataset, "--split", "train", "--top", 3, "--no-preferred",
             "--num_proc", 0, "--output", tmp_path / "all")
    assert [uid for uid, _, _ in read_output(tmp_path / "all")] == ["tie-only-a", "tie-only-b", "lost-only"]


@pytest.mark.parametrize("top", [1, 2])
def test_per_caption_top_n(pap, tmp_path, top):
    out = tmp_path / "out"
    run_tool("--cache", tmp_path / "cache", "--dataset", pap, "--split", "test", "--score", "pickscore", "--top", top,
             "--per_caption", "--no-preferred", "--num_proc", 0, "--output", out)
    rows = read_split(pap, "test")
    got = read_output(out)
    assert got == expected_selection(rows, top, preferred=False, per_caption=True)
    captions = [c for _, c, _ in got]
    assert len(set(captions)) == len({r["caption"] for r in rows}) < len(rows)  # repeated captions collapsed
    if top == 1:
        assert len(captions) == len(set(captions))
        assert len(PromptDataset(str(out))) == len(captions)  # usable as the validation/test prompt set


def test_killed_run_resumes_to_the_same_output_without_rescoring(pap, tmp_path):
    common = ["--dataset", pap, "--split", "train", "--top", 6, "--no-preferred", "--batch_size", 3, "--num_proc", 0]
    run_tool("--cache", tmp_path / "c1", "--output", tmp_path / "o1", *common)
    total = FakeScorer.scored
    assert total == len({(r[f"image_{s}_uid"], r["caption"]) for r in read_split(pap, "train") for s in (0, 1)})

    FakeScorer.scored, FakeScorer.fail_after = 0, 7  # killed in the middle of the second shard
    with pytest.raises(Killed):
        run_tool("--cache", tmp_path / "c2", "--output", tmp_path / "o2", *common)
    scored_before_kill = FakeScorer.scored
    assert 0 < scored_before_kill < total and not os.path.exists(tmp_path / "o2")
    (cache_file,) = glob.glob(str(tmp_path / "c2" / "pickapic" / "scores" / "*.jsonl"))
    with open(cache_file, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    assert len(lines) == scored_before_kill
    with open(cache_file, "wb") as f:  # the kill also cut the last line in half
        f.write(b"".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])

    FakeScorer.scored, FakeScorer.fail_after = 0, None
    run_tool("--cache", tmp_path / "c2", "--output", tmp_path / "o2", *common)
    assert FakeScorer.scored == total - scored_before_kill + 1  # only the unscored ones and the cut line
    assert tree(tmp_path / "o2") == tree(tmp_path / "o1")
    cached = ScoreCache(os.path.dirname(cache_file), "fake-1").scores  # every score readable after the repair
    assert set(cached) == {(r[f"image_{s}_uid"], r["caption"]) for r in read_split(pap, "train") for s in (0, 1)}


def test_partial_output_is_completed_and_lost_images_are_reread(pap, tmp_path, capsys):
    common = ["--cache", tmp_path / "c", "--dataset", pap, "--split", "train", "--top", 5, "--no-preferred",
              "--num_proc", 0, "--output", tmp_path / "o"]
    run_tool(*common)
    before = tree(tmp_path / "o")
    for name in ("1", "3"):
        for f in glob.glob(str(tmp_path / "o" / name / "*")):
            os.remove(f)
        os.rmdir(tmp_path / "o" / name)
    os.makedirs(tmp_path / "o" / ".tmp-3")  # what a kill while writing item 3 leaves
    for f in glob.glob(str(tmp_path / "c" / "pickapic" / "images" / "*")):
        os.remove(f)  # the kept image bytes are gone too: they must be re-read from the shards
    FakeScorer.scored = 0
    capsys.readouterr()
    run_tool(*common)
    assert FakeScorer.scored == 0
    assert tree(tmp_path / "o") == before
    assert "re-read 0 shard(s)" not in capsys.readouterr().out


def test_output_of_another_selection_is_refused(pap, tmp_path):
    common = ["--cache", tmp_path / "c", "--dataset", pap, "--split", "train", "--top", 4, "--num_proc", 0,
              "--output", tmp_path / "o"]
    run_tool(*common, "--no-preferred")
    before = tree(tmp_path / "o")
    with pytest.raises(UserError, match="different caption or image"):
        run_tool(*common, "--preferred")
    assert tree(tmp_path / "o") == before  # nothing overwritten


def test_processes_share_the_shards_and_give_the_same_output(pap, tmp_path, capsys):
    argv = ["--dataset", pap, "--split", "train", "--top", 6, "--no-preferred", "--num_proc", 0]
    run_tool("--cache", tmp_path / "c1", "--output", tmp_path / "o1", *argv)
    total = FakeScorer.scored

    argv = [str(a) for a in [*argv, "--cache", tmp_path / "c2", "--output", tmp_path / "o2"]]
    FakeScorer.scored = 0
    assert tool.run(parse_args(tool.build_parser(), argv), rank=1, world=2) is None  # process 1 scores shard 2 and writes no output
    shard2 = {(r[f"image_{s}_uid"], r["caption"]) for r in read_split(pap, "train")[8:] for s in (0, 1)}
    assert FakeScorer.scored == len(shard2) and not os.path.exists(tmp_path / "o2")
    tool.run(parse_args(tool.build_parser(), argv), rank=0, world=2)
    assert FakeScorer.scored == total  # every image scored once, by one of the processes
    assert "re-read 0 shard(s)" in capsys.readouterr().out  # each process kept its own possible winners
    parts = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "c2" / "pickapic" / "scores" / "*")))
    assert parts == ["fake-1.rank0.jsonl", "fake-1.rank1.jsonl"]
    assert tree(tmp_path / "o2") == tree(tmp_path / "o1")


def test_corrupt_jpeg_is_skipped_counted_and_reported(tmp_path, capsys):
    broken = jpeg(250)[:60]  # truncated: the header parses, the pixels do not
    dataset = write_dataset(str(tmp_path / "ds"), {"train": [
        ("a cat", "ok1", jpeg(100), "broken", broken, 0.0, 1.0),
        ("a cat", "ok2", jpeg(150), "ok3", jpeg(50), 1.0, 0.0),
    ]})
    common = ["--cache", tmp_path / "c", "--dataset", dataset, "--split", "train", "--top", 10, "--no-preferred",
              "--num_proc", 0, "--output", tmp_path / "o"]
    run_tool(*common)
    assert [uid for uid, _, _ in read_output(tmp_path / "o")] == ["ok2", "ok1", "ok3"]
    assert "skipped 1 unreadable image(s), e.g. broken" in capsys.readouterr().out
    FakeScorer.scored = 0
    run_tool(*common)  # the failure is cached: not retried, still reported
    assert FakeScorer.scored == 0 and "skipped 1 unreadable" in capsys.readouterr().out


def test_bad_input_gives_one_clear_line(pap, tmp_path):
    common = ["--cache", tmp_path / "c", "--num_proc", 0, "--output", tmp_path / "o"]
    with pytest.raises(UserError, match=r"--split 'nope' is not in .*available splits: train, test, test_unique"):
        run_tool(*common, "--dataset", pap, "--split", "nope")
    with pytest.raises(UserError, match="--dataset folder not found"):
        run_tool(*common, "--dataset", tmp_path / "missing")
    with pytest.raises(UserError, match="--score must be one of"):
        run_tool(*common, "--dataset", pap, "--score", "beauty")
    empty = write_dataset(str(tmp_path / "empty"), {"train": []})
    with pytest.raises(UserError, match="has no rows"):
        run_tool(*common, "--dataset", empty)
    garbage = write_dataset(str(tmp_path / "garbage"), {"train": []})
    with open(os.path.join(garbage, "data", "train-00000-of-00001.parquet"), "wb") as f:
        f.write(b"this is not parquet")
    with pytest.raises(UserError, match="cannot (read|open)"):
        run_tool(*common, "--dataset", garbage)
    os.makedirs(tmp_path / "nofiles")
    with pytest.raises(UserError, match="cannot open it as a dataset"):
        run_tool(*common, "--dataset", tmp_path / "nofiles")
    os.makedirs(tmp_path / "other" / "data")
    pq.write_table(pa.table({"caption": ["x"]}), str(tmp_path / "other" / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(UserError, match="missing column"):
        run_tool(*common, "--dataset", tmp_path / "other")
    assert not os.path.exists(tmp_path / "o")


def test_aesthetic_is_an_alias_of_aesthetic_v1(pap, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(tool, "load_scorer", lambda name, **kw: asked.append(name) or FakeScorer())
    run_tool("--cache", tmp_path / "c", "--dataset", pap, "--split", "test_unique", "--score", "aesthetic",
             "--top", 1, "--num_proc", 0, "--no-preferred", "--output", tmp_path / "o")
    assert asked == ["aestheticv1"]


def test_command_line_error_exits_2_with_one_line(pap, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "tools.pickapic", "--dataset", pap, "--split", "validation",
                             "--cache", str(tmp_path / "c")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --split 'validation' is not in {pap}; available splits: train, test, test_unique"]


# --------------------------------------------------------------------------- with the real (tiny) scorers
def test_seed_commands_run_with_the_tiny_scorers(pap, tmp_path, monkeypatch):
    from rpo.tiny.__main__ import KITS
    from rpo.scores import load_scorer

    monkeypatch.undo()  # the real registry
    weights = str(tmp_path / "weights")
    KITS["scorers"](weights, seed=0)
    train, test = tmp_path / "pickapicv2_hpsv2_nopreferred_500", tmp_path / "pickapicv2_pickscore_test"
    tool.main(["--cache", str(tmp_path / "cache"), "--version", "v2", "--split", "train", "--score", "hpsv2",
               "--top", "500", "--batch_size", "64", "--no-preferred", "--output", str(train),
               "--dataset", pap, "--weights_dir", weights, "--num_proc", "0"])
    tool.main(["--cache", str(tmp_path / "cache"), "--version", "v2", "--split", "test_unique", "--score", "pickscore",
               "--top", "1", "--per_caption", "--batch_size", "64", "--no-preferred", "--output", str(test),
               "--dataset", pap, "--weights_dir", weights, "--num_proc", "0"])
    rows = read_split(pap, "train")
    experts = ExpertDataset(str(train), resolution=16)
    assert len(experts) == len({(r[f"image_{s}_uid"], r["caption"]) for r in rows for s in (0, 1)})  # all < 500
    assert len(PromptDataset(str(test))) == len(read_split(pap, "test_unique"))
    scorer = load_scorer("hpsv2", weights_dir=weights)
    infos = [json.loads(open(os.path.join(train, item.name, "info.json")).read()) for item in experts.items]
    assert [i["score"] for i in infos] == sorted((i["score"] for i in infos), reverse=True)
    first = experts.items[0]
    direct = scorer.score([Image.open(first.image).convert("RGB")], [first.caption])
    assert infos[0]["score"] == pytest.approx(float(direct[0]), rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one(pap, tmp_path):
    from rpo.tiny.__main__ import KITS

    weights = str(tmp_path / "weights")
    KITS["scorers"](weights, seed=0)
    argv = ["-m", "tools.pickapic", "--dataset", pap, "--split", "train", "--score", "hpsv2", "--top", "9",
            "--no-preferred", "--weights_dir", weights, "--num_proc", "0"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               ACCELERATE_USE_CPU="1")  # accelerate's multi-process CPU mode (gloo)
    one = subprocess.run([sys.executable, *argv, "--cache", str(tmp_path / "c1"), "--output", str(tmp_path / "o1")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *argv,
                          "--cache", str(tmp_path / "c2"), "--output", str(tmp_path / "o2")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert "[process 1] shard 2/2" in two.stdout and two.stdout.count("selected 9") == 1
    assert len(glob.glob(str(tmp_path / "c2" / "pickapic" / "scores" / "*.rank1.jsonl"))) == 1
    assert read_output(tmp_path / "o2") == read_output(tmp_path / "o1")
