"""FSDP2 (torch's `fully_shard`) on two CPU processes over gloo, with the ranks' batches holding different
modalities in every step (`fsdp2_train.py` is what each process runs).

accelerate turns FSDP on only on accelerators (on CPU `distributed_type: FSDP` falls back to DDP), so this test
shards the model with `fully_shard` itself, as accelerate's TRANSFORMER_BASED_WRAP does from `_no_split_modules`.
A rank whose batch lacks a modality still runs that tower (on a placeholder input) and takes part in its
all-gathers and reduce-scatters; were it to skip the tower, the other rank would wait for it forever. The launch has
a timeout (and the process group one shorter), so a hang fails the test.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


pytestmark = pytest.mark.multiprocess
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fsdp2_train  # noqa: E402
from tiny_parts import build  # noqa: E402

from mmpeft import MMPeftForConditionalGeneration  # noqa: E402


def run_two_processes(output_dir, timeout: int = 300):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [os.path.join(HERE, "fsdp2_train.py"), str(output_dir)]
    # A session of its own, so that a timeout kills both workers and not only the launcher.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"FSDP2 run hung for {timeout} s:\n{stderr[-4000:]}")
    if process.returncode != 0:  # printed whole (pytest shortens assertion messages): why a process died
        print(f"stdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-12000:]}")
    assert process.returncode == 0, stderr[-4000:]
    return [json.load(open(output_dir / f"rank{rank}.json")) for rank in (0, 1)]


def test_fsdp2_mixed_modalities_trains_and_saves_a_reloadable_checkpoint(tmp_path):
    ranks = run_two_processes(tmp_path)
    for report in ranks:
        # Every layer of the three parts was its own unit (6) besides the root, every parameter sharded.
        assert report["layer_classes"] == [
            "LlamaDecoderLayer", "SiglipEncoderLayer", "SiglipVisionEmbeddings", "WhisperEncoderLayer",
        ]  # fmt: skip
        assert report["fsdp_units"] == len(report["units"]) + 1 == 7 and report["all_dtensor"]
        assert len(report["losses"]) == fsdp2_train.STEPS
        assert all(0 < loss < 20 for loss in report["losses"])  # finite
    assert ranks[0]["losses"] != ranks[1]["losses"]  # different data, one model

    # The gathered full state dict, saved with save_pretrained, reloads into the same parameters.
    gathered = load_file(tmp_path / "gathered.safetensors")
    reloaded = MMPeftForConditionalGeneration.from_pretrained(tmp_path / "model")
    parameters = dict(reloaded.named_parameters())
    assert set(parameters) <= set(gathered)
    for name, tensor in parameters.items():
        assert torch.equal(tensor, gathered[name]), name

    # And they are what one process reaches training on both ranks' batches with their losses averaged (FSDP
    # averages the gradients): the placeholder runs of idle towers add nothing, and every part trained. In a step
    # without audio on either rank (the second) the audio tower's gradients are zeros, on which AdamW still
    # applies its momentum; one process gets there with gradients zeroed instead of set to None.
    model, processor = build("llama", "siglip", "whisper")
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for step, batch in enumerate(zip(*(fsdp2_train.batches(processor, rank) for rank in (0, 1)))):
        losses = [model(**rank_batch).loss for rank_batch in batch]
        for rank, loss in enumerate(losses):
            assert loss.item() == pytest.approx(ranks[rank]["losses"][step], rel=1e-4)
        (sum(losses) / 2).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    # Not the attention key biases: softmax ignores a shift shared by all keys, so their gradient is 0 up to
    # rounding, which differs between the two runs and which AdamW scales up to steps of the learning rate.
    differ = {
        name: (parameters[name] - tensor).abs().max().item()
        for name, tensor in model.named_parameters()
        if not name.endswith("k_proj.bias") and not torch.allclose(parameters[name], tensor, rtol=1e-4, atol=1e-5)
    }
    assert not differ, differ
    for part in ("vision_tower", "audio_tower", "language_model"):
        assert any(not torch.equal(tensor, initial[name]) for name, tensor in parameters.items() if part in name)
