"""`transformers.Trainer` plus what it lacks for mmpeft: generation-based eval metrics (exact-match accuracy,
overall and per task; WER / BLEU on request), throughput, data-wait share and peak memory in the logs, checkpoints
that are complete or ignored, a clean stop with a checkpoint on SIGINT / SIGTERM, length-grouped sampling from
known lengths, logits only where a loss needs them, and packed attention for padding-free batches
(`mmpeft.training.packing`)."""

import os

import torch.nn.functional as F
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..data import MMPeftDataset
from ..data.dataset import IGNORE_INDEX, SkipReport, raise_bad_sample, take_load_reports
from ..data.streaming import StreamingDataset
from ..inference import evaluate_generation
from .callbacks import DataClock, PeakMemory, StopOnSignalCallback
from .checkpoints import clear_disk_full_error, mark_complete, unmark
from .packing import check_padding_free_attention, use_packed_attention
from .peft_init import save_as_lora_of_the_base
from .policy import optimizer_groups


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
        policy: `{part: PartPolicy}` (`TuningArguments.policy`): each part's learning rate and weight decay.
        loraplus_lr_ratio: LoRA+: LoRA's B matrices train at this multiple of their part's learning rate.
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
        policy=None,
        loraplus_lr_ratio=None,
        run_settings=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.run_settings = run_settings
        self.stop_on_signal = StopOnSignalCallback(self.accelerator)
        self.add_callback(self.stop_on_signal)
        self.policy, self.loraplus_lr_ratio = policy, loraplus_lr_ratio
        self.generation_dataset = generation_dataset
        self.load_report = SkipReport()
        self.generation_metric_names = list(generation_metrics)
        self.generation_max_new_tokens = generation_max_new_tokens
        self.peak_memory, self.data_clock = PeakMemory(), DataClock()
        self.add_callback(self.peak_memory)
        self.add_callback(self.data_clock)
        if getattr(self.data_collator, "padding_free", False):
            use_packed_attention(self.model)
            check_padding_free_attention(self.model)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.peak_memory.stop()  # also when training raised
            self.stop_on_signal.restore()

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
        """Trainer's `save_model`; a full disk while saving the final model is said so, naming the folder. The final
        adapter of a base-rewriting initialisation (PiSSA, OLoRA) is saved as a LoRA of the untouched base
        (`mmpeft.training.peft_init`); checkpoints keep it as trained, for resuming."""
        if _internal_call:  # a checkpoint's weights: `_save_checkpoint` handles a full disk
            return super().save_model(output_dir, _internal_call)
        with clear_disk_full_error(output_dir or self.args.output_dir):
            super().save_model(output_dir, _internal_call)
            save_as_lora_of_the_base(self, output_dir or self.args.output_dir)

    @property
    def stop_signal(self) -> int | None:
        """The signal (SIGINT, SIGTERM) that stopped training early, after a checkpoint was saved; None otherwise."""
        return self.stop_on_signal.received

    def create_optimizer(self, model=None):
        """Trainer's optimizer, its parameter groups split per part at the part's learning rate and weight decay
        (`policy`), LoRA's B matrices at `loraplus_lr_ratio` x their part's rate with LoRA+."""
        optimizer = super().create_optimizer(model)
        if self.policy is None:
            return optimizer
        model = self.model if model is None else model
        optimizer.param_groups = optimizer_groups(
            optimizer.param_groups,
            model.named_parameters(),
            set(self.get_decay_parameter_names(model)),
            self.policy,
            self.args.learning_rate,
            self.args.weight_decay,
            self.loraplus_lr_ratio,
        )
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
        """Trainer's device placement, after counting the samples the batch's dataset replaced (or raising the bad
        sample it carries)."""
        for sample in take_load_reports(inputs):
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
        timed = self.data_clock.timed(epoch_iterator, self.state.num_input_tokens_seen)
        # A bad sample is raised as it arrives: the Trainer reads `labels` of every batch it fetched before training.
        return super().get_batch_samples(map(raise_bad_sample, timed), num_batches, device)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # training logs
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


__all__ = ["MMPeftTrainer", "logits_for_labels_only"]
