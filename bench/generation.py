"""Images/s of inference.py's generation loop against a bare pipeline loop.

"inference.py" is `rpo.generate.run_jobs`, the loop the script runs: one seeded generator
per image, batches across prompts, PNGs encoded and written atomically by worker threads.
"Bare" is the least a script can do: one pipeline call per batch with a single generator,
images kept in memory, nothing written. Same pipeline, same batches, same sampler; the two
run in back-to-back pairs (alternating which goes first) in one process, and the median of
the per-pair ratios is reported.

    .venv/bin/python bench/generation.py [--kit DIR] [--device cuda] [--threads 1] [--batch_size 4]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rpo import generate
from rpo.tiny import pipelines as tiny  # noqa: E402


def bare(pipe, captions, jobs, batch_size, device, **call):
    start = time.perf_counter()
    generator = torch.Generator(device).manual_seed(0)
    for batch in generate.batches(jobs, batch_size):
        pipe(prompt=[captions[j.prompt_index] for j in batch], generator=generator, output_type="pil", **call)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", default=None, help="folder with sd15/ and prompts/ from rpo.tiny.pipelines (default: write one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_images_per_prompt", type=int, default=8)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--num_workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        kit = args.kit
        if kit is None:
            kit = tmp
            tiny.write_sd15(os.path.join(kit, "sd15"))
            tiny.write_prompts(os.path.join(kit, "prompts"))
        from rpo.data.folders import PromptDataset
        captions = [item.caption for item in PromptDataset(os.path.join(kit, "prompts")).items]
        pipe = generate.load_pipeline(os.path.join(kit, "sd15"))
        pipe.scheduler = generate.make_scheduler("DDPM", pipe.scheduler.config)
        pipe.to(args.device)
        resolution = generate.default_resolution(pipe)
        call = dict(num_inference_steps=args.num_inference_steps, guidance_scale=7.5, height=resolution, width=resolution)
        output = os.path.join(tmp, "out")
        jobs, _ = generate.plan(output, len(captions), args.num_images_per_prompt, 0)
        generate.write_captions(output, captions)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

        def timed(name):
            sync()
            if name == "bare":
                seconds = bare(pipe, captions, jobs, args.batch_size, args.device, **call)
            else:
                seconds = generate.run_jobs(pipe, captions, jobs, args.batch_size, args.device,
                                            num_workers=args.num_workers, **call)
            sync()
            return seconds

        bare(pipe, captions, jobs[:args.batch_size], args.batch_size, args.device, **call)  # warm-up
        times = {"bare": [], "inference.py": []}
        for repeat in range(args.repeats):
            # Pairs run back to back, in alternating order, so load from other jobs on a
            # shared machine hits both sides alike; the ratio is taken per pair.
            for name in (("bare", "inference.py") if repeat % 2 == 0 else ("inference.py", "bare")):
                times[name].append(timed(name))
        assert len(generate.plan(output, len(captions), args.num_images_per_prompt, 0)[0]) == 0

    ratios = sorted(b / i for b, i in zip(times["bare"], times["inference.py"]))
    print(f"{len(jobs)} images of {resolution}px, {args.num_inference_steps} DDPM steps, batch {args.batch_size}, "
          f"device {args.device}, {args.threads} thread(s), {args.repeats} alternating pairs")
    for name, seconds in times.items():
        runs = ", ".join(f"{len(jobs) / t:.1f}" for t in seconds)
        print(f"  {name:13s} {len(jobs) / statistics.median(seconds):7.2f} images/s (median; runs: {runs})")
    print(f"  ratio inference.py / bare: median {statistics.median(ratios):.3f} of pairs "
          f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f})")

if __name__ == "__main__":
    main()
