"""A score cache must never mix scores computed differently: the scorer's version (the cache
key) changes when the preprocessor or tokenizer files change and when the scoring code's
version changes, not only with the weights; a weights file with mis-shaped tensors is one
line, not a traceback; the aesthetic v1 head is pinned by sha256."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rpo.cli import UserError
from rpo.scores import load_scorer
from rpo.scores import base
from rpo.scores.aesthetic import HEADS


def copy_weights(scorer_weights, tmp_path):
    out = tmp_path / "weights"
    shutil.copytree(scorer_weights, out)
    return out


def test_version_follows_preprocessor_tokenizer_and_code(scorer_weights, tmp_path):
    weights = copy_weights(scorer_weights, tmp_path)
    first = load_scorer("pickscore", weights_dir=str(weights)).version
    assert load_scorer("pickscore", weights_dir=str(weights)).version == first  # same files, same key
    # another crop size in the image processor: other pixels reach the model
    config = weights / "pickscore" / "processor" / "preprocessor_config.json"
    values = json.loads(config.read_text())
    values["crop_size"] = 200
    config.write_text(json.dumps(values))
    second = load_scorer("pickscore", weights_dir=str(weights)).version
    assert second != first
    # another tokenizer vocabulary (two words swap ids): other token ids reach the model
    vocab = weights / "imagereward" / "tokenizer" / "vocab.txt"
    before = load_scorer("imagereward", weights_dir=str(weights)).version
    lines = vocab.read_text().splitlines()
    lines[-1], lines[-2] = lines[-2], lines[-1]
    vocab.write_text("\n".join(lines) + "\n")
    assert load_scorer("imagereward", weights_dir=str(weights)).version != before


def test_version_follows_the_scoring_code_version(scorer_weights, monkeypatch):
    first = load_scorer("clip", weights_dir=scorer_weights).version
    monkeypatch.setattr(base, "SCORING_CODE_VERSION", base.SCORING_CODE_VERSION + 1)
    assert load_scorer("clip", weights_dir=scorer_weights).version != first


def test_mis_shaped_weights_are_one_line(scorer_weights, tmp_path):
    weights = copy_weights(scorer_weights, tmp_path)
    path = weights / "pickscore" / "model" / "model.safetensors"
    tensors = load_file(path)
    name = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(UserError) as e:
        load_scorer("pickscore", weights_dir=str(weights))
    assert "\n" not in str(e.value) and "pickscore" in str(e.value).lower()


def test_aesthetic_v1_head_is_pinned():
    assert HEADS["aestheticv1"].sha256 == "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba"


def test_version_is_the_same_in_another_process(scorer_weights):
    """The key must not depend on the process (a function's repr holds its memory address):
    two fresh interpreters give the same version for every metric."""
    import subprocess
    import sys
    code = ("import sys; from rpo.scores import load_scorer, METRICS; "
            "print(' '.join(load_scorer(m, weights_dir=sys.argv[1]).version for m in METRICS))")
    runs = [subprocess.run([sys.executable, "-c", code, scorer_weights], capture_output=True, text=True, check=True,
                           cwd=base.__file__.rsplit("/rpo/", 1)[0]).stdout for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0].split()) == 6
