"""score.py --report FILE.html: one self-contained page to judge a run by looking.

The page holds the metrics table (per dir and metric: n, mean ± std with the std of
scores.csv, ddof=0, and the normal-approximation 95 % interval of the mean,
mean ± 1.96·std/√n), the win rates of each dir over the `--compare` base (wins, ties and
losses apart, with the bootstrap interval of rpo/scores/report.py's `win_rate_bootstrap`)
and a per-prompt gallery: with `--compare` one card per prompt, the base's images next to
each dir's images of the same file name (the same seed), the median-PickScore images the
win rate compares outlined; without it one card per dir and prompt. Cards sort by a key
(the score difference of the compared images, or the prompt's mean score) and filter by
prompt text, in a few lines of plain JavaScript.

Every number comes from the `report` dict score.py writes to scores.json, which is also
embedded verbatim in `<script type="application/json" id="report-data">` (under
"scores"; what the page derives from it under "derived"). Nothing is fetched: no external
CSS, scripts or fonts, and the images are JPEG thumbnails (THUMBNAIL_SIZE px on the
longest side) embedded as base64 data URIs, so the page opens offline.

Size (measured, tests/test_score_report.py::test_page_size_per_image prints it): ~0.6 KB
of markup and JSON per image plus its data URI, 4/3 of the thumbnail's JPEG bytes. A
256 px thumbnail (JPEG quality 75) of a 512 px photograph is ~12 KB, a 16 KB data URI
(matplotlib's grace_hopper.jpg resized to 512 px); the tiny kit's smooth pictures ~2.5 KB,
pure noise (the worst case) ~30 KB. So a 2,500-image run makes a page of about 42 MB, and
with a `--compare` base of as many images about 84 MB.

`?selftest=1&sort=KEY&order=desc&filter=TEXT` in the URL makes the page sort and filter
itself once loaded and write the resulting order and every image's load state as JSON
into `#selftest-result` (read back by the headless-browser test).
"""
import base64
import html
import io
import json
import math
import os

from rpo.io import write_text
from rpo.scores.report import median_image

THUMBNAIL_SIZE = 256   # longest side, px
JPEG_QUALITY = 75
Z95 = 1.96             # two-sided 95 % normal quantile


def mean_ci95(summary):
    """[low, high] of mean ± 1.96·std/√n, std as in scores.json (ddof=0); None below 2 images."""
    if summary["count"] < 2 or summary["mean"] is None:
        return None
    half = Z95 * summary["std"] / math.sqrt(summary["count"])
    return [summary["mean"] - half, summary["mean"] + half]


def thumbnail_uri(path, size=THUMBNAIL_SIZE, quality=JPEG_QUALITY):
    """The image as a data URI of a JPEG at most `size` px on its longest side."""
    from PIL import Image

    from rpo.data.folders import to_rgb

    with Image.open(path) as image:
        image = to_rgb(image)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _prompt_images(entry):
    """{prompt name: {file name: relpath}} of a dir's scored and unreadable images."""
    relpaths = list(entry["scores"]) + [os.path.relpath(p, entry["dir"]) for p in entry.get("unreadable", [])]
    prompts = {}
    for rel in relpaths:
        prompts.setdefault(os.path.dirname(rel), {})[os.path.basename(rel)] = rel
    return prompts


def _mean(values):
    return math.fsum(values) / len(values) if values else None


def page_data(report, captions):
    """What the page shows beyond scores.json, derived from it. `report`: scores.json's
    object; `captions`: per dir {prompt name: caption}. Returns {'std_ddof', 'ci95' (per
    dir {metric: [low, high] or None}), 'sort_keys' ([{'key', 'label'}]), 'cards'}; a card
    is {'prompt', 'caption', 'dirs' (dir indices shown), 'files' ([{'file', 'cells':
    [{'dir', 'path' (relpath), 'scores' (None: unreadable), 'paired'}]}]), 'keys'
    ({sort key: value or None})}."""
    metrics = list(report["metrics"])
    dirs = report["dirs"]
    images = [_prompt_images(entry) for entry in dirs]
    base = None
    if "win_rate" in report:
        base = next(d for d, entry in enumerate(dirs) if entry["dir"] == report["win_rate"]["base"])
    others = [d for d in range(len(dirs)) if d != base]
    if base is not None:
        sort_keys = [{"key": f"diff:{d}:{m}", "label": f"Δ {m}: {dirs[d]['dir']} − base"} for d in others for m in metrics]
        names = sorted(set().union(*[set(p) for p in images]))
        groups = [(name, [base] + [d for d in others if name in images[d]]) for name in names]
    else:
        sort_keys = [{"key": f"mean:{m}", "label": f"mean {m} of the prompt"} for m in metrics]
        groups = [(name, [d]) for d in range(len(dirs)) for name in sorted(images[d])]

    cards = []
    for name, shown in groups:
        caption = next(captions[d][name] for d in shown if name in captions[d])
        # the images the win rate compares: each side's median-PickScore image of the prompt
        paired = {}
        if base is not None:
            for d in shown:
                scored = [rel for rel in images[d].get(name, {}).values() if rel in dirs[d]["scores"]]
                paired[d] = median_image(scored, {rel: dirs[d]["scores"][rel]["pickscore"] for rel in scored})
        files = sorted(set().union(*[set(images[d].get(name, {})) for d in shown]))
        rows = []
        for file in files:
            cells = []
            for d in shown:
                rel = images[d].get(name, {}).get(file)
                cells.append({"dir": d, "path": rel, "scores": dirs[d]["scores"].get(rel) if rel else None,
                              "paired": rel is not None and paired.get(d) == rel})
            rows.append({"file": file, "cells": cells})
        keys = {}
        if base is not None:
            for d in others:
                for m in metrics:
                    ours, theirs = paired.get(d), paired.get(base)
                    keys[f"diff:{d}:{m}"] = (dirs[d]["scores"][ours][m] - dirs[base]["scores"][theirs][m]
                                             if ours and theirs and d in shown else None)
        else:
            for m in metrics:
                keys[f"mean:{m}"] = _mean([c["scores"][m] for r in rows for c in r["cells"] if c["scores"]])
        cards.append({"prompt": name, "caption": caption, "dirs": shown, "files": rows, "keys": keys})
    return {"std_ddof": 0, "ci95": [{m: mean_ci95(entry["metrics"][m]) for m in metrics} for entry in dirs],
            "sort_keys": sort_keys, "cards": cards}


def fmt(value, digits=4):
    return "—" if value is None else f"{value:.{digits}f}"


def fmt_interval(interval, digits=4):
    return "—" if interval is None else f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def fmt_rate(value):
    return "—" if value is None else f"{100 * value:.1f} %"


def fmt_rate_interval(interval):
    return "—" if interval is None else f"[{100 * interval[0]:.1f} %, {100 * interval[1]:.1f} %]"


def _metrics_table(report, derived):
    e = html.escape
    rows = []
    for d, entry in enumerate(report["dirs"]):
        for m in report["metrics"]:
            s = entry["metrics"][m]
            rows.append(f'<tr data-dir="{d}" data-metric="{e(m)}"><td>{e(entry["dir"])}</td><td>{e(m)}</td>'
                        f'<td class="images">{entry["images"]}</td><td class="failed">{entry["failed"]}</td>'
                        f'<td class="n">{s["count"]}</td><td class="mean">{fmt(s["mean"])}</td>'
                        f'<td class="std">{fmt(s["std"])}</td><td class="ci">{fmt_interval(derived["ci95"][d][m])}</td></tr>')
    return ('<table id="metrics"><thead><tr><th>dir</th><th>metric</th><th>images</th><th>unreadable</th><th>n</th>'
            '<th>mean</th><th>std (ddof=0)</th><th>95 % CI of the mean</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def _win_table(report):
    e = html.escape
    win = report["win_rate"]
    rows = []
    for r, row in enumerate(win["rows"]):
        for m in report["metrics"]:
            b = row["bootstrap"][m]
            rows.append(f'<tr data-row="{r}" data-metric="{e(m)}"><td>{e(row["dir"])}</td><td>{e(m)}</td>'
                        f'<td class="prompts">{row["prompts"]}</td><td class="rate">{fmt_rate(row["win_rate"][m])}</td>'
                        f'<td class="wins">{b["wins"]}</td><td class="ties">{b["ties"]}</td>'
                        f'<td class="losses">{b["losses"]}</td><td class="ci">{fmt_rate_interval(b["ci95"])}</td></tr>')
    boot = win["bootstrap"]
    return (f'<h2>Win rate over {e(win["base"])}</h2><p>Per prompt, each side\'s median-PickScore image; a win '
            f'when the dir\'s image scores higher, half a win on a tie (the paper\'s protocol). 95 % interval: '
            f'percentile bootstrap over prompts, {boot["resamples"]} resamples, seed {boot["seed"]}.</p>'
            '<table id="winrate"><thead><tr><th>dir</th><th>metric</th><th>prompts</th><th>win rate</th>'
            '<th>wins</th><th>ties</th><th>losses</th><th>95 % bootstrap CI</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def _card(index, card, report, thumbnails):
    e = html.escape
    dirs = report["dirs"]
    base = report["win_rate"]["base"] if "win_rate" in report else None
    head = "".join(f"<th>{e(dirs[d]['dir'])}{' (base)' if dirs[d]['dir'] == base else ''}</th>" for d in card["dirs"])
    rows = []
    for row in card["files"]:
        cells = []
        for cell in row["cells"]:
            if cell["path"] is None:
                cells.append("<td></td>")
                continue
            uri = thumbnails.get((cell["dir"], cell["path"])) if cell["scores"] else None
            label = e(os.path.join(dirs[cell["dir"]]["dir"], cell["path"]))
            if uri is None:
                picture = f'<div class="missing">{"unreadable" if cell["scores"] is None else "no thumbnail"}: {label}</div>'
            else:
                picture = f'<img src="{uri}" alt="{label}" title="{label}" data-dir="{cell["dir"]}" data-path="{e(cell["path"])}">'
            scores = "<br>".join(f"{e(m)} {fmt(v)}" for m, v in (cell["scores"] or {}).items())
            paired = ' class="paired"' if cell["paired"] else ""
            cells.append(f"<td{paired}><figure>{picture}<figcaption>{e(row['file'])}<br>{scores}</figcaption></figure></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<section class="card" data-card="{index}" data-prompt="{e(card["prompt"])}" '
            f'data-caption="{e(card["caption"])}"><h3>{e(card["prompt"])}: {e(card["caption"])}</h3>'
            f'<p class="key"></p><table><tr>{head}</tr>{"".join(rows)}</table></section>')


STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}th,td{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}
.card{margin:1em 0;padding:.5em;border:1px solid #ccc;border-radius:4px}
.card h3{margin:.2em 0;font-size:15px}.card th,.card td{text-align:center;vertical-align:top;border:none}
.card td.paired img{outline:3px solid #2a7;outline-offset:-3px}
figure{margin:0}figcaption{font-size:11px;color:#555}img{max-width:256px;max-height:256px;display:block;margin:auto}
#controls{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc}
.missing{width:128px;height:64px;background:#eee;font-size:11px;overflow:hidden}
"""

SCRIPT = r"""
(function () {
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const cards = DATA.derived.cards;
  const gallery = document.getElementById("gallery");
  const sort = document.getElementById("sort"), order = document.getElementById("order");
  const filter = document.getElementById("filter"), shown = document.getElementById("shown");
  function key(el) { const v = cards[+el.dataset.card].keys[sort.value]; return v === undefined ? null : v; }
  function applySort() {
    const desc = order.dataset.descending === "1";
    const els = Array.from(gallery.children);
    els.sort(function (a, b) {
      const tie = a.dataset.card - b.dataset.card;
      if (!sort.value) return tie;
      const x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null) || tie;  // no value: last
      return (desc ? y - x : x - y) || tie;
    });
    els.forEach(function (el) {
      const v = key(el);
      el.querySelector(".key").textContent = sort.value ? sort.options[sort.selectedIndex].text + ": " +
        (v === null ? "\u2014" : v.toFixed(4)) : "";
      gallery.appendChild(el);
    });
  }
  function applyFilter() {
    const q = filter.value.trim().toLowerCase();
    let n = 0;
    Array.from(gallery.children).forEach(function (el) {
      el.hidden = q !== "" && !el.dataset.caption.toLowerCase().includes(q);
      n += el.hidden ? 0 : 1;
    });
    shown.textContent = n + " of " + cards.length + " cards";
  }
  sort.addEventListener("change", applySort);
  order.addEventListener("click", function () {
    order.dataset.descending = order.dataset.descending === "1" ? "0" : "1";
    order.textContent = order.dataset.descending === "1" ? "descending" : "ascending";
    applySort();
  });
  filter.addEventListener("input", applyFilter);
  applyFilter();
  const params = new URLSearchParams(location.search);
  if (params.get("selftest") !== "1") return;
  window.addEventListener("load", function () {   // fires once every image has loaded or failed
    const result = {images: Array.from(document.images).map(function (img) {
      return {dir: +img.dataset.dir, path: img.dataset.path, complete: img.complete, width: img.naturalWidth};
    })};
    sort.value = params.get("sort") || "";
    sort.dispatchEvent(new Event("change"));
    if ((params.get("order") || "desc") !== "desc") order.click();
    result.sorted = Array.from(gallery.children).map(function (el) { return +el.dataset.card; });
    filter.value = params.get("filter") || "";
    filter.dispatchEvent(new Event("input"));
    result.visible = Array.from(gallery.children).filter(function (el) { return !el.hidden; })
      .map(function (el) { return +el.dataset.card; });
    result.shown = shown.textContent;
    result.done = true;
    document.getElementById("selftest-result").textContent = JSON.stringify(result);
  });
})();
"""


def render_html(report, captions, thumbnails):
    """The page. `report`: scores.json's object; `captions`: per dir {prompt name: caption};
    `thumbnails`: {(dir index, relpath): data URI} (a missing one shows a placeholder)."""
    e = html.escape
    derived = page_data(report, captions)
    # "<" escaped so no caption or path can close the script element; JSON reads it back as is
    data = json.dumps({"scores": report, "derived": derived}).replace("<", "\\u003c")
    options = "".join(f'<option value="{e(k["key"])}">{e(k["label"])}</option>' for k in derived["sort_keys"])
    versions = ", ".join(f"{e(m)} {e(str(v))}" for m, v in report["metrics"].items())
    win = _win_table(report) if "win_rate" in report else ""
    gallery = "".join(_card(i, card, report, thumbnails) for i, card in enumerate(derived["cards"]))
    note = ("Base images left, each dir's image of the same file name (same seed) beside it; outlined: the "
            "median-PickScore images the win rate compares." if "win_rate" in report else
            "Each dir's images with their scores, one card per dir and prompt.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>rpo score report</title><style>{STYLE}</style></head>
<body>
<h1>Score report</h1>
<p>Metric versions: {versions}. The numbers are those of scores.json (embedded in this page as JSON).</p>
<h2>Metrics</h2>
<p>mean ± std over every scored image; std is the population std (ddof=0, as scores.csv); 95 % CI of the mean
by the normal approximation mean ± 1.96·std/√n (— below 2 images).</p>
{_metrics_table(report, derived)}
{win}
<h2>Gallery</h2>
<p>{note}</p>
<div id="controls"><label>sort by <select id="sort"><option value="">prompt order</option>{options}</select></label>
<button id="order" type="button" data-descending="1">descending</button>
<label>filter <input id="filter" type="search" placeholder="prompt text"></label> <span id="shown"></span></div>
<div id="gallery">{gallery}</div>
<pre id="selftest-result" hidden></pre>
<script type="application/json" id="report-data">{data}</script>
<script>{SCRIPT}</script>
</body></html>
""".encode("ascii", "xmlcharrefreplace").decode("ascii")   # ASCII whatever the locale (the JSON is ASCII already)


def write_html_report(path, report, captions, size=THUMBNAIL_SIZE):
    """Thumbnail every scored image of `report` (scores.json's object), render the page and
    write it to `path` atomically (rpo/io.py)."""
    thumbnails = {}
    for d, entry in enumerate(report["dirs"]):
        for rel in entry["scores"]:
            try:
                thumbnails[(d, rel)] = thumbnail_uri(os.path.join(entry["dir"], rel), size)
            except OSError:   # changed on disk since it was scored: a placeholder, not a failed report
                pass
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text(path, render_html(report, captions, thumbnails))
