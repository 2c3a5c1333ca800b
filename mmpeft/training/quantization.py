"""QLoRA's quantization policy: which parts of the omni model are loaded in 4 / 8 bits through bitsandbytes,
and a report of what ended up in which precision."""

from collections import defaultdict

import torch
from transformers import BitsAndBytesConfig

from .arguments import TuningArguments
from .tuning import PART_MODULES, numel


def compute_dtype() -> torch.dtype:
    """bf16 where the accelerator supports it, else float32 (CPU bf16 matmuls are slow on most CPUs)."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def quantization_config(args: TuningArguments) -> BitsAndBytesConfig | None:
    """The bitsandbytes config of a `qlora` run, `None` otherwise.

    Parts not in `args.quantized_parts` and the modules in `args.keep_unquantized` stay unquantized. The skip
    list is always given in full: once bitsandbytes gets one it stops skipping `lm_head` by itself.
    """
    if args.method != "qlora":
        return None
    keep = [m for part, modules in PART_MODULES.items() if part not in args.quantized_parts for m in modules]
    keep += args.keep_unquantized
    if args.quantization_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.quantization_type,
        bnb_4bit_use_double_quant=args.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(),
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=keep,
    )


def _precision(parameter: torch.nn.Parameter) -> tuple[str, int, int]:
    """`(precision, logical number of weights, bytes held)` of a parameter, seeing through bitsandbytes'
    packing (two 4-bit weights per byte) and ZeRO-3 sharding."""
    kind, size = type(parameter).__name__, numel(parameter)
    if kind == "Params4bit":
        return "4-bit", 2 * size * parameter.element_size(), size * parameter.element_size()
    if kind == "Int8Params":
        return "8-bit", size, size
    return f"{parameter.element_size() * 8}-bit", size, size * parameter.element_size()


def precision_summary(model) -> dict[str, dict[str, dict[str, int]]]:
    """`{root module: {precision: {"params": n, "bytes": b}}}` of every parameter of `model`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    summary = defaultdict(lambda: defaultdict(lambda: {"params": 0, "bytes": 0}))
    for root, module in base.named_children():
        for parameter in module.parameters():
            precision, count, size = _precision(parameter)
            summary[root][precision]["params"] += count
            summary[root][precision]["bytes"] += size
    return {root: dict(kinds) for root, kinds in summary.items()}


def describe_precision(model) -> str:
    """Human-readable `precision_summary` plus the model's total memory footprint."""
    lines = []
    for root, kinds in precision_summary(model).items():
        parts = ", ".join(
            f"{k}: {v['params']:,} params ({v['bytes'] / 2**20:.2f} MiB)" for k, v in sorted(kinds.items())
        )
        lines.append(f"  {root:<18} {parts}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lines.append(f"memory footprint: {base.get_memory_footprint() / 2**20:.2f} MiB")
    return "\n".join(lines)


__all__ = ["compute_dtype", "describe_precision", "precision_summary", "quantization_config"]
