"""Arguments of the fine-tuning recipe: dataclasses parsed from a YAML config with command-line overrides.

    accelerate launch recipes/finetune.py --config recipes/configs/tiny_lora.yaml --learning_rate 1e-3

Every key of the YAML file and every `--flag` is a field of one of the dataclasses below (or of
`transformers.TrainingArguments`); an unknown key or flag (flags are never abbreviated) is an error that names it and
suggests close matches. A setting that cannot work raises `ConfigError`, which the recipes report in one line.
"""

import difflib
import json
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Literal

import yaml
from huggingface_hub import try_to_load_from_cache
from transformers import HfArgumentParser, TrainingArguments

from ..data.sources import MediaPolicy
from .errors import ConfigError
from .methods import METHODS, PART_MODULES, PART_TUNINGS, TuningMethod, check_lora_kwargs
from .peft_init import check_initialisation
from .policy import PART_SETTINGS, PartPolicy, PolicyError, resolve_policy


# Values a config may hold once its YAML aliases (*name) are expanded: real configs hold a few hundred, and an alias
# bomb (aliases of aliases, "billion laughs") reads as a few lines but expands to billions when serialised (W&B).
MAX_CONFIG_VALUES = 100_000
# Largest mixing weight of a dataset (it is repeated that many times).
MAX_WEIGHT = 1000


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
            raise ConfigError("Give either model_name_or_path or text_model/vision_model/audio_model, not both.")
        if (self.vision_model or self.audio_model) and not self.text_model:
            raise ConfigError("Composing a model needs text_model (the LM) as well.")


@dataclass
class DataArguments:
    train_data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Training datasets: paths (JSONL/JSON of messages or LLaVA conversations, a saved `datasets` "
            "folder) or Hub ids, or {path, weight, split} mappings; one path or mapping alone is a list of one. "
            f"weight: how many times the dataset is repeated in the mixture, a number in (0, {MAX_WEIGHT}] (default "
            "1; a fraction draws that share of it). Empty: the embedded synthetic dataset."
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
        metadata={
            "help": "Accept media paths outside the data file's folder (absolute paths, '../' escapes, links out), "
            "and local paths in Hub datasets."
        },
    )
    allow_remote_media: bool = field(
        default=False,
        metadata={
            "help": "Fetch http(s) media URLs (once, at preparation; kept with the prepared data). Off: URLs are bad "
            "samples. Loopback, private and link-local addresses stay refused (remote_media_allowed_networks)."
        },
    )
    remote_media_allowed_networks: list[str] = field(
        default_factory=list,
        metadata={"help": "Non-public networks media URLs may reach anyway, e.g. ['10.1.0.0/16'] for a media server."},
    )
    remote_media_timeout: float = field(
        default=10.0, metadata={"help": "Seconds to connect, per read, and for a whole media download."}
    )
    remote_media_max_bytes: int = field(default=32 * 2**20, metadata={"help": "Largest media download, in bytes."})
    max_image_pixels_per_sample: int = field(
        default=2 * 8192 * 8192,
        metadata={
            "help": "Image pixels one sample may hold in all (decoded: 3 bytes each, plus the processor's copy), "
            "checked from headers before decoding. Each image alone is limited by mmpeft.data.media.MAX_IMAGE_PIXELS."
        },
    )
    max_audio_seconds_per_sample: float = field(
        default=3600.0, metadata={"help": "Seconds of audio one sample may hold in all, checked from headers."}
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

    @property
    def media_policy(self) -> MediaPolicy:
        """The rules every media reference of the data is held to (`mmpeft.data.sources`)."""
        return MediaPolicy(
            allow_outside=self.allow_media_outside_data_dir,
            allow_remote=self.allow_remote_media,
            allowed_networks=tuple(self.remote_media_allowed_networks),
            remote_timeout=self.remote_media_timeout,
            remote_max_bytes=self.remote_media_max_bytes,
            max_sample_pixels=self.max_image_pixels_per_sample,
            max_sample_audio_seconds=self.max_audio_seconds_per_sample,
        )

    def __post_init__(self):
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise ConfigError(f"preprocessing_num_workers must be >= 1, got {self.preprocessing_num_workers}")
        if self.shuffle_buffer_size < 1:
            raise ConfigError(f"shuffle_buffer_size must be >= 1 (1: no shuffling), got {self.shuffle_buffer_size}")
        try:
            self.media_policy  # refuses a bad network or a non-positive limit, naming it
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.train_data = [_dataset_spec(spec, "train_data") for spec in _as_list(self.train_data)]
        self.eval_data = [_dataset_spec(spec, "eval_data") for spec in _as_list(self.eval_data)]


def _as_list(value) -> list:
    # `train_data: data.jsonl` means one dataset, not one per character of its name.
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _dataset_spec(spec, name: str) -> dict:
    if isinstance(spec, str):
        spec = {"path": spec}
    if (
        not isinstance(spec, dict)
        or set(spec) - {"path", "weight", "split"}
        or not isinstance(spec.get("path"), str)
        or not spec["path"]
    ):
        raise ConfigError(f"{name}: each entry is a path or a mapping with path, weight, split; got {spec!r}")
    spec = {"weight": 1.0, "split": "train" if name == "train_data" else "validation", **spec}
    weight = spec["weight"]
    # Not a bool, text ("1e9" is text in YAML), nan, inf, or so large that repeating the dataset exhausts memory.
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= MAX_WEIGHT:
        raise ConfigError(
            f"{name}: the weight of {spec['path']} must be a number in (0, {MAX_WEIGHT}] (times the dataset is "
            f"repeated), got {weight!r}"
        )
    if not isinstance(spec["split"], str):
        raise ConfigError(f"{name}: the split of {spec['path']} must be a split name, got {spec['split']!r}")
    return {**spec, "weight": float(weight)}


@dataclass
class TuningArguments:
    method: Literal[tuple(METHODS)] = field(
        default="lora",
        metadata={
            "help": ". ".join(f"{name}: {method.help}" for name, method in METHODS.items())
            + ". Each part's setting below (vision: {tuning: ...} or vision_tuning) overrides its part."
        },
    )
    vision: dict | str | None = field(
        default_factory=dict,
        metadata={
            "help": "The vision tower's policy, e.g. {tuning: lora, lora_r: 8, learning_rate: 2e-5} (JSON on the "
            "command line). Keys: "
            + "; ".join(f"{key}: {meaning}" for key, meaning in PART_SETTINGS.items())
            + ". Unset keys come from the flat settings (vision_tuning, lora_r, encoder_learning_rate_scale, ...)."
        },
    )
    audio: dict | str | None = field(default_factory=dict, metadata={"help": "The audio tower's policy, as vision."})
    projector: dict | str | None = field(default_factory=dict, metadata={"help": "The projectors' policy, as vision."})
    language: dict | str | None = field(default_factory=dict, metadata={"help": "The LM's policy, as vision."})
    vision_tuning: Literal[PART_TUNINGS] | None = field(default=None, metadata={"help": "Vision tower."})
    audio_tuning: Literal[PART_TUNINGS] | None = field(default=None, metadata={"help": "Audio tower."})
    projector_tuning: Literal[PART_TUNINGS] | None = field(default=None, metadata={"help": "Projectors."})
    language_tuning: Literal[PART_TUNINGS] | None = field(default=None, metadata={"help": "The LM."})
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
    lora_kwargs: dict | str | None = field(
        default_factory=dict,
        metadata={
            "help": "Other peft.LoraConfig fields, passed through (e.g. {use_rslora: true, init_lora_weights: "
            "pissa}; JSON on the command line). They override the method's own (dora's use_dora); the fields "
            "set by the settings above (r, lora_alpha, lora_dropout, target_modules, modules_to_save) are refused."
        },
    )
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={
            "help": "LoRA+: LoRA's B matrices train at this multiple of their part's learning rate (the LoRA+ paper "
            "suggests 16 for LLMs); unset: the same rate as A."
        },
    )
    trainable_tokens: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Tokens whose embedding rows train (and are saved with the adapter) while the rest of the LM's "
            "embedding stays frozen (PEFT trainable_token_indices), e.g. the chat markers mmpeft adds to a pretrained "
            "LM that lacks them: ['<|im_start|>', '<|im_end|>']. The <image> / <audio> rows train only where a "
            "placeholder stands without its media (elsewhere the media features replace them). Needs an adapter "
            "method and a language part not trained fully."
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
    adapter_per_modality: bool = field(
        default=False,
        metadata={
            "help": "Two LoRA adapters on the LM, vision and speech, each batch activating those of the media it "
            "holds (text-only: the base LM); see mmpeft/training/modality_adapters.py. Needs language_tuning: lora."
        },
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method: unknown method {self.method!r}; choose from {list(METHODS)}")
        unknown = set(self.quantized_parts) - set(PART_MODULES)
        if unknown:
            raise ConfigError(f"quantized_parts: unknown parts {sorted(unknown)}; choose from {list(PART_MODULES)}")
        if not 0 < self.encoder_learning_rate_scale <= 1:
            raise ConfigError(f"encoder_learning_rate_scale must be in (0, 1], got {self.encoder_learning_rate_scale}")
        if self.lora_r < 1:
            raise ConfigError(f"lora_r must be >= 1, got {self.lora_r}")
        self.lora_kwargs = _json_mapping("lora_kwargs", self.lora_kwargs)
        for part in PART_MODULES:
            setattr(self, part, _json_mapping(part, getattr(self, part)))
        try:
            self.components  # the resolved policy, and the method's adapter consistent with it
        except PolicyError as error:
            raise ConfigError(str(error)) from None
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise ConfigError(f"loraplus_lr_ratio: a positive number, got {self.loraplus_lr_ratio}")
        if self.loraplus_lr_ratio is not None and "lora" not in self.components.values():
            raise ConfigError("loraplus_lr_ratio: LoRA+ needs a part with tuning: lora")
        if self.trainable_tokens and not self.tuning_method.uses_adapter:
            raise ConfigError(f"trainable_tokens: needs an adapter method (lora, ...); method {self.method} has none")
        if self.trainable_tokens and self.components["language"] == "full":
            raise ConfigError("trainable_tokens: language trains fully, every embedding row trains already")
        if self.tuning_method.quantized:
            trained = [part for part in self.quantized_parts if self.components[part] == "full"]
            if trained:
                raise ConfigError(
                    f"quantized_parts: {', '.join(trained)} trains fully, and quantized weights cannot be trained: "
                    "quantize frozen or LoRA parts only"
                )
        try:
            check_lora_kwargs(self.lora_kwargs)
            lora_parts = [how for how in self.policy.values() if how.tuning == "lora"]
            ranks_per_part = len({(how.lora_r, how.lora_alpha) for how in lora_parts}) > 1
            check_initialisation(self.lora_kwargs, self.tuning_method.quantized, ranks_per_part)  # peft_init
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.lora_kwargs and self.tuning_method.uses_adapter:
            try:  # PEFT's own checks of the values (combinations it does not support), now rather than after the data
                self.tuning_method.adapter(self, target_modules=".*", modules_to_save=None)
            except (TypeError, ValueError) as error:
                raise ConfigError(f"lora_kwargs {self.lora_kwargs}: {error}") from None

    @property
    def tuning_method(self) -> TuningMethod:
        """The row of `METHODS` that `method` names."""
        return METHODS[self.method]

    @property
    def policy(self) -> dict[str, PartPolicy]:
        """`{part: PartPolicy}`: how each part trains (`mmpeft.training.policy.resolve_policy`)."""
        return resolve_policy(self)

    @property
    def components(self) -> dict[str, str]:
        """`{part: frozen | lora | full}` after applying the method's defaults and the part settings."""
        chosen = {part: policy.tuning for part, policy in self.policy.items()}
        uses_lora = "lora" in chosen.values()
        if not self.tuning_method.uses_adapter and uses_lora:
            adapters = [name for name, method in METHODS.items() if method.uses_adapter]
            raise ConfigError(
                f"method: {self.method} trains without adapters; set method: {' / '.join(adapters)} to use "
                "*_tuning: lora."
            )
        if self.tuning_method.uses_adapter and not uses_lora:
            raise ConfigError(f"method: {self.method} needs at least one part with *_tuning: lora.")
        return chosen


def _json_mapping(name: str, value) -> dict:
    """Setting `name` (lora_kwargs, vision, ...) as a dict: as given in YAML, or parsed from the JSON of a
    command-line flag."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{name}: not a JSON object ({error}): {value}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: a mapping of settings to values, got {value!r}")
    return value


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
            "help": "Resume from the latest complete and intact checkpoint in output_dir if there is one "
            "(checkpoints left half-written by a killed run are removed, damaged ones passed over); start fresh "
            "otherwise. A checkpoint saved with other result-changing settings is refused "
            "(see resume_with_changed_settings)."
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

    Returns `(model_args, data_args, tuning_args, training_args, config_path)`. Raises `ConfigError` for a missing
    or unreadable config, an unknown key or flag, and a setting that cannot work.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    config_path, argv = _config_argument(argv, default_config)
    # No abbreviations: `--learning_r 0.5` would otherwise silently set learning_rate.
    parser = HfArgumentParser(ARGUMENT_CLASSES, allow_abbrev=False)
    if config_path:
        values = load_config(config_path)
        known = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls) if f.init}
        unknown = [str(key) for key in values if key not in known]
        if unknown:
            raise ConfigError(f"{config_path}: unknown keys " + ", ".join(_with_hint(key, known) for key in unknown))
        # YAML values become the parser's defaults, so that command-line flags override them.
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        flags = {option for action in parser._actions for option in action.option_strings}
        hints = [
            f"{word!r}: did you mean {match[0]!r}?"
            for word in (word.split("=")[0] for word in remaining if word.startswith("--"))
            if (match := difflib.get_close_matches(word, flags, n=1))
        ]
        raise ConfigError(f"unknown command-line arguments: {remaining}" + (f" ({'; '.join(hints)})" if hints else ""))
    return (*parsed, os.path.abspath(config_path) if config_path else None)


def _config_argument(argv: list[str], default: str | None) -> tuple[str | None, list[str]]:
    """The config path given by `--config path` or `--config=path` (else `default`), and the other arguments."""
    for index, argument in enumerate(argv):
        if argument == "--config" or argument.startswith("--config="):
            if argument == "--config":
                path, rest = (argv[index + 1] if index + 1 < len(argv) else ""), argv[index + 2 :]
            else:
                path, rest = argument.split("=", 1)[1], argv[index + 1 :]
            if not path or path.startswith("--"):
                raise ConfigError("--config needs a YAML file path: --config path/to/config.yaml")
            return path, argv[:index] + rest
    return default, argv


def load_config(path: str) -> dict:
    """The settings of the YAML config at `path`, read with the safe loader.

    Aliases (`*name`) are refused once they would expand the config beyond `MAX_CONFIG_VALUES` values (or into
    itself): the values are shared in memory, but W&B and every other serialisation writes each copy out.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as file:
            loader = yaml.SafeLoader(file)
            try:
                root = loader.get_single_node()
                if root is not None:
                    size = _expanded_size(root, {}, set(), path)
                    if size > MAX_CONFIG_VALUES:
                        raise ConfigError(
                            f"{path}: its YAML aliases (*name) expand it to {size:,} values, over the limit of "
                            f"{MAX_CONFIG_VALUES:,}: aliases may repeat small values only; write the values out"
                        )
                values = {} if root is None else loader.construct_document(root)
            finally:
                loader.dispose()
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config is a mapping of settings (key: value), got a {type(values).__name__}")
    return values


def _expanded_size(node, sizes: dict, open_nodes: set, path: str) -> int:
    """Values under a composed YAML `node` with every alias expanded; each shared node is measured once."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise ConfigError(f"{path}: a YAML alias (*name) refers to a value that contains it")
    open_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    sizes[id(node)] = 1 + sum(_expanded_size(child, sizes, open_nodes, path) for child in children)
    open_nodes.discard(id(node))
    return sizes[id(node)]


def _with_hint(word: str, known) -> str:
    match = difflib.get_close_matches(word, known, n=1)
    return f"{word!r}" + (f" (did you mean {match[0]!r}?)" if match else "")


def check_model_path(name: str, value: str | None) -> str | None:
    """`value` of the model setting `name` (model_name_or_path, text_model, ...), refused in one line when it is
    meant as a folder but is none, or names a Hub model that cannot be had offline (transformers would report
    either as a Hub connection error). A Hub id (`owner/name`) is returned as given, a folder with `~` expanded."""
    if not value:
        return value
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        return path
    parent = os.path.dirname(path.rstrip("/\\"))
    looks_local = (
        value.startswith((".", "/", "~", "\\"))
        or value.count("/") > 1
        or (os.sep != "/" and os.sep in value)
        or os.path.exists(path)
        or (parent and os.path.isdir(parent))  # ./outputs exists, ./outputs/stage1 does not
    )
    if looks_local:
        what = "a file" if os.path.exists(path) else "not found"
        raise ConfigError(f"{name}: {value} is not a folder ({what}); give the folder of a saved model or a Hub id")
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        try:
            cached = isinstance(try_to_load_from_cache(value, "config.json"), str)
        except Exception:  # not even a valid repo id
            cached = False
        if not cached:
            raise ConfigError(
                f"{name}: {value} is not a folder, nor a model in the local Hub cache, and HF_HUB_OFFLINE is set "
                "(nothing is downloaded)"
            )
    return value


__all__ = [
    "ARGUMENT_CLASSES",
    "ConfigError",
    "DataArguments",
    "MMPeftTrainingArguments",
    "ModelArguments",
    "TuningArguments",
    "check_model_path",
    "load_config",
    "parse_args",
]
