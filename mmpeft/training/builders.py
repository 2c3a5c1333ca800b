"""Building what a run needs from its arguments: the model and processor, the datasets."""

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager

import datasets
import torch
from transformers.integrations import deepspeed as hf_deepspeed

from ..data import MMPeftDataset, generate_synthetic_dataset
from ..data.preparation import prepare_source
from ..data.streaming import StreamingDataset
from ..data.synthetic import VERSION as SYNTHETIC_VERSION
from ..models import MMPeftForConditionalGeneration, MMPeftProcessor
from ..reference import build_reference_checkpoint
from .arguments import DataArguments, MMPeftTrainingArguments, ModelArguments, check_model_path
from .methods import METHODS


logger = logging.getLogger(__name__)
CACHE_DIR = os.environ.get("MMPEFT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mmpeft"))
REFERENCE_NAME = "tiny-omni-v1"  # bump with any change to mmpeft.reference


def reference_checkpoint() -> str:
    """Path of the tiny reference checkpoint, built into the cache on first use (deterministic, offline).

    Processes starting at once on an empty cache each build it in a folder of their own and rename that into place
    (atomic: a half-built checkpoint is never seen); the first rename wins, the others' copies are dropped."""
    path = os.path.join(CACHE_DIR, REFERENCE_NAME)
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        logger.info(f"Building the tiny reference checkpoint in {path}")
        os.makedirs(CACHE_DIR, exist_ok=True)
        building = tempfile.mkdtemp(prefix=f"{REFERENCE_NAME}.tmp-", dir=CACHE_DIR)
        with without_zero3():
            build_reference_checkpoint(building)
        try:
            os.replace(building, path)
        except OSError:  # another process renamed its copy first (same contents: the build is deterministic)
            shutil.rmtree(building)
            if not os.path.exists(os.path.join(path, "model.safetensors")):
                raise
    return path


@contextmanager
def without_zero3():
    """Construct models as plain modules, also in a ZeRO-3 run: under ZeRO-3 transformers builds every model inside
    `deepspeed.zero.Init`, whose sharding broadcasts need every process, while the reference checkpoint is built by
    one of them (the others wait for it) and only written to disk."""
    active = hf_deepspeed._hf_deepspeed_config_weak_ref and hf_deepspeed._hf_deepspeed_config_weak_ref()
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if active is not None:
            hf_deepspeed.set_hf_deepspeed_config(active)


def load_model(args: ModelArguments, quantization_config=None):
    """`(model, processor)`: a checkpoint, a composition of pretrained parts, or the tiny reference model,
    quantized per `quantization_config` (QLoRA) when given."""
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    for name in ("model_name_or_path", "text_model", "vision_model", "audio_model"):  # a mistyped folder: one line
        setattr(args, name, check_model_path(name, getattr(args, name)))
    if args.text_model:
        if quantization_config is not None:
            quantized = " / ".join(name for name, method in METHODS.items() if method.quantized)
            raise ValueError(
                f"method: {quantized} loads a saved mmpeft checkpoint: compose the parts once (from_pretrained_parts "
                "+ save_pretrained), then set model_name_or_path to that folder."
            )
        return MMPeftForConditionalGeneration.from_pretrained_parts(
            text=args.text_model,
            vision=args.vision_model,
            audio=args.audio_model,
            dtype=dtype,
            **args.projector_settings,
        )
    path = args.model_name_or_path or reference_checkpoint()
    model = MMPeftForConditionalGeneration.from_pretrained(path, dtype=dtype, quantization_config=quantization_config)
    return model, MMPeftProcessor.from_pretrained(path)


def _mix(parts: list[tuple[datasets.Dataset, float]], seed: int) -> datasets.Dataset:
    """Each dataset repeated `weight` times (its fractional part drawn at random, seeded), concatenated."""
    pieces = []
    for rows, weight in parts:
        whole, fraction = int(weight), weight - int(weight)
        pieces += [rows] * whole
        if round(fraction * len(rows)):
            drawn = rows.shuffle(seed=seed, keep_in_memory=True)  # an index mapping: the rows stay on disk
            pieces.append(drawn.select(range(round(fraction * len(rows))), keep_in_memory=True))
    return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)


def _row_settings(args: DataArguments) -> dict:
    """The data settings that decide what a prepared row is (and so the preparation cache key)."""
    return dict(
        max_length=args.max_length,
        on_bad_sample=args.on_bad_sample,
        on_overlong=args.on_overlong,
        media_policy=args.media_policy,
    )


def prepare_data(
    specs: list[dict], args: DataArguments, processor, reports: dict | None = None
) -> list[tuple[datasets.Dataset, float]]:
    """`(rows, weight)` of each dataset spec (`{path, weight, split}`), prepared per `args` through the cache
    (`mmpeft.data.preparation.prepare_source`), so that training and `recipes/eval.py` read the same rows.
    Each source's skip report is logged and added to `reports` (by path) when given."""
    parts = []
    for spec in specs:
        prepared = prepare_source(
            spec["path"],
            processor,
            args.prepared_data_dir or os.path.join(CACHE_DIR, "prepared"),
            split=spec["split"],
            validate_media=args.validate_media,
            num_workers=args.preprocessing_num_workers,
            **_row_settings(args),
        )
        rows, report = prepared.rows, prepared.report
        logger.info(report.summary(spec["path"]))
        if reports is not None:
            reports[spec["path"]] = {**report.to_dict(), "prepared_data": prepared.path, "reused": prepared.reused}
        parts.append((rows, spec["weight"]))
    return parts


def load_datasets(
    args: DataArguments, processor, output_dir: str | None = None, rank: int = 0, world_size: int = 1
) -> tuple[MMPeftDataset | StreamingDataset, MMPeftDataset | None, dict]:
    """`(train_dataset, eval_dataset, reports)` from the configured datasets or the embedded synthetic one.

    Each source is prepared once into the cache (`mmpeft.data.preparation.prepare_source`: parallel, reused by
    later runs and by the other processes of this one) and memory-mapped. Bad and over-long samples are raised or
    skipped per the settings, and the skip report of each source is logged (and written to
    `output_dir/data_report.json`). With `streaming`, the training data is a `StreamingDataset` (this process's
    share, `rank` of `world_size`), prepared as it is read; evaluation data is prepared as above.
    `eval_dataset` is None without evaluation data.
    """
    train_specs, eval_specs = args.train_data, args.eval_data
    if not train_specs:
        sizes = (args.synthetic_train_size, args.synthetic_eval_size)
        folder = os.path.join(CACHE_DIR, f"synthetic-v{SYNTHETIC_VERSION}-{sizes[0]}-{sizes[1]}")
        paths = generate_synthetic_dataset(folder, num_train=sizes[0], num_eval=sizes[1])
        train_specs = [{"path": paths["train"], "weight": 1.0, "split": "train"}]
        eval_specs = eval_specs or [{"path": paths["eval"], "weight": 1.0, "split": "validation"}]
    settings = _row_settings(args)
    reports = {}

    def dataset(rows, mode="train"):
        return MMPeftDataset(rows, processor, mode, args.on_bad_sample, args.media_policy)

    evaluation = None
    if eval_specs:
        parts = prepare_data(eval_specs, args, processor, reports)
        evaluation = datasets.concatenate_datasets([rows for rows, _ in parts])
    if args.streaming:
        train = StreamingDataset(
            [(spec["path"], spec["split"]) for spec in train_specs],
            processor,
            rank=rank,
            world_size=world_size,
            seed=args.data_seed_mixing,
            shuffle_buffer_size=args.shuffle_buffer_size,
            validate_media="header" if args.validate_media == "auto" else args.validate_media,
            **settings,
        )
    else:
        train = _mix(prepare_data(train_specs, args, processor, reports), args.data_seed_mixing)
        if evaluation is None and args.eval_fraction:
            split = train.train_test_split(test_size=args.eval_fraction, seed=args.data_seed_mixing)
            train, evaluation = split["train"], split["test"]
        train = dataset(train)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "data_report.json"), "w") as file:
            json.dump(reports, file, indent=2)
    return train, None if evaluation is None else dataset(evaluation), reports


def check_streaming(data_args: DataArguments, training_args: MMPeftTrainingArguments):
    """Refuse, naming the alternative, the settings that need the whole training data up front."""
    if not data_args.streaming:
        return
    if training_args.max_steps <= 0:
        raise ValueError("streaming: the data's size is unknown up front, so give max_steps (not num_train_epochs).")
    if training_args.train_sampling_strategy == "group_by_length":
        raise ValueError(
            "streaming: group_by_length needs every sample's length up front; use padding_free: true to spend "
            "nothing on padding instead, or streaming: false."
        )
    if any(spec["weight"] != 1.0 for spec in data_args.train_data):
        raise ValueError(
            "streaming: mixing weights need each dataset's size; streamed datasets are read one after another "
            "(shuffled within shuffle_buffer_size). Use streaming: false to mix by weight."
        )
    if data_args.eval_fraction:
        raise ValueError("streaming: eval_fraction needs the data's size; give eval_data instead.")


__all__ = [
    "check_streaming",
    "load_datasets",
    "load_model",
    "prepare_data",
    "reference_checkpoint",
]
