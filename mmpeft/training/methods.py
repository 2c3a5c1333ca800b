"""The tuning methods, one row each: what a method trains per part by default, the PEFT adapter it adds and how it
quantizes the model. Adding a method is adding a row to `METHODS`: the arguments (choices, help, validation),
`setup_tuning`, `quantization_config` and the model loading all read the table."""

import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial

import torch
from peft import LoraConfig, PeftConfig
from peft import __version__ as PEFT_VERSION
from transformers import BitsAndBytesConfig
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled


# Tuning part -> the model's root-level modules it covers.
PART_MODULES = {
    "vision": ("vision_tower",),
    "audio": ("audio_tower",),
    "projector": ("vision_projector", "audio_projector"),
    "language": ("language_model",),
}
PART_TUNINGS = ("frozen", "lora", "full")


@dataclass(frozen=True)
class TuningMethod:
    """One tuning method.

    Args:
        help: What it does, in a few words (shown in `--help`).
        parts: `{part: frozen | lora | full}` for every part of `PART_MODULES`: what it trains unless the part's
            `*_tuning` setting says otherwise.
        adapter: `(tuning_args, target_modules, modules_to_save) -> PeftConfig` of the adapter the parts set to
            `lora` get; None for a method that trains without adapters.
        quantization: `tuning_args -> BitsAndBytesConfig` the model is loaded with; None to load it unquantized.
    """

    help: str
    parts: dict[str, str]
    adapter: Callable[..., PeftConfig] | None = None
    quantization: Callable[..., BitsAndBytesConfig] | None = None

    def __post_init__(self):
        if set(self.parts) != set(PART_MODULES) or not set(self.parts.values()) <= set(PART_TUNINGS):
            raise ValueError(f"parts: give each of {list(PART_MODULES)} one of {PART_TUNINGS}, got {self.parts}")

    @property
    def uses_adapter(self) -> bool:
        """Whether it trains through a PEFT adapter (its output is an adapter folder, not full weights)."""
        return self.adapter is not None

    @property
    def quantized(self) -> bool:
        """Whether it loads the model quantized (bitsandbytes)."""
        return self.quantization is not None


# LoraConfig fields that mmpeft sets from settings of its own, which `lora_kwargs` may therefore not set; besides
# these, PeftConfig's own fields (task_type, inference_mode, ...) are PEFT's bookkeeping.
LORA_FIELDS_SET_BY_MMPEFT = {
    "r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "target_modules": "lora_target_modules",
    "modules_to_save": "trainable_modules or *_tuning: full",
    "rank_pattern": "each part's lora_r (vision: {lora_r: 8})",
    "alpha_pattern": "each part's lora_alpha",
    "trainable_token_indices": "trainable_tokens",
}


def check_lora_kwargs(lora_kwargs: dict) -> None:
    """Raise `ValueError`, naming the first offending key, unless every key of `lora_kwargs` is a `LoraConfig`
    field that mmpeft passes through (not one it sets itself, nor PEFT's bookkeeping)."""
    known = {f.name for f in fields(LoraConfig) if f.init}
    bookkeeping = {f.name for f in fields(PeftConfig) if f.init}
    for key in lora_kwargs:
        if key in LORA_FIELDS_SET_BY_MMPEFT:
            raise ValueError(f"lora_kwargs: {key!r} is set by mmpeft; set {LORA_FIELDS_SET_BY_MMPEFT[key]} instead")
        if key in bookkeeping:
            raise ValueError(f"lora_kwargs: {key!r} is set by mmpeft and PEFT themselves, not a LoRA setting")
        if key not in known:
            raise ValueError(f"lora_kwargs: {key!r} is not a field of peft.LoraConfig (peft {PEFT_VERSION})")


def lora_config(args, target_modules: str, modules_to_save: list[str] | None, **settings) -> LoraConfig:
    """LoRA on the layers `target_modules` matches, with `modules_to_save` trained fully and saved in the adapter.
    `settings` are the method's own `LoraConfig` fields (DoRA: `use_dora=True`) and the per-part layout (rank,
    alpha, dropout, `rank_pattern`, ...; default: the flat `lora_*` settings); `args.lora_kwargs` come last and
    override them."""
    settings = {"r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout, **settings}
    return LoraConfig(
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
        **{**settings, **args.lora_kwargs},
    )


def compute_dtype() -> torch.dtype:
    """bf16 where the accelerator supports it, else float32 (CPU bf16 matmuls are slow on most CPUs)."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def shards_parameters() -> bool:
    """Whether this run shards parameters over processes: FSDP (accelerate's launcher sets `ACCELERATE_USE_FSDP`)
    or DeepSpeed ZeRO-3."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes") or is_deepspeed_zero3_enabled()


def bitsandbytes_config(args) -> BitsAndBytesConfig:
    """QLoRA's quantization policy: `args.quantized_parts` in 4 or 8 bits (`args.quantization_bits`), the other
    parts and the modules in `args.keep_unquantized` unquantized. The skip list is always given in full: once
    bitsandbytes gets one it stops skipping `lm_head` by itself.

    Under FSDP or ZeRO-3, 4-bit weights are stored in the compute dtype (`bnb_4bit_quant_storage`): both flatten
    the parameters they shard together into buffers of one dtype, so packed 4-bit weights must share the dtype of
    the unquantized ones beside them (as PEFT's and bitsandbytes' FSDP-QLoRA guides set it)."""
    keep = [m for part, modules in PART_MODULES.items() if part not in args.quantized_parts for m in modules]
    keep += args.keep_unquantized
    if args.quantization_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.quantization_type,
        bnb_4bit_use_double_quant=args.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(),
        bnb_4bit_quant_storage=compute_dtype() if shards_parameters() else torch.uint8,
        llm_int8_skip_modules=keep,
    )


# What each method trains per part (torchtune-style), with what adapter, on what quantization.
EVERYTHING = dict(vision="full", audio="full", projector="full", language="full")
ENCODERS_FROZEN = dict(vision="frozen", audio="frozen", projector="full", language="full")
LORA_ON_LM = dict(vision="frozen", audio="frozen", projector="full", language="lora")
METHODS = {
    "full": TuningMethod("train every part", EVERYTHING),
    "freeze": TuningMethod("train projectors + LM, encoders frozen", ENCODERS_FROZEN),
    "lora": TuningMethod("LoRA on the LM, projectors trained fully", LORA_ON_LM, adapter=lora_config),
    "qlora": TuningMethod("lora on a 4/8-bit LM", LORA_ON_LM, adapter=lora_config, quantization=bitsandbytes_config),
    "dora": TuningMethod("lora with DoRA (use_dora)", LORA_ON_LM, adapter=partial(lora_config, use_dora=True)),
}


__all__ = [
    "LORA_FIELDS_SET_BY_MMPEFT",
    "METHODS",
    "PART_MODULES",
    "PART_TUNINGS",
    "TuningMethod",
    "bitsandbytes_config",
    "check_lora_kwargs",
    "compute_dtype",
    "lora_config",
    "shards_parameters",
]
