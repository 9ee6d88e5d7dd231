"""The README's commands are the contract (the paper's README's commands, repaired; see
docs/papers-readme.md): every command it shows for train.py, inference.py, score.py and
the dataset tools must parse with that script's own parser, unchanged."""
import importlib
import os
import re
import shlex

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train.py": "train", "inference.py": "inference", "score.py": "score",
           "tools.pickapic": "tools.pickapic", "tools.hpdv2_benchmark": "tools.hpdv2_benchmark"}


def readme_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#")[0].strip().replace("${style}", "anime")
            if line.startswith(("do ", "for ")) or not line:
                continue
            words = shlex.split(line)
            for i, word in enumerate(words):
                target = word if word in SCRIPTS else (words[i + 1] if word == "-m" and i + 1 < len(words) else None)
                if target in SCRIPTS:
                    start = i + 1 if word in SCRIPTS else i + 2
                    commands.append((target, words[start:]))
                    break
    return commands


def test_readme_shows_every_stage():
    assert {name for name, _ in readme_commands()} == set(SCRIPTS)
    assert any(name == "train.py" and "sd15_pickapicv2hpsv2nopreferred500_bs256_hinge_1" in " ".join(argv)
               for name, argv in readme_commands())


@pytest.mark.parametrize("name, argv", readme_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_readme_command_parses(name, argv, monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    module = importlib.import_module(SCRIPTS[name])
    args = module.build_parser().parse_args(argv)
    if name == "train.py" and args.logdir.endswith("sd15_pickapicv2hpsv2nopreferred500_bs256_hinge_1"):
        # the paper's training command, as the paper ran it (other train.py commands: recipes)
        assert (args.num_steps, args.batch_size, args.gradient_accumulation_steps, args.learning_rate) == (25600, 4, 16, 1e-4)
        assert args.hinge and args.buffer_perturb_timesteps and not args.buffer_sync and args.mixed_precision == "bf16"
        assert (args.buffer_size, args.buffer_update_steps, args.checkpointing_steps, args.validation_steps) == (4, 16, 1280, 256)
