"""Preparing a data source at scale: in parallel, once, into a memory-mapped cache.

`prepare_source` turns one source (JSONL / JSON / Parquet files, a glob or folder of them, a `save_to_disk` folder
or a Hub id) into a `datasets.Dataset` of rows (`mmpeft.data.dataset.ROW_FEATURES`) with `datasets.map(num_proc=...)`
and saves it under the cache folder, named by a fingerprint of everything the rows depend on:

- the source: each data file's path, size and modification time (a `datasets` folder's files; a Hub dataset's
  own fingerprint);
- the processor: its settings, its tokenizer's vocabulary and its chat template;
- the data settings: split, `max_length`, `on_bad_sample`, `on_overlong`, `validate_media`, the media policy
  (`mmpeft.data.sources`), the image pixel limit, and `PREPARATION_VERSION`.

A later run with the same fingerprint memory-maps the saved rows (and its skip report) instead of preparing them;
any change prepares anew. A cache entry is written to a temporary folder and renamed into place, so an entry is
complete or absent, never half-written. Media files are referenced, not part of the fingerprint: a clip whose
length changed after preparation is caught when it is loaded (`mmpeft.data.dataset.load_item`).
"""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import datasets

from . import media
from .dataset import ROW_FEATURES, SkipReport, prepare_row
from .formats import Record, data_files, is_saved_dataset, load_hf_dataset, parse_line, read_json_items, read_lines
from .sources import MediaPolicy


logger = logging.getLogger(__name__)

# Bump when what a row holds or how it is computed changes: every cached entry is prepared again.
PREPARATION_VERSION = 2

# `validate_media: auto`: decode every file below this many records (a few minutes of decoding on a few cores
# for LLaVA-style images), read headers only above it.
AUTO_DECODE_MAX_RECORDS = 10_000

# Records per `datasets.map` batch; a worker process is used per 1,000 records at most (forking costs ~1 s).
BATCH_SIZE = 256
RECORDS_PER_WORKER = 1_000

_SKIP_COLUMNS = {"skip_reason": datasets.Value("string")}


def default_num_workers() -> int:
    """Preparation processes when not set: the CPUs this process may use, at most 16 (past that, reading the files
    is the limit)."""
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(), 16))


@dataclass
class PreparedSource:
    """What `prepare_source` gives: the rows (memory-mapped), the skip report, the cache entry they live in and
    whether that entry was reused (prepared by an earlier run, or by another process of this one)."""

    rows: datasets.Dataset
    report: SkipReport
    path: str
    reused: bool


def prepare_source(
    source: str,
    processor,
    cache_dir: str,
    *,
    split: str = "train",
    max_length: int | None = None,
    on_bad_sample: str = "error",
    on_overlong: str = "skip",
    validate_media: str = "auto",
    media_policy: MediaPolicy = MediaPolicy(),
    num_workers: int | None = None,
) -> PreparedSource:
    """Rows of every record of `source` (memory-mapped from the cache) and its skip report, prepared now or reused.

    Bad samples raise `BadSampleError` naming the record and field, or are skipped and counted, per the settings;
    a source with no usable sample raises `ValueError` with its skip report.
    `validate_media: auto` decodes every media file up to `AUTO_DECODE_MAX_RECORDS` records and reads headers
    only above (logged).
    """
    settings = {
        "split": split,
        "max_length": max_length,
        "on_bad_sample": on_bad_sample,
        "on_overlong": on_overlong,
        "validate_media": validate_media,
        "media_policy": dataclasses.asdict(media_policy),
    }
    key = fingerprint(source, processor, settings)
    name = os.path.basename(os.path.normpath(source.split("*")[0])) or "data"
    entry = os.path.join(cache_dir, f"{name}-{key}")
    if os.path.exists(os.path.join(entry, "report.json")):
        rows = datasets.load_from_disk(os.path.join(entry, "rows"))
        with open(os.path.join(entry, "report.json")) as file:
            report = SkipReport.from_dict(json.load(file))
        logger.info(f"{source}: reused the prepared data in {entry} ({len(rows)} samples)")
        return PreparedSource(rows, report, entry, reused=True)

    start = time.perf_counter()
    os.makedirs(cache_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{name}-{key}-", dir=cache_dir)
    try:
        records, to_records = _records(source, split, media_policy, os.path.join(work, "records"), key)
        if not len(records):
            raise ValueError(f"{source}: holds no samples")
        if validate_media == "auto":
            validate_media = "decode" if len(records) <= AUTO_DECODE_MAX_RECORDS else "header"
            logger.info(
                f"{source}: validate_media: auto -> {validate_media} for {len(records)} records "
                f"(decode up to {AUTO_DECODE_MAX_RECORDS})"
            )
        num_proc = min(num_workers or default_num_workers(), -(-len(records) // RECORDS_PER_WORKER))
        rows = records.map(
            _prepare_batch,
            batched=True,
            batch_size=BATCH_SIZE,
            with_indices=True,
            remove_columns=records.column_names,
            features=datasets.Features({**ROW_FEATURES, **_SKIP_COLUMNS}),
            fn_kwargs={
                "to_records": to_records,
                "processor": processor,
                "settings": {**settings, "validate_media": validate_media},
            },
            num_proc=num_proc if num_proc > 1 else None,
            cache_file_name=os.path.join(work, "prepared.arrow"),
            new_fingerprint=key,  # ours: datasets would hash the processor to make one
            desc=f"Preparing {name}",
        )
        report = _skip_report(rows, len(records))
        if not report.kept:  # (an empty dataset cannot even be saved and loaded back)
            raise ValueError(f"{source}: no usable samples ({report.summary(source)})")
        if report.skipped:
            rows = rows.filter(lambda reasons: [r is None for r in reasons], input_columns="skip_reason", batched=True)
        rows = rows.remove_columns(list(_SKIP_COLUMNS))
        rows.save_to_disk(os.path.join(work, "rows"))
        with open(os.path.join(work, "report.json"), "w") as file:
            json.dump(report.to_dict(), file)
        for leftover in os.listdir(work):  # the records and the map's files: only `rows` and the report stay
            if leftover not in ("rows", "report.json"):
                path = os.path.join(work, leftover)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        try:
            os.replace(work, entry)
        except OSError:  # another node on a shared filesystem finished the same entry first: use it
            if not os.path.exists(os.path.join(entry, "report.json")):
                raise
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    rows = datasets.load_from_disk(os.path.join(entry, "rows"))
    logger.info(
        f"{source}: prepared {len(rows)} samples in {time.perf_counter() - start:.1f} s with {max(num_proc, 1)} "
        f"process(es), validate_media: {validate_media}; saved to {entry}"
    )
    return PreparedSource(rows, report, entry, reused=False)


def _records(source: str, split: str, policy: MediaPolicy, work: str, key: str):
    """`(records, to_records)`: a `datasets.Dataset` with one row per record of `source`, and the function that
    turns a batch of its rows into `Record`s.

    JSONL / JSON lines are copied as raw bytes (a malformed line must become a bad sample, not fail the whole
    file's parsing as `load_dataset("json")` would); Parquet files and `datasets` datasets are used as they are.
    """
    files = data_files(source)
    if files is None or all(path.endswith(".parquet") for path in files):
        if files is None:
            dataset, base_dir, where = load_hf_dataset(source, split), source, f"{source}[{split}]"
        else:
            dataset = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=work)
            base_dir, where = os.path.commonpath([os.path.dirname(path) for path in files]), source
        return dataset, _TableRecords(where, base_dir if os.path.isdir(base_dir) else None, policy)
    if any(path.endswith(".parquet") for path in files):
        raise ValueError(f"{source}: mixes Parquet and JSON files; give them as separate sources")
    features = datasets.Features(
        {"file": datasets.Value("string"), "where": datasets.Value("string"), "raw": datasets.Value("binary")}
    )
    if next(_raw_records(files), None) is None:  # `from_generator` would fail obscurely on nothing
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features), None
    records = datasets.Dataset.from_generator(
        _raw_records, features=features, gen_kwargs={"files": files}, cache_dir=work, fingerprint=f"raw-{key}"
    )
    return records, _RawRecords(policy)


def _raw_records(files: list[str]):
    for path in files:
        if path.endswith(".jsonl"):
            for number, line in read_lines(path):
                yield {"file": path, "where": f"{path}:{number}", "raw": line}
        else:
            for index, item in enumerate(read_json_items(path)):
                yield {"file": path, "where": f"{path}[{index}]", "raw": json.dumps(item).encode()}


class _RawRecords:
    """Records of raw JSON lines (picklable, for `map`'s worker processes)."""

    def __init__(self, policy: MediaPolicy):
        self.policy = policy

    def __call__(self, batch: dict, indices: list[int]) -> list[Record]:
        return [
            parse_line(raw, where, os.path.dirname(path), self.policy, first=where == f"{path}:1")
            for path, where, raw in zip(batch["file"], batch["where"], batch["raw"])
        ]


class _TableRecords:
    """Records of the rows of a `datasets` dataset, named `<where>[<index>]`."""

    def __init__(self, where: str, base_dir: str | None, policy: MediaPolicy):
        self.where, self.base_dir, self.policy = where, base_dir, policy

    def __call__(self, batch: dict, indices: list[int]) -> list[Record]:
        names = list(batch)
        return [
            Record(dict(zip(names, values)), f"{self.where}[{index}]", self.base_dir, self.policy)
            for index, values in zip(indices, zip(*batch.values()))
        ]


def _prepare_batch(batch: dict, indices: list[int], to_records, processor, settings: dict) -> dict:
    """`datasets.map` function: a batch of records -> rows, with `skip_reason` set (and the rest empty) for the
    samples the settings skip."""
    columns = {name: [] for name in (*ROW_FEATURES, *_SKIP_COLUMNS)}
    options = {key: settings[key] for key in ("max_length", "on_bad_sample", "on_overlong", "validate_media")}
    for record in to_records(batch, indices):
        report = SkipReport()
        row = prepare_row(record, processor, report, **options)
        if row is None:
            [reason] = report.reasons
            row = {name: [] if isinstance(ROW_FEATURES[name], datasets.List) else None for name in ROW_FEATURES}
            row["where"] = record.where
        for name in ROW_FEATURES:
            columns[name].append(row[name])
        columns["skip_reason"].append(None if report.kept else reason)
    return columns


def _skip_report(rows: datasets.Dataset, read: int) -> SkipReport:
    report = SkipReport(read=read, kept=rows.data.column("skip_reason").null_count)  # kept rows have no reason
    if report.kept < read:
        skipped = rows.filter(
            lambda reasons: [r is not None for r in reasons], input_columns="skip_reason", batched=True
        )
        for reason, where in zip(skipped["skip_reason"], skipped["where"]):
            report.add(reason, where)
    return report


def fingerprint(source: str, processor, settings: dict) -> str:
    """16 hex digits naming the rows that preparing `source` with `processor` and `settings` gives."""
    tokenizer = processor.tokenizer
    vocabulary = (
        tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else tokenizer.get_vocab()
    )
    described = {
        "version": PREPARATION_VERSION,
        "source": _describe_source(source, settings["split"]),
        "processor": processor.to_json_string(),
        "tokenizer": hashlib.sha256(json.dumps(vocabulary, sort_keys=True).encode()).hexdigest(),
        "chat_template": processor.chat_template,
        "settings": settings,
        "max_image_pixels": media.MAX_IMAGE_PIXELS,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _describe_source(source: str, split: str):
    files = data_files(source)
    if files is None and is_saved_dataset(source):
        files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(source) for name in names)
    if files is None:  # a Hub id: datasets fingerprints its own download
        return {"hub": source, "fingerprint": load_hf_dataset(source, split)._fingerprint}
    return [(path, (stat := os.stat(path)).st_size, stat.st_mtime_ns) for path in files]


__all__ = [
    "AUTO_DECODE_MAX_RECORDS",
    "PREPARATION_VERSION",
    "PreparedSource",
    "default_num_workers",
    "fingerprint",
    "prepare_source",
]
