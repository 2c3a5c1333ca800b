"""Configs and command lines that cannot work are refused up front, in one line naming the value and the fix."""

import os
import subprocess
import sys

import pytest

from mmpeft.training import ConfigError, parse_args


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


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


def test_config_needs_a_path_to_an_existing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^--config needs a YAML file path"):
        parse_args(["--learning_rate", "0.1", "--config"])
    with pytest.raises(ConfigError, match=r"^--config needs a YAML file path"):
        parse_args(["--config", "--learning_rate", "0.1"])
    with pytest.raises(ConfigError, match=r"^config file not found: missing.yaml$"):
        parse_args(["--config", "missing.yaml"])
    path = config(tmp_path, "learning_rate: 0.25\n")
    assert parse_args([f"--config={path}", "--report_to", "none"])[3].learning_rate == 0.25


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
