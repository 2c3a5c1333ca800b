"""The test suite is hermetic: a user's own W&B folder, HF cache or mmpeft cache neither changes its results nor
receives its files."""

import os
import subprocess
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests that write a W&B run and read it back from their output folder, and build the reference model and data.
TESTS = ["tests/recipes/test_finetune.py::test_lora_default_end_to_end"]


def test_the_suite_ignores_the_users_wandb_dir_hf_home_and_cache(tmp_path):
    user = {name: tmp_path / name.lower() for name in ("WANDB_DIR", "HF_HOME", "MMPEFT_CACHE")}
    for folder in user.values():
        folder.mkdir()
    env = {**os.environ, **{name: str(folder) for name, folder in user.items()}, "WANDB_PROJECT": "users-own"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:warnings", *TESTS],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"{len(TESTS)} passed" in result.stdout
    for name, folder in user.items():
        assert not any(folder.iterdir()), f"the tests wrote into the user's {name}: {sorted(os.listdir(folder))}"
