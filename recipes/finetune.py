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
"""

import json
import logging
import os
import signal
import sys

import transformers
from transformers import EarlyStoppingCallback, set_seed

from mmpeft.data import BadSampleError, MMPeftDataCollator, MMPeftDataset, SkipReport
from mmpeft.hub import PushError, push_output
from mmpeft.training import (
    CheckpointError,
    ConfigError,
    EncoderCheckpointingCallback,
    MMPeftTrainer,
    OutputDirInUseError,
    WandbRunInfoCallback,
    check_streaming,
    checkpoint_to_resume,
    configure_wandb,
    count_parameters,
    describe_precision,
    describe_trainable,
    load_datasets,
    load_model,
    lock_output_dir,
    parse_args,
    quantization_config,
    reference_checkpoint,
    remove_incomplete_checkpoints,
    run_settings,
    setup_tuning,
)


logger = logging.getLogger("mmpeft")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "tiny_lora.yaml")
CARD_TEMPLATE = os.path.join(os.path.dirname(HERE), "hub", "model_card_template.md")
HYPERPARAMETERS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "seed",
)


class TrainingStopped(Exception):
    """Training stopped by a signal after saving a checkpoint; the message says how to resume."""

    def __init__(self, number: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + number  # the shell's convention for a process ended by a signal


def main(argv=None):
    args = parse_args(argv, default_config=DEFAULT_CONFIG)
    training_args = args[3]  # after the model, data and tuning arguments
    # One run per output folder (the global main process holds the lock): a second one would take the first's
    # checkpoint being written for one left half-written, and delete it.
    lock = lock_output_dir(training_args.output_dir) if training_args.process_index == 0 else None
    try:
        return train(*args)
    finally:
        if lock:
            lock.close()


def train(model_args, data_args, tuning_args, training_args, config_path):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.logging.set_verbosity_warning()
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    logger.info(f"Config: {config_path}; method: {tuning_args.method}; parts: {tuning_args.components}")
    print(f"mmpeft: process {training_args.process_index} of {training_args.world_size} on {training_args.device}")
    configure_wandb(training_args, tuning_args)
    # mmpeft pushes itself, once the output is complete on disk (the Trainer would create the repo up front);
    # the token stays out of the arguments the Trainer saves (training_args.bin) and logs.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    hub_token, training_args.hub_token = training_args.hub_token, None
    _hide_token_in_command_line()  # W&B records the command line
    if push_to_hub and not training_args.hub_model_id:
        raise ValueError("push_to_hub needs hub_model_id (the repository to push to, e.g. user/my-omni-model).")
    set_seed(training_args.seed)
    settings = run_settings(model_args, data_args, tuning_args, training_args)
    checkpoint = checkpoint_to_resume(
        training_args.output_dir,
        training_args.resume_from_checkpoint,
        training_args.auto_resume,
        settings,
        training_args.resume_with_changed_settings,
    )
    if (checkpoint or training_args.auto_resume) and training_args.process_index == 0:
        remove_incomplete_checkpoints(training_args.output_dir)

    ################
    # Model
    ################
    if not (model_args.model_name_or_path or model_args.text_model):
        with training_args.main_process_first(desc="building the reference model"):  # once, by the first process
            model_args.model_name_or_path = reference_checkpoint()
    # Every process loads at once: under ZeRO-3 the weights are sharded collectively while loading.
    quantization = quantization_config(tuning_args)
    model, processor = load_model(model_args, quantization)

    ################
    # Dataset
    ################
    # The main process (of each node, or of all with a shared cache) prepares and caches the data; the others then
    # memory-map what it wrote. With streaming, training data is prepared as it is read, by every process.
    check_streaming(data_args, training_args)
    with training_args.main_process_first(local=not data_args.prepared_data_shared, desc="preparing the data"):
        train_dataset, eval_dataset, reports = load_datasets(
            data_args, processor, training_args.output_dir, training_args.process_index, training_args.world_size
        )
    reused = sum(report["reused"] for report in reports.values())
    rank = training_args.process_index
    print(f"mmpeft: process {rank}: {len(reports) - reused} data sources prepared, {reused} reused from the cache")
    generation_dataset = None
    if eval_dataset is not None:
        count = min(len(eval_dataset), training_args.generation_num_samples or len(eval_dataset))
        generation_dataset = MMPeftDataset(
            eval_dataset.rows.select(range(count)),
            processor,
            "generate",
            data_args.on_bad_sample,
            data_args.media_policy,
        )

    ################
    # Tuning
    ################
    model = setup_tuning(model, tuning_args)
    trainable, total = count_parameters(model)
    logger.info(f"Trainable parameters per part:\n{describe_trainable(model)}")
    logger.info(f"Precision per part:\n{describe_precision(model)}")

    ################
    # Training
    ################
    trainer = MMPeftTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=MMPeftDataCollator(
            processor.tokenizer.pad_token_id, max_length=data_args.max_length, padding_free=data_args.padding_free
        ),
        processing_class=processor,
        generation_dataset=generation_dataset,
        generation_metrics=training_args.generation_metrics,
        generation_max_new_tokens=training_args.generation_max_new_tokens,
        encoder_learning_rate_scale=tuning_args.encoder_learning_rate_scale,
        run_settings=settings,
    )
    if training_args.gradient_checkpointing and not tuning_args.encoder_gradient_checkpointing:
        trainer.add_callback(EncoderCheckpointingCallback())
    if training_args.early_stopping_patience is not None:
        trainer.add_callback(EarlyStoppingCallback(training_args.early_stopping_patience))
    run_info = {
        "mmpeft": {"model": vars(model_args), "data": vars(data_args), "tuning": vars(tuning_args)},
        "method": tuning_args.method,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
    }
    trainer.add_callback(WandbRunInfoCallback(run_info))

    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.stop_signal is not None:
        _finish_wandb()
        step = trainer.state.global_step
        raise TrainingStopped(
            trainer.stop_signal,
            f"stopped by {signal.Signals(trainer.stop_signal).name} at step {step}, checkpoint saved in "
            f"{os.path.join(training_args.output_dir, f'checkpoint-{step}')}; resume with --auto_resume true",
        )
    trainer.save_metrics("train", train_result.metrics)
    metrics = trainer.evaluate() if eval_dataset else {}
    if metrics:
        trainer.save_metrics("eval", metrics)
    trainer.save_model()  # adapter + projectors for LoRA, full weights otherwise; processor alongside
    trainer.save_state()

    loading_report = trainer.loading_report()
    wandb_run = _finish_wandb()
    if trainer.is_world_process_zero():
        _add_loading_report(training_args.output_dir, loading_report)
        summary = {
            **{k: v for k, v in run_info.items() if k != "mmpeft"},
            "peak_memory_mb": round(trainer.peak_memory.mb, 1),
            **(trainer.data_clock.rates(trainer.state.num_input_tokens_seen) if trainer.data_clock else {}),
            "hyperparameters": {
                **{k: getattr(training_args, k) for k in HYPERPARAMETERS},
                **(
                    {k: getattr(tuning_args, k) for k in ("lora_r", "lora_alpha", "lora_dropout")}
                    if tuning_args.method in ("lora", "qlora")
                    else {}
                ),
            },
            "datasets": [spec["path"] for spec in data_args.train_data],
            # How a QLoRA adapter's base was quantized: mmpeft.inference loads it the same way to evaluate or chat.
            "quantization_config": quantization.to_dict() if quantization else None,
            **{k: v for k, v in train_result.metrics.items() if k in ("train_runtime", "train_samples_per_second")},
            **metrics,
        }
        with open(os.path.join(training_args.output_dir, "run_summary.json"), "w") as file:
            json.dump(summary, file, indent=2)
        shown = {
            k: round(v, 4)
            for k, v in metrics.items()
            if k.startswith(("eval_accuracy", "eval_loss", "eval_wer", "eval_bleu"))
        }
        print(
            f"\nmmpeft | {tuning_args.method} | {shown} | model saved to {os.path.abspath(training_args.output_dir)}"
            + (f" | W&B run: {wandb_run}" if wandb_run else "")
        )
    if push_to_hub and trainer.is_world_process_zero():
        url = push_output(
            training_args.output_dir,
            training_args.hub_model_id,
            template=CARD_TEMPLATE,
            private=bool(training_args.hub_private_repo),
            token=hub_token,
        )
        print(f"mmpeft | pushed to {url}")
    return trainer


def _add_loading_report(output_dir: str, report: SkipReport):
    """Samples skipped while training read them (media that failed to load; with streaming, any bad sample), logged
    and added to data_report.json."""
    path = os.path.join(output_dir, "data_report.json")
    with open(path) as file:
        reports = json.load(file)
    reports["skipped while loading"] = {
        "skipped": report.skipped,
        "reasons": dict(report.reasons),
        "where": report.where,
    }
    with open(path, "w") as file:
        json.dump(reports, file, indent=2)
    if report.skipped:
        logger.warning(
            f"training: {report.skipped} samples replaced because their media failed to load{report.details()}"
        )


def _hide_token_in_command_line():
    for index, argument in enumerate(sys.argv):
        if argument.startswith("--hub_token="):
            sys.argv[index] = "--hub_token=<hidden>"
        elif index and sys.argv[index - 1] == "--hub_token":
            sys.argv[index] = "<hidden>"


def _finish_wandb() -> str | None:
    """Close the W&B run (so that it is complete on disk) and return its URL, or its folder when offline."""
    if "wandb" not in sys.modules or sys.modules["wandb"].run is None:
        return None
    run = sys.modules["wandb"].run
    location = os.path.dirname(run.dir) if run.settings.mode == "offline" else run.url
    run.finish()
    sys.modules["wandb"].teardown()  # a later run in this process (recipes/compare.py) reads its settings anew
    return location


if __name__ == "__main__":
    try:
        main()
    except (PushError, BadSampleError, ConfigError, CheckpointError, OutputDirInUseError, FileNotFoundError) as error:
        sys.exit(f"mmpeft: {error}")
    except TrainingStopped as stop:
        print(f"mmpeft: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
