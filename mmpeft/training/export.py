"""Turning a LoRA / QLoRA result into a plain checkpoint: the adapter merged into a 16-bit base."""

import os

import torch

from ..inference import load_for_inference, output_kind


def merge_adapter(
    adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16
) -> str:
    """Merge the adapter in `adapter_dir` into its base loaded unquantized in `dtype` (QLoRA adapters too),
    and save model + processor to `output_dir`: an ordinary checkpoint that needs neither PEFT nor the base.

    The fully trained modules saved with the adapter (projectors, ...) replace the base's. Adapter and base are
    read from safetensors files only (`mmpeft.inference.load_for_inference`).
    """
    if output_kind(adapter_dir) != "adapter":
        raise ValueError(f"{adapter_dir} holds full weights already: there is no adapter to merge.")
    model, processor = load_for_inference(adapter_dir, dtype=dtype, quantized=False)
    model.merge_and_unload().save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return str(output_dir)


__all__ = ["merge_adapter"]
