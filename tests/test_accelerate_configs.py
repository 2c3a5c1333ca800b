import glob
import os

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "accelerate_configs", "*.yaml")))


def test_every_engine_has_a_config():
    names = {os.path.basename(path) for path in CONFIGS}
    assert {
        "single_gpu.yaml",
        "multi_gpu.yaml",
        "deepspeed_zero2.yaml",
        "deepspeed_zero3.yaml",
        "deepspeed_zero3_offload.yaml",
        "fsdp.yaml",
        "cpu_2proc.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_names_its_launch_command(path):
    text = open(path).read()
    command = f"accelerate launch --config_file accelerate_configs/{os.path.basename(path)}"
    assert text.startswith("#") and command in text
    config = ClusterConfig.from_yaml_file(path)  # accelerate's own loader
    assert config.distributed_type.value == yaml.safe_load(text)["distributed_type"]
