"""`transformers.Trainer` plus what it lacks for mmpeft: generation-based eval metrics (exact-match accuracy,
overall and per task; WER / BLEU on request), throughput, data-wait share and peak memory in the logs, checkpoints
that are complete or ignored, a clean stop with a checkpoint on SIGINT / SIGTERM, length-grouped sampling from
known lengths, logits only where a loss needs them, and packed attention for padding-free batches
(`mmpeft.training.packing`)."""

import os
import re
import resource
import signal
import sys
import threading
import time

import psutil
import torch
import torch.nn.functional as F
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..data import MMPeftDataset
from ..data.dataset import IGNORE_INDEX, SkipReport
from ..data.streaming import StreamingDataset
from ..inference import evaluate_generation
from .checkpoints import clear_disk_full_error, mark_complete, unmark
from .methods import PART_MODULES
from .packing import check_padding_free_attention, use_packed_attention


# Parameters of the encoders, whatever wraps the model (PEFT, DDP).
ENCODER_PARAMETER = re.compile(rf"(^|\.)({'|'.join(PART_MODULES['vision'] + PART_MODULES['audio'])})\.")


class PeakMemory:
    """Peak memory since `start()`: accelerator memory where there is one, else this process's resident set
    size sampled every 20 ms (the OS's own peak counter cannot be reset, so runs made one after another in one
    process would all report the first one's peak)."""

    def __init__(self):
        self._peak, self._stop = 0, threading.Event()

    def start(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return
        process = psutil.Process()
        self._peak = process.memory_info().rss

        def sample():
            while not self._stop.wait(0.02):
                self._peak = max(self._peak, process.memory_info().rss)

        threading.Thread(target=sample, daemon=True).start()

    def stop(self):
        self._stop.set()

    @property
    def mb(self) -> float:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
        return max(self._peak, psutil.Process().memory_info().rss) / 2**20


def peak_memory_mb() -> float:
    """Peak memory over this process's life: accelerator memory where there is one, else resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / (2**20 if sys.platform == "darwin" else 2**10)  # macOS reports bytes


class DataClock:
    """Wall time and tokens since this process's first training batch (so a resumed run counts only its own
    work), and the part of that time spent waiting for the next batch."""

    def __init__(self, tokens_seen: int):
        self.start, self.tokens_at_start, self.waited = time.perf_counter(), tokens_seen, 0.0

    def timed(self, iterator):
        """`iterator`, with the time each `next()` takes added to `waited`."""
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - start
            yield item

    def rates(self, tokens_seen: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        return {
            "tokens_per_second": round((tokens_seen - self.tokens_at_start) / elapsed, 1),
            "data_wait_fraction": round(self.waited / elapsed, 4),
        }


def logits_for_labels_only(inputs: dict) -> dict:
    """`inputs` for a training forward whose output layer runs only at positions that predict a label.

    With assistant-only loss most positions (prompt, image and audio tokens, padding) carry no label, yet an LM
    computes logits -- (tokens, vocabulary), the largest activation of a step -- everywhere. transformers' LMs take
    `logits_to_keep` (here a boolean mask: the positions whose next token is a label) and, for their loss, the
    matching `shift_labels`: the loss is the same, the output layer's work and memory shrink to the answers.
    """
    shift_labels = F.pad(inputs["labels"][..., 1:], (0, 1), value=IGNORE_INDEX)
    keep = shift_labels != IGNORE_INDEX
    return {**inputs, "logits_to_keep": keep, "shift_labels": shift_labels[keep]}


class MMPeftTrainer(Trainer):
    """Trainer that also generates answers for the eval set and scores them.

    Samples skipped while loading (`on_bad_sample: skip`: media that failed to load, and with streaming any bad
    sample; the batch's `skipped_samples`) are counted in `load_report` (`loading_report()` gathers every
    process's).

    Args:
        generation_dataset: an `MMPeftDataset` in `"generate"` mode of the eval samples to generate answers for (the
            last assistant turn of each is the reference).
        generation_metrics: metric names (`mmpeft.metrics.METRICS`); `accuracy` is exact match.
        generation_max_new_tokens: longest answer generated.
        encoder_learning_rate_scale: learning rate of encoder parameters relative to the others.
        run_settings: the settings a checkpoint is saved with (`mmpeft.training.checkpoints.run_settings`), compared
            when resuming.
        All other arguments are `transformers.Trainer`'s.
    """

    def __init__(
        self,
        *args,
        generation_dataset=None,
        generation_metrics=("accuracy",),
        generation_max_new_tokens=32,
        encoder_learning_rate_scale=1.0,
        run_settings=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.run_settings = run_settings
        self.stop_on_signal = StopOnSignalCallback(self.accelerator)
        self.add_callback(self.stop_on_signal)
        self.encoder_learning_rate_scale = encoder_learning_rate_scale
        self.generation_dataset = generation_dataset
        self.load_report = SkipReport()
        self.generation_metric_names = list(generation_metrics)
        self.generation_max_new_tokens = generation_max_new_tokens
        self.data_clock = None
        self.peak_memory = PeakMemory()
        if getattr(self.data_collator, "padding_free", False):
            use_packed_attention(self.model)
            check_padding_free_attention(self.model)

    def train(self, *args, **kwargs):
        self.data_clock = None
        self.peak_memory.start()
        try:
            return super().train(*args, **kwargs)
        finally:
            self.peak_memory.stop()
            self.stop_on_signal.restore()  # also when training raised

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint, marked complete (with the run's settings) once every process has written its part;
        older checkpoints are rotated out only after that, so a kill while saving always leaves the previous
        complete one. A full disk is said so, and the half-written checkpoint removed."""
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            unmark(folder)  # a resumed run writing a step again: that folder is incomplete until marked anew
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # the Trainer rotates before we mark
        try:
            with clear_disk_full_error(folder, remove=True):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_complete(folder, self.state.global_step, self.run_settings)
            rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint, use_mtime=True)

    def save_model(self, output_dir=None, _internal_call=False):
        """Trainer's `save_model`; a full disk while saving the final model is said so, naming the folder."""
        if _internal_call:  # a checkpoint's weights: `_save_checkpoint` handles a full disk
            return super().save_model(output_dir, _internal_call)
        with clear_disk_full_error(output_dir or self.args.output_dir):
            return super().save_model(output_dir, _internal_call)

    @property
    def stop_signal(self) -> int | None:
        """The signal (SIGINT, SIGTERM) that stopped training early, after a checkpoint was saved; None otherwise."""
        return self.stop_on_signal.received

    def create_optimizer(self, model=None):
        """Trainer's optimizer, with encoder parameters moved to groups of `encoder_learning_rate_scale` x lr."""
        optimizer = super().create_optimizer(model)
        if self.encoder_learning_rate_scale == 1.0:
            return optimizer
        model = self.model if model is None else model
        encoder = {id(p) for name, p in model.named_parameters() if ENCODER_PARAMETER.search(name)}
        groups = []
        for group in optimizer.param_groups:
            options = {key: value for key, value in group.items() if key != "params"}
            for params, scale in (
                ([p for p in group["params"] if id(p) not in encoder], 1.0),
                ([p for p in group["params"] if id(p) in encoder], self.encoder_learning_rate_scale),
            ):
                if params:
                    groups.append({**options, "params": params, "lr": options["lr"] * scale})
        optimizer.param_groups = groups
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss, with logits computed only where a label is predicted (`logits_for_labels_only`): the
        returned outputs' logits are (labelled positions, vocabulary). Label smoothing and custom loss functions,
        which read the logits themselves, get them everywhere."""
        if "labels" in inputs and self.label_smoother is None and self.compute_loss_func is None:
            inputs = logits_for_labels_only(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def get_train_dataloader(self) -> DataLoader:
        """Trainer's loader, except for a `StreamingDataset`: it splits its records across processes itself, so its
        loader is prepared for this process alone (Accelerate would otherwise split the stream again, keeping
        1 / processes of each process's share)."""
        if not isinstance(self.train_dataset, StreamingDataset):
            return super().get_train_dataloader()
        loader = DataLoader(
            self.train_dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
        )
        return prepare_data_loader(
            loader, self.args.device, num_processes=1, process_index=0, put_on_device=True, dispatch_batches=False
        )

    def _prepare_inputs(self, inputs):
        """Trainer's device placement, after counting the samples the batch's dataset replaced."""
        for sample in inputs.pop("skipped_samples", ()):
            self.load_report.add(sample["reason"], sample["where"])
        return super()._prepare_inputs(inputs)

    def loading_report(self) -> SkipReport:
        """Samples skipped while loading, by every process (call it on all of them)."""
        report = SkipReport()
        for reasons, where in gather_object([(dict(self.load_report.reasons), self.load_report.where)]):
            for reason, count in reasons.items():
                report.reasons[reason] += count
                report.where.setdefault(reason, [])
                report.where[reason] = (report.where[reason] + where[reason])[:5]
        return report

    def _get_train_sampler(self, train_dataset=None):
        """Trainer's sampler, except that `train_sampling_strategy: group_by_length` takes each sample's length from
        the rows' length column: the Trainer would load every sample (and decode its media) to measure it."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(dataset, MMPeftDataset):
            batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(batch_size, lengths=dataset.lengths)
        return super()._get_train_sampler(train_dataset)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's batch fetching, timed: `data_wait_fraction` in the logs is the share of training time spent
        waiting for batches (loading, decoding, featurizing, collating)."""
        if self.data_clock is None:
            self.data_clock = DataClock(self.state.num_input_tokens_seen)
        return super().get_batch_samples(self.data_clock.timed(epoch_iterator), num_batches, device)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.data_clock is not None and "loss" in logs:  # training logs
            logs.update(self.data_clock.rates(self.state.num_input_tokens_seen))
        logs["peak_memory_mb"] = round(self.peak_memory.mb, 1)
        super().log(logs, *args, **kwargs)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.generation_dataset is not None:
            metrics = self.generation_scores()
            output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in metrics.items()})
        return output

    def generation_scores(self) -> dict[str, float]:
        """Generation metrics over the generation dataset, overall and per task (`accuracy_<task>`), computed by
        `mmpeft.inference.evaluate_generation` (as recipes/eval.py does); samples whose media failed to load are
        left out (the eval-loss pass over the same samples counts them). Every process takes part."""
        results = evaluate_generation(
            self.accelerator.unwrap_model(self.model),
            self.processing_class,
            self.generation_dataset,
            self.generation_metric_names,
            batch_size=self.args.per_device_eval_batch_size,
            max_new_tokens=self.generation_max_new_tokens,
            device=self.args.device,
            num_workers=self.args.dataloader_num_workers,
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
            progress=self.is_local_process_zero() and not self.args.disable_tqdm,
        )
        return results.scores


class StopOnSignalCallback(TrainerCallback):
    """Stops training cleanly on SIGINT (Ctrl-C) or SIGTERM (schedulers, preemption): the step under way finishes,
    a complete checkpoint is saved, training stops (`MMPeftTrainer.stop_signal` says why). A second signal acts as
    it would without this callback. With several processes, a signal received by any of them stops all of them at
    the same step (one all-reduce of a flag per step), so that they save together.

    transformers' own `enable_jit_checkpoint` handles SIGTERM only, and saves in the middle of a step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received = None
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set signal handlers
            self._previous = {number: signal.signal(number, self._receive) for number in self.SIGNALS}

    def _receive(self, number, frame):
        self.received = number
        self.restore()

    def restore(self):
        """Put back the signal handlers there were before training."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.accelerator.num_processes > 1:
            flag = torch.tensor(self.received or 0, device=self.accelerator.device)
            self.received = int(self.accelerator.reduce(flag, reduction="max")) or None
        if self.received is not None:
            control.should_save = control.should_training_stop = True


class EncoderCheckpointingCallback(TrainerCallback):
    """Turns gradient checkpointing back off inside the encoders once the Trainer has enabled it model-wide
    (non-reentrant, transformers' default), leaving it on for the LM."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for tower in (base.vision_tower, base.audio_tower):
            for module in tower.modules() if tower is not None else ():
                if getattr(module, "gradient_checkpointing", False):
                    module.gradient_checkpointing = False


class WandbRunInfoCallback(TrainerCallback):
    """Adds mmpeft's settings and parameter counts to the W&B run config once the run exists."""

    def __init__(self, info: dict):
        self.info = info

    def on_train_begin(self, args, state, control, **kwargs):
        import wandb

        if state.is_world_process_zero and wandb.run is not None:
            wandb.run.config.update(self.info, allow_val_change=True)


__all__ = [
    "EncoderCheckpointingCallback",
    "MMPeftTrainer",
    "StopOnSignalCallback",
    "WandbRunInfoCallback",
    "logits_for_labels_only",
    "peak_memory_mb",
]
