"""What every scorer shares: the `Scorer` interface and where its weights come from.

A scorer reads its weights either from the hub (the default ids of docs/design.md, "Scorers") or from a
local folder: `--weights_dir DIR` holds one sub-folder per metric, laid out as the
package docstring of `rpo.scores` describes and as `python -m rpo.tiny scorers DIR` writes
it. Anything missing becomes one `UserError` line naming what to download and the exact
folder to put it in, never a stack trace or a minutes-long retry loop (set
`HF_HUB_OFFLINE=1` on machines without network).
"""
import hashlib
import json
import os
import re
import urllib.request

import torch

from rpo.cli import UserError


class Scorer:
    """One preference metric: `score(images, prompts) -> (N,) float32` on the CPU.

    `preprocess` is the metric's own image transform (CPU only, picklable: it runs in
    DataLoader workers); `score_tensors` is the model forward on a batch of its output.
    `version` names the released weights and ends with a fingerprint of the loaded
    tensors, so caches keyed by it never mix, say, the tiny kit with the real weights.
    """

    name = ""
    version = ""

    def __init__(self, transform, device):
        self.transform = transform
        self.device = torch.device(device)

    def preprocess(self, image):
        return self.transform(image)

    def to(self, device):
        """Move the scorer's models, e.g. onto the GPU only while train.py validates."""
        self.device = torch.device(device)
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                value.to(self.device)
        return self

    @torch.no_grad()
    def score_tensors(self, pixels, prompts):
        raise NotImplementedError

    def score(self, images, prompts):
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        if not images:
            return torch.zeros(0)
        pixels = torch.stack([self.preprocess(image) for image in images])
        return self.score_tensors(pixels, list(prompts))


# Bump when any metric's computation changes (formula, preprocessing code, tokenization):
# every cached score then carries another version and is recomputed, never mixed with new ones.
SCORING_CODE_VERSION = 2


def describe(obj):
    """A stable text of what a transform or tokenizer does, without file paths: its own
    key, a tokenizers-library JSON (vocabulary, merges, normalizer), the vocabulary, merges
    and settings of a slow or open_clip tokenizer, or else its repr (torchvision's Compose
    lists every step with its parameters)."""
    if hasattr(obj, "key"):
        return repr(obj.key)
    backend = getattr(obj, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    if not (hasattr(obj, "get_vocab") or hasattr(obj, "encoder")):
        return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))  # a function's repr holds its address: not stable
    parts = [repr(sorted(table.items(), key=repr)) for table in
             (getattr(obj, name, None) for name in ("encoder", "vocab", "bpe_ranks")) if isinstance(table, dict)]
    settings = {k: v for k, v in getattr(obj, "init_kwargs", {}).items()
                if isinstance(v, (str, int, float, bool)) and "path" not in k and "file" not in k}
    parts += [json.dumps(settings, sort_keys=True), repr(getattr(obj, "context_length", None)),
              repr(getattr(obj, "model_max_length", None)), repr(sorted(getattr(obj, "all_special_tokens", [])))]
    return "\n".join(parts)


def release_version(release, models, preprocessing):
    """`<release>-<weights fingerprint>-<preprocessing fingerprint>-c<code version>`: a cache
    keyed by it changes when the weights, the preprocessor or tokenizer files, or the
    scoring code change."""
    digest = hashlib.sha256("\0".join(describe(p) for p in preprocessing).encode()).hexdigest()[:8]
    return f"{release}-{fingerprint(*models)}-{digest}-c{SCORING_CODE_VERSION}"


def fingerprint(*modules):
    """A short hash of the weights' values (names, shapes and the first values of each
    tensor): cheap even for ViT-H, different for any two real or random checkpoints."""
    digest = hashlib.sha256()
    for module in modules:
        for key, tensor in module.state_dict().items():
            digest.update(f"{key}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:8]


def prepare(module, device):
    """Frozen, in eval mode (dropout off), fp32 — every published score is computed in fp32."""
    return module.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


# --------------------------------------------------------------------------- sources
def resolve(weights_dir, folder, repo, what, filename=None, only=()):
    """Where a hub model or file is read from, and the hint that goes into its errors.

    Without `weights_dir`: the hub id (the local hub cache when offline). With it:
    `weights_dir/folder[/filename]`, which must exist. `only`: the files of the repo
    worth downloading, for the hint.
    """
    files = "".join(f" {f}" for f in ((filename,) if filename else only))
    command = f"hf download {repo}{files} --local-dir {os.path.join(weights_dir or 'WEIGHTS_DIR', folder)}"
    if weights_dir is None:
        return repo, f"without network, run `{command}` on a connected machine and pass --weights_dir WEIGHTS_DIR"
    path = os.path.join(weights_dir, folder, filename or "")
    if not os.path.exists(path):
        raise UserError(f"{what} not found: {path.rstrip(os.sep)} is missing; get it with `{command}`")
    return path, f"expected the files of {repo} there (`{command}`)"


def from_pretrained(cls, source, what, hint, **kwargs):
    """`cls.from_pretrained(source)`, a missing model turned into one line."""
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: mis-shaped tensors in the weights file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the {what} from '{source}' ({reason}); {hint}") from None


def load_model(cls, source, what, hint):
    """A transformers model, checked complete: a missing or mis-shaped tensor would leave
    random weights behind a plausible-looking score. Unused tensors (the text tower of a
    full CLIP checkpoint read as a vision model) are fine and not reported."""
    import transformers
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = from_pretrained(cls, source, what, hint, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    bad = list(info["missing_keys"]) + [str(k[0]) if isinstance(k, tuple) else str(k) for k in info["mismatched_keys"]]
    if bad:
        raise UserError(f"the {what} from '{source}' lacks or mis-shapes {len(bad)} tensors (e.g. {bad[0]}); {hint}")
    return model


def hub_file(repo, filename, what, hint):
    """One file of a hub repo (from the local hub cache when offline)."""
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo, filename)
    except Exception as e:  # offline, missing, gated, network: all mean "not here"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot get the {what} ({repo}/{filename}: {reason}); {hint}") from None


def check_vocabulary(tokenizer, source, expected_at_least):
    # transformers 5 offline may hand back a 2-5 token tokenizer instead of raising
    # (docs/environment.md, "Traps"); every real vocabulary here has tens of thousands of entries.
    if len(tokenizer) < expected_at_least:
        raise UserError(f"tokenizer from '{source}' has only {len(tokenizer)} tokens: its files are missing or incomplete")
    return tokenizer


# --------------------------------------------------------------------------- downloads
def cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "rpo")


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url, path, sha256, what, hint):
    """Fetch `url` to `path` once: a temporary file, checked, then renamed (so an
    interrupted download never leaves a file that looks complete). `sha256=None` means
    no published digest is pinned: the digest is printed so it can be pinned."""
    if os.path.isfile(path):
        return path
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UserError(f"cannot download the {what} while offline (HF_HUB_OFFLINE=1); {hint}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.part"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
        actual = sha256_of(tmp)
        if sha256 is not None and actual != sha256:
            raise UserError(f"the {what} downloaded from {url} has sha256 {actual}, expected {sha256}; {hint}")
        if sha256 is None:
            print(f"downloaded {url} (sha256 {actual})")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot download the {what} from {url} ({e}); {hint}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
