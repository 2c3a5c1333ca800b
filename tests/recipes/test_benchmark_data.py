"""recipes/benchmarks/benchmark_data.py --quick: every measurement of the data benchmark runs and is reported
(numbers are not asserted: they depend on the machine)."""

import json
import subprocess
import sys

from recipe_helpers import REPO


def test_benchmark_data_quick_measures_every_policy_and_restart(tmp_path):
    command = [sys.executable, f"{REPO}/recipes/benchmarks/benchmark_data.py", "--quick", "--output", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "benchmark_data.json").read_text())
    [entry] = results["sizes"].values()
    assert set(entry["prepare"]) == {"header", "none", "decode"}
    assert all(runs["all"]["samples"] == 300 for runs in entry["prepare"].values())  # every generated record kept
    assert entry["cached_restart"]["reused_cache"] and entry["cached_restart"]["first_step_s"] > 0
    assert (
        entry["streaming"]["first_step_s"] > 0
        and 0 < entry["cached_restart"]["rss_anon_mb"] < entry["cached_restart"]["rss_mb"]
    )
    outcomes = {(run["case"], run["max_length"]): run["outcome"] for run in results["conversations"]}
    assert outcomes[("200 turns", None)] == "kept" and outcomes[("200 turns", 4096)] == "kept"
    assert outcomes[("one 5 MB line", 4096)].startswith("refused (longer than max_length (at least ")
    table = (tmp_path / "benchmark_data.md").read_text()
    assert table.startswith("| records |") and table.count("\n| 300 |") == 4  # 3 policies, then the restart row
