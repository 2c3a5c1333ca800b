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
