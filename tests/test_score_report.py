"""score.py --report: the win-rate bootstrap (rpo/scores/report.py), the HTML page
(rpo/scores/html_report.py) against numbers recomputed here from per-image scores, bad
input, and (slow) the page rendered by headless Chromium."""
import base64
import io
import json
import math
import os
import random
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import score
from rpo.scores.html_report import THUMBNAIL_SIZE, render_html
from rpo.scores.report import win_rate, win_rate_bootstrap
from rpo.tiny.pipelines import random_image
from scores_fixtures import write_image_dir

# mixed case, two foxes: the filter is case-insensitive and keeps more than one card
CAPTIONS = ["A Red FOX sitting in fresh snow", "an astronaut riding a horse", "a bowl of ramen, studio photo",
            "a little fox cub in the forest"]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def run_score(args):
    """score.py's main in this process; returns its exit status."""
    try:
        score.run_main(lambda: score.main(args))
        return 0
    except SystemExit as e:
        return e.code


class Page(HTMLParser):
    """The parts of the page the tests read: images, table cells by row, cards, the JSON."""

    def __init__(self, text):
        super().__init__()
        self.images, self.rows, self.cards, self.tags, self.attrs = [], {}, [], [], []
        self.scripts, self._row, self._cell, self._script = [], None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.attrs.append((tag, attrs))
        if tag == "img":
            self.images.append(attrs)
        elif tag == "tr" and "data-metric" in attrs:
            self._row = self.rows.setdefault((attrs.get("data-dir"), attrs.get("data-row"), attrs["data-metric"]), {})
        elif tag == "td" and self._row is not None and "class" in attrs:
            self._cell = attrs["class"]
            self._row[self._cell] = ""
        elif tag == "section":
            self.cards.append(attrs)
        elif tag in ("script", "pre"):
            self._script = [attrs, ""]

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag in ("script", "pre") and self._script is not None:
            self.scripts.append(tuple(self._script))
            self._script = None

    def handle_data(self, data):
        if self._cell is not None:
            self._row[self._cell] += data
        if self._script is not None:
            self._script[1] += data

    def script(self, id):
        return next(text for attrs, text in self.scripts if attrs.get("id") == id)


@pytest.fixture(scope="module")
def run(scorer_weights, tmp_path_factory):
    """One --compare run: base `a`, trained `b` (4 prompts × 3 images, same file names), and
    one run of `b` alone; {'compare'|'single': (scores.json, page text)} plus the dirs."""
    root = tmp_path_factory.mktemp("report")
    a = write_image_dir(root / "a", seed=1, prompts=4, per_prompt=3, captions=CAPTIONS)
    b = write_image_dir(root / "b", seed=2, prompts=4, per_prompt=3, captions=CAPTIONS)
    with open(os.path.join(b, "02", "10.png"), "r+b") as f:   # one unreadable image: a placeholder, no <img>
        f.truncate(200)
    flags = ["--pickscore", "--hpsv2", "--imagereward", "--num_workers", "0", "--weights_dir", scorer_weights]
    out = {"a": a, "b": b}
    for name, extra in (("compare", ["--dir", b, "--compare", a]), ("single", ["--dir", b])):
        folder = root / name
        assert run_score(flags + extra + ["--output", str(folder), "--report", str(folder / "page" / "r.html")]) == 0
        out[name] = (json.load(open(folder / "scores.json")), (folder / "page" / "r.html").read_text(),
                     str(folder / "page" / "r.html"))
    return out


# ---- the bootstrap ----------------------------------------------------------------------

def one_image_prompts(ours, theirs):
    """Prompts of one image each (so each is its own median image) with the given hpsv2 scores."""
    names = [f"{i:03d}" for i in range(len(ours))]   # sorted = listed order, as the bootstrap visits them
    prompts = {n: [f"o{n}"] for n in names}
    base = {n: [f"b{n}"] for n in names}
    scores = {"pickscore": {f"o{n}": 0.0 for n in names}, "hpsv2": {f"o{n}": v for n, v in zip(names, ours)}}
    base_scores = {"pickscore": {f"b{n}": 0.0 for n in names}, "hpsv2": {f"b{n}": v for n, v in zip(names, theirs)}}
    return prompts, base, scores, base_scores


def test_bootstrap_matches_numpy_resampling_and_counts_ties_apart():
    rng = random.Random(3)
    outcome = [1.0] * 22 + [0.5] * 6 + [0.0] * 12
    rng.shuffle(outcome)
    ours = [{1.0: 2.0, 0.5: 1.0, 0.0: 0.0}[o] for o in outcome]
    args = one_image_prompts(ours, [1.0] * len(ours))
    result = win_rate_bootstrap(*args, ["hpsv2"], resamples=500, seed=7)["hpsv2"]
    assert (result["wins"], result["ties"], result["losses"]) == (22, 6, 12)
    assert win_rate(*args, ["hpsv2"])[0]["hpsv2"] == pytest.approx((22 + 6 / 2) / 40)
    # the same resampling written out: 500 draws of 40 prompt indices, the 2.5/97.5 percentiles
    draws = np.random.default_rng(7).integers(0, 40, size=(500, 40))
    rates = np.array(outcome)[draws].mean(axis=1)
    assert result["ci95"] == pytest.approx(list(np.percentile(rates, [2.5, 97.5])), abs=1e-12)
    assert result["ci95"][0] < (22 + 3) / 40 < result["ci95"][1]


def test_bootstrap_interval_matches_the_normal_approximation():
    """Many prompts: the bootstrap interval is close to p ± 1.96·sqrt(p(1-p)/n)."""
    n, p = 400, 0.6
    ours = [1.0] * int(n * p) + [0.0] * (n - int(n * p))
    result = win_rate_bootstrap(*one_image_prompts(ours, [0.5] * n), ["hpsv2"], resamples=2000, seed=1)["hpsv2"]
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert result["ci95"] == pytest.approx([p - half, p + half], abs=0.01)


@pytest.mark.parametrize("ours, expected", [([2.0] * 5, [1.0, 1.0]), ([1.0] * 5, [0.5, 0.5]), ([0.0] * 5, [0.0, 0.0])])
def test_bootstrap_all_wins_ties_losses(ours, expected):
    result = win_rate_bootstrap(*one_image_prompts(ours, [1.0] * 5), ["hpsv2"])["hpsv2"]
    assert result["ci95"] == expected
    assert result["wins"] + result["ties"] + result["losses"] == 5


def test_bootstrap_ties_on_the_median_example_and_no_common_prompt():
    # test_scores_cli.py's example: prompt 0 loses on PickScore and wins on HPSv2, prompt 1
    # wins on PickScore and ties on HPSv2 (p2 vs c1: 5 == 5)
    prompts = {"0": ["o1", "o2", "o3"], "1": ["p1", "p2"], "2": ["q1"]}
    base = {"0": ["b1", "b2", "b3"], "1": ["c1", "c2"], "3": ["z"]}
    scores = {"pickscore": {"o1": 1, "o2": 5, "o3": 3, "p1": 2, "p2": 1, "q1": 0},
              "hpsv2": {"o1": 9, "o2": 9, "o3": 7, "p1": 1, "p2": 5, "q1": 0}}
    base_scores = {"pickscore": {"b1": 2, "b2": 9, "b3": 4, "c1": 0, "c2": 3},
                   "hpsv2": {"b1": 0, "b2": 0, "b3": 6, "c1": 5, "c2": 9}}
    result = win_rate_bootstrap(prompts, base, scores, base_scores, ["pickscore", "hpsv2"])
    assert [result["pickscore"][k] for k in ("wins", "ties", "losses")] == [1, 0, 1]
    assert [result["hpsv2"][k] for k in ("wins", "ties", "losses")] == [1, 1, 0]
    assert 0.5 <= result["hpsv2"]["ci95"][1] <= 1.0 and result["hpsv2"]["ci95"][0] >= 0.5
    none = win_rate_bootstrap({"x": ["o"]}, {"y": ["b"]}, {"pickscore": {"o": 1}}, {"pickscore": {"b": 1}}, ["pickscore"])
    assert none == {"pickscore": {"wins": 0, "ties": 0, "losses": 0, "ci95": None}}


# ---- the page ---------------------------------------------------------------------------

def median_pick(entry, prompt):
    """The prompt's image with the median PickScore (3 images: the middle one), by relpath."""
    rels = sorted((v["pickscore"], rel) for rel, v in entry["scores"].items() if os.path.dirname(rel) == prompt)
    return rels[(len(rels) - 1) // 2][1]


def test_tables_show_scores_json_and_the_ci_recomputed(run):
    report, text, _ = run["compare"]
    page = Page(text)
    assert len(report["dirs"]) == 2
    for d, entry in enumerate(report["dirs"]):
        for m in report["metrics"]:
            row = page.rows[(str(d), None, m)]
            values = np.array([s[m] for s in entry["scores"].values()])
            summary = entry["metrics"][m]
            assert row["n"] == str(len(values)) == str(summary["count"])
            assert row["mean"] == f"{summary['mean']:.4f}" and row["std"] == f"{summary['std']:.4f}"
            half = 1.96 * values.std(ddof=0) / math.sqrt(len(values))
            low, high = (float(x) for x in row["ci"].strip("[]").split(", "))
            assert low == pytest.approx(values.mean() - half, abs=5e-5 + 1e-9)
            assert high == pytest.approx(values.mean() + half, abs=5e-5 + 1e-9)
    # win rates: recomputed here from the per-image scores under the paper's protocol
    trained, base = report["dirs"]
    assert report["win_rate"]["base"] == base["dir"]
    prompts = sorted({os.path.dirname(rel) for rel in base["scores"]})
    for m in report["metrics"]:
        points = []
        for p in prompts:
            a, b = trained["scores"][median_pick(trained, p)][m], base["scores"][median_pick(base, p)][m]
            points.append(1.0 if a > b else 0.5 if a == b else 0.0)
        row = page.rows[(None, "0", m)]
        assert row["prompts"] == str(len(prompts))
        assert row["rate"] == f"{100 * np.mean(points):.1f} %"
        assert (row["wins"], row["ties"], row["losses"]) == tuple(str(points.count(v)) for v in (1.0, 0.5, 0.0))
        ci = report["win_rate"]["rows"][0]["bootstrap"][m]["ci95"]
        assert row["ci"] == f"[{100 * ci[0]:.1f} %, {100 * ci[1]:.1f} %]"
        assert min(points) <= ci[0] <= np.mean(points) <= ci[1] <= max(points)


def test_page_is_self_contained_one_image_each_that_decodes(run):
    for name in ("compare", "single"):
        report, text, _ = run[name]
        page = Page(text)
        scored = {(str(d), rel) for d, entry in enumerate(report["dirs"]) for rel in entry["scores"]}
        assert sorted((img["data-dir"], img["data-path"]) for img in page.images) == sorted(scored)
        for img in page.images:
            prefix = "data:image/jpeg;base64,"
            assert img["src"].startswith(prefix)
            thumb = Image.open(io.BytesIO(base64.b64decode(img["src"][len(prefix):], validate=True)))
            thumb.load()
            entry = report["dirs"][int(img["data-dir"])]
            with Image.open(os.path.join(entry["dir"], img["data-path"])) as original:
                assert thumb.size == original.size   # the tiny images are below THUMBNAIL_SIZE: kept as they are
        # nothing to fetch: no linked file of any kind
        assert "link" not in page.tags and "iframe" not in page.tags
        for tag, attrs in page.attrs:
            for key in ("src", "href"):
                assert key not in attrs or attrs[key].startswith("data:"), (tag, attrs.get(key))
        assert report["dirs"][0]["unreadable"] == [os.path.join(run["b"], "02", "10.png")]
        assert text.count('<div class="missing">unreadable: ') == 1
        assert "url(" not in text and "@import" not in text and "http://" not in text and "https://" not in text


def test_embedded_json_equals_scores_json(run):
    for name in ("compare", "single"):
        report, text, _ = run[name]
        data = json.loads(Page(text).script("report-data"))
        assert data["scores"] == report
        assert data["derived"]["std_ddof"] == 0
        for d, entry in enumerate(report["dirs"]):
            for m in report["metrics"]:
                values = np.array([s[m] for s in entry["scores"].values()])
                half = 1.96 * values.std() / math.sqrt(len(values))
                assert data["derived"]["ci95"][d][m] == pytest.approx([values.mean() - half, values.mean() + half])


def test_gallery_cards_and_sort_keys(run):
    report, text, _ = run["compare"]
    data = json.loads(Page(text).script("report-data"))["derived"]
    trained, base = report["dirs"]
    prompts = sorted({os.path.dirname(rel) for rel in base["scores"]})
    assert [c["prompt"] for c in data["cards"]] == prompts
    for card in data["cards"]:
        assert card["dirs"] == [1, 0]                                  # base first
        assert [r["file"] for r in card["files"]] == sorted({os.path.basename(rel) for rel in base["scores"]
                                                              if os.path.dirname(rel) == card["prompt"]})
        for row in card["files"]:                                       # same file name side by side, the
            # unreadable image too (shown as such)
            assert [c["path"] for c in row["cells"]] == [f"{card['prompt']}/{row['file']}"] * 2
        for m in report["metrics"]:
            expected = (trained["scores"][median_pick(trained, card["prompt"])][m]
                        - base["scores"][median_pick(base, card["prompt"])][m])
            assert card["keys"][f"diff:0:{m}"] == pytest.approx(expected, abs=1e-12)
    single, text, _ = run["single"]
    page = Page(text)
    data = json.loads(page.script("report-data"))["derived"]
    assert "winrate" not in text and [c["prompt"] for c in data["cards"]] == prompts
    for card in data["cards"]:
        values = [v["hpsv2"] for rel, v in single["dirs"][0]["scores"].items() if os.path.dirname(rel) == card["prompt"]]
        assert card["keys"]["mean:hpsv2"] == pytest.approx(np.mean(values), abs=1e-12)
    assert len(page.cards) == len(prompts)


def test_page_size_per_image(tmp_path):
    """Measured page size: 2 dirs × 10 prompts × 5 images of 512 px, thumbnails of 256 px."""
    rng = random.Random(0)
    report = {"metrics": {"pickscore": "v"}, "hps_version": "v2.0", "dirs": []}
    captions, thumbs = [], {}
    for d, kind in enumerate(("smooth", "noise")):
        root = tmp_path / kind
        scores = {}
        for p in range(10):
            os.makedirs(root / f"{p:03d}")
            for k in range(5):
                image = (random_image(rng, 512, 512) if kind == "smooth" else
                         Image.fromarray(np.random.default_rng(p * 5 + k).integers(0, 256, (512, 512, 3), np.uint8)))
                image.save(root / f"{p:03d}" / f"{k}.png")
                scores[f"{p:03d}/{k}.png"] = {"pickscore": rng.uniform(18, 22)}
        entry = {"dir": str(root), "images": 50, "failed": 0, "unreadable": [], "scores": scores,
                 "metrics": {"pickscore": {"mean": 20.0, "std": 1.0, "count": 50}}}
        report["dirs"].append(entry)
        captions.append({f"{p:03d}": f"prompt {p}" for p in range(10)})
    from rpo.scores.html_report import thumbnail_uri
    sizes = {}
    for d, entry in enumerate(report["dirs"]):
        for rel in entry["scores"]:
            thumbs[(d, rel)] = thumbnail_uri(os.path.join(entry["dir"], rel))
        sizes[d] = sum(len(thumbs[(d, rel)]) for rel in entry["scores"]) / 50
    page = render_html(report, captions, thumbs)
    overhead = (len(page) - sum(len(u) for u in thumbs.values())) / len(thumbs)
    print(f"\npage {len(page) / 1e6:.2f} MB for {len(thumbs)} images: data URI per image {sizes[0] / 1e3:.1f} KB (smooth), "
          f"{sizes[1] / 1e3:.1f} KB (noise, worst case); markup + JSON {overhead:.0f} B per image")
    assert all(max(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).size) == THUMBNAIL_SIZE
               for u in thumbs.values())
    assert overhead < 1000        # the docstring of rpo/scores/html_report.py says ~0.6 KB
    assert sizes[1] < 60e3        # noise is JPEG's worst case; real pictures are far smaller


# ---- bad input --------------------------------------------------------------------------

def test_bad_report_path_fails_before_scoring(run, scorer_weights, tmp_path, capsys, monkeypatch):
    def no_scoring(*args, **kwargs):
        raise AssertionError("a scorer was loaded before --report was checked")
    monkeypatch.setattr(score, "load_scorer", no_scoring)
    (tmp_path / "file.txt").write_text("x")
    flags = ["--pickscore", "--dir", run["a"], "--weights_dir", scorer_weights, "--output", str(tmp_path / "o")]
    capsys.readouterr()
    for path, message in ((tmp_path / "file.txt" / "r.html", "is not a folder"), (tmp_path, "is a folder")):
        assert run_score(flags + ["--report", str(path)]) == 2
        stderr = capsys.readouterr().err
        assert stderr.startswith("error: --report") and message in stderr and stderr.count("\n") == 1


def test_report_with_no_scored_image_is_refused(scorer_weights, tmp_path, capsys):
    d = write_image_dir(tmp_path / "bad", seed=4, prompts=2, per_prompt=1)
    for folder, _, files in os.walk(d):
        for f in files:
            if f.endswith((".png", ".jpg")):
                open(os.path.join(folder, f), "wb").write(b"not an image")
    capsys.readouterr()
    status = run_score(["--clip", "--num_workers", "0", "--dir", d, "--weights_dir", scorer_weights,
                        "--output", str(tmp_path / "o"), "--report", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert status == 2 and "error: --report" in err and "no image could be scored" in err
    assert not (tmp_path / "r.html").exists()


# ---- in a browser -----------------------------------------------------------------------

def chromium(args, profile):
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--virtual-time-budget=5000"] + args
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_page_in_headless_chromium(run, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Chromium not installed (Debian: apt-get install chromium); the page was not rendered")
    report, _, path = run["compare"]
    trained, base = report["dirs"]
    metric = "hpsv2"
    url = f"file://{path}?selftest=1&sort=diff:0:{metric}&order=desc&filter=Fox"
    dom = Page(chromium(["--dump-dom", url], tmp_path / "profile"))
    result = json.loads(dom.script("selftest-result"))
    assert result.get("done") is True
    # every image rendered
    scored = sorted((d, rel) for d, entry in enumerate(report["dirs"]) for rel in entry["scores"])
    assert sorted((i["dir"], i["path"]) for i in result["images"]) == scored
    assert all(i["complete"] and i["width"] > 0 for i in result["images"])
    # sorted by the score difference of the compared images, largest first (ties: prompt order)
    prompts = sorted({os.path.dirname(rel) for rel in base["scores"]})
    diff = [trained["scores"][median_pick(trained, p)][metric] - base["scores"][median_pick(base, p)][metric]
            for p in prompts]
    assert result["sorted"] == sorted(range(len(prompts)), key=lambda i: (-diff[i], i))
    # the filter (case-insensitive) hides every card whose caption lacks the text
    captions = [open(os.path.join(run["a"], p, "caption.txt")).read().strip() for p in prompts]
    visible = [i for i in result["sorted"] if "fox" in captions[i].lower()]
    assert result["visible"] == visible and len(visible) == 2
    assert result["shown"] == f"2 of {len(prompts)} cards"
    # the numbers on the rendered page are scores.json's
    for d, entry in enumerate(report["dirs"]):
        for m in report["metrics"]:
            row = dom.rows[(str(d), None, m)]
            assert (row["mean"], row["std"], row["n"]) == (f"{entry['metrics'][m]['mean']:.4f}",
                                                           f"{entry['metrics'][m]['std']:.4f}",
                                                           str(entry["metrics"][m]["count"]))
            if d == 0:
                win = dom.rows[(None, "0", m)]
                assert win["rate"] == f"{100 * report['win_rate']['rows'][0]['win_rate'][m]:.1f} %"
    screenshot = tmp_path / "report.png"
    chromium(["--window-size=1200,1600", f"--screenshot={screenshot}", url], tmp_path / "profile")
    with Image.open(screenshot) as shot:
        assert shot.size == (1200, 1600) and len(set(shot.convert("L").getdata())) > 16   # not a blank page
    if os.environ.get("RPO_TEST_ARTIFACTS"):
        os.makedirs(os.path.join(os.path.dirname(__file__), "artifacts"), exist_ok=True)
        shutil.copy(screenshot, os.path.join(os.path.dirname(__file__), "artifacts", "score_report.png"))
    print(f"\nscreenshot: {screenshot}")
