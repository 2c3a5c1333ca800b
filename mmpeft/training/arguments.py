"""Arguments of the fine-tuning recipe: dataclasses parsed from a YAML config with command-line overrides.

    accelerate launch recipes/finetune.py --config recipes/configs/tiny_lora.yaml --learning_rate 1e-3

Every key of the YAML file and every `--flag` is a field of one of the dataclasses below (or of
`transformers.TrainingArguments`); an unknown key is an error that names it and suggests close matches.
"""

import difflib
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Literal

import yaml
from transformers import HfArgumentParser, TrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "mmpeft checkpoint (Hub id or directory). Empty with no parts: the tiny reference model."},
    )
    text_model: str | None = field(default=None, metadata={"help": "Compose a new model: the causal LM."})
    vision_model: str | None = field(default=None, metadata={"help": "Compose a new model: the vision encoder."})
    audio_model: str | None = field(default=None, metadata={"help": "Compose a new model: the audio encoder."})
    projector_settings: dict = field(
        default_factory=dict,
        metadata={
            "help": "MMPeftConfig settings for a composed model (vision_token_reduction, audio_frames_per_token, ...)."
        },
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "dtype the model is loaded in."}
    )

    def __post_init__(self):
        if self.model_name_or_path and (self.text_model or self.vision_model or self.audio_model):
            raise ValueError("Give either model_name_or_path or text_model/vision_model/audio_model, not both.")
        if (self.vision_model or self.audio_model) and not self.text_model:
            raise ValueError("Composing a model needs text_model (the LM) as well.")


@dataclass
class DataArguments:
    train_data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Training datasets: paths (JSONL/JSON of messages or LLaVA conversations, a saved `datasets` "
            "folder) or Hub ids, or {path, weight, split} mappings. Empty: the embedded synthetic dataset."
        },
    )
    eval_data: list[str] = field(default_factory=list, metadata={"help": "Evaluation datasets, as train_data."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Hold out this fraction of train_data for evaluation when eval_data is empty."}
    )
    max_length: int = field(
        default=1024, metadata={"help": "Longest sample in tokens (placeholders expanded). Longer ones: on_overlong."}
    )
    on_bad_sample: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "Bad samples (missing/corrupt media, no assistant turn, ...): raise or skip+count."},
    )
    on_overlong: Literal["error", "skip"] = field(
        default="skip", metadata={"help": "Samples over max_length: skip+count (never truncated) or raise."}
    )
    allow_media_outside_data_dir: bool = field(
        default=False,
        metadata={"help": "Accept media paths outside the data file's folder (absolute paths, '../' escapes)."},
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Training batches laid end to end in one row (position ids restart per sample) instead of padded: "
            "no compute spent on padding, same loss. Pays off when sample lengths vary; see recipes/configs/README.md."
        },
    )
    validate_media: Literal["auto", "decode", "header", "none"] = field(
        default="auto",
        metadata={
            "help": "How much of each media file is checked before training. decode: decode every file. header: read "
            "each file's header only (format, size, length), much faster; a file that fails later, when loaded in "
            "training, is handled by on_bad_sample. none: trust the data (audio headers are still read for token "
            "counts). auto: decode up to 10,000 samples per source, header above."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Processes preparing the data (datasets.map num_proc). Default: the CPU count, at most 16."},
    )
    prepared_data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache of prepared data (reused while data files, processor and data settings are unchanged). "
            "Default: $MMPEFT_CACHE/prepared (~/.cache/mmpeft/prepared)."
        },
    )
    prepared_data_shared: bool = field(
        default=False,
        metadata={
            "help": "The prepared-data cache is on a filesystem every node sees: only the global main process "
            "prepares. Default: the main process of each node prepares, the others wait and memory-map its result."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read, prepare and load the training data as training consumes it: no pass over it before the "
            "first step (needs max_steps; eval_data is prepared as usual). Split across processes and DataLoader "
            "workers, shuffled in a buffer; validate_media auto means header here."
        },
    )
    shuffle_buffer_size: int = field(
        default=1000,
        metadata={"help": "streaming: samples each reader shuffles among (more = better mixed, more RAM)."},
    )
    synthetic_train_size: int = field(default=3000, metadata={"help": "Embedded dataset: training samples."})
    synthetic_eval_size: int = field(default=300, metadata={"help": "Embedded dataset: evaluation samples."})
    data_seed_mixing: int = field(default=0, metadata={"help": "Seed of the weighted mixing of several datasets."})

    def __post_init__(self):
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise ValueError(f"preprocessing_num_workers must be >= 1, got {self.preprocessing_num_workers}")
        if self.shuffle_buffer_size < 1:
            raise ValueError(f"shuffle_buffer_size must be >= 1 (1: no shuffling), got {self.shuffle_buffer_size}")
        self.train_data = [_dataset_spec(spec, "train_data") for spec in self.train_data]
        self.eval_data = [_dataset_spec(spec, "eval_data") for spec in self.eval_data]


def _dataset_spec(spec, name: str) -> dict:
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, dict) or "path" not in spec or set(spec) - {"path", "weight", "split"}:
        raise ValueError(f"{name}: each entry is a path or a mapping with path, weight, split; got {spec!r}")
    spec = {"weight": 1.0, "split": "train" if name == "train_data" else "validation", **spec}
    if not spec["weight"] > 0:
        raise ValueError(f"{name}: weight must be > 0, got {spec['weight']} for {spec['path']}")
    return spec


@dataclass
class TuningArguments:
    method: Literal["full", "freeze", "lora", "qlora"] = field(
        default="lora",
        metadata={
            "help": "full: train every part. freeze: train projectors + LM, encoders frozen. lora: LoRA on the LM, "
            "projectors trained fully. qlora: lora on a 4/8-bit LM. Each *_tuning below overrides its part."
        },
    )
    vision_tuning: Literal["frozen", "lora", "full"] | None = field(default=None, metadata={"help": "Vision tower."})
    audio_tuning: Literal["frozen", "lora", "full"] | None = field(default=None, metadata={"help": "Audio tower."})
    projector_tuning: Literal["frozen", "lora", "full"] | None = field(default=None, metadata={"help": "Projectors."})
    language_tuning: Literal["frozen", "lora", "full"] | None = field(default=None, metadata={"help": "The LM."})
    trainable_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Extra modules trained fully, by name (e.g. language_model.lm_head); saved with the adapter "
            "under LoRA. A randomly initialised base needs its output layer trained."
        },
    )
    encoder_learning_rate_scale: float = field(
        default=0.1,
        metadata={
            "help": "Learning rate of the encoders (when trained, fully or with LoRA) as a fraction of learning_rate: "
            "encoders destabilise at the LM's rate (LLaVA-style recipes use 0.1-0.2)."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (higher = more capacity and memory)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Regex (full match on module names) of the layers to adapt. Default: every linear layer of the "
            "parts set to lora, except the LM's output layer."
        },
    )

    encoder_gradient_checkpointing: bool = field(
        default=True,
        metadata={
            "help": "With gradient_checkpointing: also checkpoint the encoders (only matters when they train; a "
            "frozen encoder keeps no activations for backward anyway)."
        },
    )
    quantization_bits: Literal[4, 8] = field(
        default=4, metadata={"help": "qlora: 4-bit (NF4/FP4) or 8-bit LM weights."}
    )
    quantization_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "qlora 4-bit data type."})
    double_quant: bool = field(
        default=True, metadata={"help": "qlora 4-bit: also quantize the quantization constants."}
    )
    quantized_parts: list[str] = field(
        default_factory=lambda: ["language"],
        metadata={
            "help": "qlora: parts loaded quantized (language, vision, audio, projector); the rest stay 16/32-bit."
        },
    )
    keep_unquantized: list[str] = field(
        default_factory=lambda: ["lm_head"],
        metadata={"help": "qlora: module names kept unquantized inside quantized parts (prefix or suffix match)."},
    )

    def __post_init__(self):
        unknown = set(self.quantized_parts) - set(METHOD_DEFAULTS["full"])
        if unknown:
            raise ValueError(
                f"quantized_parts: unknown parts {sorted(unknown)}; choose from {list(METHOD_DEFAULTS['full'])}"
            )
        if not 0 < self.encoder_learning_rate_scale <= 1:
            raise ValueError(f"encoder_learning_rate_scale must be in (0, 1], got {self.encoder_learning_rate_scale}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")

    @property
    def components(self) -> dict[str, str]:
        """`{part: frozen | lora | full}` after applying the method's defaults."""
        chosen = dict(METHOD_DEFAULTS[self.method])
        for part in chosen:
            override = getattr(self, f"{part}_tuning")
            if override is not None:
                chosen[part] = override
        uses_lora = "lora" in chosen.values()
        if self.method in ("full", "freeze") and uses_lora:
            raise ValueError(f"method: {self.method} trains without adapters; set method: lora to use *_tuning: lora.")
        if self.method in ("lora", "qlora") and not uses_lora:
            raise ValueError(f"method: {self.method} needs at least one part with *_tuning: lora.")
        return chosen


# What each method trains, per part (torchtune-style): the per-part *_tuning settings override these.
METHOD_DEFAULTS = {
    "full": {"vision": "full", "audio": "full", "projector": "full", "language": "full"},
    "freeze": {"vision": "frozen", "audio": "frozen", "projector": "full", "language": "full"},
    "lora": {"vision": "frozen", "audio": "frozen", "projector": "full", "language": "lora"},
    "qlora": {"vision": "frozen", "audio": "frozen", "projector": "full", "language": "lora"},
}


@dataclass
class MMPeftTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with mmpeft's defaults and a few additions."""

    output_dir: str = field(default="outputs/mmpeft", metadata={"help": "Where checkpoints and the model go."})
    report_to: str | list[str] = field(
        default_factory=lambda: ["wandb"],
        metadata={"help": "Trackers. W&B runs offline by itself when no API key is configured."},
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator builds inputs."})
    wandb_project: str = field(default="mmpeft", metadata={"help": "W&B project."})
    wandb_group: str | None = field(
        default=None, metadata={"help": "W&B group: give runs to compare (full vs LoRA) the same group."}
    )
    wandb_tags: list[str] = field(default_factory=list, metadata={"help": "W&B tags (the method is always added)."})
    generation_metrics: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={"help": "Generation-based eval metrics: accuracy (exact match, always), wer, bleu."},
    )
    generation_max_new_tokens: int = field(default=32, metadata={"help": "Longest generated answer at evaluation."})
    generation_num_samples: int | None = field(
        default=None, metadata={"help": "Evaluate generation on this many eval samples (default: all)."}
    )
    auto_resume: bool = field(
        default=False,
        metadata={
            "help": "Resume from the latest complete checkpoint in output_dir if there is one (checkpoints left "
            "half-written by a killed run are ignored and removed); start fresh otherwise."
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop after this many evaluations without improving metric_for_best_model."},
    )
    resume_with_changed_settings: bool = field(
        default=False,
        metadata={
            "help": "Resume a checkpoint saved with other settings (learning rate, data, method, ...; listed in "
            "mmpeft.training.checkpoints.RUN_SETTINGS) instead of refusing. What is trained (method, *_tuning, "
            "lora_r) must still match the checkpoint's."
        },
    )

    def __post_init__(self):
        # Counting real (non-padding) tokens is what tokens/s is computed from.
        if self.include_num_input_tokens_seen in (False, "no"):
            self.include_num_input_tokens_seen = "non_padding"
        if "accuracy" not in self.generation_metrics:
            self.generation_metrics = ["accuracy", *self.generation_metrics]
        if self.early_stopping_patience is not None:
            self.load_best_model_at_end = True
            self.metric_for_best_model = self.metric_for_best_model or "eval_accuracy"
        super().__post_init__()


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TuningArguments, MMPeftTrainingArguments)


def parse_args(argv: list[str] | None = None, default_config: str | None = None):
    """Parse `--config file.yaml` (or `default_config` when absent) and `--key value` overrides.

    Returns `(model_args, data_args, tuning_args, training_args, config_path)`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    config_path = default_config
    if "--config" in argv:
        index = argv.index("--config")
        config_path = argv[index + 1]
        argv = argv[:index] + argv[index + 2 :]
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    if config_path:
        with open(config_path) as file:
            values = yaml.safe_load(file) or {}
        known = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            hints = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
            raise ValueError(
                f"{config_path}: unknown keys "
                + ", ".join(f"{k!r}" + (f" (did you mean {v[0]!r}?)" if v else "") for k, v in hints.items())
            )
        # YAML values become the parser's defaults, so that command-line flags override them.
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise ValueError(f"unknown command-line arguments: {remaining}")
    return (*parsed, os.path.abspath(config_path) if config_path else None)


__all__ = [
    "ARGUMENT_CLASSES",
    "DataArguments",
    "METHOD_DEFAULTS",
    "MMPeftTrainingArguments",
    "ModelArguments",
    "TuningArguments",
    "parse_args",
]
