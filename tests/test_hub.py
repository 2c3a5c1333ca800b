"""Publishing with the real `huggingface_hub` client against a loopback Hub server (tests/hub_server.py):
push from the recipe, from recipes/push.py and from a non-editable install, load back from that server in a
Python without mmpeft, and the failure cases (server down, HTTP 401 / 500 on commit)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub
from recipe_helpers import REPO, TINY, finetune
from tiny_parts import media

from mmpeft import MMPeftForConditionalGeneration, MMPeftProcessor
from mmpeft.data import MMPeftDataCollator, MMPeftDataset
from mmpeft.hub import model_card
from mmpeft.models import MMPeftConfig
from mmpeft.training import TuningArguments, setup_tuning


TOKEN = "hf_secret_test_token_123"


@pytest.fixture
def hub():
    server = FakeHub(token=TOKEN)
    yield server
    server.close()


def hub_env(hub, tmp_path):
    return {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN,
            "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip


def run(command, env, cwd, timeout=300):
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return result, time.perf_counter() - start


LOAD_WITHOUT_MMPEFT = textwrap.dedent(
    """
    import importlib.abc, sys
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "mmpeft" or name.startswith("mmpeft."):
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, Hide())
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    repo_id, batch_file, out_file = sys.argv[1:4]
    model = AutoModelForImageTextToText.from_pretrained(repo_id, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(processor).__name__ == "MMPeftProcessor"
    with torch.no_grad():
        torch.save(model(**torch.load(batch_file)).logits, out_file)
    """
)


def snapshot(folder) -> dict[str, str]:
    """The sha256 of every file under `folder`, by path: equal snapshots, byte-identical folders."""
    files = [path for path in Path(folder).rglob("*") if path.is_file()]
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def logits_batch(output_dir, examples):
    processor = MMPeftProcessor.from_pretrained(output_dir)
    dataset = MMPeftDataset(examples, processor)
    return MMPeftDataCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


def assert_loads_without_mmpeft(hub, tmp_path, repo_id, batch, expected):
    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "load.py").write_text(LOAD_WITHOUT_MMPEFT)
    env = {**hub_env(hub, tmp_path), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result, _ = run([sys.executable, str(tmp_path / "load.py"), repo_id, str(tmp_path / "batch.pt"),
                     str(tmp_path / "remote.pt")], env, tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "remote.pt"), expected)


def test_push_full_output_with_card_and_load_it_back_without_mmpeft(hub, tmp_path):
    output = tmp_path / "full"
    trainer = finetune.main([*TINY, "--method", "full", "--output_dir", str(output), "--report_to", "none"])
    (output / "README.md").write_text("My notes on this run.\n")
    before = snapshot(output)
    result, seconds = run([sys.executable, os.path.join(REPO, "recipes", "push.py"), str(output), "alice/tiny-full"],
                          hub_env(hub, tmp_path), tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(output) == before  # the card went into the commit, in place of the folder's own README.md
    files = hub.files("alice/tiny-full")
    assert {"model.safetensors", "config.json", "modeling_mmpeft.py", "configuration_mmpeft.py",
            "processing_mmpeft.py", "processor_config.json", "tokenizer.json", "README.md"} <= set(files)  # fmt: skip
    assert not any(name.startswith(("checkpoint-", "wandb")) or name.endswith(".bin") for name in files)
    card = files["README.md"].decode()
    assert (
        card.startswith("---\n")
        and "library_name: transformers" in card
        and "pipeline_tag: image-text-to-text" in card
    )
    assert "Method: **full**" in card and "| language model |" in card and "eval_accuracy" in card
    assert "| language model | llama (random init) |" in card
    assert "Base model: none, the parts were initialised from scratch" in card and "base_model" not in card
    assert 'AutoModelForImageTextToText.from_pretrained("alice/tiny-full", trust_remote_code=True)' in card

    # From the same server, in a Python where mmpeft cannot be imported: identical outputs.
    batch = logits_batch(output, trainer.eval_dataset.rows.select(range(4)))
    with torch.no_grad():
        expected = MMPeftForConditionalGeneration.from_pretrained(output).eval()(**batch).logits
    assert_loads_without_mmpeft(hub, tmp_path, "alice/tiny-full", batch, expected)


def test_recipe_pushes_lora_adapter_then_merged_and_never_leaks_the_token(hub, tmp_path):
    output = tmp_path / "lora"
    command = [sys.executable, os.path.join(REPO, "recipes", "finetune.py"), *TINY, "--output_dir", str(output),
               "--push_to_hub", "true", "--hub_model_id", "alice/tiny-lora", "--hub_token", TOKEN]  # fmt: skip
    env = {**hub_env(hub, tmp_path), "HF_TOKEN": "", "WANDB_MODE": "offline"}  # the token only on the command line
    result, _ = run(command, env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mmpeft | pushed to" in result.stdout
    files = hub.files("alice/tiny-lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json", "modeling_mmpeft.py",
            "README.md"} <= set(files)  # fmt: skip
    card = files["README.md"].decode()
    assert "library_name: peft" in card and "Method: **lora**" in card and "vision_projector" in card
    # Its base, the reference checkpoint in the cache, is named by its folder's name only, not its path.
    assert "base: local folder `tiny-omni-v1` (not on the Hub)" in card and "base_model_local:\n- tiny-omni-v1" in card
    assert os.environ["MMPEFT_CACHE"] not in card
    # The token is in no log, card, saved argument or W&B record.
    for text in [result.stdout, result.stderr, *(data.decode(errors="ignore") for data in files.values())]:
        assert TOKEN not in text
    for root, _, names in os.walk(output):
        for name in names:
            assert TOKEN.encode() not in open(os.path.join(root, name), "rb").read(), name
    # The card and the model code went into the commit only (the README.md in the output is PEFT's own).
    assert "modeling_mmpeft.py" not in os.listdir(output) and (output / "README.md").read_bytes() != files["README.md"]

    # recipes/push.py --merge: a plain 16-bit checkpoint that loads without PEFT or mmpeft.
    before = snapshot(output)
    result, _ = run([sys.executable, os.path.join(REPO, "recipes", "push.py"), str(output), "alice/tiny-merged",
                     "--merge"], hub_env(hub, tmp_path), tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(output) == before  # merged into a new folder, <output>-merged
    merged_files = hub.files("alice/tiny-merged")
    assert "model.safetensors" in merged_files and "adapter_config.json" not in merged_files
    merged_dir = str(output) + "-merged"
    images, audio = media(0, num_images=1, audio_seconds=(0.5,))
    processor = MMPeftProcessor.from_pretrained(merged_dir)
    batch = dict(processor(text=["<image><audio> What?"], images=images, audio=audio, return_tensors="pt"))
    with torch.no_grad():
        expected = MMPeftForConditionalGeneration.from_pretrained(merged_dir).eval()(**batch).logits
    assert_loads_without_mmpeft(hub, tmp_path, "alice/tiny-merged", batch, expected)


@pytest.mark.parametrize(
    "failure, kind",
    [("server down", "full"), ("401 on commit", "full"), ("500 on commit", "full"), ("401 on commit", "lora")],
)
def test_failed_push_is_fast_clear_and_leaves_output_byte_identical(failure, kind, hub, tmp_path, reference_dir):
    output = tmp_path / "out"
    model = MMPeftForConditionalGeneration.from_pretrained(reference_dir)
    # A LoRA output as finetune.py saves it: no model code of its own, which the push adds to the commit.
    (setup_tuning(model, TuningArguments()) if kind == "lora" else model).save_pretrained(output)
    MMPeftProcessor.from_pretrained(reference_dir).save_pretrained(output)
    (output / "README.md").write_text("My notes on this run.\n")
    before = snapshot(output)
    env = hub_env(hub, tmp_path)
    if failure == "server down":
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there
    elif failure == "401 on commit":
        hub.fail["commit"] = 401
    else:
        hub.fail["commit"] = 500
    result, seconds = run([sys.executable, os.path.join(REPO, "recipes", "push.py"), str(output), "alice/x"], env,
                          tmp_path)  # fmt: skip
    # Within seconds; a server error within a minute: the Hub client retries a 5xx five times (23 s of backoff).
    assert result.returncode != 0 and seconds < (60 if failure == "500 on commit" else 30)
    assert "Pushing" in result.stderr and "failed" in result.stderr and "retry with" in result.stderr
    assert f"python recipes/push.py {output} alice/x" in result.stderr
    assert TOKEN not in result.stderr + result.stdout
    assert snapshot(output) == before  # the same files, byte for byte: not even the model card was written


def test_non_editable_install_pushes_a_card_from_its_packaged_template(hub, tmp_path, reference_dir):
    # Built from a copy of the sources (pip builds in the source tree), with a marker in the packaged template.
    source = tmp_path / "source"
    shutil.copytree(os.path.join(REPO, "mmpeft"), source / "mmpeft", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source)
    marker = "Rendered from the template in the installed package."
    with open(source / "mmpeft" / "templates" / "model_card.md", "a") as template:
        template.write(f"\n{marker}\n")
    site = tmp_path / "site"
    result, _ = run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                     "--no-index", "--target", str(site), str(source)], os.environ, tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    output = tmp_path / "out"
    shutil.copytree(reference_dir, output)
    push = "import sys, mmpeft.hub; print(mmpeft.hub.__file__); mmpeft.hub.push_output(sys.argv[1], 'alice/installed')"
    env = {**hub_env(hub, tmp_path), "PYTHONPATH": str(site)}  # cwd tmp_path: no repository around
    result, _ = run([sys.executable, "-c", push, str(output)], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(str(site / "mmpeft" / "hub.py"))
    card = hub.files("alice/installed")["README.md"].decode()
    assert marker in card and "| language model |" in card and "library_name: transformers" in card


@pytest.fixture
def composed_output(parts, tmp_path):
    """A full output composed from local parts (tests/conftest.py `parts`): folders `clip`, `whisper` and `lm`."""
    root, _ = parts
    model, _ = MMPeftForConditionalGeneration.from_pretrained_parts(
        text=root / "lm", vision=root / "clip", audio=root / "whisper"
    )
    model.save_pretrained(tmp_path / "composed")
    return tmp_path / "composed", root


def test_card_of_a_model_composed_from_local_parts_names_them_off_the_hub(composed_output):
    output, root = composed_output
    card = model_card(str(output), "alice/local")
    assert card.data.base_model is None  # the Hub accepts Hub repositories only
    assert card.data.base_model_local == ["clip", "whisper", "lm"]
    assert "Base models: local folders `clip`, `whisper`, `lm` (not on the Hub)" in card.text
    assert "| language model | local folder `lm` (qwen2, not on the Hub) |" in card.text
    assert "| audio encoder | local folder `whisper` (whisper, not on the Hub) |" in card.text
    assert str(root) not in str(card)  # folders are named, their paths (the user's home, ...) are not


def test_card_of_an_adapter_on_a_local_base_names_the_base_and_its_hub_parts(composed_output, tmp_path):
    output, _ = composed_output
    config = MMPeftConfig.from_pretrained(output)
    config.text_config._name_or_path = "Qwen/Qwen2.5-0.5B-Instruct"  # as if composed from the Hub's LM
    config.save_pretrained(output)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(output), "modules_to_save": ["vision_projector"]})
    )
    card = model_card(str(adapter), "alice/adapter")
    assert card.data.base_model == ["Qwen/Qwen2.5-0.5B-Instruct"] and card.data.library_name == "peft"
    assert card.data.base_model_local == ["composed", "clip", "whisper"]
    named = "Base models: `Qwen/Qwen2.5-0.5B-Instruct`; local folders `composed`, `clip`, `whisper` (not on the Hub)"
    assert named in card.text
    assert "vision_projector; base: local folder `composed` (not on the Hub))" in card.text
    assert 'from_pretrained("composed", trust_remote_code=True)  # a local folder, not on the Hub' in card.text
