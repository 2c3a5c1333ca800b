"""recipes/compare.py on the shrunk default: one run per method, a report that agrees with the runs."""

import glob
import json
import os
import sys

from recipe_helpers import REPO, TINY

from mmpeft.report import COLUMNS


sys.path.insert(0, os.path.join(REPO, "recipes"))
import compare  # noqa: E402


def test_compare_full_lora_qlora(tmp_path):
    output = tmp_path / "compare"
    args = [*TINY, "--eval_strategy", "steps", "--eval_steps", "4", "--logging_steps", "2"]
    records = compare.main(["--methods", "full,lora,qlora", "--output_dir", str(output), "--group", "g1", *args])
    assert [r["method"] for r in records] == ["full", "lora", "qlora"]

    table = (output / "comparison.md").read_text()
    for name in ("train_loss.png", "eval_loss.png", "eval_accuracy.png"):
        assert (output / name).stat().st_size > 5000  # a rendered figure, not an empty file
        assert f"![{name}]({name})" in table
    assert all(header in table for _, header, _ in COLUMNS)
    rows = json.loads((output / "comparison.json").read_text())
    for row, method in zip(rows, ("full", "lora", "qlora")):
        run_dir = output / method
        results = json.loads((run_dir / "eval_results.json").read_text())
        summary = json.loads((run_dir / "run_summary.json").read_text())
        history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
        # The report's figures are each run's own.
        assert row["method"] == method and row["final_eval_loss"] == results["eval_loss"]
        assert row["final_eval_accuracy"] == results["eval_accuracy"]
        assert row["best_eval_accuracy"] == max(e["eval_accuracy"] for e in history if "eval_accuracy" in e)
        assert row["trainable_params"] == summary["trainable_params"] and row["peak_memory_mb"] > 0
        weights = sum(os.path.getsize(p) for p in glob.glob(str(run_dir / "*.safetensors")))
        assert abs(row["checkpoint_mb"] - weights / 2**20) < 1e-9 and row["wall_time_s"] > 0
        assert f"| {method} | {row['trainable_params']:,} |" in table
        # One W&B run per method, in the group, named after its method.
        [run_file] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
        recorded = open(run_file, "rb").read()
        assert b"g1" in recorded and f"g1-{method}".encode() in recorded
    assert rows[0]["trainable_percent"] == 100.0 and rows[1]["trainable_percent"] < 100.0
    assert rows[2]["checkpoint_mb"] == rows[1]["checkpoint_mb"]  # QLoRA saves the same adapter as LoRA
    # ... and the comparison itself as a W&B run with the table and the plots.
    [comparison] = glob.glob(str(output / "wandb" / "offline-run-*" / "run-*.wandb"))
    recorded = open(comparison, "rb").read()
    assert b"g1-comparison" in recorded and b"eval_accuracy" in recorded
