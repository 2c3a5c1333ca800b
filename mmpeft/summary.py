"""The summary of a training run, `run_summary.json` in its output folder: what was trained, how, and the figures
it reached. Written by `mmpeft.training.callbacks.RunSummaryCallback`; read by the model card (`mmpeft.hub`), the
comparison report (`mmpeft.report`), `mmpeft.inference` (how a QLoRA base was quantized) and the benchmarks.

One dataclass, so that a renamed field is an error where it is read rather than an "n/a" in a model card. The file
is flat JSON (evaluation metrics sit beside the other fields, as `eval_results.json` has them) and stays readable
by anything that reads JSON.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field


RUN_SUMMARY = "run_summary.json"


@dataclass
class RunSummary:
    """What a run trained and what it measured. Figures the run did not produce (no evaluation data, a run stopped
    before its end) are `None` / absent from `metrics`.

    Args:
        method: the tuning method (a key of `mmpeft.training.methods.METHODS`).
        trainable_params / total_params / trainable_fraction: parameter counts, as PEFT counts them.
        peak_memory_mb: peak accelerator memory, or resident memory on CPU, while training.
        hyperparameters: the training settings that shape the result (learning rate, steps, batch, LoRA rank ...).
        datasets: the training datasets as configured (paths or Hub ids; empty for the generated default).
        quantization_config: the bitsandbytes config the base was loaded with (QLoRA), else None.
        train_runtime / train_samples_per_second: the Trainer's figures for this process's training.
        tokens_per_second / data_wait_fraction: training throughput and the share of time spent waiting for data.
        metrics: evaluation metrics after training (`eval_loss`, `eval_accuracy`, `eval_accuracy_<task>` ...).
    """

    method: str
    trainable_params: int
    total_params: int
    trainable_fraction: float
    peak_memory_mb: float | None = None
    hyperparameters: dict = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    quantization_config: dict | None = None
    train_runtime: float | None = None
    train_samples_per_second: float | None = None
    tokens_per_second: float | None = None
    data_wait_fraction: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The flat JSON form: every field but `metrics`, whose entries sit at the top level."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "metrics"}
        return {**fields, **self.metrics}

    @classmethod
    def from_dict(cls, values: dict) -> "RunSummary":
        names = {f.name for f in dataclasses.fields(cls)} - {"metrics"}
        known = {k: v for k, v in values.items() if k in names}
        return cls(**known, metrics={k: v for k, v in values.items() if k not in names})

    def save(self, folder: str) -> str:
        path = os.path.join(folder, RUN_SUMMARY)
        with open(path, "w") as file:
            json.dump(self.to_dict(), file, indent=2)
        return path

    @classmethod
    def load(cls, folder: str) -> "RunSummary | None":
        """The summary saved in `folder`; None when there is none (an output of another tool, a merged export)."""
        path = os.path.join(folder, RUN_SUMMARY)
        if not os.path.exists(path):
            return None
        with open(path) as file:
            return cls.from_dict(json.load(file))


__all__ = ["RUN_SUMMARY", "RunSummary"]
