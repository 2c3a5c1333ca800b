"""The comparison report of runs of the same task with different methods (full / LoRA / QLoRA ...): one
Markdown table of each run's figures and PNG plots of loss and accuracy against step on shared axes,
written next to the runs and logged to W&B (a `wandb.Table` and images)."""

import json
import os

import matplotlib

from .summary import RunSummary
from .tracking import WandbTracking


matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


WEIGHT_FILES = (".safetensors",)  # mmpeft saves safetensors only (training_args.bin is not weights)
COLUMNS = [  # (key, header, format)
    ("method", "method", "{}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("trainable_percent", "trainable %", "{:.2f}"),
    ("peak_memory_mb", "peak memory (MB)", "{:.0f}"),
    ("wall_time_s", "wall time (s)", "{:.1f}"),
    ("tokens_per_second", "tokens/s", "{:.0f}"),
    ("samples_per_second", "samples/s", "{:.1f}"),
    ("final_eval_loss", "final eval_loss", "{:.4f}"),
    ("final_eval_accuracy", "final eval_accuracy", "{:.4f}"),
    ("best_eval_accuracy", "best eval_accuracy", "{:.4f}"),
    ("checkpoint_mb", "checkpoint (MB)", "{:.2f}"),
]
PLOTS = {  # file -> (log key, y label)
    "train_loss.png": ("loss", "training loss"),
    "eval_loss.png": ("eval_loss", "eval loss"),
    "eval_accuracy.png": ("eval_accuracy", "eval accuracy (exact match)"),
}


def checkpoint_mb(output_dir: str) -> float:
    """Size of the saved model (weight files in `output_dir` itself, not its checkpoints) in MB."""
    names = [n for n in os.listdir(output_dir) if n.endswith(WEIGHT_FILES)]
    return sum(os.path.getsize(os.path.join(output_dir, n)) for n in names) / 2**20


def run_record(output_dir: str, wall_time_s: float) -> dict:
    """The figures of one finished `recipes/finetune.py` run, read from what it wrote to `output_dir`."""
    summary = RunSummary.load(output_dir)
    history = json.load(open(os.path.join(output_dir, "trainer_state.json")))["log_history"]
    accuracies = [entry["eval_accuracy"] for entry in history if "eval_accuracy" in entry]
    throughput = [entry["tokens_per_second"] for entry in history if "tokens_per_second" in entry and "loss" in entry]
    return {
        "method": summary.method,
        "trainable_params": summary.trainable_params,
        "trainable_percent": 100 * summary.trainable_fraction,
        "peak_memory_mb": summary.peak_memory_mb,
        "wall_time_s": wall_time_s,
        "tokens_per_second": throughput[-1] if throughput else float("nan"),
        "samples_per_second": summary.train_samples_per_second,
        "final_eval_loss": summary.metrics.get("eval_loss", float("nan")),
        "final_eval_accuracy": summary.metrics.get("eval_accuracy", float("nan")),
        "best_eval_accuracy": max(accuracies) if accuracies else float("nan"),
        "checkpoint_mb": checkpoint_mb(output_dir),
        "history": history,
    }


def markdown_table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(header for _, header, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for record in records:
        lines.append("| " + " | ".join(fmt.format(record[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def plot(records: list[dict], key: str, label: str, path: str) -> str:
    """`key` against step for every run, on one set of axes."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for record in records:
        points = [(entry["step"], entry[key]) for entry in record["history"] if key in entry]
        if points:
            axes.plot(*zip(*points), marker="o" if len(points) < 20 else None, label=record["method"])
    axes.set_xlabel("step")
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(records: list[dict], report_dir: str, title: str = "mmpeft method comparison") -> dict:
    """Write `comparison.md`, `comparison.json` and the plots to `report_dir`; return their paths."""
    os.makedirs(report_dir, exist_ok=True)
    plots = {name: plot(records, key, label, os.path.join(report_dir, name)) for name, (key, label) in PLOTS.items()}
    table = markdown_table(records)
    with open(os.path.join(report_dir, "comparison.md"), "w") as file:
        file.write(f"# {title}\n\n{table}\n\n" + "".join(f"![{name}]({name})\n" for name in plots))
    with open(os.path.join(report_dir, "comparison.json"), "w") as file:
        json.dump([{k: v for k, v in r.items() if k != "history"} for r in records], file, indent=2)
    return {"markdown": os.path.join(report_dir, "comparison.md"), "plots": plots, "table": table}


def log_report_to_wandb(records: list[dict], report: dict, group: str, directory: str) -> str | None:
    """Log the table (`wandb.Table`) and the plots (`wandb.Image`) as a `comparison` run of `group`, stored
    under `directory` when offline; returns the run's URL or folder."""
    import wandb

    with WandbTracking(directory, "mmpeft", group=group, tags=["comparison"]) as tracking:
        run = tracking.init(name=f"{group}-comparison", job_type="comparison")
        columns = [header for _, header, _ in COLUMNS]
        rows = [[record[key] for key, _, _ in COLUMNS] for record in records]
        run.log(
            {
                "comparison": wandb.Table(columns=columns, data=rows),
                **{name.removesuffix(".png"): wandb.Image(path) for name, path in report["plots"].items()},
            }
        )
        return tracking.finish()


__all__ = ["log_report_to_wandb", "markdown_table", "run_record", "write_report"]
