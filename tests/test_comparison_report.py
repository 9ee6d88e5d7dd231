"""score.py --method: the comparison of several methods on several benchmarks (Table 3 and
Table 1 layouts, charts, training curves, the two-method gallery) against numbers recomputed
here from the per-image scores and the logdir's history.jsonl, the CSV files read back, bad
input, and (slow) the page rendered by headless Chromium."""
import csv
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import score
from scores_fixtures import write_image_dir

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
METRICS = ["pickscore", "hpsv2"]
HISTORY = [{"kind": "train", "step": 16 * s, "loss/loss": 1.0 / s, "loss/diff": -0.1 * s} for s in range(1, 5)] + \
          [{"kind": "validation", "step": 32, "metrics/pickscore": 20.5}, {"kind": "validation", "step": 64,
                                                                          "metrics/pickscore": 20.75}]


def run_score(args):
    try:
        score.run_main(lambda: score.main(args))
        return 0
    except SystemExit as e:
        return e.code


class Page(HTMLParser):
    """Table cells by (table id, data attributes) with their spans' text; chart elements; scripts."""

    def __init__(self, text):
        super().__init__()
        self.cells, self.charts, self.scripts = {}, [], {}
        self.table, self.cell, self.span, self.strong, self.script = None, None, None, 0, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.table = attrs.get("id")
        elif tag == "td" and "data-metric" in attrs:
            key = (self.table, attrs.get("data-method") or attrs.get("data-against"), attrs["data-benchmark"],
                   attrs["data-metric"])
            self.cell = self.cells.setdefault(key, {"class": attrs.get("class"), "text": "", "bold": False})
        elif tag == "span" and self.cell is not None:
            self.span = attrs.get("class")
            self.cell[self.span] = ""
        elif tag == "strong" and self.cell is not None:
            self.cell["bold"] = True
        elif tag in ("g", "rect", "polyline", "figure", "circle"):
            self.charts.append((tag, attrs))
        elif tag in ("script", "pre"):
            self.script = [attrs.get("id"), ""]

    def handle_endtag(self, tag):
        if tag == "td":
            self.cell = None
        elif tag == "span":
            self.span = None
        elif tag in ("script", "pre") and self.script:
            self.scripts[self.script[0]] = self.script[1]
            self.script = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["text"] += data
            if self.span:
                self.cell[self.span] += data
        if self.script is not None:
            self.script[1] += data


@pytest.fixture(scope="module")
def run(scorer_weights, tmp_path_factory):
    """Three methods: DRO and SD1.5 on two benchmarks, SFT on one; DRO with a logdir."""
    root = tmp_path_factory.mktemp("comparison")
    dirs = {}
    for i, method in enumerate(("dro", "base", "sft")):
        for j, bench in enumerate(("pickapic", "anime")[:1 if method == "sft" else 2]):
            dirs[(method, bench)] = write_image_dir(root / method / bench, seed=10 * i + j, prompts=5, per_prompt=3)
    logdir = root / "logs" / "dro"
    os.makedirs(logdir)
    (logdir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HISTORY))
    args = ["--pickscore", "--hpsv2", "--num_workers", "0", "--weights_dir", scorer_weights,
            "--method", f"DRO=pickapic:{dirs[('dro', 'pickapic')]},anime:{dirs[('dro', 'anime')]}",
            "--method", f"SD1.5=pickapic:{dirs[('base', 'pickapic')]},anime:{dirs[('base', 'anime')]}",
            "--method", f"SFT=pickapic:{dirs[('sft', 'pickapic')]}", "--reference", "DRO",
            "--method_logdir", f"DRO={logdir}", "--gallery_prompts", "3",
            "--output", str(root / "out"), "--report", str(root / "out" / "compare.html")]
    assert run_score(args) == 0
    out = root / "out"
    return {"dirs": dirs, "root": root, "args": args, "comparison": json.load(open(out / "comparison.json")),
            "scores": json.load(open(out / "scores.json")), "page": (out / "compare.html").read_text(),
            "path": str(out / "compare.html"), "out": out}


NAMES = {"DRO": "dro", "SD1.5": "base", "SFT": "sft"}


def image_scores(run, method, bench):
    """{relpath: {metric: score}} from scores.json (the per-image scores score.py computed)."""
    folder = run["dirs"][(NAMES[method], bench)]
    return next(entry["scores"] for entry in run["scores"]["dirs"] if entry["dir"] == folder)


def median_pick(scores, prompt):
    ranked = sorted((v["pickscore"], rel) for rel, v in scores.items() if os.path.dirname(rel) == prompt)
    return ranked[(len(ranked) - 1) // 2][1]


def test_table3_recomputed_marked_and_shown(run):
    comparison, page = run["comparison"], Page(run["page"])
    assert comparison["benchmarks"] == ["pickapic", "anime"]
    rows = {(r["method"], r["benchmark"], r["metric"]): r for r in comparison["table3"]}
    assert len(rows) == 3 * 2 * 2
    for bench in ("pickapic", "anime"):
        for metric in METRICS:
            means = {}
            for method in NAMES:
                row, cell = rows[(method, bench, metric)], page.cells[("table3", method, bench, metric)]
                if (NAMES[method], bench) not in run["dirs"]:
                    assert row["mean"] is None and cell["text"] == "—" and not row["best"]
                    continue
                values = np.array([v[metric] for v in image_scores(run, method, bench).values()])
                assert row["mean"] == pytest.approx(values.mean(), abs=1e-9)
                assert row["std"] == pytest.approx(values.std(ddof=0), abs=1e-9) and row["count"] == 15
                half = 1.96 * values.std() / np.sqrt(15)
                assert row["ci95"] == pytest.approx([values.mean() - half, values.mean() + half], abs=1e-9)
                assert (cell["mean"], cell["std"]) == (f"{row['mean']:.4f}", f"{row['std']:.4f}")
                means[method] = values.mean()
            best = max(means, key=means.get)
            for method in means:
                marked = rows[(method, bench, metric)]["best"]
                assert marked == (method == best)
                assert page.cells[("table3", method, bench, metric)]["bold"] == marked
                assert ("best" in page.cells[("table3", method, bench, metric)]["class"]) == marked
    with open(run["out"] / "table3.csv") as f:
        for r in csv.DictReader(f):
            row = rows[(r["method"], r["benchmark"], r["metric"])]
            assert r["mean"] == repr(row["mean"]) and r["best"] == str(int(row["best"]))


def test_table1_recomputed_and_shown(run):
    comparison, page = run["comparison"], Page(run["page"])
    rows = {(r["against"], r["benchmark"], r["metric"]): r for r in comparison["table1"]}
    assert sorted(rows) == sorted((a, b, m) for a, b in (("SD1.5", "pickapic"), ("SD1.5", "anime"), ("SFT", "pickapic"))
                                  for m in METRICS)
    for (against, bench, metric), row in rows.items():
        ours, theirs = image_scores(run, "DRO", bench), image_scores(run, against, bench)
        prompts = sorted({os.path.dirname(rel) for rel in ours})
        points = []
        for p in prompts:
            a, b = ours[median_pick(ours, p)][metric], theirs[median_pick(theirs, p)][metric]
            points.append(1.0 if a > b else 0.5 if a == b else 0.0)
        assert row["method"] == "DRO" and row["prompts"] == len(prompts) == 5
        assert row["win_rate"] == pytest.approx(np.mean(points), abs=1e-12)
        assert (row["wins"], row["ties"], row["losses"]) == tuple(points.count(v) for v in (1.0, 0.5, 0.0))
        assert min(points) <= row["ci95"][0] <= row["win_rate"] <= row["ci95"][1] <= max(points)
        cell = page.cells[("table1", against, bench, metric)]
        assert cell["rate"] == f"{100 * row['win_rate']:.1f} %"
        assert cell["ci"] == f"[{100 * row['ci95'][0]:.1f} %, {100 * row['ci95'][1]:.1f} %]"
        assert cell["wtl"] == f"{row['wins']}/{row['ties']}/{row['losses']}" and cell["prompts"] == "5"
    assert page.cells[("table1", "SFT", "anime", "hpsv2")]["text"] == "—"
    with open(run["out"] / "table1.csv") as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rows)
    for r in read:
        row = rows[(r["against"], r["benchmark"], r["metric"])]
        assert (r["win_rate"], r["ci95_low"], r["wins"]) == (repr(row["win_rate"]), repr(row["ci95"][0]), str(row["wins"]))


def test_charts_show_the_json_numbers(run):
    comparison, page = run["comparison"], Page(run["page"])
    points = [a for tag, a in page.charts if tag == "g" and "data-mean" in a]
    shown = {(a["data-method"], a["data-benchmark"], float(a["data-mean"])) for a in points}
    assert shown == {(r["method"], r["benchmark"], r["mean"]) for r in comparison["table3"] if r["mean"] is not None}
    bars = [a for tag, a in page.charts if tag == "g" and "data-rate" in a]
    assert sorted((a["data-against"], a["data-benchmark"], float(a["data-rate"])) for a in bars) == \
        sorted((r["against"], r["benchmark"], r["win_rate"]) for r in comparison["table1"])
    rects = [a for tag, a in page.charts if tag == "rect"]
    assert sorted(float(a["width"]) for a in rects) == pytest.approx(
        sorted(round(r["win_rate"] * 300, 1) for r in comparison["table1"]), abs=0.051)


def test_training_curves_are_the_history(run):
    comparison, page = run["comparison"], Page(run["page"])
    train = {k: [[r["step"] for r in HISTORY if r["kind"] == "train"], [r[k] for r in HISTORY if r["kind"] == "train"]]
             for k in ("loss/loss", "loss/diff")}
    valid = {"metrics/pickscore": [[32, 64], [20.5, 20.75]]}
    assert comparison["curves"] == {"DRO": {"train": train, "validation": valid}}
    charts = [a for tag, a in page.charts if tag == "figure" and a.get("data-chart") == "curve"]
    assert sorted(a["data-key"] for a in charts) == sorted(list(train) + list(valid))
    polylines = [a for tag, a in page.charts if tag == "polyline"]
    assert sorted(len(a["points"].split()) for a in polylines) == [2, 4, 4]


def test_gallery_data(run):
    gallery = run["comparison"]["gallery"]
    assert sorted(gallery) == ["anime", "pickapic"]
    for bench, cards in gallery.items():
        assert [c["prompt"] for c in cards] == ["00", "01", "02"]                 # --gallery_prompts 3
        for card in cards:
            assert sorted(card["images"]) == sorted(m for m in NAMES if (NAMES[m], bench) in run["dirs"])
            for method, images in card["images"].items():
                scores = image_scores(run, method, bench)
                folder = run["dirs"][(NAMES[method], bench)]
                assert [i["path"] for i in images] == sorted(
                    os.path.join(card["prompt"], f) for f in os.listdir(os.path.join(folder, card["prompt"]))
                    if f != "caption.txt")
                assert {i["path"] for i in images} == {rel for rel in scores if os.path.dirname(rel) == card["prompt"]}
                for image in images:
                    assert image["scores"] == scores[image["path"]]
                    assert image["median"] == (image["path"] == median_pick(scores, card["prompt"]))
    data = json.loads(Page(run["page"]).scripts["comparison-data"])
    assert data["comparison"] == run["comparison"]
    assert set(data["thumbnails"]) == {f"{m}\t{b}\t{i['path']}" for b, cards in gallery.items() for c in cards
                                       for m, images in c["images"].items() for i in images}


@pytest.mark.parametrize("extra, message", [
    (["--method", "DRO"], "expected NAME=BENCHMARK:DIR"),
    (["--method", "A=x:/nope", "--method", "A=x:/nope"], "the name A is given twice"),
    (["--method", "A=x:/nope"], "at least two methods"),
    (["--method", "A=x:/a", "--method", "B=x:/b", "--reference", "C"], "--reference C: no --method"),
    (["--method", "A=x:/a", "--method", "B=x:/b", "--dir", "/a"], "leave out --dir"),
    (["--method", "A=x:/a", "--method", "B=x:/b", "--method_logdir", "A=/no/such"], "no history.jsonl"),
    (["--reference", "A", "--dir", "/a"], "need --method"),
])
def test_bad_method_options_are_one_line(scorer_weights, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(score, "load_scorer", lambda *a, **k: pytest.fail("a scorer loaded before the check"))
    capsys.readouterr()
    assert run_score(["--pickscore", "--weights_dir", scorer_weights, "--output", str(tmp_path)] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_methods_whose_prompts_differ_are_refused_before_scoring(scorer_weights, tmp_path, capsys, monkeypatch):
    a = write_image_dir(tmp_path / "a", seed=1, prompts=2, per_prompt=1)
    b = write_image_dir(tmp_path / "b", seed=2, prompts=2, per_prompt=1)
    (tmp_path / "b" / "01" / "caption.txt").write_text("another prompt\n")
    monkeypatch.setattr(score, "load_scorer", lambda *a, **k: pytest.fail("a scorer loaded before the check"))
    capsys.readouterr()
    assert run_score(["--pickscore", "--weights_dir", scorer_weights, "--output", str(tmp_path / "o"),
                      "--method", f"A=bench:{a}", "--method", f"B=bench:{b}"]) == 2
    err = capsys.readouterr().err
    assert "--method (benchmark bench): prompt 01 differs" in err and err.count("\n") == 1


def chromium(args, profile):
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--virtual-time-budget=5000"] + args
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_comparison_page_in_headless_chromium(run, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Chromium not installed (Debian: apt-get install chromium); the page was not rendered")
    comparison = run["comparison"]
    url = f"file://{run['path']}?selftest=1&a=SFT&b=DRO&bench=pickapic"
    dom = Page(chromium(["--dump-dom", url], tmp_path / "profile"))
    result = json.loads(dom.scripts["selftest-result"])
    assert result["done"] and (result["a"], result["b"], result["bench"]) == ("SFT", "DRO", "pickapic")
    cards = comparison["gallery"]["pickapic"]
    assert [c["prompt"] for c in result["cards"]] == [c["prompt"] for c in cards]
    for shown, card in zip(result["cards"], cards):
        assert [r["who"] for r in shown["rows"]] == ["SFT", "DRO"]
        for row in shown["rows"]:
            images = card["images"][row["who"]]
            assert row["paths"] == [f"{i['path']} pickscore {i['scores']['pickscore']:.4f}" for i in images]
            assert row["median"] == [i["median"] for i in images]
    assert len(result["images"]) == sum(len(c["images"][m]) for c in cards for m in ("SFT", "DRO"))
    assert all(i["decoded"] and i["width"] > 0 for i in result["images"])
    # the rendered tables hold comparison.json's numbers
    for r in comparison["table3"]:
        cell = dom.cells[("table3", r["method"], r["benchmark"], r["metric"])]
        assert cell.get("mean", cell["text"]) == ("—" if r["mean"] is None else f"{r['mean']:.4f}")
        assert cell["bold"] == r["best"]
    for r in comparison["table1"]:
        assert dom.cells[("table1", r["against"], r["benchmark"], r["metric"])]["rate"] == f"{100 * r['win_rate']:.1f} %"
    screenshot = tmp_path / "comparison.png"
    chromium(["--window-size=1200,1800", f"--screenshot={screenshot}", url], tmp_path / "profile")
    with Image.open(screenshot) as shot:
        assert shot.size == (1200, 1800) and len(set(shot.convert("L").getdata())) > 16
    if os.environ.get("RPO_TEST_ARTIFACTS"):
        os.makedirs(os.path.join(os.path.dirname(__file__), "artifacts"), exist_ok=True)
        shutil.copy(screenshot, os.path.join(os.path.dirname(__file__), "artifacts", "comparison_report.png"))


def test_a_yaml_config_holds_the_methods(run, scorer_weights):
    """The spec-file way: --config FILE.yaml with the method list gives the same comparison."""
    import yaml
    args = run["args"]
    methods = [args[i + 1] for i, a in enumerate(args) if a == "--method"]
    config = run["root"] / "compare.yaml"
    config.write_text(yaml.safe_dump({"method": methods, "reference": "DRO", "method_logdir": [args[args.index("--method_logdir") + 1]],
                                      "gallery_prompts": 3, "pickscore": True, "hpsv2": True}))
    out = run["root"] / "from-yaml"
    assert run_score(["--config", str(config), "--num_workers", "0", "--weights_dir", scorer_weights,
                      "--output", str(out)]) == 0
    assert json.load(open(out / "comparison.json")) == run["comparison"]
