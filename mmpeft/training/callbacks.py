"""Callbacks of an mmpeft run: what `MMPeftTrainer` measures (peak memory, throughput and data wait), a clean stop on
SIGINT / SIGTERM, gradient checkpointing kept out of the encoders, mmpeft's settings in the W&B run, and the run
summary (`run_summary.json`), and the check that the first optimizer step trained what the policy says."""

import logging
import os
import resource
import signal
import sys
import threading
import time

import psutil
import torch
from transformers import TrainerCallback

from ..summary import RunSummary
from .policy import part_of_parameter


logger = logging.getLogger("mmpeft")


class PeakMemory(TrainerCallback):
    """Peak memory while training: accelerator memory where there is one, else this process's resident set size
    sampled every 20 ms (the OS's own peak counter cannot be reset, so runs made one after another in one process
    would all report the first one's peak)."""

    def __init__(self):
        self._peak, self._stop = 0, threading.Event()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start()

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def start(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return
        process, stop = psutil.Process(), threading.Event()  # one event per start: `train()` may run again
        self._peak, self._stop = process.memory_info().rss, stop

        def sample():
            while not stop.wait(0.02):
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


class DataClock(TrainerCallback):
    """Wall time and tokens since this process's first training batch (so a resumed run counts only its own
    work), and the part of that time spent waiting for the next batch: `MMPeftTrainer` fetches its batches
    through `timed` and adds `rates` to its training logs."""

    def __init__(self):
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = None  # started by the first batch

    def timed(self, iterator, tokens_seen: int):
        """`iterator`, with the time each `next()` takes added to `waited`; the first call starts the clock."""
        if self.start is None:
            self.start, self.tokens_at_start, self.waited = time.perf_counter(), tokens_seen, 0.0
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
        """`tokens_per_second` and `data_wait_fraction` so far; empty before the first batch."""
        if self.start is None:
            return {}
        elapsed = time.perf_counter() - self.start
        return {
            "tokens_per_second": round((tokens_seen - self.tokens_at_start) / elapsed, 1),
            "data_wait_fraction": round(self.waited / elapsed, 4),
        }


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


class LogResume(TrainerCallback):
    """Says in the log that a run resumes, and where: `Resuming from <checkpoint> (step N of M)`."""

    def __init__(self, checkpoint: str | None):
        self.checkpoint = checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        if self.checkpoint and state.is_world_process_zero:  # the state is the checkpoint's by now
            logger.info(f"Resuming from {self.checkpoint} (step {state.global_step} of {state.max_steps})")


class RunSummaryCallback(TrainerCallback):
    """Writes the run's `RunSummary` to `run_summary.json` in the output folder (main process): when training ends,
    with the training figures, and again after each evaluation that follows (the final metrics). A run stopped by a
    signal (`stop`) writes none: it is not finished.

    Args:
        summary: the run's summary with what is known up front (method, parameter counts, hyperparameters ...);
            the callback fills in the rest.
        peak_memory, data_clock: the trainer's meters.
        stop: the trainer's `StopOnSignalCallback`.
    """

    TRAIN_FIGURES = ("train_runtime", "train_samples_per_second")

    def __init__(
        self, summary: RunSummary, peak_memory: PeakMemory, data_clock: DataClock, stop: StopOnSignalCallback
    ):
        self.summary, self.peak_memory, self.data_clock, self.stop = summary, peak_memory, data_clock, stop
        self.trained = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.trained = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        for name in self.TRAIN_FIGURES:
            if name in (logs or {}):
                setattr(self.summary, name, logs[name])

    def on_train_end(self, args, state, control, **kwargs):
        if self.stop.received is not None:
            return
        self.trained = True
        self.summary.peak_memory_mb = round(self.peak_memory.mb, 1)
        for name, value in self.data_clock.rates(state.num_input_tokens_seen).items():
            setattr(self.summary, name, value)
        self._save(args, state)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.trained:
            self.summary.metrics.update(metrics or {})
            self._save(args, state)

    def _save(self, args, state):
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            self.summary.save(args.output_dir)


# Signed integer type of each element size: a weight's bits are summed as integers, so any change to any bit of it
# changes its fingerprint (barring an exact compensation), whatever its dtype (floats, 4-bit packed bytes, ...).
BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(parameter: torch.Tensor) -> int:
    """Sum of the bit patterns of this process's share of `parameter` (the local shard under ZeRO-3 or FSDP2):
    one pass over the weights, no copy of them kept, so that a 7B model can be checked."""
    local = getattr(parameter, "ds_tensor", None)  # ZeRO-3 keeps this process's partition here
    if local is None:
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter  # FSDP2's DTensor
    bits = local.detach().reshape(-1).view(BITS_OF_SIZE[local.element_size()])
    return sum(int(chunk.sum(dtype=torch.int64)) for chunk in bits.split(2**24))


class PolicyCheckError(RuntimeError):
    """The first optimizer step left a part that should train unchanged, or changed a frozen weight."""


class PolicyCheckCallback(TrainerCallback):
    """Checks the policy on the weights themselves: from the first optimizer step at a non-zero learning rate,
    every frozen weight (frozen parts, the base weights under LoRA) must stay bit-identical, and every part whose
    policy trains it (`lora` / `full`) must change within `window` steps (a part changes only in steps whose
    batches reach it: an audio tower in a step without audio does not). One log line once every part has changed;
    `PolicyCheckError` naming the parts and weights otherwise, so that projectors or an audio LoRA that silently
    do not train, or a frozen encoder that does, cannot go unnoticed.

    Args:
        policy: `{part: PartPolicy}` of the run.
        trainable_modules: modules trained fully on purpose inside any part (`TuningArguments.trainable_modules`).
        window: optimizer steps every trained part has to change in.
    """

    def __init__(self, policy: dict, trainable_modules=(), window: int = 20):
        self.policy, self.trainable_modules, self.window = policy, tuple(trainable_modules), window
        self.before, self.pending, self.steps = None, [], 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {name: (p.requires_grad, fingerprint(p)) for name, p in model.named_parameters()}
        present = {self._part(name) for name in self.before}
        self.pending = [part for part, how in self.policy.items() if how.tuning != "frozen" and part in present]
        self.frozen = [part for part, how in self.policy.items() if how.tuning == "frozen" and part in present]
        self.trained = list(self.pending)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.before is None:
            return
        if optimizer is not None and not any(group["lr"] for group in optimizer.param_groups):
            return  # a step at learning rate 0 (the first of a warmup from 0, a run at 0) changes nothing
        step, self.steps = state.global_step + 1, self.steps + 1  # global_step counts the step once it is done
        changed = {name for name, p in model.named_parameters() if fingerprint(p) != self.before[name][1]}
        kept_changed = sorted(
            name
            for name in changed
            if not self.before[name][0] or (self.policy[self._part(name)].tuning == "frozen" and not self._extra(name))
        )
        # Per part: did any of its trainable weights change; did any weight it must keep change. Under ZeRO-3 /
        # FSDP each process sees its shards only: the flags are combined over all processes.
        flags = torch.tensor(
            [any(self._part(n) == part and self.before[n][0] for n in changed) for part in self.pending]
            + [any(self._part(n) == part for n in kept_changed) for part in self.policy],
            dtype=torch.int32,
            device=args.device,
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        flags = flags.tolist()
        self.pending = [part for part, flag in zip(self.pending, flags) if not flag]
        broken = [part for part, flag in zip(self.policy, flags[-len(self.policy) :]) if flag]
        problems = [f"{part} has frozen weights that changed: {self._examples(kept_changed, part)}" for part in broken]
        if self.pending and self.steps >= self.window:
            problems += [
                f"{part} should train ({self.policy[part].tuning}) but none of its weights changed in {self.steps} "
                "steps (not optimised, or no batch reached it)"
                for part in self.pending
            ]
        if problems:
            self.before = None
            raise PolicyCheckError(f"policy check after step {step}: " + "; ".join(problems))
        if not self.pending:
            self.before = None
            logger.info(
                f"Policy check after step {step}: trained parts changed ({', '.join(self.trained) or 'none'}); "
                f"frozen weights bit-identical ({', '.join([*self.frozen, 'the base weights under LoRA'])})"
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.before is not None and self.pending:
            logger.warning(
                f"Policy check: {', '.join(self.pending)} did not change in the {self.steps} steps trained (too few "
                "to tell whether a batch reached them); frozen weights stayed bit-identical"
            )
            self.before = None

    def _part(self, name: str) -> str:
        return part_of_parameter(name) or "language"

    def _extra(self, name: str) -> bool:
        """A weight trained on purpose inside a frozen part: trainable_modules, trainable token rows."""
        plain = name.removeprefix("base_model.model.")
        return "trainable_tokens_" in name or any(plain.startswith(f"{module}.") for module in self.trainable_modules)

    @staticmethod
    def _examples(names: list[str], part: str) -> str:
        mine = [name for name in names if (part_of_parameter(name) or "language") == part]
        return ", ".join(mine[:3]) + (f" and {len(mine) - 3} more" if len(mine) > 3 else "")


__all__ = [
    "PolicyCheckCallback",
    "PolicyCheckError",
    "DataClock",
    "EncoderCheckpointingCallback",
    "LogResume",
    "PeakMemory",
    "RunSummaryCallback",
    "StopOnSignalCallback",
    "WandbRunInfoCallback",
    "peak_memory_mb",
]
