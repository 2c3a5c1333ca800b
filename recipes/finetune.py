"""Fine-tune an mmpeft omni model (any vision encoder + any audio encoder + any causal LM).

    # The embedded default: tiny reference model + generated image/audio/text data, LoRA. Offline, CPU, ~5 min.
    accelerate launch recipes/finetune.py

    # A config, with command-line overrides of any of its keys
    accelerate launch recipes/finetune.py --config recipes/configs/tiny_full.yaml --learning_rate 5e-4
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/finetune.py --config <config.yaml>
    python recipes/finetune.py --config <config.yaml>

Settings: mmpeft/training/arguments.py (plus every `transformers.TrainingArguments` field). Outputs in
`output_dir`: the model (full weights, or the LoRA adapter with the projectors), the processor,
`eval_results.json`, `run_summary.json` (parameters, memory, time, metrics), `data_report.json`,
checkpoints, and the W&B run (offline without an API key).

The work is `mmpeft.training.run`; this script is its command line.
"""

import logging
import os
import sys

from mmpeft.data import BadSampleError
from mmpeft.hub import PushError
from mmpeft.training import (
    CheckpointError,
    ConfigError,
    OutputDirInUseError,
    TrainingStopped,
    configure_logging,
    parse_args,
    run,
)


logger = logging.getLogger("mmpeft")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny_lora.yaml")
# Errors of the data, a setting or the output folder: said in one line, exit code 1.
USER_ERRORS = (PushError, BadSampleError, ConfigError, CheckpointError, OutputDirInUseError, FileNotFoundError)


def main(argv=None):
    """Train per the command line (`--config` and overrides); returns the `MMPeftTrainer` of the finished run."""
    model_args, data_args, tuning_args, training_args, config_path = parse_args(argv, default_config=DEFAULT_CONFIG)
    configure_logging(training_args)
    logger.info(f"Config: {config_path}")
    _hide_token_in_command_line()  # W&B records the command line
    return run(model_args, data_args, tuning_args, training_args).trainer


def _hide_token_in_command_line():
    for index, argument in enumerate(sys.argv):
        if argument.startswith("--hub_token="):
            sys.argv[index] = "--hub_token=<hidden>"
        elif index and sys.argv[index - 1] == "--hub_token":
            sys.argv[index] = "<hidden>"


def error_line(error: Exception) -> str:
    """The one line a user error ends the recipe with."""
    if isinstance(error, BadSampleError):
        return f"mmpeft: bad sample: {error} (on_bad_sample: skip skips and counts bad samples instead)"
    return f"mmpeft: {error}"


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as error:
        sys.exit(error_line(error))
    except TrainingStopped as stop:
        print(f"mmpeft: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
