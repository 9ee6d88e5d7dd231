"""Tables of scores: per folder and metric the mean ± std over images (as the paper's
Tables 3/4; std with ddof=0, over every scored image), and the paper's win rate.

Win rate of folder A over a base folder B on a metric: for each prompt both folders hold
(matched by prompt folder name), take on each side the image with the median PickScore
(of 5 images, the 3rd by PickScore; of an even count, the lower median), and count a win
when A's image scores higher on the metric, half a win on a tie; the rate is the share of
prompts won. `win_rate_bootstrap` counts the ties apart and adds a bootstrap interval.
"""
import csv
import io
import math

import numpy as np


def summarize(values):
    if not values:
        return {"mean": math.nan, "std": math.nan, "count": 0}
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "count": len(values)}


def median_image(images, pickscores):
    """The image with the median PickScore among `images` that have one (ties by path)."""
    ranked = sorted((pickscores[path], path) for path in images if path in pickscores)
    return ranked[(len(ranked) - 1) // 2][1] if ranked else None


def win_pairs(prompts, base_prompts, scores, base_scores):
    """[(prompt name, our image, base image)]: the median-PickScore images the win rate
    compares, for each prompt both folders hold and both sides have a scored image."""
    pairs = []
    for name in sorted(set(prompts) & set(base_prompts)):
        ours = median_image(prompts[name], scores["pickscore"])
        theirs = median_image(base_prompts[name], base_scores["pickscore"])
        if ours is not None and theirs is not None:
            pairs.append((name, ours, theirs))
    return pairs


def win_rate(prompts, base_prompts, scores, base_scores, metrics):
    """`prompts`/`base_prompts`: {prompt name: [image paths]}; `scores`/`base_scores`:
    {metric: {image path: score}}. Returns ({metric: rate}, number of prompts compared)."""
    pairs = win_pairs(prompts, base_prompts, scores, base_scores)
    wins = {m: 0.0 for m in metrics}
    for _, ours, theirs in pairs:
        for m in metrics:
            a, b = scores[m][ours], base_scores[m][theirs]
            wins[m] += 1.0 if a > b else 0.5 if a == b else 0.0
    compared = len(pairs)
    return {m: wins[m] / compared if compared else math.nan for m in metrics}, compared


def win_rate_bootstrap(prompts, base_prompts, scores, base_scores, metrics, resamples=1000, seed=0):
    """The win rate's wins, ties and losses counted apart, and a 95 % percentile bootstrap
    interval of the win rate (ties half a win, as `win_rate`): prompts are resampled with
    replacement `resamples` times (one draw of prompt indices from numpy's
    `default_rng(seed)`, shared by all metrics, so the intervals are paired and fixed for
    a given input). Arguments as `win_rate`. Returns {metric: {'wins', 'ties', 'losses':
    prompt counts, 'ci95': [low, high] or None when no prompt was compared}}."""
    pairs = win_pairs(prompts, base_prompts, scores, base_scores)
    n = len(pairs)
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n)) if n else None
    result = {}
    for m in metrics:
        points = np.array([1.0 if scores[m][a] > base_scores[m][b] else 0.5 if scores[m][a] == base_scores[m][b]
                           else 0.0 for _, a, b in pairs])
        interval = None
        if n:
            low, high = np.quantile(points[indices].mean(axis=1), [0.025, 0.975])
            interval = [float(low), float(high)]
        result[m] = {"wins": int((points == 1.0).sum()), "ties": int((points == 0.5).sum()),
                     "losses": int((points == 0.0).sum()), "ci95": interval}
    return result


def format_table(header, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(w) if i == 0 else str(cell).rjust(w) for i, (cell, w) in
                       enumerate(zip(line, widths))) for line in [header, *rows]]
    return "\n".join(lines)


def scores_table(summaries, metrics):
    """summaries: [{'dir', 'images', 'failed', 'metrics': {m: summary}}] -> printable table."""
    header = ["dir", "images", "failed"] + list(metrics)
    rows = [[s["dir"], s["images"], s["failed"]] +
            [f"{s['metrics'][m]['mean']:.4f} ± {s['metrics'][m]['std']:.4f}" for m in metrics] for s in summaries]
    return format_table(header, rows)


def win_rate_table(comparisons, base, metrics):
    header = [f"win rate vs {base}", "prompts"] + list(metrics)
    rows = [[c["dir"], c["prompts"]] + [f"{100 * c['win_rate'][m]:.1f}%" for m in metrics] for c in comparisons]
    return format_table(header, rows)


def scores_csv(summaries, metrics, versions):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["dir", "metric", "version", "mean", "std", "count", "images", "failed"])
    for s in summaries:
        for m in metrics:
            summary = s["metrics"][m]
            writer.writerow([s["dir"], m, versions[m], repr(summary["mean"]), repr(summary["std"]), summary["count"],
                             s["images"], s["failed"]])
    return out.getvalue()


def win_rate_csv(comparisons, metrics):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["dir", "prompts"] + list(metrics))
    for c in comparisons:
        writer.writerow([c["dir"], c["prompts"]] + [repr(c["win_rate"][m]) for m in metrics])
    return out.getvalue()
