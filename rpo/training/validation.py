"""Validation during training: generate the validation prompts with the (EMA) UNet, save
the images and captioned grids under `<logdir>/images/`, log the grid and, with `--score`,
the mean score (the paper's code validates only at checkpoints and only with a score).

Seeds follow the benchmark protocol (seed + prompt index + k * number of prompts, one
generator per image), so the images at every validation are comparable across steps and
independent of the number of processes, which split the work.

A validation killed half-way leaves `images/step-N/` partial. Its `validation.json` records
the settings and a fingerprint of the weights the images were made with; a later
validation of the same step with the same fingerprint makes only the missing images
(`rpo.generate.plan` lists only those), any difference makes them all again.
"""
import hashlib
import json
import os
import shutil
import textwrap
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from rpo.cli import UserError
from rpo.generate import Job, image_seed, make_scheduler, plan, prompt_folder, run_jobs, write_captions
from rpo.io import write_text
from rpo.scores import METRICS

SCORE_CHOICES = METRICS
FINGERPRINT = "validation.json"
TILES_PER_PAGE = 16
BACKGROUND = (236, 236, 236)  # neutral grey behind the captions and where a short last row has no tile
TEXT = (20, 20, 20)
TILE_RESAMPLE = Image.Resampling.LANCZOS


@dataclass(frozen=True)
class ValidationSettings:
    scheduler: str            # a stock sampler name (rpo.generate.SCHEDULERS)
    num_inference_steps: int
    guidance_scale: float
    resolution: int
    seed: int                 # base seed of the benchmark protocol
    images_per_prompt: int
    batch_size: int           # images per pipeline call and per scoring batch


def weights_fingerprint(module):
    """A hash of the exact bits of every parameter and buffer of `module`.

    Integer sums of the bit patterns are exact, so the same weights give the same hash on
    any device and thread count (a float sum would depend on the reduction order); the
    position weights make a permutation of values count as a change.
    """
    h = hashlib.sha256()
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        t = t.detach().contiguous().reshape(-1)
        bits = t.view(ints[t.element_size()]).to(torch.int64)
        position = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{int(bits.sum())}:{int((bits * position).sum())};".encode())
    return h.hexdigest()


def trackers_of(report_to):
    """`--report_to` as accelerate's `log_with` wants it: None, 'all' or a list of names.

    A name accelerate does not know, or whose package is not installed, is refused here, at
    start-up (accelerate would fail at `init_trackers`, after the models loaded).
    """
    names = [n.strip().lower() for n in str(report_to if report_to is not None else "none").split(",") if n.strip()]
    if not names or names == ["none"]:
        return None
    if names == ["all"]:
        return "all"
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UserError(f"--report_to: unknown tracker {name!r}; use one or more of {sorted(LOGGER_TYPE_TO_CLASS)} "
                            "(comma-separated), 'all' or 'none'")
        if name not in available:
            raise UserError(f"--report_to {name}: the {name} package is not installed (pip install {name}), "
                            "or pass --report_to none / tensorboard")
    return names


# --------------------------------------------------------------------------- grids
@dataclass(frozen=True)
class Tile:
    index: int                # which image (position in the list given to grid_layout)
    box: tuple                # (left, top, width, height) of the image in the page
    lines: tuple              # caption lines, wrapped and truncated, then the seed line
    text_xy: tuple            # where the first line starts


@dataclass(frozen=True)
class Page:
    size: tuple               # (width, height)
    title: str
    title_xy: tuple
    tiles: tuple = field(default_factory=tuple)


def font():
    return ImageFont.load_default()


def tile_side(side):
    """Tiles are at least 192 px wide (tiny kit images are 32 px: captions need room) and at
    most 512 (an SDXL page of 16 tiles stays ~2k px wide)."""
    return min(max(side, 192), 512)


def grid_layout(n, image_size, captions, seeds, *, title, per_page=TILES_PER_PAGE, caption_lines=3):
    """The pages of a grid of `n` images of `image_size` (w, h), a pure function.

    Tile i shows image i resized to the tile size, its caption (wrapped, at most
    `caption_lines` lines, the last cut with '...') and 'seed S' under it. Every page but the
    last holds `per_page` tiles in a near-square grid; rows fill left to right, so only the
    last row of a page is short, and no filler tile is drawn.
    """
    f = font()
    w, h = image_size
    tw = tile_side(w)
    th = round(h * tw / w)
    char_w = max(1.0, f.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
    line_h = int(sum(f.getbbox("Ag")[1::2]) + 4)
    chars = max(4, int((tw - 8) / char_w))
    pad, title_h = 6, line_h + 2 * 6
    cell_h = th + pad + (caption_lines + 1) * line_h + pad
    cols = int(np.ceil(np.sqrt(min(n, per_page))))
    pages = []
    starts = list(range(0, n, per_page))
    for number, start in enumerate(starts, 1):
        count = min(per_page, n - start)
        rows = int(np.ceil(count / cols))
        size = (cols * (tw + pad) + pad, title_h + rows * cell_h)
        tiles = []
        for j in range(count):
            i = start + j
            x, y = pad + (j % cols) * (tw + pad), title_h + (j // cols) * cell_h
            lines = textwrap.wrap(captions[i], width=chars) or [""]
            if len(lines) > caption_lines:
                lines = lines[:caption_lines]
                lines[-1] = lines[-1][:chars - 3].rstrip() + "..."
            tiles.append(Tile(index=i, box=(x, y, tw, th), lines=tuple(lines) + (f"seed {seeds[i]}",),
                              text_xy=(x, y + th + pad)))
        page_title = title if len(starts) == 1 else f"{title} (page {number}/{len(starts)})"
        pages.append(Page(size=size, title=page_title, title_xy=(pad, pad), tiles=tuple(tiles)))
    return pages


def render_page(page, images):
    """Draw `page` (from grid_layout) with `images` (PIL, indexed as the layout's tiles)."""
    f = font()
    canvas = Image.new("RGB", page.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text(page.title_xy, page.title, fill=TEXT, font=f)
    line_h = int(sum(f.getbbox("Ag")[1::2]) + 4)
    for tile in page.tiles:
        x, y, w, h = tile.box
        image = images[tile.index].convert("RGB")
        canvas.paste(image if image.size == (w, h) else image.resize((w, h), TILE_RESAMPLE), (x, y))
        for k, line in enumerate(tile.lines):
            draw.text((tile.text_xy[0], tile.text_xy[1] + k * line_h), line, fill=TEXT, font=f)
    return canvas


def grid_pages(paths, captions, seeds, title, per_page=TILES_PER_PAGE):
    images = [Image.open(path).convert("RGB") for path in paths]
    layout = grid_layout(len(images), images[0].size, captions, seeds, title=title, per_page=per_page)
    return [render_page(page, images) for page in layout]


def page_names(step, count):
    """`step-N.png` is the first (or only) page, as before; `step-N-p2.png`... the others.
    `step-N-p1.png` is the first page again, so pages can be listed by one pattern."""
    names = [[f"step-{step}.png", f"step-{step}-p1.png"]] if count > 1 else [[f"step-{step}.png"]]
    return names + [[f"step-{step}-p{k}.png"] for k in range(2, count + 1)]


# --------------------------------------------------------------------------- the validator
class Validator:
    def __init__(self, *, accelerator, captions, text, vae, family, settings, logdir, scorer=None, score_name=None,
                 on_score=None):
        self.accelerator, self.captions, self.text, self.vae = accelerator, list(captions), text, vae
        self.settings, self.logdir, self.scorer, self.score_name = settings, logdir, scorer, score_name
        self.family = family  # builds the stock pipeline (rpo/families)
        self.scheduler = make_scheduler(settings.scheduler, family.schedule)
        self.on_score = on_score  # called on the main process with (step, {name: value})

    def pipeline(self, model):
        return self.family.validation_pipeline(self.text, self.vae, model, self.scheduler)

    def folder(self, step):
        return os.path.join(self.logdir, "images", f"step-{step}")

    def num_images(self):
        return len(self.captions) * self.settings.images_per_prompt

    def complete(self, step):
        """Every image and the first grid page of `step` exist (the grid is written last)."""
        jobs, _ = plan(self.folder(step), len(self.captions), self.settings.images_per_prompt, self.settings.seed)
        return not jobs and os.path.isfile(os.path.join(self.logdir, "images", f"step-{step}.png"))

    def fingerprint(self, unet):
        captions = hashlib.sha256("\n".join(self.captions).encode()).hexdigest()
        return {"settings": asdict(self.settings), "captions": captions, "weights": weights_fingerprint(unet)}

    @torch.no_grad()
    def run(self, unet, step):
        """Generate (each rank every world-th image), score, log the mean and the grids."""
        s, acc = self.settings, self.accelerator
        out = self.folder(step)
        start = time.perf_counter()
        fingerprint = self.fingerprint(unet)  # every rank: the same weights give the same value
        if acc.is_main_process:
            path = os.path.join(out, FINGERPRINT)
            try:
                with open(path, encoding="utf-8") as f:
                    same = json.load(f) == fingerprint
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:  # other weights, settings or an older layout: no image there can be kept
                shutil.rmtree(out, ignore_errors=True)
                os.makedirs(out, exist_ok=True)
                write_text(path, json.dumps(fingerprint, indent=1) + "\n")  # before any image: a partial folder has one
            write_captions(out, self.captions)
        acc.wait_for_everyone()
        jobs, done = plan(out, len(self.captions), s.images_per_prompt, s.seed)
        if acc.is_main_process:
            tqdm.write(f"validating step {step}: {len(jobs)} images" + (f" ({done} already made)" if done else "") + "...")
        mine = jobs[acc.process_index::acc.num_processes]
        pipe = self.pipeline(unet)
        pipe.set_progress_bar_config(disable=True)
        with acc.autocast():
            run_jobs(pipe, self.captions, mine, s.batch_size, acc.device,
                     num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                     height=s.resolution, width=s.resolution)
        acc.wait_for_everyone()
        everything = self.all_jobs(out)
        logs = {}
        if self.scorer is not None:  # every image, also those an interrupted validation made
            logs[f"metrics/{self.score_name}"] = self.mean_score(everything[acc.process_index::acc.num_processes])
        if acc.is_main_process:
            ordered = sorted(everything, key=lambda j: (j.image_index, j.prompt_index))  # first image of each prompt first
            pages = grid_pages([j.path for j in ordered], [self.captions[j.prompt_index] for j in ordered],
                               [j.seed for j in ordered], title=f"step {step}")
            self.save_pages(step, pages)
            self.log_images(step, pages, [self.captions[j.prompt_index] for j in ordered])
            if logs and self.on_score is not None:
                self.on_score(step, logs)
            seconds = time.perf_counter() - start
            scores = "".join(f", {k} = {v:.4f}" for k, v in logs.items())
            tqdm.write(f"validated step {step}: done in {seconds:.1f} s{scores} -> {out}")
        if logs:
            acc.log(logs, step=step)

    def all_jobs(self, out):
        """Every image of a validation, in (prompt, image) order, as `plan` would list them."""
        n, s = len(self.captions), self.settings
        return [Job(p, k, image_seed(s.seed, p, k, n), os.path.join(prompt_folder(out, p, n), f"{image_seed(s.seed, p, k, n)}.png"))
                for p in range(n) for k in range(s.images_per_prompt)]

    def save_pages(self, step, pages):
        folder = os.path.join(self.logdir, "images")
        keep = set()
        for names, page in zip(page_names(step, len(pages)), pages):
            for name in names:
                page.save(os.path.join(folder, name))
                keep.add(name)
        prefix = f"step-{step}-p"
        for name in os.listdir(folder):  # pages of an earlier validation with more prompts
            if name.startswith(prefix) and name.endswith(".png") and name not in keep:
                os.remove(os.path.join(folder, name))

    def log_images(self, step, pages, captions):
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                for k, page in enumerate(pages, 1):
                    tracker.writer.add_image("validation" if k == 1 else f"validation/p{k}", np.asarray(page), step,
                                             dataformats="HWC")
                tracker.writer.add_text("validation/captions", "\n\n".join(captions), step)
            elif tracker.name == "wandb":
                import wandb
                per = TILES_PER_PAGE
                tracker.log({"validation": [
                    wandb.Image(page, caption=f"step {step} ({k}/{len(pages)}): " + " | ".join(captions[(k - 1) * per:k * per]))
                    for k, page in enumerate(pages, 1)]}, step=step)

    def mean_score(self, mine):
        """Mean score over all ranks' images; the scorer visits the GPU only for this."""
        acc, batch = self.accelerator, self.settings.batch_size
        self.scorer.to(acc.device)
        total = torch.zeros(2, device=acc.device)  # (sum, count) over this rank's images
        for start in range(0, len(mine), batch):
            chunk = mine[start:start + batch]
            scores = self.scorer.score([Image.open(job.path).convert("RGB") for job in chunk],
                                       [self.captions[job.prompt_index] for job in chunk])
            total += torch.stack([scores.float().sum(), torch.tensor(float(len(chunk)))]).to(acc.device)
        self.scorer.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        total = acc.reduce(total, "sum")
        return (total[0] / total[1]).item()


def make_grid(paths, captions=None, seeds=None, title=""):
    """The first page of the captioned grid of the images at `paths` (kept for callers of
    the old uncaptioned helper)."""
    captions = captions if captions is not None else [""] * len(paths)
    seeds = seeds if seeds is not None else list(range(len(paths)))
    return grid_pages(paths, captions, seeds, title)[0]
