"""Compare fine-tuning methods on the same model, data, seed and step budget, side by side.

    # The embedded default (tiny model + generated data), full vs LoRA vs QLoRA: ~4 min on a 2-core CPU
    python recipes/compare.py --methods full,lora,qlora
    accelerate launch recipes/compare.py --config recipes/configs/tiny_lora.yaml --methods full,lora
    python recipes/compare.py --config <config.yaml> --methods full,lora,qlora,freeze --max_steps 500

Every other `--key value` goes to every run. Each method is one run of `mmpeft.training.run` (what
recipes/finetune.py runs) in `<output_dir>/<method>`, one W&B run in one W&B group with its method as tag, so the
W&B dashboard shows them side by side. The report -- `comparison.md` (table), `comparison.json` and PNG plots of
training loss, eval loss and eval accuracy against step -- is written to `<output_dir>` and logged to W&B as a
`comparison` run of the same group (a `wandb.Table` and images), so it exists offline too.
"""

import argparse
import gc
import os
import time

from mmpeft.report import log_report_to_wandb, run_record, write_report
from mmpeft.training import configure_logging, parse_args, run
from mmpeft.training.methods import METHODS


DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny_lora.yaml")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="base config (default: the embedded one)")
    parser.add_argument("--methods", default="full,lora,qlora", help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--output_dir", default="outputs/compare", help="runs go to <output_dir>/<method>")
    parser.add_argument("--group", default=None, help="W&B group (default: compare-<time>)")
    args, overrides = parser.parse_known_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    group = args.group or time.strftime("compare-%Y%m%d-%H%M%S")
    training_args = parse_args(["--config", args.config, *overrides])[3]
    configure_logging(training_args)

    records = []
    for method in methods:
        run_dir = os.path.join(args.output_dir, method)
        arguments = parse_args(
            ["--config", args.config, *overrides, "--method", method, "--output_dir", run_dir,
             "--wandb_group", group, "--wandb_tags", "compare", "--run_name", f"{group}-{method}"]
        )[:4]  # fmt: skip
        start = time.perf_counter()
        result = run(*arguments)
        wall_time = time.perf_counter() - start
        main_process = result.summary is not None
        del result
        gc.collect()  # the next run's memory figures should not carry this one's
        if main_process:
            records.append(run_record(run_dir, wall_time))

    if records:
        report = write_report(records, args.output_dir, title=f"mmpeft method comparison ({group})")
        print(f"\n{report['table']}\n\nReport: {os.path.abspath(report['markdown'])}")
        if "wandb" in training_args.report_to:
            print(f"W&B comparison run: {log_report_to_wandb(records, report, group, args.output_dir)}")
    return records


if __name__ == "__main__":
    main()
