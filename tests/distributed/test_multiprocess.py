"""The recipe under 2-process DDP and DeepSpeed ZeRO-2 / ZeRO-3 on CPU (gloo), with batches whose
modalities differ across ranks in every step. Each launch has a timeout, so a hang fails the test.

Marked `multiprocess` (each launch costs ~10-40 s); `.ci/run` runs them with the rest of the suite.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from mmpeft import MMPeftForConditionalGeneration
from mmpeft.training import latest_complete_checkpoint


pytestmark = pytest.mark.multiprocess
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIGS = os.path.join(REPO, "accelerate_configs")
# Sequential sampling over the synthetic data (image, audio, both and text-only samples in random order):
# with one sample per process, the two ranks hold different modalities in most steps.
RECIPE_ARGS = [
    "--ddp_backend",
    "gloo",
    "--synthetic_train_size",
    "48",
    "--synthetic_eval_size",
    "7",
    "--max_steps",
    "8",
    "--per_device_train_batch_size",
    "1",
    "--per_device_eval_batch_size",
    "2",
    "--eval_strategy",
    "no",
    "--save_strategy",
    "no",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--logging_steps",
    "1",
    "--train_sampling_strategy",
    "sequential",
    "--learning_rate",
    "3e-3",
    "--warmup_steps",
    "0",
]


def launch_command(config: str, output_dir, *args) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(CONFIGS, config),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        os.path.join(HERE, "launch_recipe.py"),
        *RECIPE_ARGS,
        "--output_dir",
        str(output_dir),
        *args,
    ]


def launch(config: str, output_dir, *args, env=None):
    command = launch_command(config, output_dir, *args)
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=420, env={**os.environ, **(env or {})}, cwd=output_dir.parent
    )
    if result.returncode != 0:  # printed whole (pytest shortens assertion messages): why a process died
        print(f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-12000:]}")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    for rank in (0, 1):
        assert f"mmpeft: process {rank} of 2" in result.stdout
        assert f"launch_recipe: rank {rank} wrote" in result.stdout
    ranks = [load_file(os.path.join(output_dir, f"rank{rank}.safetensors")) for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:  # both processes ended with the same weights
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    return result, ranks[0]


def test_ddp_two_processes_mixed_modalities_data_prepared_once(tmp_path):
    # Without unused-parameter detection DDP fails as soon as a rank's batch lacks a modality, unless every
    # tower still takes part in the step.
    output, prepared = tmp_path / "ddp", tmp_path / "prepared"
    result, weights = launch(
        "cpu_2proc.yaml", output, "--ddp_find_unused_parameters", "false", "--prepared_data_dir", str(prepared),
        env={"ACCELERATE_USE_CPU": "true"},
    )  # fmt: skip
    assert "DeepSpeed" not in result.stdout + result.stderr
    # The main process prepared train and eval data once; the other memory-mapped what it wrote.
    assert "mmpeft: process 0: 2 data sources prepared, 0 reused from the cache" in result.stdout
    assert "mmpeft: process 1: 0 data sources prepared, 2 reused from the cache" in result.stdout
    assert len(os.listdir(prepared)) == 2
    reference = MMPeftForConditionalGeneration.from_pretrained(
        json.load(open(output / "adapter_config.json"))["base_model_name_or_path"]
    )
    trained = PeftModel.from_pretrained(reference, output)
    saved = dict(trained.named_parameters())
    for name, tensor in weights.items():  # the saved adapter is what the ranks trained
        assert torch.equal(saved[name], tensor), name


def test_ddp_padding_free_packs_each_ranks_samples(tmp_path):
    # Two samples per rank, laid end to end: packed attention and the padding-free check run on every rank.
    result, _ = launch(
        "cpu_2proc.yaml", tmp_path / "ddp-packed", "--padding_free", "true", "--per_device_train_batch_size", "2",
        env={"ACCELERATE_USE_CPU": "true"},
    )  # fmt: skip
    losses = [json.loads(line.replace("'", '"'))["loss"] for line in result.stdout.splitlines() if "'loss'" in line]
    assert len(losses) == 8 and all(0 < float(loss) < 20 for loss in losses)


def test_ddp_streaming_splits_the_stream_and_trains_to_max_steps(tmp_path):
    # Each rank prepares its own share of the records as it reads them; only the eval data is prepared up front.
    result, _ = launch(
        "cpu_2proc.yaml", tmp_path / "ddp-stream", "--streaming", "true", "--shuffle_buffer_size", "8",
        "--prepared_data_dir", str(tmp_path / "prepared"), env={"ACCELERATE_USE_CPU": "true"},
    )  # fmt: skip
    assert "mmpeft: process 0: 1 data sources prepared, 0 reused from the cache" in result.stdout
    assert "mmpeft: process 1: 0 data sources prepared, 1 reused from the cache" in result.stdout
    losses = [json.loads(line.replace("'", '"'))["loss"] for line in result.stdout.splitlines() if "'loss'" in line]
    assert len(losses) == 8 and all(0 < float(loss) < 20 for loss in losses)


def test_ddp_resume_from_a_checkpoint_is_bit_exact(tmp_path):
    # Two processes: an 8-step run saving at step 4, and a run resumed from that checkpoint in another folder.
    env, saving = {"ACCELERATE_USE_CPU": "true"}, ["--save_strategy", "steps", "--save_steps", "4"]
    _, uninterrupted = launch("cpu_2proc.yaml", tmp_path / "whole", *saving, env=env)
    checkpoint = tmp_path / "resumed" / "checkpoint-4"
    shutil.copytree(tmp_path / "whole" / "checkpoint-4", checkpoint)
    result, resumed = launch("cpu_2proc.yaml", tmp_path / "resumed", *saving, "--auto_resume", "true", env=env)
    assert f"auto_resume: resuming from {checkpoint}" in result.stderr
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in resumed.items():
        assert torch.equal(tensor, uninterrupted[name]), name


def test_ddp_sigterm_stops_both_processes_at_one_step_with_a_complete_checkpoint(tmp_path):
    # SIGTERM to the launcher, as a scheduler sends it: it passes it on to both processes, which may get it in
    # different steps; they stop at the same one and save it together.
    output = tmp_path / "stopped"
    output.mkdir()
    process = subprocess.Popen(
        launch_command("cpu_2proc.yaml", output, "--max_steps", "40"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    logged = 0
    for line in process.stdout:
        logged += "'loss'" in line
        if logged == 3:
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=420)
    assert process.returncode != 0
    steps = {int(step) for step in re.findall(r"stopped by SIGTERM at step (\d+)", stderr)}
    assert len(re.findall(r"stopped by SIGTERM at step", stderr)) == 2 and len(steps) == 1, stderr[-4000:]
    step = steps.pop()
    assert 3 <= step < 40 and latest_complete_checkpoint(str(output)) == str(output / f"checkpoint-{step}")


def test_deepspeed_zero2_lora_mixed_modalities(tmp_path):
    pytest.importorskip("deepspeed")
    result, weights = launch("deepspeed_zero2.yaml", tmp_path / "zero2")
    assert "deepspeed" in (result.stdout + result.stderr).lower()
    assert any("lora_A" in name for name in weights)


def test_deepspeed_zero3_full_saves_complete_checkpoint(tmp_path):
    pytest.importorskip("deepspeed")
    output = tmp_path / "zero3"
    _, weights = launch("deepspeed_zero3.yaml", output, "--method", "full")
    reloaded = dict(MMPeftForConditionalGeneration.from_pretrained(output).named_parameters())
    assert set(weights) == set(reloaded)
    for name, tensor in weights.items():  # every trained weight saved whole, exactly
        assert torch.equal(reloaded[name], tensor), name


def test_deepspeed_zero3_lora_saves_adapter_with_projectors(tmp_path):
    pytest.importorskip("deepspeed")
    output = tmp_path / "zero3-lora"
    # An empty cache: one process builds the reference checkpoint while the other waits (no ZeRO-3 collectives).
    _, weights = launch("deepspeed_zero3.yaml", output, env={"MMPEFT_CACHE": str(tmp_path / "cache")})
    adapter = json.load(open(output / "adapter_config.json"))
    assert {"vision_projector", "audio_projector"} <= set(adapter["modules_to_save"])
    base = MMPeftForConditionalGeneration.from_pretrained(adapter["base_model_name_or_path"])
    reloaded = dict(PeftModel.from_pretrained(base, output).named_parameters())
    projector_weights = [name for name in weights if "vision_projector.modules_to_save" in name]
    assert projector_weights
    for name, tensor in weights.items():
        assert torch.equal(reloaded[name], tensor), name


def test_ddp_adapter_per_modality_ranks_train_different_adapters(tmp_path):
    # One sample per rank in sequential order: the ranks activate different adapters in most steps, which DDP
    # accepts only with unused-parameter detection (turned on by the setting; an explicit false is refused).
    from mmpeft.inference import load_for_inference

    output = tmp_path / "per-modality"
    _, weights = launch(
        "cpu_2proc.yaml", output, "--adapter_per_modality", "true", env={"ACCELERATE_USE_CPU": "true"}
    )  # both ranks ended with the same weights (checked by launch)
    assert any(".lora_B.vision." in name for name in weights) and any(".lora_B.speech." in name for name in weights)
    assert all(weights[name].abs().sum() > 0 for name in weights if ".lora_B." in name)  # both adapters trained
    saved = dict(load_for_inference(output)[0].named_parameters())
    for name, tensor in weights.items():  # the saved adapters are what the ranks trained
        assert torch.equal(saved[name], tensor), name
