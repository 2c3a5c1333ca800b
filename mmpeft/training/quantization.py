"""Quantized loading: the bitsandbytes config a run's method loads the model with (the policy itself is the method's,
in `mmpeft.training.methods`), and a report of what ended up in which precision."""

from collections import defaultdict

import torch
from transformers import BitsAndBytesConfig

from .arguments import TuningArguments
from .methods import compute_dtype


def quantization_config(args: TuningArguments) -> BitsAndBytesConfig | None:
    """The bitsandbytes config the method of `args` loads the model with (e.g. qlora's 4 / 8-bit LM:
    `mmpeft.training.methods.bitsandbytes_config`), `None` for a method that loads it unquantized."""
    method = args.tuning_method
    return method.quantization(args) if method.quantized else None


def _numel(parameter) -> int:
    """Number of elements, also of a parameter that ZeRO-3 has sharded away (it keeps the count in `ds_numel`)."""
    return getattr(parameter, "ds_numel", parameter.numel())


def _precision(parameter: torch.nn.Parameter) -> tuple[str, int, int]:
    """`(precision, logical number of weights, bytes held)` of a parameter, seeing through bitsandbytes'
    packing (two 4-bit weights per byte) and ZeRO-3 sharding."""
    kind, size = type(parameter).__name__, _numel(parameter)
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
