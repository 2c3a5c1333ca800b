"""Evaluate any output of recipes/finetune.py (full weights, a LoRA / QLoRA adapter on its base, a merged export)
on a dataset: batched greedy generation scored by the same code as training-time evaluation, so the numbers are
the ones finetune.py reported for the same model and data. (Named eval.py: a script named evaluate.py in this
folder would be imported in place of the `evaluate` library by every recipe here.)

    python recipes/eval.py outputs/tiny-lora --data data/eval.jsonl
    python recipes/eval.py outputs/tiny-lora-merged --data "data/*.jsonl" --metrics accuracy,wer,bleu \\
        --batch_size 32 --num_samples 500 --report_to wandb
    # Several processes: each generates a share, the main one writes the report.
    accelerate launch --num_processes 8 recipes/eval.py outputs/tiny-lora --data data/eval.jsonl

Data is read and prepared as in training (any format finetune.py reads, the same cache); the data settings of
mmpeft/training/arguments.py (`--on_bad_sample skip`, `--max_length`, `--validate_media`, media policy, ...) apply,
and skipped samples are counted and listed in the report. Outputs in `--output_dir` (default `<model>/eval`):
`eval_report.json` (metrics, settings, skipped samples, every sample's prompt, prediction and reference) and
`eval_report.md` (metrics table + the first `--show_samples` samples); with `--report_to wandb` a W&B run (offline
without an API key) with the metrics and a table of image, audio, prompt, prediction and reference per sample.
"""

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import datasets
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from transformers import HfArgumentParser

from mmpeft.data import BadSampleError, MediaError, MMPeftDataset, load_audio, load_image
from mmpeft.inference import evaluate_generation, load_for_inference, output_kind
from mmpeft.metrics import METRICS
from mmpeft.tracking import WandbTracking
from mmpeft.training import ConfigError, DataArguments, prepare_data


logger = logging.getLogger("mmpeft")


@dataclass
class EvaluateArguments:
    model: str = field(
        metadata={"help": "Output folder of recipes/finetune.py or recipes/merge.py (also the first positional)."}
    )
    data: list[str] = field(
        default_factory=list,
        metadata={"help": "Datasets to evaluate on, as finetune.py's eval_data: files, globs, folders, Hub ids."},
    )
    metrics: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={"help": f"Generation metrics, comma- or space-separated, from {sorted(METRICS)} (accuracy always)."},
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts generated for at once, per process."})
    max_new_tokens: int = field(default=32, metadata={"help": "Longest generated answer (finetune.py's default)."})
    num_samples: int | None = field(default=None, metadata={"help": "Evaluate the first N samples (default: all)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the report goes (default: <model>/eval)."})
    show_samples: int = field(default=20, metadata={"help": "Samples shown in eval_report.md."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "dtype the model is loaded in (auto: as saved)."}
    )
    report_to: Literal["none", "wandb"] = field(default="none", metadata={"help": "Also log the report to W&B."})
    wandb_project: str = field(default="mmpeft", metadata={"help": "W&B project."})
    wandb_samples: int = field(default=200, metadata={"help": "Samples (with their media) in the W&B table."})

    def __post_init__(self):
        self.metrics = [name for value in self.metrics for name in value.split(",") if name]
        if "accuracy" not in self.metrics:
            self.metrics = ["accuracy", *self.metrics]
        unknown = [name for name in self.metrics if name not in METRICS]
        if unknown:
            raise ConfigError(f"--metrics: unknown {unknown}; choose from {sorted(METRICS)}")
        if not self.data:
            raise ConfigError("--data is required: the dataset(s) to evaluate on")
        self.output_dir = self.output_dir or os.path.join(self.model, "eval")


def parse_args(argv: list[str] | None = None) -> tuple[EvaluateArguments, DataArguments]:
    """`(evaluate_args, data_args)`; the model folder may come first, without `--model`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--model", *argv]
    parser = HfArgumentParser((EvaluateArguments, DataArguments), allow_abbrev=False)
    args, data_args, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise ConfigError(f"unknown command-line arguments: {remaining}")
    return args, dataclasses.replace(data_args, eval_data=args.data)  # replace re-checks the dataset specs


def main(argv=None) -> dict:
    args, data_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.logging.set_verbosity_warning()
    # As the Trainer reads it: ACCELERATE_USE_CPU (accelerate_configs/cpu_2proc.yaml) makes processes CPU ranks.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    logger.setLevel(logging.INFO if state.is_main_process else logging.WARNING)

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, processor = load_for_inference(args.model, dtype=dtype, device=state.device)

    # As in training: the main process prepares (or reuses) the data, the others memory-map what it wrote.
    reports = {}
    with state.local_main_process_first():
        parts = prepare_data(data_args.eval_data, data_args, processor, reports)
    rows = datasets.concatenate_datasets([rows for rows, _ in parts])
    if args.num_samples is not None:
        rows = rows.select(range(min(args.num_samples, len(rows))))
    dataset = MMPeftDataset(rows, processor, "generate", data_args.on_bad_sample, data_args.media_policy)

    start = time.perf_counter()
    results = evaluate_generation(
        model,
        processor,
        dataset,
        args.metrics,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=state.device,
        process_index=state.process_index,
        num_processes=state.num_processes,
        progress=state.is_local_main_process,
    )
    seconds = time.perf_counter() - start
    report = None
    if state.is_main_process:  # every process holds all results (gathered once); one writes them
        report = build_report(args, data_args, dataset, results, reports, seconds, state.num_processes)
        write_report(report, args.output_dir, args.show_samples)
        if args.report_to == "wandb":
            report["wandb_run"] = log_to_wandb(report, dataset, args)
        shown = {name: round(value, 4) for name, value in results.scores.items()}
        print(f"\nmmpeft | evaluate | {shown} | report in {os.path.abspath(args.output_dir)}")
    state.wait_for_everyone()
    return report


def build_report(args, data_args, dataset, results, reports, seconds, num_processes) -> dict:
    """Everything about one evaluation as JSON-ready data: metrics, settings, skipped samples, every sample."""
    tokenizer = dataset.processor.tokenizer
    samples = []
    for index, row in enumerate(dataset.rows):
        samples.append(
            {
                "index": index,
                "where": row["where"],
                "task": row["task"],
                # Placeholders stay one token each (<image>, <audio>): the prompt as written, not as expanded.
                "prompt": tokenizer.decode(row["input_ids"][: row["prompt_length"]]),
                "prediction": results.answers[index],
                "reference": row["reference"],
                "skipped": index in results.failed,
            }
        )
    return {
        "model": os.path.abspath(args.model),
        "output_kind": output_kind(args.model),
        "data": [spec["path"] for spec in data_args.eval_data],
        "metrics": results.scores,
        "num_samples": len(dataset),
        "num_scored": len(dataset) - len(results.failed),
        "skipped": {
            # Samples left out while preparing (per on_bad_sample / on_overlong), by source...
            "preparation": {
                path: {k: r[k] for k in ("read", "kept", "reasons", "where")} for path, r in reports.items()
            },
            # ...and those whose media failed to load at generation time (not scored).
            "loading": [samples[index]["where"] for index in sorted(results.failed)],
        },
        "settings": {
            "metrics": args.metrics,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "num_processes": num_processes,
            "on_bad_sample": data_args.on_bad_sample,
        },
        "seconds": round(seconds, 2),
        "samples": samples,
    }


def _cell(text) -> str:
    """`text` made safe for one markdown table cell."""
    return "" if text is None else str(text).replace("|", "\\|").replace("\n", "<br>")


def write_report(report: dict, output_dir: str, show_samples: int):
    """`eval_report.json` (all of `report`) and `eval_report.md` (metrics + the first `show_samples` samples)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "eval_report.json"), "w") as file:
        json.dump(report, file, indent=2)
    skipped_preparing = sum(r["read"] - r["kept"] for r in report["skipped"]["preparation"].values())
    lines = [
        f"# Evaluation of `{report['model']}`",
        "",
        f"Data: {', '.join(f'`{path}`' for path in report['data'])}; {report['num_scored']} of "
        f"{report['num_samples']} samples scored ({len(report['skipped']['loading'])} whose media failed to load, "
        f"{skipped_preparing} skipped while preparing).",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {name} | {value:.4f} |" for name, value in report["metrics"].items()),
        "",
        f"## First {min(show_samples, report['num_samples'])} samples",
        "",
        "| where | task | prompt | prediction | reference |",
        "| --- | --- | --- | --- | --- |",
        *(
            "| " + " | ".join(_cell(s[k]) for k in ("where", "task", "prompt", "prediction", "reference")) + " |"
            for s in report["samples"][:show_samples]
        ),
    ]
    with open(os.path.join(output_dir, "eval_report.md"), "w") as file:
        file.write("\n".join(lines) + "\n")


def log_to_wandb(report: dict, dataset: MMPeftDataset, args: EvaluateArguments) -> str:
    """Log the metrics and a `wandb.Table` (image, audio, prompt, prediction, reference per sample) as a run
    under the output folder, offline without an API key; returns the run's URL or folder."""
    with WandbTracking(args.output_dir, args.wandb_project) as tracking:
        run = tracking.init(
            job_type="evaluation", config={"model": report["model"], "data": report["data"], **report["settings"]}
        )
        log_table(run, report, dataset, args)
        return tracking.finish()


def log_table(run, report: dict, dataset: MMPeftDataset, args: EvaluateArguments):
    """The metrics and a `wandb.Table` of the first `wandb_samples` samples, logged to `run`."""
    import wandb

    sampling_rate = dataset.processor.feature_extractor.sampling_rate
    table = wandb.Table(columns=["where", "task", "image", "audio", "prompt", "prediction", "reference"])
    for sample in report["samples"][: args.wandb_samples]:
        example = dataset.example(sample["index"])
        try:  # the first image and clip of the sample, as the model saw them
            image = wandb.Image(load_image(example.images[0])) if example.images else None
            clip = load_audio(example.audio[0], sampling_rate) if example.audio else None
        except MediaError:  # unreadable since (it was not scored either)
            image = clip = None
        audio = wandb.Audio(clip, sample_rate=sampling_rate) if clip is not None else None
        table.add_data(
            sample["where"], sample["task"], image, audio, sample["prompt"], sample["prediction"], sample["reference"]
        )
    run.log({**{f"eval/{name}": value for name, value in report["metrics"].items()}, "eval/samples": table})


if __name__ == "__main__":
    try:
        main()
    except (BadSampleError, ConfigError, FileNotFoundError, ValueError) as error:  # the data or a setting at fault
        sys.exit(f"mmpeft: {error}")
