"""score.py --method ... --report FILE.html: the comparison of several methods on one
self-contained page (docs/design.md, "Comparing methods").

The page shows, from comparison.json's object (embedded verbatim in
`<script type="application/json" id="comparison-data">` under "comparison"):
- Table 3 (`#table3`): methods × (metric, benchmark), mean ± std, the best of each column in bold;
- Table 1 (`#table1`): the reference method's win rate against each other method per metric
  and benchmark, its bootstrap 95 % interval and wins/ties/losses;
- inline SVG charts drawn here (no script, no network): per metric the means with their
  95 % intervals (one dot and whisker per method and benchmark), per metric the win rates
  with their bootstrap intervals around the 50 % line, and each logdir's training curves
  (one chart per logged statistic, one line per method);
- a gallery of any two methods side by side on one benchmark, chosen on the page (a few
  lines of JavaScript draw it from the embedded data; thumbnails are JPEG data URIs, as
  in rpo/scores/html_report.py), the median-PickScore images (those Table 1 compares) outlined.

`?selftest=1&a=NAME&b=NAME&bench=BENCH` makes the page choose those, draw the gallery, wait
for its images and write what it shows into `#selftest-result` (the headless-browser test).
"""
import html
import json
import os

from rpo.io import write_text
from rpo.scores.html_report import STYLE as REPORT_STYLE, fmt, fmt_interval, fmt_rate, fmt_rate_interval, thumbnail_uri
from rpo.scores.report import format_table

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")
E = html.escape


def comparison_tables(comparison):
    """Both tables as text, for the terminal."""
    metrics, benches = list(comparison["metrics"]), comparison["benchmarks"]
    cells = {(r["method"], r["benchmark"], r["metric"]): r for r in comparison["table3"]}
    header = ["method"] + [f"{m} {b}" for m in metrics for b in benches]
    def cell(r):
        return "—" if r["mean"] is None else ("*" if r["best"] else "") + f"{fmt(r['mean'])} ± {fmt(r['std'])}"

    rows = [[method["name"]] + [cell(cells[(method["name"], b, m)]) for m in metrics for b in benches]
            for method in comparison["methods"]]
    wins = {(r["against"], r["benchmark"], r["metric"]): r for r in comparison["table1"]}
    against = [m["name"] for m in comparison["methods"] if m["name"] != comparison["reference"]]
    win_rows = [[name] + [fmt_rate(wins[(name, b, m)]["win_rate"]) if (name, b, m) in wins else "—"
                          for m in metrics for b in benches] for name in against]
    return (format_table(header, rows) + "\n(* best of the column)\n\n"
            + format_table([f"{comparison['reference']} wins vs"] + header[1:], win_rows))


# ---- tables -----------------------------------------------------------------------------

def _head(corner, metrics, benches):
    """Two header rows: `corner` (spanning both), then one column per metric × benchmark."""
    return (f'<thead><tr><th rowspan="2">{E(corner)}</th>'
            + "".join(f'<th colspan="{len(benches)}">{E(m)}</th>' for m in metrics) + "</tr><tr>"
            + "".join(f"<th>{E(b)}</th>" for _ in metrics for b in benches) + "</tr></thead>")


def table3_html(comparison):
    metrics, benches = list(comparison["metrics"]), comparison["benchmarks"]
    cells = {(r["method"], r["benchmark"], r["metric"]): r for r in comparison["table3"]}
    body = []
    for method in comparison["methods"]:
        tds = []
        for m in metrics:
            for b in benches:
                r = cells[(method["name"], b, m)]
                text = (f'<span class="mean">{fmt(r["mean"])}</span> ± <span class="std">{fmt(r["std"])}</span>'
                        if r["mean"] is not None else '<span class="mean">—</span>')
                best = ' class="cell best"' if r["best"] else ' class="cell"'
                tds.append(f'<td{best} data-method="{E(method["name"])}" data-benchmark="{E(b)}" data-metric="{E(m)}">'
                           f'{"<strong>" + text + "</strong>" if r["best"] else text}</td>')
        body.append(f'<tr><td class="name">{E(method["name"])}</td>{"".join(tds)}</tr>')
    return f'<table id="table3" class="grid">{_head("method", metrics, benches)}<tbody>{"".join(body)}</tbody></table>'


def table1_html(comparison):
    metrics, benches = list(comparison["metrics"]), comparison["benchmarks"]
    rows = {(r["against"], r["benchmark"], r["metric"]): r for r in comparison["table1"]}
    body = []
    for method in comparison["methods"]:
        if method["name"] == comparison["reference"]:
            continue
        tds = []
        for m in metrics:
            for b in benches:
                r = rows.get((method["name"], b, m))
                if r is None:
                    tds.append(f'<td class="cell" data-against="{E(method["name"])}" data-benchmark="{E(b)}" '
                               f'data-metric="{E(m)}">—</td>')
                    continue
                tds.append(f'<td class="cell" data-against="{E(method["name"])}" data-benchmark="{E(b)}" data-metric="{E(m)}">'
                           f'<span class="rate">{fmt_rate(r["win_rate"])}</span><br>'
                           f'<span class="ci">{fmt_rate_interval(r["ci95"])}</span><br>'
                           f'<span class="wtl">{r["wins"]}/{r["ties"]}/{r["losses"]}</span> of '
                           f'<span class="prompts">{r["prompts"]}</span></td>')
        body.append(f'<tr><td class="name">{E(method["name"])}</td>{"".join(tds)}</tr>')
    head = _head(f'{comparison["reference"]} against', metrics, benches)
    return f'<table id="table1" class="grid">{head}<tbody>{"".join(body)}</tbody></table>'


# ---- charts (inline SVG) ----------------------------------------------------------------

def _scale(low, high, top, bottom):
    """y(value) mapping [low, high] onto [bottom, top] pixels (a flat range gets a margin)."""
    if high <= low:
        low, high = low - 1, high + 1
    pad = (high - low) * 0.08
    low, high = low - pad, high + pad
    return (lambda v: bottom - (v - low) / (high - low) * (bottom - top)), low, high


def means_chart(comparison, metric):
    """Dots (mean) and whiskers (95 % CI of the mean) per benchmark and method."""
    rows = [r for r in comparison["table3"] if r["metric"] == metric and r["mean"] is not None]
    if not rows:
        return ""
    names = [m["name"] for m in comparison["methods"]]
    benches = comparison["benchmarks"]
    values = [v for r in rows for v in ([r["mean"]] + (r["ci95"] or []))]
    width, height, left, top, bottom = 120 + 110 * len(benches), 220, 70, 20, 180
    y, low, high = _scale(min(values), max(values), top, bottom)
    parts = [f'<line x1="{left}" y1="{bottom}" x2="{width - 10}" y2="{bottom}" stroke="#999"/>',
             f'<text x="{left - 6}" y="{bottom}" text-anchor="end" font-size="10">{low:.4g}</text>',
             f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" font-size="10">{high:.4g}</text>']
    group = (width - left - 10) / len(benches)
    for j, b in enumerate(benches):
        parts.append(f'<text x="{left + group * (j + 0.5):.1f}" y="{bottom + 16}" text-anchor="middle" '
                     f'font-size="11">{E(b)}</text>')
        for r in (r for r in rows if r["benchmark"] == b):
            i = names.index(r["method"])
            x = left + group * j + group * (i + 1) / (len(names) + 1)
            low_v, high_v = r["ci95"] or (r["mean"], r["mean"])
            parts.append(f'<g class="point" data-method="{E(r["method"])}" data-benchmark="{E(b)}" '
                         f'data-mean="{r["mean"]!r}" fill="{COLORS[i % len(COLORS)]}" stroke="{COLORS[i % len(COLORS)]}">'
                         f'<title>{E(r["method"])}, {E(b)}: {fmt(r["mean"])} {fmt_interval(r["ci95"])}</title>'
                         f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y(low_v):.1f}" y2="{y(high_v):.1f}"/>'
                         f'<circle cx="{x:.1f}" cy="{y(r["mean"]):.1f}" r="4"/></g>')
    return (f'<figure class="chart" data-chart="means" data-metric="{E(metric)}"><figcaption>{E(metric)}: mean and '
            f'95 % CI</figcaption><svg width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{"".join(parts)}</svg></figure>')


def win_chart(comparison, metric):
    """Horizontal bars: the reference's win rate per opponent and benchmark, bootstrap whiskers, 50 % line."""
    rows = [r for r in comparison["table1"] if r["metric"] == metric and r["win_rate"] is not None]
    if not rows:
        return ""
    label_width, bar_width, line = 220, 300, 18
    height = 32 + line * len(rows)
    x = lambda rate: label_width + rate * bar_width  # noqa: E731
    parts = [f'<line x1="{x(0.5)}" y1="5" x2="{x(0.5)}" y2="{height - 17}" stroke="#999" stroke-dasharray="3,3"/>']
    parts += [f'<text x="{x(tick)}" y="{height - 4}" text-anchor="middle" font-size="10">{100 * tick:.0f} %</text>'
              for tick in (0.0, 0.5, 1.0)]
    for k, r in enumerate(rows):
        y0 = 10 + line * k
        i = [m["name"] for m in comparison["methods"]].index(r["against"])
        whisker = ""
        if r["ci95"]:
            whisker = (f'<line x1="{x(r["ci95"][0]):.1f}" x2="{x(r["ci95"][1]):.1f}" y1="{y0 + 6}" y2="{y0 + 6}" '
                       f'stroke="#000"/>')
        parts.append(f'<g class="bar" data-against="{E(r["against"])}" data-benchmark="{E(r["benchmark"])}" '
                     f'data-rate="{r["win_rate"]!r}"><title>vs {E(r["against"])}, {E(r["benchmark"])}: '
                     f'{fmt_rate(r["win_rate"])} {fmt_rate_interval(r["ci95"])}</title>'
                     f'<text x="{label_width - 6}" y="{y0 + 10}" text-anchor="end" font-size="11">vs {E(r["against"])} '
                     f'({E(r["benchmark"])})</text><rect x="{label_width}" y="{y0}" width="{r["win_rate"] * bar_width:.1f}" '
                     f'height="12" fill="{COLORS[i % len(COLORS)]}"/>{whisker}</g>')
    width = label_width + bar_width + 20
    return (f'<figure class="chart" data-chart="winrate" data-metric="{E(metric)}"><figcaption>{E(metric)}: win rate of '
            f'{E(comparison["reference"])} (dashed: 50 %)</figcaption><svg '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">{"".join(parts)}</svg></figure>')


def curve_chart(comparison, kind, key):
    """One statistic of the training histories, one line per method that logged it."""
    lines = [(m["name"], comparison["curves"][m["name"]][kind][key]) for m in comparison["methods"]
             if m["name"] in comparison["curves"] and key in comparison["curves"][m["name"]][kind]]
    steps = [s for _, (xs, _) in lines for s in xs]
    values = [v for _, (_, vs) in lines for v in vs]
    width, height, left, top, bottom, right = 360, 200, 60, 15, 170, 350
    y, low, high = _scale(min(values), max(values), top, bottom)
    first, last = min(steps), max(steps)
    x = lambda s: left + (s - first) / ((last - first) or 1) * (right - left)  # noqa: E731
    names = [m["name"] for m in comparison["methods"]]
    parts = [f'<text x="{left - 4}" y="{bottom}" text-anchor="end" font-size="10">{low:.4g}</text>',
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" font-size="10">{high:.4g}</text>',
             f'<text x="{left}" y="{bottom + 15}" font-size="10">{first}</text>',
             f'<text x="{right}" y="{bottom + 15}" text-anchor="end" font-size="10">{last}</text>']
    for name, (xs, vs) in lines:
        color = COLORS[names.index(name) % len(COLORS)]
        points = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(xs, vs))
        dots = "".join(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5" fill="{color}"/>'
                       for s, v in zip(xs, vs)) if len(xs) <= 50 else ""   # a lone point shows too
        parts.append(f'<g data-method="{E(name)}"><title>{E(name)}</title><polyline class="curve" points="{points}" '
                     f'fill="none" stroke="{color}"/>{dots}</g>')
    return (f'<figure class="chart" data-chart="curve" data-kind="{kind}" data-key="{E(key)}"><figcaption>{E(key)} '
            f'({"per update" if kind == "train" else "validation"})</figcaption><svg '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">{"".join(parts)}</svg></figure>')


def curves_html(comparison):
    charts = []
    for kind in ("train", "validation"):
        keys = list(dict.fromkeys(k for c in comparison["curves"].values() for k in c[kind]))
        charts += [curve_chart(comparison, kind, key) for key in keys]
    return "".join(charts)


def legend(comparison):
    return "".join(f'<span class="swatch" style="background:{COLORS[i % len(COLORS)]}"></span>{E(m["name"])} '
                   for i, m in enumerate(comparison["methods"]))


# ---- the page ---------------------------------------------------------------------------

STYLE = REPORT_STYLE + """
table.grid th,table.grid td.cell{text-align:center}table.grid td.best{background:#eaf6ea}
.chart{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}.chart figcaption{font-size:12px}
.swatch{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
.pair{margin:1em 0;padding:.5em;border:1px solid #ccc;border-radius:4px}.pair h3{margin:.2em 0;font-size:14px}
.pair .row{display:flex;gap:6px;align-items:flex-start}.pair .who{width:120px;font-weight:bold}
.pair figure.median img{outline:3px solid #2a7;outline-offset:-3px}
"""

SCRIPT = r"""
(function () {
  const DATA = JSON.parse(document.getElementById("comparison-data").textContent);
  const C = DATA.comparison, THUMBS = DATA.thumbnails;
  const a = document.getElementById("gallery-a"), b = document.getElementById("gallery-b");
  const bench = document.getElementById("gallery-bench"), gallery = document.getElementById("gallery");
  function fmt(v) { return v === null || v === undefined ? "\u2014" : v.toFixed(4); }
  function column(card, name) {
    const row = document.createElement("div");
    row.className = "row";
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = name;
    row.appendChild(who);
    (card.images[name] || []).forEach(function (image) {
      const fig = document.createElement("figure");
      fig.className = image.median ? "median" : "";
      const uri = THUMBS[name + "\t" + bench.value + "\t" + image.path];
      if (uri && image.scores) {
        const img = document.createElement("img");
        img.src = uri;
        img.alt = image.path;
        img.dataset.method = name;
        img.dataset.path = image.path;
        fig.appendChild(img);
      } else {
        const missing = document.createElement("div");
        missing.className = "missing";
        missing.textContent = "unreadable: " + image.path;
        fig.appendChild(missing);
      }
      const cap = document.createElement("figcaption");
      cap.textContent = image.path + (image.scores ? " pickscore " + fmt(image.scores.pickscore) : "");
      fig.appendChild(cap);
      row.appendChild(fig);
    });
    return row;
  }
  function draw() {
    gallery.textContent = "";
    (C.gallery[bench.value] || []).forEach(function (card) {
      if (!card.images[a.value] && !card.images[b.value]) return;
      const section = document.createElement("section");
      section.className = "pair";
      section.dataset.prompt = card.prompt;
      const h = document.createElement("h3");
      h.textContent = card.prompt + ": " + card.caption;
      section.appendChild(h);
      section.appendChild(column(card, a.value));
      section.appendChild(column(card, b.value));
      gallery.appendChild(section);
    });
  }
  [a, b, bench].forEach(function (el) { el.addEventListener("change", draw); });
  draw();
  const params = new URLSearchParams(location.search);
  if (params.get("selftest") !== "1") return;
  window.addEventListener("load", function () {
    ["a", "b", "bench"].forEach(function (k) {
      if (params.get(k) !== null) document.getElementById("gallery-" + k).value = params.get(k);
    });
    draw();
    const imgs = Array.from(gallery.querySelectorAll("img"));
    Promise.all(imgs.map(function (img) { return img.decode().then(function () { return true; }, function () { return false; }); }))
      .then(function (decoded) {
        const result = {
          a: a.value, b: b.value, bench: bench.value,
          cards: Array.from(gallery.children).map(function (s) {
            return {prompt: s.dataset.prompt, rows: Array.from(s.querySelectorAll(".row")).map(function (r) {
              return {who: r.querySelector(".who").textContent,
                      paths: Array.from(r.querySelectorAll("figcaption")).map(function (f) { return f.textContent; }),
                      median: Array.from(r.querySelectorAll("figure")).map(function (f) { return f.className === "median"; })};
            })};
          }),
          images: imgs.map(function (img, i) {
            return {method: img.dataset.method, path: img.dataset.path, decoded: decoded[i], width: img.naturalWidth};
          }),
          done: true};
        document.getElementById("selftest-result").textContent = JSON.stringify(result);
      });
  });
})();
"""


def _select(id, names, chosen):
    options = "".join(f'<option value="{E(n)}"{" selected" if n == chosen else ""}>{E(n)}</option>' for n in names)
    return f'<select id="{id}">{options}</select>'


def render_comparison(comparison, thumbnails):
    """The page. `thumbnails`: {"method\\tbenchmark\\trelpath": data URI}."""
    metrics = list(comparison["metrics"])
    names = [m["name"] for m in comparison["methods"]]
    other = next(n for n in names if n != comparison["reference"])
    data = json.dumps({"comparison": comparison, "thumbnails": thumbnails}).replace("<", "\\u003c")
    methods = "".join(f'<li><b>{E(m["name"])}</b>: ' + ", ".join(f"{E(b)} {E(d)}" for b, d in m["dirs"].items())
                      + (f'; logdir {E(m["logdir"])}' if m["logdir"] else "") + "</li>" for m in comparison["methods"])
    boot = comparison["bootstrap"]
    curves = curves_html(comparison)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>rpo comparison</title><style>{STYLE}</style></head>
<body>
<h1>Comparison of {len(names)} methods</h1>
<p>Metric versions: {", ".join(f"{E(m)} {E(str(v))}" for m, v in comparison["metrics"].items())}. Every number is
comparison.json's (embedded in this page).</p>
<ul>{methods}</ul>
<h2>Scores (the paper's Table 3 layout)</h2>
<p>mean ± std (ddof=0) over every scored image; bold: the best mean of the column.</p>
{table3_html(comparison)}
<h2>Win rates of {E(comparison["reference"])} (the paper's Table 1 layout)</h2>
<p>Per prompt, each side's median-PickScore image; a win when {E(comparison["reference"])}'s scores higher, half a win
on a tie. Second line: percentile bootstrap 95 % interval over prompts ({boot["resamples"]} resamples, seed
{boot["seed"]}); third: wins/ties/losses of the prompts compared.</p>
{table1_html(comparison)}
<h2>Charts</h2>
<p>{legend(comparison)}</p>
{"".join(means_chart(comparison, m) for m in metrics)}
<div>{"".join(win_chart(comparison, m) for m in metrics)}</div>
{"<h2>Training curves</h2>" + curves if curves else ""}
<h2>Gallery</h2>
<p>Two methods side by side, all images of the first prompts of a benchmark; outlined: the median-PickScore image
the win rate compares.</p>
<div id="controls">{_select("gallery-a", names, comparison["reference"])} against {_select("gallery-b", names, other)}
on {_select("gallery-bench", comparison["benchmarks"], comparison["benchmarks"][0])}</div>
<div id="gallery"></div>
<pre id="selftest-result" hidden></pre>
<script type="application/json" id="comparison-data">{data}</script>
<script>{SCRIPT}</script>
</body></html>
""".encode("ascii", "xmlcharrefreplace").decode("ascii")


def write_comparison_page(path, comparison, methods):
    """Thumbnail the gallery's images, render, write `path` atomically."""
    thumbnails = {}
    folders = {m.name: m.dirs for m in methods}
    for bench, cards in comparison["gallery"].items():
        for card in cards:
            for name, images in card["images"].items():
                for image in images:
                    if image["scores"] is None:
                        continue
                    try:
                        thumbnails[f"{name}\t{bench}\t{image['path']}"] = thumbnail_uri(
                            os.path.join(folders[name][bench], image["path"]))
                    except OSError:   # changed since scored: a placeholder
                        pass
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text(path, render_comparison(comparison, thumbnails))
