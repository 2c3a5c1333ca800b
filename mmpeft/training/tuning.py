"""What gets trained: per-part `frozen | lora | full`, adapters through PEFT, and PEFT's parameter count."""

import logging
import re

from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers.pytorch_utils import Conv1D

from .arguments import TuningArguments
from .methods import PART_MODULES
from .modality_adapters import add_modality_adapters, check_settings


logger = logging.getLogger(__name__)
LINEAR_LAYERS = (nn.Linear, Conv1D)  # Conv1D: GPT-2's linear layers


def lora_target_regex(model, module_names: list[str]) -> str:
    """Regex (PEFT full-match) of every linear layer inside `module_names`, except the LM's output layer."""
    head = model.get_output_embeddings()
    leaves = {
        name.rsplit(".", 1)[-1]
        for root in module_names
        for name, module in getattr(model, root).named_modules()
        if isinstance(module, LINEAR_LAYERS) and module is not head and name
    }
    return rf"({'|'.join(map(re.escape, module_names))})\.(.*\.)?({'|'.join(sorted(leaves))})"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts of any module, PEFT's (`PeftModel.get_nb_trainable_parameters`, which
    PEFT itself applies to plain models): a 4-bit weight counts as its logical number of weights (bitsandbytes packs
    two per byte), a parameter sharded away by ZeRO-3 as its `ds_numel`, a shared tensor once."""
    return PeftModel.get_nb_trainable_parameters(model)


def setup_tuning(model, args: TuningArguments):
    """Freeze / unfreeze parts and add LoRA adapters as `args` says; returns the model to train (a
    `PeftModel` when any part uses LoRA). Parts a model lacks (no audio tower, ...) are skipped."""
    check_settings(args)  # adapter_per_modality: refused here when it cannot work
    components = args.components
    present = {
        part: [m for m in modules if getattr(model, m, None) is not None] for part, modules in PART_MODULES.items()
    }
    for name in args.trainable_modules:
        try:
            model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"trainable_modules: the model has no module {name!r}") from error

    method = args.tuning_method
    if method.quantized:
        # Freeze and prepare the quantized LM only: PEFT's helper upcasts every non-quantized parameter to
        # fp32, which the encoders do not need.
        prepare_model_for_kbit_training(model.language_model, use_gradient_checkpointing=False)
    lora_modules = [m for part, how in components.items() if how == "lora" for m in present[part]]
    full_modules = [m for part, how in components.items() if how == "full" for m in present[part]]
    if not lora_modules:
        model.requires_grad_(False)
        for name in [*full_modules, *args.trainable_modules]:
            model.get_submodule(name).requires_grad_(True)
        return model

    config = method.adapter(
        args,
        target_modules=lora_target_regex(model, lora_modules),
        # Fully trained parts live in the adapter checkpoint too, so a LoRA run never loses its projectors.
        modules_to_save=[*full_modules, *args.trainable_modules] or None,
    )
    if args.adapter_per_modality:  # one LoRA adapter per modality: mmpeft.training.modality_adapters
        return add_modality_adapters(model, config)
    return get_peft_model(model, config)


def describe_trainable(model) -> str:
    """One line per root module: trainable / total parameters; then the exact totals."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lines = []
    for name, module in base.named_children():
        trainable, total = count_parameters(module)
        lines.append(f"  {name:<18} {trainable:>12,} / {total:>12,} trainable")
    trainable, total = count_parameters(model)
    lines.append(
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
    return "\n".join(lines)


__all__ = ["PART_MODULES", "count_parameters", "describe_trainable", "lora_target_regex", "setup_tuning"]
