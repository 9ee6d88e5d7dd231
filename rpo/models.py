"""Load the parts of a Stable Diffusion (1.5 or XL) pipeline and encode prompts.

Hub ids stay the defaults; a local folder in the diffusers layout (what `python -m
rpo.tiny sd15 OUT` writes) goes through exactly the same `from_pretrained` calls. A model
that cannot be found (no network, a typo, a folder that is not a pipeline, a single-file
checkpoint) becomes one `UserError` line saying what was needed and how to fix it.
`revision` and `cache_dir` mean what they mean to diffusers and transformers, and reach
every `from_pretrained` call (only when set, so the libraries' defaults stay theirs).
"""
import hashlib
import json
import os
import shlex
import socket
import sys
import urllib.parse
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from rpo.cli import UserError

SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"
# --mixed_precision -> the dtype frozen parts are loaded in (every entry point)
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def hub_endpoint():
    """The hub's address as huggingface_hub will use it (`HF_ENDPOINT`, else huggingface.co)."""
    from huggingface_hub import constants
    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


HUB_TIMEOUT_ENV = "RPO_HUB_TIMEOUT"  # seconds; the probe's limit and every hub request's connect/read limit
PROBE_TIMEOUT_S = 3.0     # the probe, when RPO_HUB_TIMEOUT is not set
REQUEST_TIMEOUT_S = 10.0  # each hub request's connect and read (not the whole download), when it is not set


def hub_timeout(default=REQUEST_TIMEOUT_S):
    """`RPO_HUB_TIMEOUT` in seconds, else `default`; a bad value is one line."""
    value = os.environ.get(HUB_TIMEOUT_ENV)
    if value in (None, ""):
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"{HUB_TIMEOUT_ENV}={value!r}: expected a positive number of seconds")
    return seconds


def hub_reachable(timeout=None):
    """Whether the hub endpoint answers an HTTP request within `timeout` seconds in all
    (default: `RPO_HUB_TIMEOUT`, else 3 s).

    Without network, huggingface_hub retries each file for half a minute (train.py's
    dozens of files: minutes of retry lines). A TCP connect alone is not enough: a proxy or
    firewall that accepts connections and never answers would pass it, then hang every
    request. So the probe sends `HEAD /` and waits for the first bytes of any HTTP answer
    (any status: only "does it answer" matters), under one deadline for connect, TLS
    handshake, send and receive.
    """
    import ssl
    import time
    timeout = hub_timeout(PROBE_TIMEOUT_S) if timeout is None else timeout
    deadline = time.monotonic() + timeout

    def left():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("hub probe deadline")
        return remaining

    try:
        url = urllib.parse.urlsplit(hub_endpoint())
        port = url.port or (443 if url.scheme == "https" else 80)
        with socket.create_connection((url.hostname, port), timeout=left()) as raw:
            conn = raw
            if url.scheme == "https":  # only "does it answer": no certificate check for the probe itself
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                raw.settimeout(left())
                conn = context.wrap_socket(raw, server_hostname=url.hostname)
            conn.settimeout(left())
            conn.sendall(f"HEAD / HTTP/1.1\r\nHost: {url.hostname}\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while len(answer) < 5:
                conn.settimeout(left())
                chunk = conn.recv(5 - len(answer))
                if not chunk:
                    break
                answer += chunk
            return answer.startswith(b"HTTP/")
    except (OSError, ValueError):  # refused, unreachable, no DNS, timed out, TLS failed; a malformed HF_ENDPOINT
        return False


def set_hub_timeouts(seconds=None):
    """Give every huggingface_hub request a connect/read limit (default: `RPO_HUB_TIMEOUT`,
    else 10 s): its shared HTTP client is built with `timeout=None` (huggingface_hub 2.4,
    utils/_http.py), so a server that stops answering mid-request would hang it forever.
    Also sets the metadata (HF_HUB_ETAG_TIMEOUT) and download (HF_HUB_DOWNLOAD_TIMEOUT)
    limits, unless the user set those variables. A read limit, not a total one: a slow
    download that keeps receiving bytes is not cut."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http
    seconds = hub_timeout() if seconds is None else seconds
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        if not os.environ.get(name):
            os.environ[name] = str(max(1, round(seconds)))  # for child processes; huggingface_hub reads ints
            setattr(constants, name, max(1, round(seconds)))
    factory = getattr(_http, "default_client_factory", None)
    if factory is None or not hasattr(_http, "set_client_factory"):
        return

    def with_timeout():
        client = factory()
        client.timeout = seconds
        return client

    _http.set_client_factory(with_timeout)


def pipeline_class_name(source, *, revision=None, cache_dir=None):
    """`_class_name` of the pipeline's model_index.json (a local folder, or a hub id already
    cached / reachable); None when it cannot be read."""
    if os.path.isdir(source):
        path = os.path.join(source, "model_index.json")
    else:
        try:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(source, "model_index.json", **hub_options(revision, cache_dir))
        except Exception:  # noqa: BLE001 - offline / unknown id: the loaders report it later in one line
            return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("_class_name")
    except (OSError, ValueError):
        return None


def is_local(source):
    return source is not None and os.path.exists(source)


def offline_unless_hub_reachable(sources, timeout=None):
    """Call before the first hub load: when some source is not a local path (a hub id, or
    None for "the hub default", e.g. scorer weights without --weights_dir), `HF_HUB_OFFLINE`
    is unset and the hub does not answer, switch this process to offline mode, so models
    already in the hub cache load and the others fail at once with from_pretrained's
    one-line download hint. Returns True when it switched. Every later hub request gets
    a time limit (`set_hub_timeouts`); `RPO_HUB_TIMEOUT` sets both limits.
    """
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or all(is_local(s) for s in sources):
        return False
    set_hub_timeouts()  # the hub will be asked: no request may hang
    if hub_reachable(timeout):
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"  # child processes (DataLoader workers) and libraries imported later
    constants.HF_HUB_OFFLINE = True     # huggingface_hub read the variable at import; its downloads check this
    # libraries that copied the flag at import (from huggingface_hub.constants import HF_HUB_OFFLINE)
    for module, name in (("datasets.config", "HF_HUB_OFFLINE"), ("diffusers.utils.hub_utils", "HF_HUB_OFFLINE"),
                         ("diffusers.loaders.lora_base", "HF_HUB_OFFLINE")):
        if module in sys.modules and hasattr(sys.modules[module], name):
            setattr(sys.modules[module], name, True)
    print(f"warning: {hub_endpoint()} does not answer (no network?): working offline, only models already in "
          "the hub cache load", file=sys.stderr)
    return True


WEIGHT_EXTENSIONS = (".safetensors", ".bin")  # diffusers' and transformers' weight files (sharded ones too)


def file_identity(stat):
    """What changes whenever a file's bytes may have: size, mtime, and also the inode (a
    file replaced by a rename or a copy) and the ctime (set by the kernel on every write or
    utime call, so `cp -p`, `rsync -t` or `touch -r` restoring the old mtime still change it)."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]


def file_sha256(path, memo=None):
    """sha256 of the whole file; `memo` ({real path: [size, mtime_ns, inode, ctime_ns,
    sha256]}, e.g. from the previous run's manifest) skips re-reading a file whose identity
    (`file_identity`) is unchanged: one stat per file, nothing per image.

    Whole-file hashes because a head/tail hash misses a fine-tune that changed only middle
    tensors (attention-only training leaves conv_in and the last blocks byte-identical);
    the memo keeps reruns cheap (~500 MB/s hashing here: 4 GB of SD1.5 weights ~8 s, once).
    Memo entries of the older [size, mtime_ns, sha256] form never match: hashed afresh once.
    """
    real = os.path.realpath(path)
    identity = file_identity(os.stat(real))
    entry = memo.get(real) if memo is not None else None
    if isinstance(entry, list) and len(entry) == len(identity) + 1 and entry[:-1] == identity:
        return entry[-1]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    if memo is not None:
        memo[real] = [*identity, digest.hexdigest()]
    return digest.hexdigest()


def weights_fingerprint(source, subfolder=None, *, revision=None, cache_dir=None, memo=None):
    """What identifies the weights a model loads from, for a manifest.

    A local folder: {"folder": its real path, "files": {weight file: sha256}} (see
    `file_sha256`). A hub id: {"commit": the snapshot commit it resolved to in the hub cache}
    (call after loading, when the snapshot is cached), or {"commit": None} if not found.
    """
    if os.path.isdir(source):
        folder = os.path.join(source, subfolder) if subfolder else source
        names = sorted(n for n in os.listdir(folder) if n.endswith(WEIGHT_EXTENSIONS))
        return {"folder": os.path.realpath(folder),
                "files": {n: file_sha256(os.path.join(folder, n), memo) for n in names}}
    from huggingface_hub import try_to_load_from_cache
    for name in ("config.json", "model_index.json"):
        found = try_to_load_from_cache(source, f"{subfolder}/{name}" if subfolder else name,
                                       cache_dir=cache_dir, revision=revision)
        if isinstance(found, str):  # <cache>/models--owner--name/snapshots/<commit>/...
            parts = os.path.normpath(found).split(os.sep)
            return {"commit": parts[parts.index("snapshots") + 1]}
    return {"commit": None}


def fingerprint_change(old, new):
    """A few words on how fingerprint `new` differs from `old`, or None if it does not."""
    if old == new:
        return None
    if "files" in old and "files" in new:
        for name in sorted(set(old["files"]) | set(new["files"])):
            a, b = old["files"].get(name), new["files"].get(name)
            if a != b:
                short = lambda h: h[:12] if h else "absent"  # noqa: E731
                return f"{name} in {new.get('folder')} has sha256 {short(b)}, the images were made with {short(a)}"
    return f"made with {old}, now {new}"


def hub_options(revision=None, cache_dir=None):
    """The hub keywords that are set: diffusers' ModelMixin/DiffusionPipeline and
    transformers' models, configs and tokenizers all take `revision` and `cache_dir`."""
    return {k: v for k, v in (("revision", revision), ("cache_dir", cache_dir)) if v is not None}


def from_pretrained(cls, source, what, *, revision=None, cache_dir=None, **kwargs):
    """`cls.from_pretrained(source, **kwargs)`, with a one-line error when it is missing."""
    kwargs.update(hub_options(revision, cache_dir))
    subfolder = kwargs.get("subfolder")
    if os.path.isdir(source):
        where = os.path.join(source, subfolder) if subfolder else source
        if not os.path.isdir(where):
            raise UserError(f"{what}: {source} is not a diffusers pipeline folder (no '{subfolder}/' inside)")
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        hint = (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__).rstrip(".")
        raise UserError(
            f"cannot load the {what} from '{source}'"
            + (f" (subfolder '{subfolder}')" if subfolder else "")
            + f": {hint}. Without network access, download it on a connected machine "
            "(`hf download <id>`) and pass the local folder instead."
        ) from None


# A tokenizer folder holds the BPE vocabulary and merges, or the `tokenizers` file (or both).
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
DOWNLOAD_HINT = "Download the model on a connected machine (`hf download <id>`) and pass the local folder instead."


def check_tokenizer(tokenizer, source, vocab_size=None, subfolder="tokenizer"):
    """Refuse a tokenizer that cannot encode captions for a text encoder of `vocab_size` rows.

    transformers 5, offline and without the files, may hand back a stand-in instead of
    raising: a tokenizer of 2-5 special tokens only, which turns every caption into
    unknown tokens. Any vocabulary size is fine otherwise (a byte-level one has 514), as
    long as the text encoder has an embedding row for every id the tokenizer can give.
    """
    where = f"'{source}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
    if not set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens):
        raise UserError(f"cannot load the tokenizer from {where}: got {len(tokenizer)} special tokens only, its files are "
                        f"missing (no network?). {DOWNLOAD_HINT}")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise UserError(f"the tokenizer from {where} has {len(tokenizer)} tokens, but its text encoder embeds only "
                        f"{vocab_size}: they come from different models")
    return tokenizer


def check_tokenizer_files(source, subfolder):
    """For a local folder: the tokenizer's files are there (checked before anything loads)."""
    if not os.path.isdir(source):
        return
    folder = os.path.join(source, subfolder)
    if not any(all(os.path.isfile(os.path.join(folder, name)) for name in group) for group in TOKENIZER_FILES):
        raise UserError(f"{folder} holds no tokenizer files (vocab.json and merges.txt, or tokenizer.json)")


def load_tokenizer(source, subfolder="tokenizer", encoder_subfolder="text_encoder", *, revision=None, cache_dir=None):
    """The pipeline's CLIP tokenizer, checked against its text encoder's config.

    Reads `<encoder_subfolder>/config.json` only (no weights), so a mismatch fails before
    anything large loads. Every entry point (training, inference) loads tokenizers here.
    """
    hub = hub_options(revision, cache_dir)
    check_tokenizer_files(source, subfolder)
    config = from_pretrained(CLIPTextConfig, source, "text encoder config", subfolder=encoder_subfolder, **hub)
    tokenizer = from_pretrained(CLIPTokenizer, source, subfolder.replace("_", " "), subfolder=subfolder, **hub)
    return check_tokenizer(tokenizer, source, config.vocab_size, subfolder)


def load_model(cls, source, subfolder=None, variant=None, dtype=torch.float32, what="model", *, revision=None,
               cache_dir=None):
    """A diffusers model (`cls`: UNet, SD3 transformer, ...) with one-line errors."""
    kwargs = {"dtype": dtype, **hub_options(revision, cache_dir)}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if variant:
        kwargs["variant"] = variant
    return from_pretrained(cls, source, what, **kwargs)


def load_unet(source, subfolder=None, variant=None, dtype=torch.float32, what="UNet", *, revision=None, cache_dir=None):
    return load_model(UNet2DConditionModel, source, subfolder, variant, dtype, what, revision=revision, cache_dir=cache_dir)


@dataclass
class TextEncoders:
    """One (SD1.5) or two (SDXL) CLIP text encoders with their tokenizers."""
    tokenizers: list
    encoders: list
    sdxl: bool

    def to(self, device=None, dtype=None):
        for encoder in self.encoders:
            encoder.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, captions):
        """Caption embeddings as the pipelines compute them.

        SD1.5: the last hidden state (B, 77, 768), pooled None.
        SDXL: the penultimate hidden states of both encoders concatenated (B, 77, 2048),
        pooled = the projected pooled output of encoder 2 (B, 1280).
        """
        device = self.encoders[0].device
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            if not self.sdxl:
                return encoder(ids)[0], None
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (encoder 2 is last)
        return torch.cat(hidden, dim=-1), pooled


def load_text_encoders(source, sdxl=False, variant=None, dtype=torch.float32, *, revision=None, cache_dir=None):
    hub = hub_options(revision, cache_dir)
    kw = {"variant": variant, **hub} if variant else hub
    tokenizers = [load_tokenizer(source, **hub)]
    if sdxl:  # both tokenizers are checked before either encoder's weights load
        tokenizers.append(load_tokenizer(source, "tokenizer_2", "text_encoder_2", **hub))
    encoders = [from_pretrained(CLIPTextModel, source, "text encoder", subfolder="text_encoder", dtype=dtype, **kw)]
    if sdxl:
        encoders.append(from_pretrained(CLIPTextModelWithProjection, source, "text encoder 2",
                                        subfolder="text_encoder_2", dtype=dtype, **kw))
    for encoder in encoders:
        encoder.requires_grad_(False).eval()
    return TextEncoders(tokenizers, encoders, sdxl)


def load_vae(source, sdxl=False, variant=None, dtype=torch.float32, vae=None, *, revision=None, cache_dir=None):
    """The pipeline's VAE; for SDXL the fp16-fix VAE (as the paper's code, basiclab/DiffusionDRO), unless `vae` names another.

    `revision` is the pipeline's: a separate `vae` repository gets only `cache_dir`."""
    if vae is None and sdxl and not os.path.isdir(source):
        vae = SDXL_VAE
    if vae is not None:
        model = from_pretrained(AutoencoderKL, vae, "VAE", dtype=dtype, cache_dir=cache_dir)
    else:
        kw = {"variant": variant} if variant else {}
        model = from_pretrained(AutoencoderKL, source, "VAE", subfolder="vae", dtype=dtype, revision=revision,
                                cache_dir=cache_dir, **kw)
    return model.requires_grad_(False).eval()


SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt")


def single_file_is_sdxl(path, sdxl):
    """SDXL or not, from a .safetensors header (only the key names are read): SDXL's
    original checkpoints hold a second text encoder under `conditioner.embedders.1.`.
    A .ckpt is a pickle that would have to load whole; trust `sdxl` for it."""
    if path.lower().endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework="pt") as f:
                return any(key.startswith("conditioner.embedders.1.") for key in f.keys())
        except (OSError, SafetensorError):  # not a readable safetensors file: the conversion will say so
            pass
    return sdxl


def conversion_command(path, sdxl=False):
    """The exact command that turns a single-file checkpoint into a diffusers folder."""
    cls = "StableDiffusionXLPipeline" if single_file_is_sdxl(path, sdxl) else "StableDiffusionPipeline"
    out = os.path.splitext(path)[0] + "_diffusers"
    # JSON string literals are Python literals too, and double-quoted: shlex.quote then
    # wraps the code in plain single quotes (for any path without a single quote)
    code = f"from diffusers import {cls}; {cls}.from_single_file({json.dumps(path)}).save_pretrained({json.dumps(out)})"
    return f"python -c {shlex.quote(code)}", out


def check_pipeline_folder(source, sdxl=False):
    """Refuse early a local path that is not a diffusers pipeline (before any weight loads).

    A single-file checkpoint (.safetensors/.ckpt, the original Stable Diffusion format)
    gets the one command that converts it; diffusers' `from_single_file` needs the
    network once, for the base model's configs.
    """
    if os.path.isfile(source) or (source.lower().endswith(SINGLE_FILE_EXTENSIONS) and not os.path.isdir(source)):
        if not os.path.exists(source):
            raise UserError(f"--pretrained_model_name_or_path {source}: no such file")
        command, out = conversion_command(source, sdxl)
        raise UserError(f"--pretrained_model_name_or_path {source} is a single-file checkpoint; convert it to a diffusers "
                        f"folder once with: {command} and pass --pretrained_model_name_or_path {shlex.quote(out)}")
    if os.path.exists(source) and not os.path.isfile(os.path.join(source, "model_index.json")):
        raise UserError(f"--pretrained_model_name_or_path {source} is not a diffusers pipeline folder (no model_index.json)")
