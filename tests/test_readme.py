"""The README's Python example runs as written, with local tiny parts in place of the Hub ids."""

import os
import re


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_composition_example_runs(parts, tmp_path, monkeypatch):
    root, _ = parts
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    [example] = [block for block in blocks if "from_pretrained_parts" in block]
    hub_ids = (
        'TEXT, VISION, AUDIO = "Qwen/Qwen2.5-0.5B-Instruct", "google/siglip-base-patch16-224", "openai/whisper-base"'
    )
    assert hub_ids in example
    local = f'TEXT, VISION, AUDIO = "{root / "lm"}", "{root / "clip"}", "{root / "whisper"}"'
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example.replace(hub_ids, local), README, "exec"), namespace)
    assert (tmp_path / "my-omni-model" / "model.safetensors").exists()
    assert type(namespace["model"]).__name__ == "MMPeftForConditionalGeneration"


def test_readme_training_api_example_runs(tmp_path, monkeypatch):
    from recipe_helpers import TINY

    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    [example] = [block for block in blocks if "from mmpeft.training import parse_args, run" in block]
    config = '["--config", "recipes/configs/tiny_lora.yaml"]'
    assert config in example
    shrunk = repr(["--config", "recipes/configs/tiny_lora.yaml", *TINY, "--output_dir", str(tmp_path / "run")])
    monkeypatch.chdir(os.path.dirname(README))
    namespace = {}
    exec(compile(example.replace(config, shrunk), README, "exec"), namespace)
    result = namespace["result"]
    assert result.output_dir == str(tmp_path / "run") and result.summary.method == "lora"
    assert result.summary.metrics["eval_accuracy"] == result.metrics["eval_accuracy"]
    assert (tmp_path / "run" / "run_summary.json").exists() and (
        tmp_path / "run" / "adapter_model.safetensors"
    ).exists()
