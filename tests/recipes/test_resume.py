"""Kill and resume: a run SIGKILLed at an arbitrary point and restarted ends bit-exact with an uninterrupted
one (CPU, one process), and a checkpoint left half-written by a kill is never resumed from."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from recipe_helpers import REPO, TINY, finetune
from safetensors.torch import load_file

from mmpeft.training import CheckpointError, checkpoint_to_resume, latest_complete_checkpoint, parse_args, run_settings
from mmpeft.training.checkpoints import COMPLETE_MARKER


RECIPE = os.path.join(REPO, "recipes", "finetune.py")
KILL_WHILE_SAVING = os.path.join(REPO, "tests", "kill_while_saving.py")
SETTINGS = {"--max_steps": "24", "--save_strategy": "steps", "--save_steps": "4", "--save_total_limit": "2"}
ARGS = [
    *[arg for pair in zip(TINY[::2], TINY[1::2]) if pair[0] not in SETTINGS for arg in pair],
    *[arg for pair in SETTINGS.items() for arg in pair],
    *["--learning_rate", "3e-3", "--report_to", "none", "--auto_resume", "true"],
]
TIMEOUT = 300


def command(output, script=RECIPE):
    return [sys.executable, script, *ARGS, "--output_dir", str(output)]


def run(output, script=RECIPE, **env):
    result = subprocess.run(
        command(output, script), env={**os.environ, **env}, capture_output=True, text=True, timeout=TIMEOUT
    )
    return result


def final_state(output) -> tuple[dict, dict]:
    """The saved adapter weights and the eval metrics (timings left out)."""
    metrics = json.loads((output / "eval_results.json").read_text())
    timings = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "peak_memory_mb")
    return load_file(output / "adapter_model.safetensors"), {k: v for k, v in metrics.items() if k not in timings}


def assert_same_final_state(output, reference):
    weights, metrics = final_state(output)
    reference_weights, reference_metrics = final_state(reference)
    assert weights.keys() == reference_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference_weights[name]), name
    assert metrics == reference_metrics and "eval_loss" in metrics


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output = tmp_path_factory.mktemp("resume") / "uninterrupted"
    result = run(output)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def test_sigkill_at_an_arbitrary_moment_then_auto_resume_is_bit_exact(tmp_path, uninterrupted):
    output = tmp_path / "killed"
    # Killed at a random step (its log line read as it is printed), at a random moment inside the next step or the
    # save after it: anywhere from the second checkpoint on, always before the run's end.
    kill_after = random.randint(5, 20)
    process = subprocess.Popen(
        command(output), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    logged = 0
    for line in process.stdout:  # the Trainer prints each step's logs (logging_steps 1, no progress bar)
        logged += "'loss'" in line
        if logged == kill_after:
            time.sleep(random.uniform(0.0, 0.05))
            process.send_signal(signal.SIGKILL)
            break
    assert process.wait(timeout=TIMEOUT) == -signal.SIGKILL, f"the run ended before step {kill_after}"
    assert not (output / "eval_results.json").exists(), f"killed after step {kill_after}: too late"

    resumed_from = latest_complete_checkpoint(str(output))
    result = run(output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"auto_resume: resuming from {resumed_from}" in result.stderr
    assert_same_final_state(output, uninterrupted)


def test_a_checkpoint_half_written_by_a_kill_is_never_resumed_from(tmp_path, uninterrupted):
    output = tmp_path / "killed-while-saving"
    result = run(output, KILL_WHILE_SAVING, KILL_AT_STEP="12")
    assert result.returncode == -signal.SIGKILL
    half = output / "checkpoint-12"
    assert (half / "adapter_model.safetensors").exists() and not (half / "rng_state.pth").exists()
    assert not (half / COMPLETE_MARKER).exists()
    assert latest_complete_checkpoint(str(output)) == str(output / "checkpoint-8")
    with pytest.raises(ValueError, match="checkpoint-12 is incomplete"):
        checkpoint_to_resume(str(output), str(half), auto_resume=False)

    result = run(output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"auto_resume: resuming from {output / 'checkpoint-8'}" in result.stderr
    assert "Removing incomplete checkpoint" in result.stderr
    checkpoints = sorted(output.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-20", "checkpoint-24"]
    assert all((c / COMPLETE_MARKER).exists() for c in checkpoints)
    assert_same_final_state(output, uninterrupted)


def test_auto_resume_without_checkpoints_starts_fresh(tmp_path):
    assert checkpoint_to_resume(str(tmp_path / "new"), None, auto_resume=True) is None
    assert checkpoint_to_resume(str(tmp_path), None, auto_resume=False) is None


def copy_of(output, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    return copy


def settings_of(*argv):
    """`run_settings` of the recipe run with ARGS and `argv`."""
    arguments = parse_args([*ARGS, *argv, "--output_dir", "unused"], default_config=finetune.DEFAULT_CONFIG)
    return run_settings(*arguments[:4])


def test_a_complete_checkpoint_with_files_lost_since_is_refused_or_passed_over(tmp_path, uninterrupted, caplog):
    output = copy_of(uninterrupted, tmp_path)
    damaged = output / "checkpoint-24"
    (damaged / "optimizer.pt").unlink()
    (damaged / "scheduler.pt").unlink()
    with open(damaged / "rng_state.pth", "r+b") as file:
        file.truncate(100)
    with pytest.raises(CheckpointError, match=r"optimizer.pt, rng_state.pth \(100 bytes, \d+ when saved\), sched"):
        checkpoint_to_resume(str(output), str(damaged), auto_resume=False)
    # auto_resume takes the latest intact checkpoint instead, and says why.
    assert checkpoint_to_resume(str(output), None, auto_resume=True) == str(output / "checkpoint-20")
    assert f"passing over {damaged}: files lost since it was saved: optimizer.pt" in caplog.text

    result = subprocess.run(
        [*command(output), "--resume_from_checkpoint", str(damaged)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(f"mmpeft: resume_from_checkpoint: {damaged} has lost files")


def test_auto_resume_into_the_folder_of_a_run_with_other_settings_is_refused(tmp_path, uninterrupted):
    output = copy_of(uninterrupted, tmp_path)
    summary = (output / "run_summary.json").read_text()
    result = subprocess.run(
        [*command(output), "--learning_rate", "0.5", "--synthetic_train_size", "32"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    message = result.stderr.splitlines()[-1]
    assert message.startswith(f"mmpeft: {output / 'checkpoint-24'} was saved by a run with other settings: ")
    assert "synthetic_train_size: 64 in the checkpoint, 32 now; learning_rate: 0.003 in the checkpoint, 0.5 now" in (
        message
    )
    assert "resume_with_changed_settings: true" in message
    assert (output / "run_summary.json").read_text() == summary

    # Asked for, the checkpoint is resumed with the new settings (warned); unchanged, it is resumed as it is.
    checkpoint = str(output / "checkpoint-24")
    changed = settings_of("--learning_rate", "0.5")
    assert checkpoint_to_resume(str(output), None, True, changed, allow_changed_settings=True) == checkpoint
    assert checkpoint_to_resume(str(output), None, True, settings_of()) == checkpoint


def test_a_resumed_run_says_where_it_resumes_from(tmp_path, uninterrupted):
    output = copy_of(uninterrupted, tmp_path)
    checkpoint = output / "checkpoint-20"
    resume = [*command(output), "--resume_from_checkpoint", str(checkpoint)]
    result = subprocess.run(resume, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {checkpoint} (step 20 of 24)" in result.stderr


def test_resuming_a_checkpoint_of_another_method_names_both_methods(tmp_path, uninterrupted):
    with pytest.raises(CheckpointError, match="method: 'lora' in the checkpoint, 'full' now"):
        checkpoint_to_resume(str(uninterrupted), None, True, settings_of("--method", "full"))


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_complete_checkpoint_and_auto_resume_continues_bit_exact(tmp_path, uninterrupted, number):
    output = tmp_path / "signalled"
    process = subprocess.Popen(
        command(output), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    logged = 0
    for line in process.stdout:
        logged += "'loss'" in line
        if logged == 6:  # between the checkpoints of steps 4 and 8
            process.send_signal(number)
            break
    process.stdout.read()
    assert process.wait(timeout=TIMEOUT) == 128 + number
    message = process.stderr.read().splitlines()[-1]
    name = signal.Signals(number).name
    step = int(re.fullmatch(rf"mmpeft: stopped by {name} at step (\d+), checkpoint saved in .*", message).group(1))
    assert message.endswith(f"checkpoint saved in {output / f'checkpoint-{step}'}; resume with --auto_resume true")
    assert 6 <= step < 24 and latest_complete_checkpoint(str(output)) == str(output / f"checkpoint-{step}")
    assert not (output / "eval_results.json").exists()

    result = run(output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"auto_resume: resuming from {output / f'checkpoint-{step}'}" in result.stderr
    assert_same_final_state(output, uninterrupted)


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB filesystem of its own (tmpfs; mounting needs root): the recipe's checkpoints are 3.3 MB."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", disk]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", disk], check=True)


def test_a_full_disk_is_said_so_and_the_retry_clears_what_it_left(small_disk):
    output = small_disk / "run"
    output.mkdir()
    (small_disk / "ballast").write_bytes(bytes(4 * 2**20))
    result = subprocess.run([*command(output), "--max_steps", "4"], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1
    message = result.stderr.splitlines()[-1]
    assert message.startswith(f"mmpeft: no space left on device while saving {output / 'checkpoint-4'} (")
    assert "the half-written folder was removed" in message and not (output / "checkpoint-4").exists()

    # A half-written checkpoint left by a run killed while saving, and no complete one: auto_resume removes it (the
    # retry would not have the space to save otherwise).
    (small_disk / "ballast").unlink()
    (output / "checkpoint-8").mkdir()
    (output / "checkpoint-8" / "optimizer.pt").write_bytes(bytes(3 * 2**20))
    result = subprocess.run([*command(output), "--max_steps", "4"], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Removing incomplete checkpoint {output / 'checkpoint-8'}" in result.stderr
    assert latest_complete_checkpoint(str(output)) == str(output / "checkpoint-4")
