"""Using what `recipes/finetune.py` wrote: loading any of its outputs (full weights, an adapter, a merged
export) for inference.

    model, processor = load_for_inference("outputs/tiny-lora")  # full weights, an adapter, or a merged export
"""

import json
import os

import torch
from peft import PeftConfig, PeftModel
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as SAFE_ADAPTER_NAME
from transformers import BitsAndBytesConfig

from .models import MMPeftConfig, MMPeftForConditionalGeneration, MMPeftProcessor


# Written by recipes/finetune.py next to a QLoRA adapter: the bitsandbytes config its base was trained under.
RUN_SUMMARY = "run_summary.json"


def output_kind(path: str | os.PathLike) -> str:
    """`"adapter"` (a LoRA / QLoRA adapter folder, base named in its config) or `"full"` (full weights: a full
    fine-tune, a merged export, any saved mmpeft checkpoint); `ValueError` in one line for anything else."""
    path = str(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such folder (give the output_dir of recipes/finetune.py or recipes/merge.py)")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return "adapter"
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        with open(config) as file:
            model_type = json.load(file).get("model_type")
        if model_type == MMPeftConfig.model_type:
            return "full"
        raise ValueError(f"{path}: config.json is of model_type {model_type!r}, not {MMPeftConfig.model_type!r}")
    raise ValueError(f"{path}: not an mmpeft output (neither adapter_config.json nor an mmpeft config.json)")


def adapter_quantization(adapter_dir: str | os.PathLike) -> BitsAndBytesConfig | None:
    """The quantization a QLoRA adapter's base was trained under (recorded by recipes/finetune.py), else None."""
    summary = os.path.join(adapter_dir, RUN_SUMMARY)
    if not os.path.isfile(summary):
        return None
    with open(summary) as file:
        recorded = json.load(file).get("quantization_config")
    return BitsAndBytesConfig.from_dict(recorded) if recorded else None


def load_for_inference(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantized: bool = True,
) -> tuple[torch.nn.Module, MMPeftProcessor]:
    """`(model, processor)` of an output folder, in eval mode.

    - full weights (`config.json` of model_type mmpeft: a full fine-tune or a merged export): loaded as saved;
    - an adapter (`adapter_config.json`): the base named in it (`base_model_name_or_path`) with the adapter on top,
      a `PeftModel` (`merge_and_unload()` it for speed). A QLoRA adapter's base is quantized as in training (the
      config recorded next to it), so outputs are the trained model's; `quantized=False` loads it unquantized.

    Weights come from safetensors files only. The processor is the one saved in the folder, else the base's.
    `dtype` defaults to the saved one; `device` to where `from_pretrained` puts it (CPU).
    """
    path = str(path)
    options = {} if dtype is None else {"dtype": dtype}
    if output_kind(path) == "full":
        model, processor_path = MMPeftForConditionalGeneration.from_pretrained(path, **options), path
    else:
        if not os.path.isfile(os.path.join(path, SAFE_ADAPTER_NAME)):  # PEFT would fall back to a pickle
            raise ValueError(f"{path} has no {SAFE_ADAPTER_NAME}: mmpeft loads adapters from safetensors only.")
        base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
        quantization = adapter_quantization(path) if quantized else None
        if quantization is not None:
            options["quantization_config"] = quantization
        base = MMPeftForConditionalGeneration.from_pretrained(base_path, **options)
        model = PeftModel.from_pretrained(base, path)
        has_processor = os.path.isfile(os.path.join(path, "processor_config.json"))
        processor_path = path if has_processor else base_path
    if device is not None:
        model.to(device)
    return model.eval(), MMPeftProcessor.from_pretrained(processor_path)


__all__ = [
    "adapter_quantization",
    "load_for_inference",
    "output_kind",
]
