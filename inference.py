"""Generate N images per prompt for benchmarking, deterministically and resumably.

    accelerate launch --multi_gpu --num_processes 4 inference.py --unet ./logs/run/ckpt-25600/ema \
        --test_dataset_root ./data/pickapicv2_test --output ./output/pickapicv2_test

Writes `<output>/<prompt index>/caption.txt` and `<output>/<prompt index>/<seed>.png`
with seed = `--seed` + prompt index + image index * number of prompts, so 1 and 4
processes, or any --batch_size, give the same images; a rerun makes only what is missing.
"""
import argparse
import contextlib
import os
import time

import diffusers
import transformers
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env

from rpo import generate
from rpo.cli import UserError, cpu_ranks, flag, parse_args, run_main
from rpo.data.folders import PromptDataset
from rpo import families
from rpo.lock import DirectoryLock
from rpo.models import check_pipeline_folder, fingerprint_change, offline_unless_hub_reachable, weights_fingerprint


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    p.add_argument("--revision", type=str, default=None, required=False,
                   help="Revision of pretrained model identifier from huggingface.co/models.")
    p.add_argument("--variant", default=None, help="file variant of the pipeline's weights, e.g. fp16")
    p.add_argument("--cache_dir", type=str, default=None,
                   help="The directory where the downloaded models and datasets will be stored.")
    flag(p, "sdxl", False, "the pipeline is Stable Diffusion XL (detected from its model_index.json when local)")
    p.add_argument("--model_family", choices=families.CHOICES, default="auto",
                   help="the pipeline's model family (rpo/families/); auto: from its model_index.json")
    p.add_argument("--unet", default=None,
                   help="fine-tuned UNet: a save_pretrained folder such as <logdir>/ckpt-N/ema, or a hub id; "
                        "default: the pipeline's own")
    p.add_argument("--unet_subfolder", default=None)
    p.add_argument("--unet_variant", default=None)
    p.add_argument("--lora", default=None,
                   help="LoRA weights to load into the UNet with pipe.load_lora_weights: a folder such as "
                        "<logdir>/ckpt-N/lora_ema (train.py --lora_rank), or a hub id")
    p.add_argument("--scheduler", default="DDPM", choices=list(generate.SCHEDULERS),
                   help="stock diffusers sampler; SDXL is the paper's code's name for Euler")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--num_images_per_prompt", type=int, default=5)
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels; default: the pipeline's (512 for SD1.5, 1024 for SDXL)")
    p.add_argument("--test_dataset_root", "--test_dataset", dest="test_dataset_root", default="./data/pickapicv2_test",
                   help="prompt folder dataset: one sub-folder per prompt holding caption.txt")
    p.add_argument("--output", default="./output")
    p.add_argument("--batch_size", type=int, default=4, help="images per pipeline call (per process), across prompts")
    p.add_argument("--num_workers", type=int, default=8, help="threads that encode and write PNGs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed_precision", default="bf16", choices=list(generate.DTYPES),
                   help="dtype every model is cast to")
    flag(p, "safety_checker", False, "run the SD1.5 safety checker (off in the paper's evaluation)")
    return p


def check_numbers(args):
    for name in ("num_inference_steps", "num_images_per_prompt", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if args.resolution is not None and args.resolution < 1:
        raise UserError(f"--resolution must be positive, got {args.resolution}")


def start_processes():
    """accelerate's process state; on a machine without CUDA, a multi-process launch runs on the CPU.

    Without `cpu=True`, accelerate treats `torchrun`/`accelerate launch --multi_gpu` on a
    CPU-only machine as N independent single-process runs that would race on the output.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or cpu_ranks())
    if launched and state.num_processes == 1:
        raise UserError(f"launched as {os.environ['WORLD_SIZE']} processes, but accelerate set up only one")
    return state


def settings_of(args, family, pipe, resolution, num_prompts):
    """What decides the pixels; a rerun into the same --output must match all of it."""
    def model(path):
        return os.path.realpath(path) if path is not None and os.path.exists(path) else path
    return {
        "pretrained_model_name_or_path": model(args.pretrained_model_name_or_path), "revision": args.revision,
        "variant": args.variant,
        "model_family": family.name, "unet": model(args.unet), "unet_subfolder": args.unet_subfolder,
        "unet_variant": args.unet_variant, "scheduler": type(pipe.scheduler).__name__,
        "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
        "resolution": resolution, "seed": args.seed, "mixed_precision": args.mixed_precision,
        "safety_checker": args.safety_checker, "num_prompts": num_prompts,
        **({"lora": lora_fingerprint(args.lora)} if args.lora else {}),  # absent without --lora: old manifests match
    }


def check_lora_path(path):
    """Refuse a local --lora that holds no LoRA weights, before any model loads."""
    if path is None:
        return
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") != 1
    if os.path.isdir(path):
        if not any(n.endswith(".safetensors") for n in os.listdir(path)):
            raise UserError(f"--lora {path}: no .safetensors file in it (train.py writes ckpt-N/lora_ema/"
                            "pytorch_lora_weights.safetensors)")
    elif os.path.exists(path) or looks_local:
        raise UserError(f"--lora {path}: not a folder of LoRA weights (e.g. <logdir>/ckpt-N/lora_ema)")


def lora_fingerprint(path):
    """What identifies the --lora weights in the manifest: a local folder's real path and the
    sha256 of each weight file; a hub id as given."""
    import hashlib
    if not os.path.isdir(path):
        return {"id": path}
    files = {}
    for name in sorted(n for n in os.listdir(path) if n.endswith(".safetensors")):
        h = hashlib.sha256()
        with open(os.path.join(path, name), "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        files[name] = h.hexdigest()
    return {"folder": os.path.realpath(path), "files": files}


WEIGHT_PARTS = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2",
                "text_encoder_3": "text encoder 3", "vae": "VAE"}


def weights_of(args, family, memo):
    """{part: fingerprint} of the weights this run generates with (rpo.models.weights_fingerprint):
    the path says where they are, this says what they are."""
    source, hub = args.pretrained_model_name_or_path, {"revision": args.revision, "cache_dir": args.cache_dir}
    # "unet": the network that trains, whatever the family calls it (old manifests use this key)
    parts = {"unet": weights_fingerprint(args.unet, args.unet_subfolder, cache_dir=args.cache_dir, memo=memo)
             if args.unet else weights_fingerprint(source, family.denoiser_folder, **hub, memo=memo)}
    for encoder in family.text_encoder_folders:
        parts[encoder] = weights_fingerprint(source, encoder, **hub, memo=memo)
    vae, subfolder = family.vae_location(source)
    parts["vae"] = weights_fingerprint(vae, subfolder, **(hub if vae == source else {"cache_dir": args.cache_dir}),
                                       memo=memo)
    return parts


def check_weights(output, manifest, weights):
    """Refuse to add images made with other weights under the same paths; returns a warning
    line for a manifest written before weights were recorded."""
    if manifest is None:
        return None
    old = manifest.get("settings", {}).get("weights")
    if old is None:
        return (f"warning: {output}/{generate.MANIFEST} predates weight fingerprints: assuming its images were made "
                "with the weights now at the same paths, and recording them")
    for part, label in WEIGHT_PARTS.items():
        change = fingerprint_change(old.get(part), weights.get(part)) if (part in old or part in weights) else None
        if change:
            raise UserError(f"--output {output}: the {label} weights changed since its images were made ({change}): "
                            "use another --output or the original weights")
    return None


def main(argv=None):
    args = parse_args(build_parser(), argv)
    check_numbers(args)
    # Cheap checks first: bad paths fail in the first second, before any weight loads.
    captions = [item.caption for item in PromptDataset(args.test_dataset_root, what="--test_dataset_root").items]
    generate.check_unet_path(args.unet, args.unet_subfolder)
    generate.check_unet_weights(args.unet, args.unet_subfolder, args.unet_variant)  # a half-saved UNet: one line
    check_lora_path(args.lora)
    check_pipeline_folder(args.pretrained_model_name_or_path, sdxl=args.sdxl)
    generate.check_output(args.output)
    generate.check_captions(args.output, captions)

    state = start_processes()
    if args.mixed_precision == "fp16" and state.device.type == "cpu":
        raise UserError("--mixed_precision fp16 on the CPU: PyTorch's CPU kernels lack or crawl through fp16 "
                        "matmuls and convolutions; use --mixed_precision bf16 or no")
    offline_unless_hub_reachable([args.pretrained_model_name_or_path] + ([args.unet] if args.unet else []))
    # One writer per --output: a second run into it (a resubmitted job) stops here, naming the first.
    with DirectoryLock(args.output, what="--output") if state.is_main_process else contextlib.nullcontext():
        generate_into(args, state, captions)


def generate_into(args, state, captions):
    """Load the pipeline, check the output's manifest and weights, generate what is missing."""
    # Loading bars of every rank would bury the one line that matters (an error, the summary).
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    family = families.resolve(args.model_family, args.pretrained_model_name_or_path, sdxl=args.sdxl,
                              revision=args.revision, cache_dir=args.cache_dir)
    pipe = generate.load_pipeline(
        args.pretrained_model_name_or_path, model_family=family.name, variant=args.variant, unet=args.unet,
        unet_subfolder=args.unet_subfolder, unet_variant=args.unet_variant,
        dtype=generate.DTYPES[args.mixed_precision], safety_checker=args.safety_checker,
        revision=args.revision, cache_dir=args.cache_dir)
    if args.lora:  # the adapter at scale 1 on the UNet, as a stock pipeline loads it
        pipe.load_lora_weights(args.lora)
    pipe.scheduler = generate.make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.to(state.device)
    resolution = args.resolution or generate.default_resolution(pipe)
    if resolution % pipe.vae_scale_factor:
        raise UserError(f"--resolution must be a multiple of {pipe.vae_scale_factor}, got {resolution}")

    # Every rank plans from the same files before the barrier, and nothing is written
    # until every check passed, so a refused run leaves the output as it was.
    settings = settings_of(args, family, pipe, resolution, len(captions))
    jobs, done = generate.plan(args.output, len(captions), args.num_images_per_prompt, args.seed)
    manifest = generate.read_manifest(args.output)
    memo = dict((manifest or {}).get("weight_hashes", {}))  # unchanged files (size, mtime, inode, ctime) are not re-read
    weights = weights_of(args, family, memo)
    warnings = [check_weights(args.output, manifest, weights)]
    if manifest is not None:  # weights compared above, by part; check_manifest compares the rest
        old = {k: v for k, v in manifest.get("settings", {}).items() if k != "weights"}
        if "sdxl" in old:  # written before model families: the --sdxl flag it recorded names one
            old["model_family"] = families.legacy_name(old.pop("sdxl"), family)
        manifest = {**manifest, "settings": old}
    warnings.append(generate.check_manifest(args.output, manifest, settings, done))
    if state.is_main_process:
        for warning in filter(None, warnings):
            print(warning)
        generate.write_manifest(args.output, {**settings, "weights": weights}, vars(args), {"weight_hashes": memo})
        generate.write_captions(args.output, captions)
    state.wait_for_everyone()

    start = time.perf_counter()
    with state.split_between_processes(jobs) as mine:  # contiguous shares, no padding
        generate.run_jobs(pipe, captions, mine, args.batch_size, state.device, num_workers=args.num_workers,
                          progress=state.is_main_process, num_inference_steps=args.num_inference_steps,
                          guidance_scale=args.guidance_scale, height=resolution, width=resolution)
    made = gather_object([len(mine)])  # waits for every rank; shows the split was exact
    seconds = time.perf_counter() - start
    if state.is_main_process:
        print(f"generated {sum(made)} images ({' + '.join(map(str, made))} on {state.num_processes} "
              f"process{'es' if state.num_processes > 1 else ''}), skipped {done} already complete, {seconds:.1f} s "
              f"({sum(made) / seconds if made else 0:.2f} images/s) -> {args.output}")

if __name__ == "__main__":
    run_main(main)
