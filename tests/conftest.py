import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One thread per process (inherited by the scripts the tests launch): tiny models gain
# nothing from two, and two ranks x two OpenMP threads on a 2-core machine spin-wait each
# other into 100x slowdowns.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from rpo.tiny.__main__ import KITS  # noqa: E402


@pytest.fixture(scope="session")
def kit(tmp_path_factory):
    """The tiny kit, written once per test session: {'sd15', 'experts', 'prompts'} -> path."""
    root = tmp_path_factory.mktemp("kit")
    paths = {}
    for kind in ("sd15", "experts", "prompts"):
        paths[kind] = str(root / kind)
        KITS[kind](paths[kind], seed=0)
    return paths


from scores_fixtures import scorer_weights  # noqa: E402,F401  (tiny scorer weights, once per session)
