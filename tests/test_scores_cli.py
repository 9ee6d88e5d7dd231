"""score.py end to end on the tiny scorers: the table and its files, the per-image cache,
unreadable images, win rates, bad input, and 1 vs 2 processes."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import score
from rpo.scores import METRICS, load_scorer
from rpo.scores.report import median_image, win_rate
from scores_fixtures import write_image_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_FLAGS = ["--batch_size", "32", "--pickscore", "--hpsv2", "--aestheticv2", "--clip", "--imagereward"]


def run_score(args, capsys):
    """score.py's main in this process; returns (exit status, stdout, stderr)."""
    try:
        score.run_main(lambda: score.main(args))
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def dirs(tmp_path):
    return write_image_dir(tmp_path / "a", seed=1), write_image_dir(tmp_path / "b", seed=2)


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_seed_command_writes_table_csv_json(scorer_weights, dirs, tmp_path, capsys):
    a, b = dirs
    out = tmp_path / "out"
    status, stdout, _ = run_score(SEED_FLAGS + ["--aestheticv1", "--num_workers", "2", "--dir", a, "--dir", b,
                                                "--weights_dir", scorer_weights, "--output", str(out)], capsys)
    assert status == 0
    assert stdout.splitlines()[0].split() == ["dir", "images", "failed"] + list(METRICS)
    assert len(stdout.splitlines()) == 3 and " ± " in stdout
    rows = read_rows(out / "scores.csv")
    assert [(r["dir"], r["metric"]) for r in rows] == [(d, m) for d in (a, b) for m in METRICS]
    report = json.load(open(out / "scores.json"))
    for d, summary in zip((a, b), report["dirs"]):
        assert summary["dir"] == d and summary["images"] == 6 and summary["failed"] == 0
        assert sorted(summary["scores"]) == sorted(os.path.relpath(os.path.join(r, f), d)
                                                   for r, _, files in os.walk(d) for f in files
                                                   if f.endswith((".png", ".jpg")))
        for m in METRICS:
            values = np.array([s[m] for s in summary["scores"].values()])
            row = next(r for r in rows if r["dir"] == d and r["metric"] == m)
            assert float(row["mean"]) == pytest.approx(values.mean(), abs=1e-9)
            assert float(row["std"]) == pytest.approx(values.std(), abs=1e-9)  # ddof=0
            assert int(row["count"]) == 6 and row["version"] == report["metrics"][m]
    # every image's score is the scorer's own value for that image and its caption
    for m in ("hpsv2", "imagereward"):
        scorer = load_scorer(m, scorer_weights)
        for relpath, values in report["dirs"][1]["scores"].items():
            caption = open(os.path.join(b, os.path.dirname(relpath), "caption.txt")).read().strip()
            with Image.open(os.path.join(b, relpath)) as image:
                expected = float(scorer.score([image], [caption])[0])
            assert values[m] == pytest.approx(expected, rel=1e-5, abs=1e-5)


def counting_scorers(monkeypatch):
    """Count the images each metric actually runs its model on."""
    counts = {}

    def wrap(score_tensors):
        def counted(self, pixels, prompts):
            counts[self.name] = counts.get(self.name, 0) + len(prompts)
            return score_tensors(self, pixels, prompts)
        return counted
    from rpo.scores import aesthetic, clip, hpsv2, imagereward, pickscore
    for cls in (pickscore.PickScore, hpsv2.HPSv2, aesthetic.Aesthetic, clip.ClipScore, imagereward.ImageReward):
        monkeypatch.setattr(cls, "score_tensors", wrap(cls.score_tensors))
    return counts


def test_cache_rescores_only_what_changed(scorer_weights, dirs, tmp_path, capsys, monkeypatch):
    a, _ = dirs
    counts = counting_scorers(monkeypatch)
    # batch size 1: a batch holding a changed image is scored whole (so that its scores equal
    # a fresh run's, rpo/scores/loop.py); one image per batch makes the counts exact
    args = ["--pickscore", "--hpsv2", "--batch_size", "1", "--num_workers", "0", "--dir", a, "--weights_dir",
            scorer_weights, "--output", str(tmp_path / "out")]
    assert run_score(args, capsys)[0] == 0
    assert counts == {"pickscore": 6, "hpsv2": 6}
    first = (tmp_path / "out" / "scores.csv").read_text()
    cache = json.load(open(os.path.join(a, "scores_cache.json")))
    assert sorted(k.split("@")[0] for k in cache) == ["hpsv2", "pickscore"] and all(len(v) == 6 for v in cache.values())

    counts.clear()
    assert run_score(args, capsys)[0] == 0                      # unchanged: all from the cache
    assert counts == {} and (tmp_path / "out" / "scores.csv").read_text() == first

    image = os.path.join(a, "00", "0.png")                      # regenerate one image
    Image.new("RGB", (96, 96), (10, 200, 30)).save(image)
    assert run_score(args, capsys)[0] == 0
    assert counts == {"pickscore": 1, "hpsv2": 1}
    cache = json.load(open(os.path.join(a, "scores_cache.json")))
    assert all(len(v) == 6 for v in cache.values())             # the old image's entries are gone

    counts.clear()                                               # another HPSv2 version: only HPSv2 again
    assert run_score(args + ["--hps_version", "v2.1"], capsys)[0] == 0
    assert counts == {"hpsv2": 6}

    counts.clear()                                               # a changed caption changes the key
    with open(os.path.join(a, "01", "caption.txt"), "w") as f:
        f.write("a different prompt\n")
    assert run_score(args, capsys)[0] == 0
    assert counts == {"pickscore": 2, "hpsv2": 2}


def test_unreadable_image_is_reported_excluded_and_counted(scorer_weights, dirs, tmp_path, capsys):
    a, _ = dirs
    broken = os.path.join(a, "02", "2.png")
    with open(broken, "r+b") as f:                               # a truncated PNG
        f.truncate(200)
    status, stdout, stderr = run_score(["--clip", "--num_workers", "0", "--dir", a, "--weights_dir", scorer_weights,
                                        "--output", str(tmp_path / "out")], capsys)
    assert status == 0
    assert broken in stderr and "unreadable" in stderr
    row = read_rows(tmp_path / "out" / "scores.csv")[0]
    assert (row["images"], row["failed"], row["count"]) == ("6", "1", "5")
    report = json.load(open(tmp_path / "out" / "scores.json"))
    assert report["dirs"][0]["unreadable"] == [broken] and os.path.relpath(broken, a) not in report["dirs"][0]["scores"]
    cache = json.load(open(os.path.join(a, "scores_cache.json")))
    assert [len(v) for v in cache.values()] == [5]


def test_corrupt_cache_file_is_replaced(scorer_weights, dirs, tmp_path, capsys):
    a, _ = dirs
    with open(os.path.join(a, "scores_cache.json"), "w") as f:
        f.write('{"clip@x": {"abc": 1.0')                         # cut off mid-write by some other tool
    status, _, stderr = run_score(["--clip", "--num_workers", "0", "--dir", a, "--weights_dir", scorer_weights,
                                   "--output", str(tmp_path / "out")], capsys)
    assert status == 0 and "ignoring unreadable score cache" in stderr
    assert len(next(iter(json.load(open(os.path.join(a, "scores_cache.json"))).values()))) == 6


def test_win_rate_median_and_ties():
    # prompt "0": ours has PickScores 1, 5, 3 -> median image "o2" (3); base 2, 9, 4 -> "b3" (4)
    prompts = {"0": ["o1", "o2", "o3"], "1": ["p1", "p2"], "2": ["q1"]}
    base = {"0": ["b1", "b2", "b3"], "1": ["c1", "c2"], "3": ["z"]}
    scores = {"pickscore": {"o1": 1, "o2": 5, "o3": 3, "p1": 2, "p2": 1, "q1": 0},
              "hpsv2": {"o1": 9, "o2": 9, "o3": 7, "p1": 1, "p2": 5, "q1": 0}}
    base_scores = {"pickscore": {"b1": 2, "b2": 9, "b3": 4, "c1": 0, "c2": 3},
                   "hpsv2": {"b1": 0, "b2": 0, "b3": 6, "c1": 5, "c2": 9}}
    assert median_image(prompts["0"], scores["pickscore"]) == "o3"
    assert median_image(base["0"], base_scores["pickscore"]) == "b3"
    assert median_image(prompts["1"], scores["pickscore"]) == "p2"   # even count: the lower median
    rates, compared = win_rate(prompts, base, scores, base_scores, ["pickscore", "hpsv2"])
    # prompt 0: pickscore 3 < 4 (loss), hpsv2 7 > 6 (win); prompt 1: p2 vs c1: pickscore 1 > 0, hpsv2 5 == 5 (tie)
    assert compared == 2 and rates == {"pickscore": 0.5, "hpsv2": 0.75}


def test_compare_against_itself_is_all_ties(scorer_weights, dirs, tmp_path, capsys):
    a, _ = dirs
    copy = str(tmp_path / "copy")
    shutil.copytree(a, copy)
    status, stdout, _ = run_score(["--hpsv2", "--num_workers", "0", "--dir", copy, "--compare", a,
                                   "--weights_dir", scorer_weights, "--output", str(tmp_path / "out")], capsys)
    assert status == 0 and f"win rate vs {a}" in stdout
    rows = read_rows(tmp_path / "out" / "winrate.csv")
    assert rows == [{"dir": copy, "prompts": "3", "pickscore": "0.5", "hpsv2": "0.5"}]  # pickscore added by --compare
    report = json.load(open(tmp_path / "out" / "scores.json"))
    assert [d["dir"] for d in report["dirs"]] == [copy, a] and report["win_rate"]["base"] == a


@pytest.mark.parametrize("make_args, message", [
    (lambda a, w: ["--pickscore", "--dir", a + "/missing", "--weights_dir", w], "folder not found"),
    (lambda a, w: ["--dir", a, "--weights_dir", w], "no metric chosen"),
    (lambda a, w: ["--hpsv2", "--hps_version", "v2.2", "--dir", a, "--weights_dir", w], "--hps_version must be one of"),
    (lambda a, w: ["--pickscore", "--weights_dir", w], "no --dir given"),
    (lambda a, w: ["--pickscore", "--dir", a, "--weights_dir", w + "/nowhere"], "--weights_dir: no such folder"),
    (lambda a, w: ["--pickscore", "--dir", a + "/00", "--weights_dir", w], "no prompt folders"),
])
def test_bad_input_is_one_line_and_exit_2(make_args, message, scorer_weights, dirs, capsys):
    status, stdout, stderr = run_score(make_args(dirs[0], scorer_weights), capsys)
    assert status == 2 and stderr.startswith("error: ") and message in stderr and stderr.count("\n") == 1


def test_dir_without_images_and_caption_mismatch(scorer_weights, dirs, tmp_path, capsys):
    a, b = dirs
    empty = tmp_path / "empty" / "00"
    empty.mkdir(parents=True)
    (empty / "caption.txt").write_text("a prompt\n")
    status, _, stderr = run_score(["--clip", "--dir", str(tmp_path / "empty"), "--weights_dir", scorer_weights], capsys)
    assert status == 2 and "prompt folder without images" in stderr and str(empty) in stderr
    with open(os.path.join(b, "00", "caption.txt"), "w") as f:
        f.write("something else\n")
    status, _, stderr = run_score(["--clip", "--dir", a, "--compare", b, "--weights_dir", scorer_weights], capsys)
    assert status == 2 and "--compare: prompt 00 differs" in stderr


def test_cli_exit_status(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "score.py"), "--clip", "--dir", str(tmp_path / "no")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2 and result.stderr.strip() == f"error: --dir: folder not found: {tmp_path / 'no'}"


@pytest.mark.slow
def test_one_and_two_processes_give_identical_tables(scorer_weights, dirs, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine (accelerate
    1.15 launches one process for `--cpu --num_processes 2`; score.py turns the two
    launched processes into a gloo group itself)."""
    a, b = dirs
    flags = ["--batch_size", "4", "--num_workers", "1", "--pickscore", "--hpsv2", "--imagereward", "--dir", a,
             "--dir", b, "--weights_dir", scorer_weights, "--compare", a]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    outputs = {}
    for processes in (1, 2):
        for d in (a, b):
            if os.path.exists(os.path.join(d, "scores_cache.json")):
                os.remove(os.path.join(d, "scores_cache.json"))
        out = tmp_path / f"out{processes}"
        launch = [accelerate, "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        launch += ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--cpu", "--num_processes", "1"]
        result = subprocess.run(launch + [os.path.join(ROOT, "score.py")] + flags + ["--output", str(out)],
                                capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        if processes == 2:
            assert "process 0/2: scored 8 of 12" in result.stderr and "process 1/2: scored 4 of 12" in result.stderr
        outputs[processes] = [(out / name).read_text() for name in ("scores.csv", "scores.json", "winrate.csv")]
    assert outputs[1] == outputs[2]
