"""Configs and command lines that cannot work are refused up front, in one line naming the value and the fix."""

import math
import os
import subprocess
import sys
import time

import pytest

from mmpeft.training import ConfigError, ModelArguments, load_model, parse_args
from mmpeft.training.arguments import MAX_CONFIG_VALUES, check_model_path


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def alias_bomb(levels: int = 9) -> str:
    """Billion laughs: 9 aliases of 9 aliases of ... a list of 9 -- 9**9 values once expanded."""
    names = "abcdefghijklmnop"
    lines = [f"{names[0]}: &{names[0]} [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{names[i]}: &{names[i]} [{', '.join([f'*{names[i - 1]}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines)


def test_a_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path):
    # The anchors sit inside a key of their own: the last one is wandb_tags, which W&B would serialise.
    path = config(tmp_path, alias_bomb().replace("i: &i", "wandb_tags: &i") + "\n")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"config.yaml: its YAML aliases \(\*name\) expand it to [\d,]{11} values"):
        parse_args(["--config", path, "--report_to", "none"])
    assert time.monotonic() - start < 30  # a generous bound: expanding it would take minutes and gigabytes


def test_a_yaml_alias_into_itself_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="a YAML alias .* refers to a value that contains it"):
        parse_args(["--config", config(tmp_path, "wandb_tags: &tags [a, *tags]\n")])


def test_a_config_with_a_few_aliases_loads(tmp_path):
    text = "wandb_tags: &tags [lora, tiny]\nwandb_group: &group compare\nrun_name: *group\n"
    text += "train_data:\n  - {path: a.jsonl, weight: &w 2}\n  - {path: b.jsonl, weight: *w}\n"
    _, data_args, _, training_args, _ = parse_args(["--config", config(tmp_path, text), "--report_to", "none"])
    assert training_args.wandb_tags == ["lora", "tiny"] and training_args.run_name == "compare"
    assert [spec["weight"] for spec in data_args.train_data] == [2.0, 2.0]
    # The bound leaves room for any real config.
    many = "wandb_tags: [" + ", ".join(["t"] * (MAX_CONFIG_VALUES // 10)) + "]\n"
    assert len(parse_args(["--config", config(tmp_path, many), "--report_to", "none"])[3].wandb_tags) > 1000


@pytest.mark.parametrize(
    "text, message",
    [
        ("method: [lora\n", r"config.yaml: not valid YAML: while parsing a flow sequence"),
        ("- method\n", r"config.yaml: a config is a mapping of settings \(key: value\), got a list"),
    ],
)
def test_a_config_that_is_not_a_mapping_of_settings_is_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_args(["--config", config(tmp_path, text)])
    assert "\n" not in str(error.value)


def test_lora_kwargs_come_from_yaml_or_as_json_from_the_command_line(tmp_path):
    path = config(tmp_path, "lora_kwargs: {use_rslora: true}\n")
    assert parse_args(["--config", path])[2].lora_kwargs == {"use_rslora": True}
    tuning_args = parse_args(["--config", path, "--lora_kwargs", '{"init_lora_weights": "gaussian"}'])[2]
    assert tuning_args.lora_kwargs == {"init_lora_weights": "gaussian"}
    with pytest.raises(ConfigError, match=r"lora_kwargs: not a JSON object"):
        parse_args(["--lora_kwargs", "{init_lora_weights: gaussian}"])


def test_config_needs_a_path_to_an_existing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^--config needs a YAML file path"):
        parse_args(["--learning_rate", "0.1", "--config"])
    with pytest.raises(ConfigError, match=r"^--config needs a YAML file path"):
        parse_args(["--config", "--learning_rate", "0.1"])
    with pytest.raises(ConfigError, match=r"^config file not found: missing.yaml$"):
        parse_args(["--config", "missing.yaml"])
    path = config(tmp_path, "learning_rate: 0.25\n")
    assert parse_args([f"--config={path}", "--report_to", "none"])[3].learning_rate == 0.25


def test_flags_are_never_abbreviated(tmp_path):
    with pytest.raises(
        ConfigError, match=r"\['--learning_r', '0.5'\] \('--learning_r': did you mean '--learning_rate'"
    ):
        parse_args(["--learning_r", "0.5", "--report_to", "none"])
    with pytest.raises(ConfigError, match=r"unknown command-line arguments: \['--learning_r=0.5'\]"):
        parse_args(["--learning_r=0.5", "--report_to", "none"])
    assert parse_args(["--learning_rate", "0.5", "--report_to", "none"])[3].learning_rate == 0.5


@pytest.mark.parametrize("name", ["train_data", "eval_data"])
def test_one_dataset_may_be_given_without_a_list(tmp_path, name):
    data_args = parse_args(["--config", config(tmp_path, f"{name}: data.jsonl\n"), "--report_to", "none"])[1]
    assert [spec["path"] for spec in getattr(data_args, name)] == ["data.jsonl"]
    text = f"{name}: {{path: data.jsonl, weight: 2}}\n"
    data_args = parse_args(["--config", config(tmp_path, text), "--report_to", "none"])[1]
    assert [(spec["path"], spec["weight"]) for spec in getattr(data_args, name)] == [("data.jsonl", 2.0)]
    data_args = parse_args([f"--{name}", "data.jsonl", "--report_to", "none"])[1]
    assert [spec["path"] for spec in getattr(data_args, name)] == ["data.jsonl"]


@pytest.mark.parametrize("weight", ["1e9", "1.0e9", ".inf", ".nan", "two", "-1", "0", "true", "[1]"])
def test_mixing_weights_outside_the_allowed_range_are_refused(tmp_path, weight):
    text = f"train_data:\n  - {{path: data.jsonl, weight: {weight}}}\n"
    with pytest.raises(ConfigError, match=r"train_data: the weight of data.jsonl must be a number in \(0, 1000\]"):
        parse_args(["--config", config(tmp_path, text), "--report_to", "none"])


def test_mixing_weights_within_the_range_are_kept(tmp_path):
    text = "train_data:\n  - {path: a.jsonl, weight: 0.5}\n  - {path: b.jsonl, weight: 1000}\n  - c.jsonl\n"
    data_args = parse_args(["--config", config(tmp_path, text), "--report_to", "none"])[1]
    assert [spec["weight"] for spec in data_args.train_data] == [0.5, 1000.0, 1.0]
    assert not any(math.isnan(spec["weight"]) for spec in data_args.train_data)


@pytest.mark.parametrize("name", ["model_name_or_path", "text_model", "vision_model", "audio_model"])
@pytest.mark.parametrize("value", ["./chekpoint", "../chekpoint", "/no/such/chekpoint", "~/chekpoint", "a/b/c"])
def test_a_mistyped_model_folder_is_named_as_such(name, value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"^{name}: {value} is not a folder \(not found\)"):
        check_model_path(name, value)


def test_model_paths_that_exist_in_part_or_as_a_file_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "weights.safetensors").write_text("")
    with pytest.raises(ConfigError, match=r"^model_name_or_path: outputs/stage1 is not a folder \(not found\)"):
        check_model_path("model_name_or_path", "outputs/stage1")
    with pytest.raises(ConfigError, match=r"^text_model: weights.safetensors is not a folder \(a file\)"):
        check_model_path("text_model", "weights.safetensors")
    assert check_model_path("model_name_or_path", "outputs") == "outputs"


def test_a_hub_id_that_cannot_be_had_offline_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"^model_name_or_path: chekpoint is not a folder, nor a model in the local"):
        check_model_path("model_name_or_path", "chekpoint")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert check_model_path("text_model", "owner/model") == "owner/model"  # left to the Hub


def test_the_recipe_reports_a_config_error_in_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "recipes", "finetune.py"), "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == f"mmpeft: config file not found: {tmp_path / 'missing.yaml'}"
    assert "Traceback" not in run.stderr


def test_loading_a_mistyped_model_folder_names_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^model_name_or_path: ./chekpoint is not a folder"):
        load_model(ModelArguments(model_name_or_path="./chekpoint"))
    with pytest.raises(ConfigError, match=r"^text_model: ../lm is not a folder"):
        load_model(ModelArguments(text_model="../lm"))
