"""Generation metrics as local `evaluate` modules (Hub metrics cannot be loaded offline)."""

import functools
import os

import evaluate


METRICS_DIR = os.path.dirname(os.path.abspath(__file__))
# name in configs -> (module folder, key of its result)
METRICS = {"accuracy": ("exact_match", "exact_match"), "wer": ("wer", "wer"), "bleu": ("bleu", "bleu")}


@functools.lru_cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    """The `evaluate` module for `name` (one of `METRICS`), loaded from mmpeft's own files (once per process:
    every evaluation computes accuracy overall and per task)."""
    if name not in METRICS:
        raise ValueError(f"unknown generation metric {name!r}; choose from {sorted(METRICS)}")
    return evaluate.load(os.path.join(METRICS_DIR, METRICS[name][0]))


def compute_metrics(names: list[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    """`{name: value}` of each metric in `names`."""
    results = {}
    for name in names:
        result = load_metric(name).compute(predictions=predictions, references=references)
        results[name] = float(result[METRICS[name][1]])
    return results


__all__ = ["METRICS", "compute_metrics", "load_metric"]
