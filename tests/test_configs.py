import glob
import os

import pytest
from accelerate.commands.config.config_args import load_config_from_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = {"default_config": ("NO", 1, "no"), "4gpu": ("MULTI_GPU", 4, "bf16"), "8gpu": ("MULTI_GPU", 8, "bf16"),
            "2node": ("MULTI_GPU", 8, "bf16"), "deepspeed_zero2": ("DEEPSPEED", 4, "bf16"), "fsdp": ("FSDP", 4, "bf16")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_configs_load(name):
    config = load_config_from_file(os.path.join(REPO, "configs", f"{name}.yaml"))
    kind, processes, precision = EXPECTED[name]
    assert (str(config.distributed_type).split(".")[-1], config.num_processes, config.mixed_precision) == (kind, processes, precision)


def test_every_config_is_tested():
    names = {os.path.basename(f)[:-5] for f in glob.glob(os.path.join(REPO, "configs", "*.yaml"))}
    assert names == set(EXPECTED)
