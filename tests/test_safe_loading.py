"""Loading never runs code from a checkpoint: weights from safetensors only, the Trainer's resume state through
torch's weights-only unpickler, and model code saved next to a checkpoint imported only with trust_remote_code.

Each test plants a payload that creates a marker file when it runs, checks that it really would run when loaded
the unsafe way, and that mmpeft's loading refuses it without running it."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from recipe_helpers import TINY, finetune
from tiny_parts import build

from mmpeft import MMPeftForConditionalGeneration, MMPeftProcessor
from mmpeft.inference import merge_adapter
from mmpeft.training.checkpoints import mark_complete


class Payload:
    """Unpickling this opens (creates) `marker`: any callable could be there instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_pickle(path, marker):
    torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, path)
    # The planted file is hostile: an unrestricted unpickler runs the payload.
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)
    os.remove(marker)


def test_model_weights_load_from_safetensors_only(tmp_path, tok):
    model, _ = build(tok=tok)
    model.save_pretrained(tmp_path / "model")
    os.remove(tmp_path / "model" / "model.safetensors")
    marker = tmp_path / "ran"
    plant_pickle(tmp_path / "model" / "pytorch_model.bin", marker)
    with pytest.raises(OSError, match="model.safetensors"):
        MMPeftForConditionalGeneration.from_pretrained(tmp_path / "model")
    assert not marker.exists()


def test_merge_refuses_an_adapter_saved_as_a_pickle(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    marker = tmp_path / "ran"
    plant_pickle(adapter / "adapter_model.bin", marker)
    with pytest.raises(ValueError, match="has no adapter_model.safetensors"):
        merge_adapter(adapter, tmp_path / "merged")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resume_refuses_a_pickle_planted_in_a_checkpoint(name, tmp_path):
    output = tmp_path / "run"
    args = [*TINY, "--output_dir", str(output), "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none"]
    finetune.main([*args, "--max_steps", "2"])
    checkpoint = output / "checkpoint-2"
    marker = tmp_path / "ran"
    plant_pickle(checkpoint / name, marker)
    mark_complete(str(checkpoint), 2)  # as whoever planted it could: the loader itself must refuse it
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        finetune.main([*args, "--max_steps", "4", "--resume_from_checkpoint", str(checkpoint)])
    assert not marker.exists()


def test_model_code_next_to_a_checkpoint_runs_only_with_trust_remote_code(tmp_path, tok):
    model, processor = build(tok=tok)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    marker = tmp_path / "ran"
    with open(folder / "modeling_mmpeft.py", "a") as file:  # the copy saved for trust_remote_code
        file.write(f"\nopen({str(marker)!r}, 'w').close()\n")

    # mmpeft loads with its own installed code: the saved copy is never imported.
    MMPeftForConditionalGeneration.from_pretrained(folder)
    assert not marker.exists()
    # Plain transformers (no mmpeft imported) refuses the remote code unless trust_remote_code is set.
    load = "from transformers import AutoModelForImageTextToText as A; A.from_pretrained({!r}{})"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    refused = subprocess.run(
        [sys.executable, "-c", load.format(str(folder), "")], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert refused.returncode != 0 and "trust_remote_code" in refused.stderr
    assert not marker.exists()
    # The planted line is live code: with trust_remote_code=True it runs (that is what the flag means).
    trusted = subprocess.run(
        [sys.executable, "-c", load.format(str(folder), ", trust_remote_code=True")],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert marker.exists()


# Each part's config, and the keys that make transformers look for a checkpoint's own class.
AUTO_MAPS = {
    "tokenizer": ("tokenizer_config.json", None, "tokenizer_class", "AutoTokenizer"),
    "image_processor": ("processor_config.json", "image_processor", "image_processor_type", "AutoImageProcessor"),
    "feature_extractor": (
        "processor_config.json", "feature_extractor", "feature_extractor_type", "AutoFeatureExtractor"
    ),
}  # fmt: skip


def plant_auto_map(folder, part, marker):
    """Map `part` to a class in a .py file planted in `folder`, which creates `marker` when imported."""
    (folder / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import PreTrainedTokenizerFast as Custom\n"
    )
    name, key, type_key, auto_class = AUTO_MAPS[part]
    config = json.loads((folder / name).read_text())
    settings = config[key] if key else config
    settings[type_key] = "Custom"
    settings["auto_map"] = {auto_class: ["custom.Custom", "custom.Custom"] if part == "tokenizer" else "custom.Custom"}
    (folder / name).write_text(json.dumps(config))


@pytest.fixture
def prompts(tmp_path, monkeypatch):
    """What transformers asks on the terminal; each prompt is answered y (run the code)."""
    asked = []
    monkeypatch.setattr("builtins.input", lambda *args: asked.append(args) or "y")
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "modules"))
    return asked


@pytest.mark.parametrize("part", list(AUTO_MAPS))
def test_a_processor_part_mapped_to_custom_code_is_refused_without_a_prompt(part, tmp_path, tok, prompts):
    _, processor = build(tok=tok)
    folder = tmp_path / "model"
    processor.save_pretrained(folder)
    marker = tmp_path / "ran"
    plant_auto_map(folder, part, marker)
    with pytest.raises(ValueError, match=r"maps to custom code \(auto_map\); mmpeft never runs code from"):
        MMPeftProcessor.from_pretrained(folder)
    assert not prompts and not marker.exists()


def test_a_part_mapped_to_custom_code_is_refused_when_composing(parts, tmp_path, prompts):
    root, _ = parts
    text = tmp_path / "lm"
    shutil.copytree(root / "lm", text)
    marker = tmp_path / "ran"
    plant_auto_map(text, "tokenizer", marker)
    # A model of its own kind (transformers has no tokenizer for it): only then would its code be needed.
    config = json.loads((text / "config.json").read_text())
    config.update(model_type="custom", auto_map={"AutoConfig": "custom.Custom"})
    (text / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lm: its Tokenizer config maps to custom code \(auto_map\)"):
        MMPeftForConditionalGeneration.from_pretrained_parts(text=text)
    assert not prompts and not marker.exists()
