"""Peak memory and time per training step of full fine-tuning, LoRA and QLoRA on the same model and data.

    python recipes/benchmarks/benchmark_methods.py                  # tiny reference model and a small one (LM 512 x 4)
    python recipes/benchmarks/benchmark_methods.py --steps 20 --batch-size 16

Each (model, method) runs in its own process, so that peak memory is that run's alone: accelerator memory
(`torch.cuda.max_memory_allocated`) on a GPU, peak resident set size on CPU (which includes ~0.6 GB of
Python + torch). A step is forward + backward + AdamW on a fixed batch of generated samples, timed after
warm-up steps (median). "LM bytes" are the language model's weights as loaded for QLoRA with its
non-quantized parts in bf16, against the same LM wholly in bf16.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch


METHODS = ("full", "lora", "qlora")


def build_small(path: str) -> str:
    """The reference model with a larger LM (Llama 512 x 4, MLP 1536), same towers, tokenizer and data."""
    from transformers import LlamaConfig

    from mmpeft import MMPeftConfig, MMPeftForConditionalGeneration
    from mmpeft.reference import build_reference_model

    reference, processor = build_reference_model()
    text = reference.config.text_config.to_dict()
    text.update(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4
    )
    settings = {
        k: v for k, v in reference.config.to_dict().items() if k not in ("text_config", "architectures", "auto_map")
    }
    torch.manual_seed(0)
    model = MMPeftForConditionalGeneration(MMPeftConfig(**{**settings, "text_config": LlamaConfig(**text)}))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def worker(model_path: str, method: str, steps: int, batch_size: int, data_dir: str) -> dict:
    from mmpeft import MMPeftForConditionalGeneration, MMPeftProcessor
    from mmpeft.data import (
        MMPeftDataCollator,
        MMPeftDataset,
        generate_synthetic_dataset,
        prepare_examples,
        read_records,
    )
    from mmpeft.training import (
        TuningArguments,
        count_parameters,
        peak_memory_mb,
        quantization_config,
        setup_tuning,
    )

    tuning = TuningArguments(method=method, trainable_modules=["language_model.lm_head"] if method != "full" else [])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantization = quantization_config(tuning)
    model = MMPeftForConditionalGeneration.from_pretrained(model_path, quantization_config=quantization)
    model = setup_tuning(model, tuning).to(device)
    trainable, total = count_parameters(model)
    processor = MMPeftProcessor.from_pretrained(model_path)
    paths = generate_synthetic_dataset(data_dir, num_train=16, num_eval=batch_size)
    examples, _ = prepare_examples(read_records(paths["eval"]), processor)
    dataset = MMPeftDataset(examples, processor)
    batch = MMPeftDataCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for step in range(steps + 3):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - start)
    return {
        "method": method,
        "ms_per_step": 1000 * statistics.median(times),
        "peak_memory_mb": peak_memory_mb(),
        "trainable": trainable,
        "total": total,
        "tokens": int(batch["attention_mask"].sum()),
    }


def lm_bytes(model_path: str) -> tuple[int, int]:
    """Bytes of the LM's weights as loaded for QLoRA (quantized linears + bf16 rest), and wholly in bf16."""
    from mmpeft import MMPeftForConditionalGeneration
    from mmpeft.training import TuningArguments, precision_summary, quantization_config

    config = quantization_config(TuningArguments(method="qlora"))
    quantized = MMPeftForConditionalGeneration.from_pretrained(
        model_path, dtype=torch.bfloat16, quantization_config=config
    )
    bf16 = MMPeftForConditionalGeneration.from_pretrained(model_path, dtype=torch.bfloat16)
    return (
        sum(kind["bytes"] for kind in precision_summary(quantized)["language_model"].values()),
        sum(p.numel() * p.element_size() for p in bf16.language_model.parameters()),
    )


def machine_description() -> str:
    """The machine: architecture, and the accelerator's name or the CPU core count."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{platform.machine()}, {device}"


def run_worker(command: list[str]) -> dict:
    """Run a benchmark worker in a fresh process (so that its peak memory is its own) and return the JSON object
    it prints on its last line. A failed worker raises with the end of its output."""
    process = subprocess.run(command, capture_output=True, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (after 3 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.batch_size, args.data_dir)))
        return

    from mmpeft.training import reference_checkpoint

    with tempfile.TemporaryDirectory() as workdir:
        models = {
            "tiny (reference)": reference_checkpoint(),
            "small (LM 512 x 4)": build_small(os.path.join(workdir, "small")),
        }
        print(f"Machine: {machine_description()}; batch {args.batch_size}, median of {args.steps} steps\n")
        print("| model | method | ms / step | peak memory | trainable params | LM weights (QLoRA / bf16) |")
        print("|---|---|---|---|---|---|")
        for name, path in models.items():
            qlora_bytes, bf16_bytes = lm_bytes(path)
            for method in METHODS:
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    path,
                    method,
                    "--steps",
                    str(args.steps),
                    "--batch-size",
                    str(args.batch_size),
                    "--data-dir",
                    os.path.join(workdir, "data"),
                ]
                result = run_worker(command)
                ratio = f"{qlora_bytes / 2**20:.2f} / {bf16_bytes / 2**20:.2f} MiB = {qlora_bytes / bf16_bytes:.0%}"
                ratio = ratio if method == "qlora" else ""
                print(
                    f"| {name} | {method} | {result['ms_per_step']:.0f} | {result['peak_memory_mb']:.0f} MB "
                    f"| {result['trainable']:,} / {result['total']:,} | {ratio} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
