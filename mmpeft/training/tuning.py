"""What gets trained: per-part `frozen | lora | full`, adapters through PEFT, and PEFT's parameter count."""

import logging
import re

from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers.pytorch_utils import Conv1D

from .arguments import ConfigError, TuningArguments
from .methods import PART_MODULES
from .modality_adapters import add_modality_adapters, check_settings
from .policy import ALL_LINEAR, MODULE_PARTS
from .quantization import precision_summary


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


def setup_tuning(model, args: TuningArguments, tokenizer=None):
    """Freeze / unfreeze parts and add LoRA adapters as the policy of `args` says (`args.policy`); returns the model
    to train (a `PeftModel` when any part uses LoRA). Parts a model lacks (no audio tower, ...) are skipped.
    `tokenizer` resolves `args.trainable_tokens` to ids."""
    check_settings(args)  # adapter_per_modality: refused here when it cannot work
    policy = args.policy
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
    lora_parts = [part for part, how in policy.items() if how.tuning == "lora" and present[part]]
    full_modules = [m for part, how in policy.items() if how.tuning == "full" for m in present[part]]
    if not lora_parts:
        model.requires_grad_(False)
        for name in [*full_modules, *args.trainable_modules]:
            model.get_submodule(name).requires_grad_(True)
        return model

    config = method.adapter(
        args,
        # Fully trained parts live in the adapter checkpoint too, so a LoRA run never loses its projectors.
        modules_to_save=[*full_modules, *args.trainable_modules] or None,
        **lora_layout(model, {part: policy[part] for part in lora_parts}, present, args.lora_target_modules),
        **({"trainable_token_indices": token_ids(tokenizer, args.trainable_tokens)} if args.trainable_tokens else {}),
    )
    if args.adapter_per_modality:  # one LoRA adapter per modality: mmpeft.training.modality_adapters
        model = add_modality_adapters(model, config)
    else:
        model = get_peft_model(model, config)
    set_lora_dropout(model, {part: policy[part].lora_dropout for part in lora_parts})
    return model


def lora_layout(model, lora_policy: dict, present: dict, target_regex: str | None = None) -> dict:
    """The `LoraConfig` fields that place LoRA on the parts of `lora_policy` (`{part: PartPolicy}`): the layers
    to adapt (`target_modules`: each part's, joined; `target_regex` instead when given) and the rank and alpha,
    the first part's for the adapter and `rank_pattern` / `alpha_pattern` entries for parts that differ."""
    regexes = []
    for part, how in lora_policy.items():
        targets, modules = how.lora_target_modules, present[part]
        if targets is None or targets == ALL_LINEAR:
            regexes.append(lora_target_regex(model, modules))
        elif isinstance(targets, list):
            regexes.append(rf"({'|'.join(map(re.escape, modules))})\.(.*\.)?({'|'.join(map(re.escape, targets))})")
        else:
            regexes.append(targets)
    first = next(iter(lora_policy.values()))
    rank_pattern, alpha_pattern = {}, {}
    for part, how in lora_policy.items():
        for module in present[part]:
            # PEFT matches a pattern key against the end of each module name, after any prefix.
            if how.lora_r != first.lora_r:
                rank_pattern[rf"{re.escape(module)}\..*"] = how.lora_r
            if how.lora_alpha != first.lora_alpha:
                alpha_pattern[rf"{re.escape(module)}\..*"] = how.lora_alpha
    return {
        "target_modules": target_regex or "|".join(f"(?:{regex})" for regex in regexes),
        "r": first.lora_r,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": first.lora_dropout,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }


def set_lora_dropout(model, dropout: dict[str, float]) -> None:
    """Each part's LoRA dropout on its layers. PEFT configures dropout per adapter (its layers keep one module
    each), so parts with their own rate get theirs here, after the adapter is added; dropout acts in training
    only, so the saved adapter loads the same whatever rate it trained with."""
    for name, module in model.get_base_model().named_modules():
        part = MODULE_PARTS.get(name.split(".", 1)[0])
        if part not in dropout or not isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict):
            continue
        for adapter in module.lora_dropout:
            module.lora_dropout[adapter] = nn.Dropout(dropout[part]) if dropout[part] > 0 else nn.Identity()


def token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """The ids of `tokens`, each a single token of `tokenizer`; raises `ConfigError` naming those that are not."""
    if tokenizer is None:
        raise ConfigError("trainable_tokens: needs the tokenizer to find the tokens' ids")
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in tokens if token not in vocabulary]
    if missing:
        raise ConfigError(f"trainable_tokens: {missing} are not tokens of the model's tokenizer")
    return sorted({vocabulary[token] for token in tokens})


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


def describe_policy(model, policy: dict, learning_rate: float, weight_decay: float) -> str:
    """The run's policy as a table, one row per part the model has: tuning, trainable / total parameters, learning
    rate, weight decay, LoRA rank and the precisions its weights are held in; then the totals and the memory
    footprint."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    precisions = precision_summary(model)
    rows = [("part", "tuning", "trainable / total", "learning rate", "weight decay", "LoRA rank", "precision")]
    for part, how in policy.items():
        modules = [m for m in PART_MODULES[part] if getattr(base, m, None) is not None]
        if not modules:
            continue
        counts = [count_parameters(getattr(base, m)) for m in modules]
        trainable, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
        trains = how.tuning != "frozen"
        rows.append(
            (
                part,
                how.tuning,
                f"{trainable:,} / {total:,}",
                f"{how.resolved_learning_rate(learning_rate):.3g}" if trains else "-",
                f"{how.resolved_weight_decay(weight_decay):.3g}" if trains else "-",
                str(how.lora_r) if how.tuning == "lora" else "-",
                ", ".join(sorted({kind for m in modules for kind in precisions.get(m, {})})),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    trainable, total = count_parameters(model)
    lines.append(
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
    lines.append(f"memory footprint: {base.get_memory_footprint() / 2**20:.2f} MiB")
    return "\n".join(lines)


__all__ = [
    "PART_MODULES",
    "count_parameters",
    "describe_policy",
    "describe_trainable",
    "lora_target_regex",
    "setup_tuning",
]
