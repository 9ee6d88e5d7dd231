"""The tiny kit: stand-ins for every model and dataset, in the on-disk layout the real
loaders read, so tests and the offline demo run the real code paths without a GPU or
the hub (docs/design.md, "Working offline").

    python -m rpo.tiny sd15     OUT   # tiny SD1.5-shaped pipeline folder
    python -m rpo.tiny sdxl     OUT   # tiny SDXL-shaped pipeline folder
    python -m rpo.tiny sd3      OUT   # tiny SD3-shaped pipeline folder (rpo/tiny/sd3.py)
    python -m rpo.tiny flux     OUT   # tiny FLUX.1-dev-shaped pipeline folder (rpo/tiny/flux.py)
    python -m rpo.tiny flux-schnell OUT  # tiny FLUX.1-schnell-shaped pipeline folder
    python -m rpo.tiny experts  OUT   # small expert folder dataset (caption.txt + image)
    python -m rpo.tiny prompts  OUT   # small prompt folder dataset (caption.txt only)
    python -m rpo.tiny scorers  OUT   # tiny weights of the six scorers
    python -m rpo.tiny pickapic OUT   # small dataset in the Pick-a-Pic schema
    python -m rpo.tiny hpdv2    OUT   # small HPDv2 benchmark layout
    python -m rpo.tiny pairs    OUT   # preference pairs (caption.txt, win.png, lose.png), for DPO
    python -m rpo.tiny labels   OUT   # labelled images (caption.txt, image, label.txt), for KTO

Same seed, same files.
"""
import argparse

from rpo.tiny.datasets import write_tiny_hpdv2, write_tiny_labels, write_tiny_pairs, write_tiny_pickapic
from rpo.tiny.pipelines import write_experts, write_prompts, write_sd15, write_sdxl
from rpo.tiny.scorers import write_tiny_scorers
from rpo.tiny.flux import write_flux, write_flux_schnell
from rpo.tiny.sd3 import write_sd3

KITS = {
    "sd15": write_sd15, "sdxl": write_sdxl, "sd3": write_sd3, "experts": write_experts, "prompts": write_prompts,
    "scorers": write_tiny_scorers, "pickapic": write_tiny_pickapic, "hpdv2": write_tiny_hpdv2,
    "pairs": write_tiny_pairs, "labels": write_tiny_labels,
    "flux": write_flux, "flux-schnell": write_flux_schnell,
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rpo.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(KITS))
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    KITS[args.kind](args.out, seed=args.seed)
    print(f"wrote tiny {args.kind} to {args.out}")


if __name__ == "__main__":
    main()
