"""Tiny stand-ins for Pick-a-Pic and the HPDv2 benchmark, in the real on-disk layouts, so
`tools.pickapic --dataset OUT` and `tools.hpdv2_benchmark --repo OUT` run the real code.

    python -m rpo.tiny pickapic OUT   # OUT/data/<split>-NNNNN-of-NNNNN.parquet (train: 2 shards, test, test_unique)
    python -m rpo.tiny hpdv2 OUT      # OUT/benchmark/<style>.json + OUT/benchmark/benchmark_imgs/<model>.tar.gz

Pick-a-Pic rows hold the real columns (caption, jpg_0/jpg_1 JPEG bytes, image_0_uid/
image_1_uid, label_0/label_1, best_image_uid, ...), with repeated captions, ties
(0.5/0.5), and images that appear in more than one row (as in the real data, where one
generated image is compared several times). The HPDv2 layout is described in
`rpo/data/hpdv2.py`. Same seed, same bytes.
"""
import gzip
import io
import json
import os
import random
import tarfile
import uuid

from rpo.tiny.pipelines import CAPTIONS, random_image

PICKAPIC_SPLITS = {"train": (2, 8), "test": (1, 6), "test_unique": (1, 4)}  # split -> (shards, rows per shard)
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
HPDV2_MODELS = ("CM", "sdv1", "sdv2")  # three of the benchmark's 22 model names
LABELS = ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5))


def jpeg_bytes(rng, size=None):
    width, height = size or rng.choice([(48, 48), (64, 48), (48, 64), (56, 56)])
    buffer = io.BytesIO()
    random_image(rng, width, height).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def pickapic_rows(rng, count, captions):
    rows, seen = [], {}  # caption -> [(uid, bytes)] images already generated for it
    for i in range(count):
        caption = rng.choice(captions)
        images = []
        for side in range(2):
            if side == 0 and i % 3 == 2 and seen.get(caption):
                images.append(rng.choice(seen[caption]))  # the same image compared again
            else:
                image = (str(uuid.UUID(int=rng.getrandbits(128), version=4)), jpeg_bytes(rng))
                seen.setdefault(caption, []).append(image)
                images.append(image)
        label_0, label_1 = LABELS[rng.randrange(3)]
        best = images[0][0] if label_0 > label_1 else images[1][0] if label_1 > label_0 else ""
        rows.append({
            "are_different": True, "best_image_uid": best, "caption": caption, "has_label": True,
            "image_0_uid": images[0][0], "image_1_uid": images[1][0], "jpg_0": images[0][1], "jpg_1": images[1][1],
            "label_0": label_0, "label_1": label_1, "model_0": "tiny-sd", "model_1": "tiny-sdxl",
            "ranking_id": rng.randrange(10**6), "user_id": rng.randrange(10**4), "num_example_per_prompt": 1,
        })
    return rows


def write_tiny_pickapic(out, seed=0):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    for split, (shards, per_shard) in PICKAPIC_SPLITS.items():
        if split == "test_unique":
            captions = rng.sample(CAPTIONS, per_shard)
            rows = [pickapic_rows(rng, 1, [caption])[0] for caption in captions]  # one row per caption
        else:
            rows = pickapic_rows(rng, shards * per_shard, rng.sample(CAPTIONS, 5))
        for s in range(shards):
            table = pa.Table.from_pylist(rows[s * per_shard:(s + 1) * per_shard])
            pq.write_table(table, os.path.join(out, "data", f"{split}-{s:05d}-of-{shards:05d}.parquet"))


def _add(tar, name, data=None):
    info = tarfile.TarInfo(name)
    info.mtime = 0
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))


def write_tiny_hpdv2(out, seed=0, prompts_per_style=4):
    rng = random.Random(seed)
    bench = os.path.join(out, "benchmark")
    os.makedirs(os.path.join(bench, "benchmark_imgs"), exist_ok=True)
    prompts = {}
    for style in HPDV2_STYLES:
        prompts[style] = [f"{caption}, {style}" for caption in rng.sample(CAPTIONS, prompts_per_style - 1)]
        prompts[style].append(prompts[style][0])  # the real lists hold duplicates too
        with open(os.path.join(bench, f"{style}.json"), "w") as f:
            json.dump(prompts[style], f, indent=1)
    for model in HPDV2_MODELS:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, model)
            for style in HPDV2_STYLES:
                _add(tar, f"{model}/{style}")
                for index in range(len(prompts[style])):
                    _add(tar, f"{model}/{style}/{index:05d}.jpg", jpeg_bytes(rng, (48, 48)))
        with open(os.path.join(bench, "benchmark_imgs", f"{model}.tar.gz"), "wb") as f:
            with gzip.GzipFile(filename="", fileobj=f, mode="wb", mtime=0) as gz:  # fixed header: same seed, same bytes
                gz.write(buffer.getvalue())


def write_tiny_pairs(out, seed=0, count=6):
    """Preference pairs in `tools.pickapic --mode pairs`'s layout (rpo/data/preference.py):
    `OUT/<i>/caption.txt`, `win.png`, `lose.png` (the two of a pair the same size)."""
    rng = random.Random(seed + 7)
    digits = len(str(count - 1))
    for i in range(count):
        folder = os.path.join(out, f"{i:0{digits}d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "caption.txt"), "w") as f:
            f.write(CAPTIONS[i % len(CAPTIONS)] + "\n")
        width, height = rng.choice([(64, 64), (96, 64), (64, 80)])
        for side in ("win", "lose"):
            random_image(rng, width, height).save(os.path.join(folder, f"{side}.png"))


def write_tiny_labels(out, seed=0, count=8):
    """Labelled images in `tools.pickapic --mode labels`'s layout: `OUT/<i>/caption.txt`,
    `<i>.png`, `label.txt` (desirable / undesirable, alternating from item 0)."""
    rng = random.Random(seed + 11)
    digits = len(str(count - 1))
    for i in range(count):
        folder = os.path.join(out, f"{i:0{digits}d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "caption.txt"), "w") as f:
            f.write(CAPTIONS[i % len(CAPTIONS)] + "\n")
        with open(os.path.join(folder, "label.txt"), "w") as f:
            f.write("desirable\n" if i % 2 == 0 else "undesirable\n")
        width, height = rng.choice([(64, 64), (96, 64), (64, 80)])
        random_image(rng, width, height).save(os.path.join(folder, f"{i:0{digits}d}.png"))
