"""recipes/benchmarks/benchmark_serve.py at its smallest: every measurement runs against a real server (numbers are
not asserted: they depend on the machine)."""

import os
import sys

from recipe_helpers import REPO


sys.path.insert(0, os.path.join(REPO, "recipes", "benchmarks"))
import benchmark_serve  # noqa: E402


def test_benchmark_serve_measures_first_token_and_throughput():
    summary = benchmark_serve.main(["--requests", "2", "--concurrency", "2", "--max_tokens", "4"])
    assert summary["requests"] == 2 and summary["concurrency"] == 2
    assert summary["median_ttft_s"] > 0 and summary["requests_per_s"] > 0 and summary["total_tokens_per_s"] > 0
