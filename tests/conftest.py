import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from rpo import tiny  # noqa: E402


@pytest.fixture(scope="session")
def kit(tmp_path_factory):
    """The tiny kit, written once per test session: {'sd15', 'experts', 'prompts'} -> path."""
    root = tmp_path_factory.mktemp("kit")
    paths = {}
    for kind in ("sd15", "experts", "prompts"):
        paths[kind] = str(root / kind)
        tiny.KITS[kind](paths[kind], seed=0)
    return paths
