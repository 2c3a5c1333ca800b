"""recipes/benchmarks/benchmark.py --quick: every run gives positive numbers, and the matched models really match
(the part that could go wrong silently). Timings are measured, not checked: unit tests do not time things."""

import json
import os
import subprocess
import sys

from recipe_helpers import REPO


sys.path.insert(0, os.path.join(REPO, "recipes", "benchmarks"))
import benchmark  # noqa: E402


def test_benchmark_quick_runs_every_configuration_on_matched_models(tmp_path):
    output = tmp_path / "benchmark.json"
    script = os.path.join(REPO, "recipes", "benchmarks", "benchmark.py")
    command = [sys.executable, script, "--quick", "--output", str(output)]
    # Two runs at once, one thread each: timings do not matter here, wall time does.
    command += ["--jobs", "2", "--threads", "1", "--repeats", "1"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    runs = json.loads(output.read_text())["runs"]
    assert list(runs) == list(benchmark.RUNS)

    for name, run in runs.items():
        assert f"| {name} |" in completed.stdout
        assert run["samples_per_second"] > 0 and run["ms_per_step"] > 0 and run["peak_memory_mb"] > 0
        assert run["tokens"]["real"] > 0 and run["media_tokens"] > 0 and run["samples"] > 0
        # LoRA on the 7 attention + MLP linears of every LM layer, nothing in the towers.
        assert run["lora_layers"] == 7 * benchmark.SIZES["quick"]["lm_layers"]

    for pair, baseline in (("image", "image/llava"), ("audio", "audio/qwen2-audio")):
        ours, theirs = runs[f"{pair}/mmpeft"], runs[baseline]
        assert ours["parameters"]["lm"] == theirs["parameters"]["lm"] > 0
        assert ours["parameters"]["tower"] == theirs["parameters"]["tower"] > 0
        # The same samples, batched the same way, with as many image / audio tokens on both sides.
        assert ours["media_tokens"] == theirs["media_tokens"]
        assert ours["tokens"] == theirs["tokens"] and ours["sample_lengths"] == theirs["sample_lengths"]
        packed = runs[f"{pair}/mmpeft-padding-free"]
        assert packed["tokens"]["positions"] == packed["tokens"]["real"] == ours["tokens"]["real"]
    # Llava's projector is mmpeft's "mlp" projector; Qwen2-Audio's is one linear layer on pooled frames, mmpeft's
    # one linear layer on 2 stacked frames (twice as wide an input).
    assert runs["image/mmpeft"]["parameters"]["projector"] == runs["image/llava"]["parameters"]["projector"]
    assert runs["image/mmpeft"]["parameters"]["trainable"] == runs["image/llava"]["parameters"]["trainable"]
    tower_width, lm_width = benchmark.SIZES["quick"]["tower_hidden"], benchmark.SIZES["quick"]["lm_hidden"]
    audio_extra = (
        runs["audio/mmpeft"]["parameters"]["projector"] - runs["audio/qwen2-audio"]["parameters"]["projector"]
    )
    assert audio_extra == tower_width * lm_width
