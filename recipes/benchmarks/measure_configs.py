"""Run recipe configs as a user would (`accelerate launch`, fresh cache) and print their figures as the
Markdown table of recipes/configs/README.md.

    python recipes/benchmarks/measure_configs.py tiny_lora tiny_full

Wall time includes everything a first run does: start-up, building the reference model, generating and
preparing the data, training, evaluation and saving. Peak memory is the training process's (RSS on CPU).
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

from mmpeft.summary import RunSummary


RECIPES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # finetune.py and configs/


def measure(name: str, workdir: str) -> dict:
    output_dir = os.path.join(workdir, name)
    env = {**os.environ, "MMPEFT_CACHE": os.path.join(workdir, "cache", name), "WANDB_MODE": "offline"}
    command = [
        "accelerate",
        "launch",
        os.path.join(RECIPES, "finetune.py"),
        "--config",
        os.path.join(RECIPES, "configs", f"{name}.yaml"),
        "--output_dir",
        output_dir,
        "--disable_tqdm",
        "true",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return {"config": name, "wall_s": wall, **RunSummary.load(output_dir).to_dict()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="config names in recipes/configs/ (without .yaml)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        rows = [measure(name, workdir) for name in args.configs]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}"
    print(f"\nMachine: {machine}\n")
    tasks = sorted({k for row in rows for k in row if k.startswith("eval_accuracy_")})
    print(
        "| config | method | wall time | train time | trainable params | peak memory | eval_loss | eval_accuracy | "
        + " | ".join(t.removeprefix("eval_accuracy_") for t in tasks)
        + " |"
    )
    print("|" + "---|" * (8 + len(tasks)))
    for row in rows:
        print(
            f"| {row['config']} | {row['method']} | {row['wall_s'] / 60:.1f} min | {row['train_runtime']:.0f} s "
            f"| {row['trainable_params']:,} ({100 * row['trainable_fraction']:.1f} %) "
            f"| {row['peak_memory_mb']:.0f} MB "
            f"| {row['eval_loss']:.3f} | {row['eval_accuracy']:.3f} | "
            + " | ".join(f"{row.get(t, float('nan')):.2f}" for t in tasks)
            + " |"
        )


if __name__ == "__main__":
    main()
