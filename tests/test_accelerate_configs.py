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
        "fsdp2.yaml",
        "cpu_2proc.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_names_its_launch_command(path):
    text = open(path).read()
    command = f"accelerate launch --config_file accelerate_configs/{os.path.basename(path)}"
    assert text.startswith("#") and command in text
    config = ClusterConfig.from_yaml_file(path)  # accelerate's own loader
    assert config.distributed_type.value == yaml.safe_load(text)["distributed_type"]


def test_fsdp2_config_shards_every_layer_and_saves_whole(monkeypatch, tok):
    # The FSDP settings `accelerate launch` hands each process for fsdp2.yaml, read back by accelerate's plugin as
    # on a GPU machine, and its auto-wrap policy on a composition: one unit per layer of the encoders and the LM.
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env
    from tiny_parts import build

    config = os.path.join(REPO, "accelerate_configs", "fsdp2.yaml")
    args = launch_command_parser().parse_args(["--config_file", config, "recipes/finetune.py"])
    for name, value in prepare_multi_gpu_env(_validate_launch_command(args)[0]).items():
        if name.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.transformer_cls_names_to_wrap is None

    model, _ = build("llama", "clip", "wav2vec2", tok=tok)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = {name for name, module in model.named_modules() if policy(module)}
    layers = {f"language_model.model.layers.{i}" for i in range(2)} | {
        f"vision_tower.encoder.layers.{i}" for i in range(2)
    }
    assert layers | {"audio_tower.encoder.layers.0"} <= units
    assert {type(model.get_submodule(name)).__name__ for name in units} == model._no_split_modules
