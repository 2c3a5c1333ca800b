"""Training: arguments, what to train (full / frozen parts / LoRA), the Trainer, and run setup."""

from .arguments import (
    DataArguments,
    MMPeftTrainingArguments,
    ModelArguments,
    TuningArguments,
    parse_args,
)
from .builders import configure_wandb, load_datasets, load_model, reference_checkpoint
from .quantization import describe_precision, precision_summary, quantization_config
from .trainer import EncoderCheckpointingCallback, MMPeftTrainer, WandbRunInfoCallback, peak_memory_mb
from .tuning import count_parameters, describe_trainable, setup_tuning


__all__ = [
    "DataArguments",
    "EncoderCheckpointingCallback",
    "MMPeftTrainer",
    "MMPeftTrainingArguments",
    "ModelArguments",
    "TuningArguments",
    "WandbRunInfoCallback",
    "configure_wandb",
    "count_parameters",
    "describe_precision",
    "describe_trainable",
    "load_datasets",
    "load_model",
    "parse_args",
    "peak_memory_mb",
    "precision_summary",
    "quantization_config",
    "reference_checkpoint",
    "setup_tuning",
]
