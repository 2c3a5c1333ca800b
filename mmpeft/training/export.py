"""Turning a LoRA / QLoRA result into a plain checkpoint: the adapter merged into a 16-bit base."""

import os

import torch
from peft import PeftConfig, PeftModel
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as SAFE_ADAPTER_NAME

from ..models import MMPeftForConditionalGeneration, MMPeftProcessor


def merge_adapter(
    adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16
) -> str:
    """Merge the adapter in `adapter_dir` into its base loaded unquantized in `dtype` (QLoRA adapters too),
    and save model + processor to `output_dir`: an ordinary checkpoint that needs neither PEFT nor the base.

    The fully trained modules saved with the adapter (projectors, ...) replace the base's. Adapter and base are
    read from safetensors files only.
    """
    if not os.path.isfile(os.path.join(adapter_dir, SAFE_ADAPTER_NAME)):  # PEFT would fall back to a pickle
        raise ValueError(f"{adapter_dir} has no {SAFE_ADAPTER_NAME}: mmpeft loads adapters from safetensors only.")
    base_path = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    base = MMPeftForConditionalGeneration.from_pretrained(base_path, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    model.save_pretrained(output_dir)
    MMPeftProcessor.from_pretrained(adapter_dir).save_pretrained(output_dir)
    return str(output_dir)


__all__ = ["merge_adapter"]
