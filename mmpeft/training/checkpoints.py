"""Checkpoints that are either complete or ignored, finding the one to resume from, and the output folder's lock.

`transformers.Trainer` writes a checkpoint file by file (weights, optimizer, scheduler, RNG states, trainer
state); a run killed in between leaves a folder that looks like a checkpoint but would resume half-restored.
mmpeft writes a marker file after everything else (`MMPeftTrainer._save_checkpoint`), once every process has
finished its part; a checkpoint folder without it is incomplete and never resumed from. The marker lists the
checkpoint's files with their sizes (a file lost or cut short since is found before resuming) and the run's
settings (`run_settings`: resuming with other settings is refused unless asked for).
"""

import errno
import fcntl
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


logger = logging.getLogger(__name__)
COMPLETE_MARKER = "mmpeft_checkpoint_complete.json"
CHECKPOINT_FOLDER = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
LOCK_FILE = ".mmpeft.lock"
# The settings that change what a run computes, per argument group (the recipe's dataclasses). Left out, because a
# resumed run may change them freely: where outputs, logs and checkpoints go and how often, evaluation and
# generation settings, trackers, data preparation workers and caches, auto_resume / resume_from_checkpoint.
RUN_SETTINGS = {
    "model": ("model_name_or_path", "text_model", "vision_model", "audio_model", "projector_settings", "dtype"),
    "data": (
        "train_data", "eval_data", "eval_fraction", "max_length", "on_bad_sample", "on_overlong",
        "allow_media_outside_data_dir", "allow_remote_media", "remote_media_allowed_networks", "remote_media_timeout",
        "remote_media_max_bytes", "max_image_pixels_per_sample", "max_audio_seconds_per_sample", "validate_media",
        "padding_free", "streaming", "shuffle_buffer_size", "synthetic_train_size", "synthetic_eval_size",
        "data_seed_mixing",
    ),
    "tuning": (
        "method", "vision_tuning", "audio_tuning", "projector_tuning", "language_tuning", "vision", "audio",
        "projector", "language", "loraplus_lr_ratio", "trainable_tokens", "trainable_modules",
        "encoder_learning_rate_scale", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_kwargs",
        "quantization_bits", "quantization_type", "double_quant", "quantized_parts", "keep_unquantized",
    ),
    "training": (
        "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "adam_beta1",
        "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args", "num_train_epochs", "max_steps",
        "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "seed", "data_seed",
        "label_smoothing_factor", "train_sampling_strategy", "bf16", "fp16", "early_stopping_patience",
    ),
}  # fmt: skip
# Where an error while writing a file means a full disk or quota: errno, or words of the message (torch's
# checkpoint writer reports a failed write as an `inline_container.cc` enforce failure, without the errno).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "inline_container.cc")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from or saved; the message names it, the reason and the way out."""


class OutputDirInUseError(RuntimeError):
    """Another run holds the output folder's lock."""


def mark_complete(folder: str, step: int, settings: dict | None = None) -> None:
    """Write `folder`'s completion marker (atomically: written aside, then renamed into place): the step, the
    checkpoint's files with their sizes, and the run's `settings`."""
    names = sorted(name for name in os.listdir(folder) if not name.startswith(COMPLETE_MARKER))  # not itself
    sizes = {name: os.path.getsize(os.path.join(folder, name)) for name in names}
    path = os.path.join(folder, COMPLETE_MARKER)
    with open(path + ".tmp", "w") as file:
        json.dump({"global_step": step, "files": names, "sizes": sizes, "settings": settings}, file)
    os.replace(path + ".tmp", path)


def unmark(folder: str) -> None:
    """Remove `folder`'s completion marker, if any: a checkpoint about to be written again is incomplete meanwhile."""
    if os.path.isfile(os.path.join(folder, COMPLETE_MARKER)):
        os.remove(os.path.join(folder, COMPLETE_MARKER))


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def read_marker(folder: str) -> dict:
    with open(os.path.join(folder, COMPLETE_MARKER)) as file:
        return json.load(file)


def damaged_files(folder: str) -> list[str]:
    """Files the marker of complete checkpoint `folder` lists that are missing now, or have another size."""
    marker = read_marker(folder)
    damaged = []
    for name in marker["files"]:
        path = os.path.join(folder, name)
        if name.startswith(COMPLETE_MARKER):  # markers before this check listed their own .tmp file
            continue
        if not os.path.exists(path):
            damaged.append(name)
        elif name in marker.get("sizes", {}) and os.path.getsize(path) != marker["sizes"][name]:
            damaged.append(f"{name} ({os.path.getsize(path)} bytes, {marker['sizes'][name]} when saved)")
    return damaged


def checkpoint_folders(output_dir: str) -> list[str]:
    """`checkpoint-<step>` folders of `output_dir`, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_FOLDER.match(name))]
    return [
        os.path.join(output_dir, name) for _, name in sorted(found) if os.path.isdir(os.path.join(output_dir, name))
    ]


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in `output_dir`, or None."""
    complete = [folder for folder in checkpoint_folders(output_dir) if is_complete(folder)]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(output_dir: str) -> list[str]:
    """Delete the checkpoint folders a stopped run left half-written (logged); returns their paths."""
    removed = [folder for folder in checkpoint_folders(output_dir) if not is_complete(folder)]
    for folder in removed:
        logger.warning(f"Removing incomplete checkpoint {folder} (the run was stopped while saving it).")
        shutil.rmtree(folder)
    return removed


def run_settings(model_args, data_args, tuning_args, training_args) -> dict:
    """The settings of `RUN_SETTINGS` (what changes a run's result), from the recipe's arguments, as JSON values."""
    groups = dict(zip(RUN_SETTINGS, (model_args, data_args, tuning_args, training_args)))
    found = {name: getattr(groups[group], name) for group, names in RUN_SETTINGS.items() for name in names}
    return json.loads(json.dumps(found, default=str))  # enums become their values, tuples lists


def changed_settings(folder: str, settings: dict) -> list[str]:
    """`name: <checkpoint's value> in the checkpoint, <value> now` for each setting of `settings` that differs from
    the one checkpoint `folder` was saved with (none for checkpoints saved without settings)."""
    saved = read_marker(folder).get("settings") or {}
    return [
        f"{name}: {saved[name]!r} in the checkpoint, {settings[name]!r} now"
        for name in settings
        if name in saved and saved[name] != settings[name]
    ]


def checkpoint_to_resume(
    output_dir: str,
    resume_from_checkpoint: str | None,
    auto_resume: bool,
    settings: dict | None = None,
    allow_changed_settings: bool = False,
) -> str | None:
    """The checkpoint a run starts from: `resume_from_checkpoint` (which must be complete and intact), else with
    `auto_resume` the latest complete and intact checkpoint in `output_dir` (None when there is none: a fresh
    start). A complete checkpoint with files missing or cut short since it was saved is refused when named, and
    passed over for an earlier one (warned) by `auto_resume`. Either way, a checkpoint saved with other `settings`
    (`run_settings`) is refused, naming the differences, unless `allow_changed_settings`."""
    if resume_from_checkpoint:
        if not os.path.isdir(resume_from_checkpoint):
            raise CheckpointError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a folder")
        if not is_complete(resume_from_checkpoint):
            raise CheckpointError(
                f"resume_from_checkpoint: {resume_from_checkpoint} is incomplete (no {COMPLETE_MARKER}: the run "
                "was stopped while saving it, or it was not written by mmpeft). Resume from an earlier checkpoint, "
                "or use auto_resume to take the latest complete one."
            )
        if damaged := damaged_files(resume_from_checkpoint):
            raise CheckpointError(
                f"resume_from_checkpoint: {resume_from_checkpoint} has lost files since it was saved: "
                f"{', '.join(damaged)}. Resuming would restart the optimizer and learning-rate schedule; resume "
                "from another checkpoint."
            )
        checkpoint = resume_from_checkpoint
    elif auto_resume:
        checkpoint = None
        for folder in reversed([folder for folder in checkpoint_folders(output_dir) if is_complete(folder)]):
            if not (damaged := damaged_files(folder)):
                checkpoint = folder
                break
            logger.warning(f"auto_resume: passing over {folder}: files lost since it was saved: {', '.join(damaged)}")
        if checkpoint is None:
            logger.info(f"auto_resume: no complete checkpoint in {output_dir}, starting from scratch")
            return None
        logger.info(f"auto_resume: resuming from {checkpoint}")
    else:
        return None
    changed = changed_settings(checkpoint, settings or {})
    if changed and not allow_changed_settings:
        raise CheckpointError(
            f"{checkpoint} was saved by a run with other settings: {'; '.join(changed)}. Use another output_dir for "
            "a new run, or set resume_with_changed_settings: true to resume with the new settings."
        )
    if changed:
        logger.warning(f"resume_with_changed_settings: resuming {checkpoint} with {'; '.join(changed)}")
    return checkpoint


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, raised while writing files, means the disk (or the quota) is full."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    return any(words in str(error) for words in DISK_FULL_WORDS)


@contextmanager
def clear_disk_full_error(path: str, remove: bool = False):
    """Turns a full-disk error raised while saving `path` into a `CheckpointError` that says so, naming `path` and
    the free space; with `remove`, the half-written `path` is deleted first (so that it is never resumed from)."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        if remove:
            shutil.rmtree(path, ignore_errors=True)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20
        raise CheckpointError(
            f"no space left on device while saving {path} ({free:.1f} MB free"
            + ("; the half-written folder was removed). " if remove else "). ")
            + "Free some space or choose another output_dir, then rerun (with auto_resume: true to continue)."
        ) from error


def lock_output_dir(output_dir: str):
    """Take the lock of `output_dir` (created if needed) for this process's lifetime, or until the returned file is
    closed; raise `OutputDirInUseError` if another run holds it. An flock is let go by the kernel when its process
    dies, so a killed run never leaves a stale lock behind."""
    os.makedirs(output_dir, exist_ok=True)
    file = open(os.path.join(output_dir, LOCK_FILE), "a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "another process"
        file.close()
        raise OutputDirInUseError(
            f"output_dir {os.path.abspath(output_dir)} is in use by another run ({holder}); wait for it to end or "
            "choose another output_dir."
        ) from None
    file.truncate(0)
    file.write(f"pid {os.getpid()} on {os.uname().nodename}")
    file.flush()
    return file


__all__ = [
    "COMPLETE_MARKER",
    "CheckpointError",
    "OutputDirInUseError",
    "changed_settings",
    "checkpoint_folders",
    "checkpoint_to_resume",
    "clear_disk_full_error",
    "damaged_files",
    "is_complete",
    "latest_complete_checkpoint",
    "lock_output_dir",
    "mark_complete",
    "remove_incomplete_checkpoints",
    "run_settings",
    "unmark",
]
