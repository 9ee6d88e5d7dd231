"""Deterministic, resumable generation of benchmark images (what inference.py runs).

Layout (docs/upstream.md, "Data layouts"): `<output>/<prompt index, zero-padded>/caption.txt` and one
`<seed>.png` per image, plus `<output>/manifest.json` recording how the images were made.
The seed of image k of prompt p is `seed + p + k * num_prompts` (the paper's protocol),
and every image gets its own generator, so its starting noise (and DDPM's per-step noise)
depends only on that seed: not on the batch it lands in, nor on the number of processes.
The remaining difference between batchings is floating-point kernel choice (oneDNN and
cuDNN pick other kernels for a batch of 1), worth at most a unit in the last 8-bit place.

The work list holds only images that are missing, so an interrupted run resumes where it
stopped; PNGs are written under a temporary name and renamed, so an image that exists
under its final name is complete.
"""
import inspect
import json
import os
import platform
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from rpo.cli import UserError, check_writable
from rpo.diffusion.schedulers import STOCK_SCHEDULERS
from rpo.io import atomic_write, write_text
from rpo import families
from rpo.models import DTYPES  # noqa: F401 (inference.py's --mixed_precision)

SCHEDULERS = STOCK_SCHEDULERS  # inference.py's --scheduler choices (rpo/diffusion/schedulers.py)
MANIFEST = "manifest.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with


# --------------------------------------------------------------------------- the pipeline
def make_scheduler(name, config):
    """A stock sampler on the pipeline's noise schedule (betas, prediction type, spacing).

    A config without `clip_sample` (PNDM and Euler have no such option, so diffusers saves
    none) must not switch clipping on: DDPM and DDIM default to clipping the predicted x0
    to [-1, 1], which no Stable Diffusion latent is trained for.
    """
    if name not in SCHEDULERS:
        raise UserError(f"--scheduler must be one of {list(SCHEDULERS)}, got {name!r}")
    cls = SCHEDULERS[name]
    if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler" or ("shift" in config and "beta_schedule" not in config):
        # SD3 / SD3.5 (flow matching): the DDPM-family samplers do not apply; keep the model's own
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    clips = "clip_sample" in inspect.signature(cls.__init__).parameters  # DDPM, DDIM; never pass it to others
    return cls.from_config(config, **({"clip_sample": False} if clips and "clip_sample" not in config else {}))


def check_unet_path(unet, subfolder=None, what="--unet"):
    """Refuse a local `--unet` that is not a UNet folder, before anything loads.

    A string that does not exist locally is taken as a hub id only if it looks like one
    (`owner/name`); anything else is a mistyped path.
    """
    if unet is None:
        return
    if not os.path.exists(unet):
        if unet.startswith((".", "/", "~")) or unet.count("/") != 1:
            raise UserError(f"{what}: no such folder: {unet}")
        return
    where = os.path.join(unet, subfolder) if subfolder else unet
    if not os.path.isfile(os.path.join(where, "config.json")):
        hint = ""
        for inner in ("ema", "unet"):  # train.py writes ckpt-N/ema and ckpt-N/unet
            if os.path.isfile(os.path.join(where, inner, "config.json")):
                hint = f" (did you mean {os.path.join(where, inner)}?)"
                break
        raise UserError(f"{what} {where} is not a UNet folder (no config.json){hint}")


def weight_keys(folder, variant=None):
    """The tensor names a diffusers model folder's safetensors weights hold (headers only),
    or None when it has none to read (.bin weights: left to the loader)."""
    from safetensors import SafetensorError, safe_open
    base = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    index = os.path.join(folder, f"{base}.safetensors.index.json")
    if os.path.isfile(index):  # sharded: the index names every tensor's file
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index} is unreadable ({e})") from None
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, f"{base}.safetensors")):
        files = [f"{base}.safetensors"]
    else:
        return None
    keys = set()
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing (listed in {os.path.basename(index)})")
        try:
            with safe_open(path, framework="pt") as f:
                keys.update(f.keys())
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is unreadable ({str(e).splitlines()[0]}): truncated or damaged") from None
    return keys


def check_unet_weights(unet, subfolder=None, variant=None, what="--unet"):
    """Refuse a local UNet (or SD3 transformer) folder whose weights lack tensors its config
    needs, before anything loads: diffusers would leave them on the meta device and fail
    later with "Cannot copy out of meta tensor". Reads the config and the safetensors
    headers only; the model is built on the meta device (no memory)."""
    if unet is None or not os.path.isdir(unet):
        return
    import diffusers
    folder = os.path.join(unet, subfolder) if subfolder else unet
    keys = weight_keys(folder, variant)
    if keys is None:
        return
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            name = json.load(f).get("_class_name", "UNet2DConditionModel")
        cls = getattr(diffusers, name)
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(folder))
    except Exception:  # an unknown class, a config that does not build: the loader's own error says it better
        return
    needed = set(model.state_dict())
    missing = sorted(needed - keys)
    if missing:
        raise UserError(f"{what} {folder}: its weights lack {len(missing)} of the {len(needed)} tensors its config.json "
                        f"needs (e.g. {missing[0]}): a partial or interrupted save; use a complete model folder")


def load_pipeline(source, sdxl=False, variant=None, unet=None, unet_subfolder=None, unet_variant=None,
                  dtype=torch.float32, safety_checker=False, *, model_family="auto", revision=None, cache_dir=None):
    """The stock diffusers pipeline of `source`'s model family (rpo/families; auto: its
    model_index.json, `sdxl` the --sdxl shorthand), with `unet` (a folder or hub id of the
    network that trains: a UNet, an SD3 transformer) in place of the pipeline's own.

    The tokenizers load first, checked against their text encoders' configs as training
    loads them (rpo.models.load_tokenizer). `revision` is the pipeline's; a `unet` from
    elsewhere gets only `cache_dir`.
    """
    family = families.resolve(model_family, source, sdxl=sdxl, revision=revision, cache_dir=cache_dir)
    return family.load_pipeline(source, denoiser=unet, denoiser_subfolder=unet_subfolder, denoiser_variant=unet_variant,
                                variant=variant, dtype=dtype, safety_checker=safety_checker, revision=revision,
                                cache_dir=cache_dir)


def default_resolution(pipe):
    """The pipeline's own default: the UNet's sample size times the VAE's downscale factor."""
    size = (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).config.sample_size  # SD3: a transformer
    return (size if isinstance(size, int) else size[0]) * pipe.vae_scale_factor


# --------------------------------------------------------------------------- the work list
@dataclass(frozen=True)
class Job:
    prompt_index: int
    image_index: int
    seed: int
    path: str   # <output>/<prompt folder>/<seed>.png


def image_seed(seed, prompt_index, image_index, num_prompts):
    """The paper's protocol: image k of prompt p gets `seed + p + k * num_prompts`."""
    return seed + prompt_index + image_index * num_prompts


def prompt_folder(output, prompt_index, num_prompts):
    return os.path.join(output, f"{prompt_index:0{len(str(num_prompts - 1))}d}")


def png_complete(path):
    """True if `path` is a whole PNG: the signature, then chunks whose CRC-32s all check,
    ending with IEND at the end of the file.

    Every byte but the signature is under a CRC, so a flipped byte anywhere or a truncated
    file fails (300 of 300 random single-bit flips in the middle of a 512 px PNG caught,
    as Pillow's full decode catches them), at a fifteenth of a full decode's cost: on 2
    shared CPU cores 0.03 ms vs 0.2 ms per 32 px image (1,000 images: 0.03 s vs 0.2 s) and
    0.8 ms vs 12 ms per 512 px one, i.e. 13 s instead of 3 min on every rerun of a
    16,000-image benchmark. (The rename in `save_png` is atomic; this catches what a
    crash of the machine or the disk does to a file afterwards.)
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    if data[:8] != PNG_SIGNATURE:
        return False
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 12 + length
        if end > len(data) or zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return False
        if data[pos + 4:pos + 8] == b"IEND":
            return end == len(data)
        pos = end
    return False


def plan(output, num_prompts, num_images_per_prompt, seed):
    """(jobs still to do, number of images already complete), in (prompt, image) order."""
    jobs, done = [], 0
    for p in range(num_prompts):
        folder = prompt_folder(output, p, num_prompts)
        for k in range(num_images_per_prompt):
            s = image_seed(seed, p, k, num_prompts)
            path = os.path.join(folder, f"{s}.png")
            if png_complete(path):
                done += 1
            else:
                jobs.append(Job(p, k, s, path))
    return jobs, done


def batches(jobs, batch_size):
    """Consecutive batches of `batch_size` jobs; a batch may span several prompts."""
    return [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]


# --------------------------------------------------------------------------- files
def save_png(image, path):
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def check_output(output):
    """Refuse an `output` that could not be written, without creating anything yet
    (a run refused later must not leave folders behind)."""
    check_writable(output, "--output")  # a probe file, created and removed: os.access lies to root


def check_captions(output, captions):
    """Refuse an output whose prompt folders hold other captions (another prompt set or order)."""
    for p, caption in enumerate(captions):
        path = os.path.join(prompt_folder(output, p, len(captions)), "caption.txt")
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:  # not UTF-8: another caption, refused below
                existing = f.read().strip()
            if existing != caption:
                raise UserError(f"{os.path.dirname(path)} holds the caption {existing[:60]!r}, but prompt {p} of the "
                                f"dataset is {caption[:60]!r}: use another --output")


def write_captions(output, captions):
    for p, caption in enumerate(captions):
        folder = prompt_folder(output, p, len(captions))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "caption.txt")
        if not os.path.isfile(path):
            write_text(path, caption + "\n")
        for name in os.listdir(folder):  # temporaries left by a killed run
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))


def library_versions():
    import accelerate
    import diffusers
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def read_manifest(output):
    path = os.path.join(output, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable manifest ({e}); move it away only if you know how the images were made") from None


def check_manifest(output, manifest, settings, done):
    """Refuse to add images made with other settings to an existing output.

    `settings` holds everything that changes the pixels (num_images_per_prompt does not:
    more images per prompt only adds seeds). Returns a warning line when only the library
    versions differ, which can shift pixels slightly but does not change the protocol.
    """
    if manifest is None:
        if done:
            raise UserError(f"--output {output} already holds images but no {MANIFEST}: cannot tell how they were made; "
                            "use another --output")
        return None
    old = manifest.get("settings", {})
    for key in sorted(set(old) | set(settings)):
        if old.get(key) != settings.get(key):
            raise UserError(f"--output {output} was made with {key}={old.get(key)!r}, this run has "
                            f"{key}={settings.get(key)!r}: use another --output or the same setting")
    versions = library_versions()
    if manifest.get("versions", {}) != versions:
        return f"warning: {output} was made with {manifest.get('versions')}, this run uses {versions}"
    return None


def write_manifest(output, settings, arguments, extra=None):
    """`extra`: further top-level entries (inference.py's weight-file hash memo)."""
    manifest = {"settings": settings, "arguments": arguments, "versions": library_versions(), **(extra or {})}
    os.makedirs(output, exist_ok=True)
    write_text(os.path.join(output, MANIFEST), json.dumps(manifest, indent=2) + "\n")


# --------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_batch(pipe, captions, jobs, device, **call):
    """PIL images for `jobs`, one generator per image seeded with its own seed."""
    generators = [torch.Generator(device).manual_seed(job.seed) for job in jobs]
    return pipe(prompt=[captions[job.prompt_index] for job in jobs], generator=generators,
                num_images_per_prompt=1, output_type="pil", **call).images


def run_jobs(pipe, captions, jobs, batch_size, device, num_workers=1, progress=False, **call):
    """Generate and save every job, `batch_size` images per pipeline call.

    PNGs are encoded and written by `num_workers` threads (Pillow releases the GIL while
    compressing) while the next batch is generated; at most two batches wait to be written.
    Returns the seconds taken.
    """
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), unit="img", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max(1, num_workers)) as writer:
        pending = []
        for batch in batches(jobs, batch_size):
            images = generate_batch(pipe, captions, batch, device, **call)
            while len(pending) > 2 * batch_size:
                pending.pop(0).result()
            pending += [writer.submit(save_png, image, job.path) for image, job in zip(images, batch)]
            bar.update(len(batch))
        for future in pending:
            future.result()
    bar.close()
    return time.perf_counter() - start
