"""The HPDv2 benchmark: its prompts and the images many models generated for them.

Layout of the hub dataset (`ymhao/HPDv2`; `zhwang/HPDv2` is the same) and of a local
`--repo` folder (what `python -m rpo.tiny hpdv2` writes):

    benchmark/anime.json  concept-art.json  paintings.json  photo.json
                                     each a JSON list of prompt strings (800, duplicates kept)
    benchmark/benchmark_imgs/<model>.tar.gz
                                     one tarball per model, unpacking to
                                     <model>/<style>/<index:05d>.jpg

where <index> is the prompt's position in <style>.json. This is what the HPSv2 code reads:
`hpsv2.utils.download_benchmark_images` extracts `<model>.tar.gz` into `benchmark_imgs/`
and `hpsv2.evaluation.BenchmarkDataset` opens `benchmark_imgs/<model>/<style>/{idx:05d}.jpg`
for prompt `idx`. Assumptions beyond that code: a tarball without the top `<model>/`
folder (styles at its root) is accepted too, and a missing image only removes that model
from the prompt's candidates. A local folder may also hold the models already unpacked
(`benchmark_imgs/<model>/<style>/...`, as the paper's README's `tar -zxvf` loop leaves them).

Downloads and extractions go under `<cache>/hpdv2_benchmark/<repo>/`; each tarball is
extracted (safely, rpo/data/safe_tar.py) into a temporary folder renamed into place when
complete, so an interrupted run resumes cleanly. A downloaded tarball is deleted once
extracted: the extracted folder is the cache.
"""
import hashlib
import json
import os
import re
import shutil

from rpo.cli import UserError
from rpo.data.safe_tar import safe_extract

STYLES = ("anime", "concept-art", "paintings", "photo")
# The 22 models of the benchmark (the paper's README's download list; hpsv2.utils.model_ab_dict).
MODELS = ("CM", "Cog2", "DALLE-mini", "DALLE", "DF-IF", "DL", "Deliberate", "ED", "FD", "LDM", "Laf", "MM", "OJ",
          "RV", "SDXL-base-0.9", "SDXL-refiner-0.9", "VD", "VQD", "VQGAN", "glide", "sdv1", "sdv2")
IMAGES = "benchmark/benchmark_imgs"


class Benchmark:
    """One HPDv2 source: a local folder, or a hub dataset downloaded into the cache."""

    def __init__(self, repo, cache):
        self.repo = repo
        self.local = os.path.isdir(repo)
        if not self.local and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
            raise UserError(f"--repo folder not found: {repo}")
        if self.local:
            path = os.path.abspath(repo)
            self.tag = f"{os.path.basename(path)}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
            self.root = repo
        else:
            self.tag = repo.replace("/", "--")
            self.root = os.path.join(cache, "hpdv2_benchmark", self.tag, "download")
        self.work = os.path.join(cache, "hpdv2_benchmark", self.tag)

    def _fetch(self, filename):
        """Path of `filename` (relative to the repo root), downloading it if needed."""
        path = os.path.join(self.root, filename)
        if self.local:
            if not os.path.isfile(path):
                raise UserError(f"--repo {self.repo}: missing {filename}")
            return path
        if os.path.isfile(path):
            return path
        from huggingface_hub import hf_hub_download
        try:
            return hf_hub_download(self.repo, filename, repo_type="dataset", local_dir=self.root)
        except OSError as e:  # offline, not found, HTTP errors
            raise UserError(f"--repo {self.repo}: cannot download {filename} ({str(e).splitlines()[0]}); "
                            f"pass --repo PATH to a local copy in the same layout") from None

    def prompts(self, style):
        path = self._fetch(f"benchmark/{style}.json")
        try:
            with open(path, encoding="utf-8") as f:
                prompts = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a JSON list of prompts: {e}") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise UserError(f"{path}: expected a JSON list of prompt strings")
        return prompts

    def models(self):
        if not self.local:
            return list(MODELS)
        folder = os.path.join(self.root, IMAGES)
        names = set()
        if os.path.isdir(folder):
            for entry in os.listdir(folder):
                if entry.endswith(".tar.gz"):
                    names.add(entry[:-len(".tar.gz")])
                elif os.path.isdir(os.path.join(folder, entry)) and not entry.startswith("."):
                    names.add(entry)
        if not names:
            raise UserError(f"--repo {self.repo}: no model images under {IMAGES} (<model>.tar.gz or <model>/)")
        return sorted(names)

    def model_folder(self, model):
        """The folder holding `model`'s images, downloading and extracting once if needed."""
        unpacked = os.path.join(self.root, IMAGES, model)
        if self.local and os.path.isdir(unpacked):
            return unpacked
        extracted = os.path.join(self.work, "images", model)
        if os.path.isdir(extracted):
            return extracted
        tarball = self._fetch(f"{IMAGES}/{model}.tar.gz")
        temp = extracted + ".partial"
        shutil.rmtree(temp, ignore_errors=True)
        safe_extract(tarball, temp)
        os.rename(temp, extracted)
        if not self.local:
            os.remove(tarball)  # the extracted folder is the cache now
        return extracted


def style_folder(model_folder, model, style):
    """`<model_folder>/<style>` or `<model_folder>/<model>/<style>`, whichever exists (else None)."""
    for folder in (os.path.join(model_folder, model, style), os.path.join(model_folder, style)):
        if os.path.isdir(folder):
            return folder
    return None


def image_path(folder, index):
    """The image of prompt `index` in a style folder, or None if that model has none."""
    if folder is None:
        return None
    for ext in (".jpg", ".jpeg", ".png", ".webp"):
        path = os.path.join(folder, f"{index:05d}{ext}")
        if os.path.isfile(path):
            return path
    return None
