"""recipes/finetune.py end to end on the embedded default, shrunk: tiny synthetic data, a few steps."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from recipe_helpers import TINY, finetune, losses

from mmpeft import MMPeftForConditionalGeneration, MMPeftProcessor
from mmpeft.data import MMPeftDataCollator, MMPeftDataset
from mmpeft.training import parse_args


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "recipes", "configs", "*.yaml")))


def batch_of(processor, examples):
    dataset = MMPeftDataset(examples, processor)
    return MMPeftDataCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_every_config_parses(config):
    model_args, data_args, tuning_args, training_args, path = parse_args(["--config", config])
    assert path == config and tuning_args.components  # method and per-part settings are consistent
    first_line = open(config).readline()
    assert first_line.startswith("#"), "each config starts with a comment giving its launch command"
    assert "recipes/finetune.py" in open(config).read().split("\n\n")[0]


def test_unknown_keys_are_errors(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("method: lora\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown keys 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        parse_args(["--config", str(config)])
    with pytest.raises(ValueError, match=r"unknown command-line arguments: \['--no_such_flag', '1'\]"):
        parse_args(["--no_such_flag", "1"])


def test_lora_default_end_to_end(tmp_path):
    output = tmp_path / "lora"
    trainer = finetune.main([*TINY, "--output_dir", str(output), "--learning_rate", "3e-3"])
    history = losses(trainer)
    assert len(history) == 12 and sum(history[-3:]) / 3 < sum(history[:3]) / 3 * 0.7  # loss goes down

    # Files: adapter with the projectors inside, processor, metrics, data report, W&B offline run.
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "eval_results.json",
        "train_results.json",
        "data_report.json",
    ):
        assert (output / name).exists(), name
    results = json.loads((output / "eval_results.json").read_text())
    assert {"eval_loss", "eval_accuracy", "eval_accuracy_image", "eval_accuracy_audio"} <= set(results)
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert set(adapter["modules_to_save"]) >= {"vision_projector", "audio_projector", "language_model.lm_head"}
    # The offline run's record file (protobuf records, JSON values) holds the config, parameter counts,
    # throughput, memory and eval metrics, and the group used to compare runs.
    [run_file] = glob.glob(str(output / "wandb" / "offline-run-*" / "run-*.wandb"))
    recorded = open(run_file, "rb").read()
    for key in (
        "trainable_params",
        "trainable_fraction",
        "learning_rate",
        "tokens_per_second",
        "peak_memory_mb",
        "eval_accuracy",
        "tiny-default",
    ):
        assert key.encode() in recorded, key
    report = json.loads((output / "data_report.json").read_text())
    assert all(entry["skipped"] == 0 for entry in report.values())

    # Reload: base + adapter gives exactly the trained model's outputs.
    processor = MMPeftProcessor.from_pretrained(output)
    base = MMPeftForConditionalGeneration.from_pretrained(adapter["base_model_name_or_path"])
    reloaded = PeftModel.from_pretrained(base, output).eval()
    trained = trainer.model.eval()
    batch = batch_of(processor, trainer.eval_dataset.rows.select(range(6)))
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained(**batch).logits)
    # The projectors really were trained and saved (not left at their initial weights).
    initial = MMPeftForConditionalGeneration.from_pretrained(adapter["base_model_name_or_path"])
    merged = reloaded.merge_and_unload()
    assert not torch.equal(merged.vision_projector.linear_1.weight, initial.vision_projector.linear_1.weight)


def test_full_fine_tuning_end_to_end_and_reload(tmp_path):
    output = tmp_path / "full"
    trainer = finetune.main(
        [*TINY, "--method", "full", "--output_dir", str(output), "--learning_rate", "1e-3", "--report_to", "none"]
    )
    assert sum(losses(trainer)[-3:]) < sum(losses(trainer)[:3])
    reloaded = MMPeftForConditionalGeneration.from_pretrained(output).eval()
    batch = batch_of(MMPeftProcessor.from_pretrained(output), trainer.eval_dataset.rows.select(range(6)))
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trainer.model.eval()(**batch).logits)
    assert (output / "modeling_mmpeft.py").exists()  # loadable with trust_remote_code too


def test_stage1_projectors_then_stage2_lora(tmp_path):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    configs = os.path.join(REPO, "recipes", "configs")
    trainer1 = finetune.main(
        [
            "--config",
            os.path.join(configs, "stage1_projectors.yaml"),
            *TINY,
            "--output_dir",
            str(stage1),
            "--report_to",
            "none",
        ]
    )
    # Stage 1 trained the projectors only; its output is an ordinary HF checkpoint.
    reference = MMPeftForConditionalGeneration.from_pretrained(trainer1.model.config._name_or_path)
    saved = MMPeftForConditionalGeneration.from_pretrained(stage1)
    assert not torch.equal(saved.audio_projector.linear_2.weight, reference.audio_projector.linear_2.weight)
    assert torch.equal(saved.language_model.lm_head.weight, reference.language_model.lm_head.weight)
    assert torch.equal(
        saved.vision_tower.embeddings.patch_embedding.weight, reference.vision_tower.embeddings.patch_embedding.weight
    )

    trainer2 = finetune.main(
        [
            "--config",
            os.path.join(configs, "stage2_lora.yaml"),
            *TINY,
            "--model_name_or_path",
            str(stage1),
            "--output_dir",
            str(stage2),
            "--report_to",
            "none",
        ]
    )
    adapter = json.loads((stage2 / "adapter_config.json").read_text())
    assert os.path.abspath(adapter["base_model_name_or_path"]) == str(stage1)
    # Stage 2 started from the stage-1 projectors (its frozen copy holds them unchanged).
    started = trainer2.model.base_model.model.vision_projector.original_module.linear_1.weight
    assert torch.equal(started, saved.vision_projector.linear_1.weight)


def test_resume_from_checkpoint_continues(tmp_path):
    output = tmp_path / "resume"
    args = [*TINY, "--output_dir", str(output), "--save_strategy", "steps", "--save_steps", "6", "--report_to", "none"]
    finetune.main([*args, "--max_steps", "6"])
    assert (output / "checkpoint-6").is_dir()
    # A longer run than the checkpoint's changes the schedule: resuming it is asked for.
    resume = ["--resume_from_checkpoint", str(output / "checkpoint-6"), "--resume_with_changed_settings", "true"]
    trainer = finetune.main([*args, "--max_steps", "12", *resume])
    assert trainer.state.global_step == 12
    steps = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    # Steps 1-6 come from the checkpoint's history, 7-12 from this run: it continued rather than starting over.
    assert steps == list(range(1, 13))


def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    output = tmp_path / "early"
    # With a zero learning rate accuracy never improves: training stops after `patience` evaluations past the first.
    trainer = finetune.main(
        [
            *TINY,
            "--output_dir",
            str(output),
            "--learning_rate",
            "0",
            "--report_to",
            "none",
            "--max_steps",
            "40",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "2",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--early_stopping_patience",
            "2",
        ]
    )
    assert trainer.state.global_step == 6
    assert trainer.args.load_best_model_at_end and trainer.args.metric_for_best_model == "eval_accuracy"
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")


def test_accelerate_launch_runs_the_recipe(tmp_path):
    """The README's main command, through `accelerate launch` in a fresh process."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            "--cpu",
            os.path.join(REPO, "recipes", "finetune.py"),
            *TINY,
            "--max_steps",
            "4",
            "--output_dir",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mmpeft | lora | {'eval_accuracy'" in result.stdout or "mmpeft | lora | {'eval_loss'" in result.stdout
    assert f"model saved to {tmp_path}" in result.stdout and "W&B run:" in result.stdout


@pytest.mark.parametrize("encoders", [True, False])
def test_gradient_checkpointing_lm_and_optionally_encoders(encoders, tmp_path):
    args = [*TINY, "--max_steps", "3", "--report_to", "none", "--method", "full", "--learning_rate", "1e-3"]
    plain = finetune.main([*args, "--output_dir", str(tmp_path / "plain")])
    checkpointed = finetune.main(
        [
            *args,
            "--output_dir",
            str(tmp_path / "gc"),
            "--gradient_checkpointing",
            "true",
            "--encoder_gradient_checkpointing",
            str(encoders).lower(),
        ]
    )
    model = checkpointed.model
    assert all(layer.gradient_checkpointing for layer in model.language_model.model.layers)
    tower_layers = list(model.vision_tower.encoder.layers) + list(model.audio_tower.layers)
    assert all(layer.gradient_checkpointing == encoders for layer in tower_layers)
    # Recomputing activations changes nothing in what is learnt.
    assert losses(checkpointed) == pytest.approx(losses(plain), rel=1e-5)


def test_padding_free_batches_and_loader_workers_train_as_the_default(tmp_path):
    # No dropout: padded and flattened batches draw different dropout masks, the only thing that may differ.
    base = [*TINY, "--max_steps", "4", "--report_to", "none", "--lora_dropout", "0"]
    padded = finetune.main([*base, "--output_dir", str(tmp_path / "padded")])
    packed = finetune.main(
        [*base, "--output_dir", str(tmp_path / "packed"), "--padding_free", "true", "--dataloader_num_workers", "2"]
    )
    assert packed.data_collator.padding_free and packed.args.dataloader_num_workers == 2
    assert losses(packed) == pytest.approx(losses(padded), rel=1e-4)
    results = [json.loads((tmp_path / run / "eval_results.json").read_text()) for run in ("padded", "packed")]
    assert results[1]["eval_loss"] == pytest.approx(results[0]["eval_loss"], rel=1e-4)
    assert results[1]["eval_accuracy"] == results[0]["eval_accuracy"]
    # The share of training time spent waiting for batches is measured and reported.
    summary = json.loads((tmp_path / "packed" / "run_summary.json").read_text())
    assert 0 < summary["data_wait_fraction"] < 1
    assert all(0 < entry["data_wait_fraction"] < 1 for entry in packed.state.log_history if "loss" in entry)


@pytest.mark.parametrize(
    "options",
    [[], ["--validate_media", "none", "--dataloader_num_workers", "2"]],
    ids=["found while preparing", "found while loading, in a DataLoader worker"],
)
def test_a_bad_sample_under_on_bad_sample_error_ends_the_recipe_in_one_line(tmp_path, options):
    sample = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    lines = [json.dumps(sample)] * 12
    bad = {"role": "user", "content": [{"type": "image", "path": "missing.png"}, {"type": "text", "text": "What?"}]}
    lines[4] = json.dumps({"messages": [bad, {"role": "assistant", "content": "A circle"}]})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    command = [
        sys.executable, os.path.join(REPO, "recipes", "finetune.py"), *TINY, "--train_data", str(data),
        "--on_bad_sample", "error", "--output_dir", str(tmp_path / "out"), "--report_to", "none", *options,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        f"mmpeft: bad sample: {data}:5: field 'messages[0].content[0]': file not found: {tmp_path / 'missing.png'} "
        "(on_bad_sample: skip skips and counts bad samples instead)"
    )


def test_adapter_per_modality_end_to_end(tmp_path, monkeypatch):
    from mmpeft.inference import load_for_inference
    from mmpeft.training.modality_adapters import ModalityRouter

    routed = []
    route = ModalityRouter.route
    monkeypatch.setattr(ModalityRouter, "route", lambda self, names: routed.append(tuple(names)) or route(self, names))
    output = tmp_path / "per-modality"
    # One sample per micro-batch: image, audio, image+audio and text-only batches each route differently.
    trainer = finetune.main(
        [
            *TINY,
            "--adapter_per_modality",
            "true",
            "--per_device_train_batch_size",
            "1",
            "--gradient_accumulation_steps",
            "8",
            "--output_dir",
            str(output),
            "--learning_rate",
            "3e-3",
            "--report_to",
            "none",
        ]
    )
    history = losses(trainer)
    assert len(history) == 12 and all(map(math.isfinite, history))
    assert sum(history[-3:]) < sum(history[:3])
    assert {("vision",), ("speech",), ("vision", "speech"), ()} <= set(routed)

    for name in ("vision/adapter_model.safetensors", "speech/adapter_model.safetensors", "eval_results.json"):
        assert (output / name).exists(), name
    results = json.loads((output / "eval_results.json").read_text())
    assert {"eval_accuracy_image", "eval_accuracy_audio"} <= set(results)

    # mmpeft's loading gives the trained model's logits, on image-only and on audio-only batches.
    reloaded, processor = load_for_inference(output)
    trained = trainer.model.eval()
    rows = trainer.eval_dataset.rows
    for task in ("image", "audio"):
        batch = batch_of(processor, rows.select([i for i, t in enumerate(rows["task"]) if t == task][:3]))
        with torch.no_grad():
            assert torch.equal(reloaded(**batch).logits, trained(**batch).logits), task
