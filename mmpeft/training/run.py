"""One training run from its four argument dataclasses: build the model and the data, set up what trains, train,
evaluate, save, push. `recipes/finetune.py` is a command line around `run`; the comparison of methods, the stress
test and the benchmarks call it directly, several runs in one process.

    from mmpeft.training import parse_args, run

    model_args, data_args, tuning_args, training_args, _ = parse_args(["--config", "my.yaml"])
    result = run(model_args, data_args, tuning_args, training_args)
    print(result.metrics, result.summary.trainable_params)

`Run` holds the stages for those who need one in between (a callback added to the trainer, the model inspected
before training): `Run(...).build()` then `.train()`.
"""

import json
import logging
import os
import signal
from dataclasses import dataclass

import transformers
from transformers import EarlyStoppingCallback, TrainerCallback, set_seed

from ..data import MMPeftDataCollator, MMPeftDataset, SkipReport
from ..hub import push_output
from ..summary import RunSummary
from ..tracking import WandbTracking
from .arguments import DataArguments, MMPeftTrainingArguments, ModelArguments, TuningArguments
from .builders import check_streaming, load_datasets, load_model, reference_checkpoint
from .callbacks import (
    EncoderCheckpointingCallback,
    LogResume,
    PolicyCheckCallback,
    RunSummaryCallback,
    WandbRunInfoCallback,
)
from .checkpoints import checkpoint_to_resume, lock_output_dir, remove_incomplete_checkpoints, run_settings
from .modality_adapters import check_settings as check_modality_settings
from .peft_init import initialise
from .policy import describe_parts
from .quantization import quantization_config
from .trainer import MMPeftTrainer
from .tuning import count_parameters, describe_policy, setup_tuning


logger = logging.getLogger("mmpeft")
# Training settings that shape the result, recorded in the run summary and the model card.
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
SHOWN_METRICS = ("eval_accuracy", "eval_loss", "eval_wer", "eval_bleu")  # in the run's last line
LORA_HYPERPARAMETERS = ("lora_r", "lora_alpha", "lora_dropout", "lora_kwargs")
OPTIONAL_HYPERPARAMETERS = ("loraplus_lr_ratio", "trainable_tokens", "adapter_per_modality")  # recorded when set


class TrainingStopped(Exception):
    """Training stopped by a signal after saving a checkpoint; the message says how to resume."""

    def __init__(self, number: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + number  # the shell's convention for a process ended by a signal


@dataclass
class RunResult:
    """What a finished run produced.

    Args:
        trainer: the `MMPeftTrainer` (its `model`, `state` with the log history, datasets).
        metrics: evaluation metrics after training (empty without evaluation data).
        summary: the `RunSummary` written to `run_summary.json` (on the main process; None on the others).
        wandb_run: the W&B run's URL, or its folder when offline; None without W&B.
        hub_url: the Hub repository pushed to, when `push_to_hub`.
    """

    trainer: MMPeftTrainer
    metrics: dict[str, float]
    summary: RunSummary | None
    wandb_run: str | None = None
    hub_url: str | None = None

    @property
    def output_dir(self) -> str:
        return self.trainer.args.output_dir


class Run:
    """A training run, stage by stage: `build()` (model, data, tuning, trainer) then `train()` (train, evaluate,
    save, push). `callbacks` are added to the trainer."""

    def __init__(
        self,
        model_args: ModelArguments,
        data_args: DataArguments,
        tuning_args: TuningArguments,
        training_args: MMPeftTrainingArguments,
        callbacks: list[TrainerCallback] = (),
    ):
        self.model_args, self.data_args, self.tuning_args, self.args = (
            model_args,
            data_args,
            tuning_args,
            training_args,
        )
        self.callbacks = list(callbacks)
        check_modality_settings(tuning_args, training_args)  # adapter_per_modality, before any data is prepared
        # mmpeft pushes itself, once the output is complete on disk (the Trainer would create the repo up front);
        # the token stays out of the arguments the Trainer saves (training_args.bin) and logs.
        self.push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
        self.hub_token, training_args.hub_token = training_args.hub_token, None
        if self.push_to_hub and not training_args.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (the repository to push to, e.g. user/my-omni-model).")
        self.trainer = self.checkpoint = self.summary_callback = None

    def build(self) -> MMPeftTrainer:
        """Model and processor, datasets, tuning and the trainer; returns the trainer."""
        model_args, data_args, tuning_args, args = self.model_args, self.data_args, self.tuning_args, self.args
        set_seed(args.seed)
        settings = run_settings(model_args, data_args, tuning_args, args)
        self.checkpoint = checkpoint_to_resume(
            args.output_dir, args.resume_from_checkpoint, args.auto_resume, settings, args.resume_with_changed_settings
        )
        if (self.checkpoint or args.auto_resume) and args.process_index == 0:
            remove_incomplete_checkpoints(args.output_dir)

        # Model. Every process loads at once: under ZeRO-3 the weights are sharded collectively while loading.
        if not (model_args.model_name_or_path or model_args.text_model):
            with args.main_process_first(desc="building the reference model"):  # once, by the first process
                model_args.model_name_or_path = reference_checkpoint()
        self.quantization = quantization_config(tuning_args)
        model, processor = load_model(model_args, self.quantization)

        # Data. The main process (of each node, or of all with a shared cache) prepares and caches it; the others
        # then memory-map what it wrote. With streaming, training data is prepared as it is read, by every process.
        check_streaming(data_args, args)
        with args.main_process_first(local=not data_args.prepared_data_shared, desc="preparing the data"):
            train_dataset, eval_dataset, reports = load_datasets(
                data_args, processor, args.output_dir, args.process_index, args.world_size
            )
        reused = sum(report["reused"] for report in reports.values())
        print(
            f"mmpeft: process {args.process_index}: {len(reports) - reused} data sources prepared, "
            f"{reused} reused from the cache"
        )
        generation_dataset = None
        if eval_dataset is not None:
            count = min(len(eval_dataset), args.generation_num_samples or len(eval_dataset))
            generation_dataset = MMPeftDataset(
                eval_dataset.rows.select(range(count)),
                processor,
                "generate",
                data_args.on_bad_sample,
                data_args.media_policy,
            )

        # Tuning.
        model = setup_tuning(model, tuning_args, processor.tokenizer)
        trainable, total = count_parameters(model)
        policy = tuning_args.policy
        logger.info(f"Policy per part:\n{describe_policy(model, policy, args.learning_rate, args.weight_decay)}")

        # Trainer.
        trainer = MMPeftTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=MMPeftDataCollator(
                processor.tokenizer.pad_token_id, max_length=data_args.max_length, padding_free=data_args.padding_free
            ),
            processing_class=processor,
            generation_dataset=generation_dataset,
            generation_metrics=args.generation_metrics,
            generation_max_new_tokens=args.generation_max_new_tokens,
            policy=policy,
            loraplus_lr_ratio=tuning_args.loraplus_lr_ratio,
            run_settings=settings,
        )
        trainer.add_callback(PolicyCheckCallback(policy, tuning_args.trainable_modules))
        initialise(trainer, self.checkpoint)  # PiSSA / OLoRA / EVA: before training (mmpeft.training.peft_init)
        if args.gradient_checkpointing and not tuning_args.encoder_gradient_checkpointing:
            trainer.add_callback(EncoderCheckpointingCallback())
        if args.early_stopping_patience is not None:
            trainer.add_callback(EarlyStoppingCallback(args.early_stopping_patience))
        summary = RunSummary(
            method=tuning_args.method,
            trainable_params=trainable,
            total_params=total,
            trainable_fraction=trainable / total,
            hyperparameters={
                **{name: getattr(args, name) for name in HYPERPARAMETERS},
                **(
                    {name: getattr(tuning_args, name) for name in LORA_HYPERPARAMETERS}
                    if tuning_args.tuning_method.uses_adapter
                    else {}
                ),
                "parts": describe_parts(policy, args.learning_rate, args.weight_decay),
                **{
                    name: getattr(tuning_args, name) for name in OPTIONAL_HYPERPARAMETERS if getattr(tuning_args, name)
                },
            },
            datasets=[spec["path"] for spec in data_args.train_data],
            # How a QLoRA adapter's base was quantized: mmpeft.inference loads it the same way to evaluate or chat.
            quantization_config=self.quantization.to_dict() if self.quantization else None,
        )
        run_info = {
            "mmpeft": {"model": vars(model_args), "data": vars(data_args), "tuning": vars(tuning_args)},
            **{k: getattr(summary, k) for k in ("method", "trainable_params", "total_params", "trainable_fraction")},
        }
        trainer.add_callback(WandbRunInfoCallback(run_info))
        self.summary_callback = RunSummaryCallback(
            summary, trainer.peak_memory, trainer.data_clock, trainer.stop_on_signal
        )
        trainer.add_callback(self.summary_callback)
        trainer.add_callback(LogResume(self.checkpoint))
        for callback in self.callbacks:
            trainer.add_callback(callback)
        self.trainer = trainer
        return trainer

    def train(self) -> RunResult:
        """Train (resuming when asked), evaluate, save the model, the state and the reports, then push when asked.
        Raises `TrainingStopped` when a signal stopped training (a checkpoint was saved)."""
        trainer, args = self.trainer or self.build(), self.args
        with WandbTracking.for_training(args, tags=[self.tuning_args.method]) as tracking:
            train_result = trainer.train(resume_from_checkpoint=self.checkpoint)
            if trainer.stop_signal is not None:
                step = trainer.state.global_step
                raise TrainingStopped(
                    trainer.stop_signal,
                    f"stopped by {signal.Signals(trainer.stop_signal).name} at step {step}, checkpoint saved in "
                    f"{os.path.join(args.output_dir, f'checkpoint-{step}')}; resume with --auto_resume true",
                )
            trainer.save_metrics("train", train_result.metrics)
            metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
            if metrics:
                trainer.save_metrics("eval", metrics)
            trainer.save_model()  # adapter + projectors for LoRA, full weights otherwise; processor alongside
            trainer.save_state()
            loading_report = trainer.loading_report()
            wandb_run = tracking.finish()
        result = RunResult(trainer, metrics, None, wandb_run)
        if not trainer.is_world_process_zero():
            return result
        result.summary = self.summary_callback.summary
        _add_loading_report(args.output_dir, loading_report)
        shown = {
            k: round(v, 4)
            for k, v in metrics.items()
            if k.startswith(("eval_accuracy", "eval_loss", "eval_wer", "eval_bleu"))
        }
        print(
            f"\nmmpeft | {self.tuning_args.method} | {shown} | model saved to {os.path.abspath(args.output_dir)}"
            + (f" | W&B run: {wandb_run}" if wandb_run else "")
        )
        if self.push_to_hub:
            result.hub_url = push_output(
                args.output_dir,
                args.hub_model_id,
                private=bool(args.hub_private_repo),
                token=self.hub_token,
            )
            print(f"mmpeft | pushed to {result.hub_url}")
        return result


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    tuning_args: TuningArguments,
    training_args: MMPeftTrainingArguments,
    callbacks: list[TrainerCallback] = (),
) -> RunResult:
    """Train, evaluate, save and (when asked) push one run; see `Run`. The output folder is locked for the run's
    length: a second run there would take the first's checkpoint being written for one left half-written."""
    lock = lock_output_dir(training_args.output_dir) if training_args.process_index == 0 else None
    try:
        logger.info(f"Method: {tuning_args.method}; parts: {tuning_args.components}")
        print(f"mmpeft: process {training_args.process_index} of {training_args.world_size} on {training_args.device}")
        return Run(model_args, data_args, tuning_args, training_args, callbacks).train()
    finally:
        if lock:
            lock.close()


def configure_logging(training_args: MMPeftTrainingArguments):
    """mmpeft's log lines with time and level, INFO on the process that logs (`should_log`), transformers' warnings."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.logging.set_verbosity_warning()
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)


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


__all__ = ["HYPERPARAMETERS", "Run", "RunResult", "TrainingStopped", "configure_logging", "run"]
