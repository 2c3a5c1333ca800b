"""Training: arguments, what to train (full / frozen parts / LoRA), the Trainer and its callbacks, and `run`, which
turns the arguments into a trained, saved (and pushed) model."""

from .arguments import (
    ConfigError,
    DataArguments,
    MMPeftTrainingArguments,
    ModelArguments,
    TuningArguments,
    parse_args,
)
from .builders import (
    check_streaming,
    load_datasets,
    load_model,
    prepare_data,
    reference_checkpoint,
)
from .callbacks import (
    EncoderCheckpointingCallback,
    RunSummaryCallback,
    StopOnSignalCallback,
    WandbRunInfoCallback,
    peak_memory_mb,
)
from .checkpoints import (
    CheckpointError,
    OutputDirInUseError,
    checkpoint_to_resume,
    latest_complete_checkpoint,
    lock_output_dir,
    remove_incomplete_checkpoints,
    run_settings,
)
from .packing import check_padding_free_attention, use_packed_attention
from .quantization import describe_precision, precision_summary, quantization_config
from .run import Run, RunResult, TrainingStopped, configure_logging, run
from .trainer import MMPeftTrainer
from .tuning import count_parameters, describe_trainable, setup_tuning


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataArguments",
    "EncoderCheckpointingCallback",
    "MMPeftTrainer",
    "MMPeftTrainingArguments",
    "ModelArguments",
    "OutputDirInUseError",
    "StopOnSignalCallback",
    "TuningArguments",
    "WandbRunInfoCallback",
    "check_padding_free_attention",
    "check_streaming",
    "checkpoint_to_resume",
    "count_parameters",
    "describe_precision",
    "describe_trainable",
    "load_datasets",
    "latest_complete_checkpoint",
    "load_model",
    "lock_output_dir",
    "parse_args",
    "peak_memory_mb",
    "precision_summary",
    "prepare_data",
    "quantization_config",
    "reference_checkpoint",
    "remove_incomplete_checkpoints",
    "Run",
    "RunResult",
    "RunSummaryCallback",
    "TrainingStopped",
    "configure_logging",
    "run",
    "run_settings",
    "setup_tuning",
    "use_packed_attention",
]
