"""From records to rows, and from rows to model inputs.

Preparing a record (`make_row`) validates it, tokenizes it with assistant-only labels, counts each media item's
tokens and applies the length rule, so that every bad or over-long sample is known (raised or counted) before
training. What it keeps is a compact row (`ROW_FEATURES`): token ids with each placeholder as one token, the
labelled spans, each clip's token count, and media as references (a path or the encoded bytes) -- never decoded
pixels or waveforms. Rows live in a `datasets.Dataset` (Arrow, memory-mapped from disk), so a training process
holds none of them in memory.

`MMPeftDataset` turns a row into model inputs when the DataLoader asks for it: placeholders are expanded, media
are loaded and featurized (in DataLoader workers), and a sample whose media fail to load then is replaced by the
next one and reported (`on_bad_sample: skip`) or stops the run naming the file, line and field (`error`).
"""

import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Literal

import datasets
import numpy as np
import soundfile
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils.chat_template_utils import _get_control_token_patterns, mark_control_tokens

from ..models.processing_mmpeft import ChatTemplateTimeout
from .formats import BadSampleError, Record, to_conversation
from .media import MediaError, audio_length, check_image, load_audio, load_image


logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclass
class Example:
    """One prepared sample as the model sees it: expanded token ids and labels, and its media sources. A view of a
    stored row (`MMPeftDataset.example`), for inspection and tests; training reads rows directly."""

    input_ids: list[int]
    labels: list[int]
    images: list
    audio: list
    where: str
    task: str | None = None
    prompt_length: int = 0  # tokens before the last assistant answer (the generation prompt)
    prompt_media: tuple[int, int] = (0, 0)  # images and audio clips in that prompt
    reference: str = ""  # text of the last assistant answer

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SkipReport:
    """Samples left out, by reason, with where the first few of each came from."""

    read: int = 0
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)
    where: dict = field(default_factory=dict)

    def add(self, reason: str, where: str):
        """Count one skipped sample: why (`BadSampleError.key`) and where it came from."""
        self.reasons[reason] += 1
        self.where.setdefault(reason, [])
        if len(self.where[reason]) < 5:
            self.where[reason].append(where)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def summary(self, name: str = "data") -> str:
        return f"{name}: read {self.read} samples, kept {self.kept}, skipped {self.skipped}" + self.details()

    def details(self) -> str:
        """One line per reason: how many, and where the first few came from."""
        return "".join(
            f"\n  - {count} x {reason} (e.g. {', '.join(self.where[reason])})"
            for reason, count in self.reasons.most_common()
        )

    @classmethod
    def from_dict(cls, data: dict) -> "SkipReport":
        return cls(data["read"], data["kept"], Counter(data["reasons"]), data["where"])

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "skipped": self.skipped,
            "reasons": dict(self.reasons),
            "where": self.where,
        }


def _template_view(conversation: list[dict]) -> list[dict]:
    """The conversation as the chat template sees it: media parts without their (heavy) sources."""
    return [
        {"role": m["role"], "content": [p if p["type"] == "text" else {"type": p["type"]} for p in m["content"]]}
        for m in conversation
    ]


def tokenize_conversation(processor, conversation: list[dict]) -> tuple[list[int], list[int], int]:
    """Token ids of the rendered conversation, labels that keep only assistant turns, and the length of the
    prompt before the last assistant turn. Placeholders are single tokens here (not yet expanded).

    Assistant spans are found by rendering growing prefixes of the conversation with the processor's chat
    template, so any template works as long as a prefix renders as a prefix. Control tokens that the data's
    own text contains (a literal `<image>`, `<|im_end|>`) are encoded as plain text: only media parts become
    placeholders, and user text cannot forge turns or media slots.
    """
    tokenizer = processor.tokenizer
    control_tokens, _ = _get_control_token_patterns(tokenizer._get_control_tokens(processor.chat_template))
    view = mark_control_tokens(_template_view(conversation), control_tokens)

    # Every prefix is rendered and tokenized in two batched calls, each rendered once (the conversation itself is
    # the last prefix ending with an answer when it ends with one): tokenizing is most of a sample's preparation.
    answers = [turn for turn, message in enumerate(view) if message["role"] == "assistant"]
    ends = [view[: turn + 1] for turn in answers if turn != len(view) - 1] + [view]
    prompts = [view[:turn] for turn in answers]
    texts = processor.apply_chat_template(ends, tokenize=False)
    texts += processor.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False) if prompts else []
    encoded = tokenizer(texts, add_special_tokens=False, sanitize_control_tokens=True)["input_ids"]
    input_ids, prefixes, starts = encoded[len(ends) - 1], encoded[: len(ends) - 1] + [None], encoded[len(ends) :]
    labels = [IGNORE_INDEX] * len(input_ids)
    prompt_length = 0
    for turn, prefix, prompt in zip(answers, prefixes, starts):
        prefix = input_ids if prefix is None else prefix
        start, end = len(prompt), len(prefix)
        if input_ids[:end] != prefix or start > end:
            raise ValueError("the chat template does not render a conversation prefix as a prefix of the whole")
        labels[start:end] = input_ids[start:end]
        prompt_length = start
    return input_ids, labels, prompt_length


class OverlongError(BadSampleError):
    """A sample longer than `max_length`: dropped whole (or raised), never truncated."""


# How much of a sample's media `make_row` checks (`DataArguments.validate_media`):
# decode: decode every image and clip (broken files are found before training, at the cost of decoding all);
# header: read each file's header only (format, size, length: missing, empty, unknown and truncated-header files
#   are found; a file that breaks further in fails when it is loaded in training, handled by `on_bad_sample`);
# none: trust the data (audio headers are still read: a clip's token count comes from its length).
VALIDATE_MEDIA = ("decode", "header", "none")

MEDIA_REFERENCE = {
    "path": datasets.Value("string"),
    "bytes": datasets.Value("binary"),
    "field": datasets.Value("string"),
}
ROW_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),  # placeholders as one token each (not expanded)
        "label_spans": datasets.List(datasets.Value("int32")),  # [start, end, start, end, ...] of labelled tokens
        "audio_tokens": datasets.List(datasets.Value("int32")),  # tokens of each clip (images: image_seq_length)
        "num_tokens": datasets.Value("int32"),  # length with placeholders expanded: for batching by length
        "prompt_length": datasets.Value("int32"),  # tokens (not expanded) before the last assistant answer
        "images": datasets.List(MEDIA_REFERENCE),
        "audio": datasets.List(MEDIA_REFERENCE),
        "where": datasets.Value("string"),  # "path/train.jsonl:12" or "dataset[split][12]"
        "task": datasets.Value("string"),
        "reference": datasets.Value("string"),  # text of the last assistant answer
    }
)


def _media(conversation, kind):
    """`(source, field)` of every `kind` part, in order."""
    return [
        (part[kind], f"messages[{turn}].content[{index}]")
        for turn, message in enumerate(conversation)
        for index, part in enumerate(message["content"])
        if part["type"] == kind
    ]


def _label_spans(labels: list[int]) -> list[int]:
    spans, inside = [], False
    for position, label in enumerate(labels):
        if (label != IGNORE_INDEX) != inside:
            spans.append(position)
            inside = not inside
    return spans + [len(labels)] if inside else spans


def make_row(
    record: Record, processor, max_length: int | None, validate_media: Literal["decode", "header", "none"] = "decode"
) -> dict:
    """Validate and encode one record into a row of `ROW_FEATURES`. Raises `BadSampleError` naming the record and
    field.

    Audio is measured from its file header first, so that a sample over `max_length` is refused
    (`OverlongError`) before any of its media is decoded: a two-hour recording costs no memory. The media of a
    sample within the limit are then checked as `validate_media` says.
    """
    conversation = to_conversation(record)
    if not conversation:
        raise BadSampleError(record.where, "empty conversation", "messages")
    answers = [m for m in conversation if m["role"] == "assistant"]
    if not answers:
        raise BadSampleError(record.where, "no assistant turn to learn from", "messages")
    if not any(p["type"] == "text" and p["text"].strip() for p in answers[-1]["content"]):
        raise BadSampleError(record.where, "the last assistant turn has no text", "messages")
    task = record.data.get("task")
    if task is not None and not isinstance(task, str):
        raise BadSampleError(record.where, f"must be a string, got {type(task).__name__}", "task")

    media = {kind: _media(conversation, kind) for kind in ("image", "audio")}
    for kind, present in (("image", "image_processor"), ("audio", "feature_extractor")):
        if media[kind] and getattr(processor, present, None) is None:
            raise BadSampleError(
                record.where, f"has {kind} input but the model has no {kind} modality", media[kind][0][1]
            )
    sampling_rate = processor.feature_extractor.sampling_rate if media["audio"] else None
    audio_lengths = [
        _read_media(record.where, field_name, audio_length, source, sampling_rate)
        for source, field_name in media["audio"]
    ]
    audio_tokens = []
    for length, (_, field_name) in zip(audio_lengths, media["audio"]):
        try:
            audio_tokens.append(processor.num_audio_tokens_for_samples(length))
        except ValueError as error:
            raise BadSampleError(record.where, str(error), field_name) from error

    try:
        input_ids, labels, prompt_length = tokenize_conversation(processor, conversation)
    except ChatTemplateTimeout as error:  # the template rendered this sample too long (a loop over its content?)
        raise BadSampleError(record.where, str(error), "messages") from error
    for token_id, count in (
        (processor.image_token_id, len(media["image"])),
        (processor.audio_token_id, len(audio_tokens)),
    ):
        found = input_ids.count(token_id) if token_id is not None else 0
        if found != count:  # a chat template that writes placeholders of its own
            raise BadSampleError(record.where, f"{found} placeholder tokens for {count} media items", "messages")
    num_tokens = len(input_ids) + len(media["image"]) * ((processor.image_seq_length or 1) - 1)
    num_tokens += sum(audio_tokens) - len(audio_tokens)
    if max_length is not None and num_tokens > max_length:
        raise OverlongError(record.where, f"longer than max_length ({num_tokens} > {max_length} tokens)")

    if validate_media != "none":
        for source, field_name in media["image"]:
            _read_media(record.where, field_name, load_image if validate_media == "decode" else check_image, source)
    if validate_media == "decode":
        for (source, field_name), length in zip(media["audio"], audio_lengths):
            decoded = _read_media(record.where, field_name, load_audio, source, sampling_rate).shape[0]
            if decoded != length:  # the token count above came from the header
                raise BadSampleError(
                    record.where, f"audio decodes to {decoded} samples but its header says {length}", field_name
                )
    return {
        "input_ids": input_ids,
        "label_spans": _label_spans(labels),
        "audio_tokens": audio_tokens,
        "num_tokens": num_tokens,
        "prompt_length": prompt_length,
        "images": [_reference(source, field_name) for source, field_name in media["image"]],
        "audio": [_reference(source, field_name) for source, field_name in media["audio"]],
        "where": record.where,
        "task": task,
        "reference": "".join(p["text"] for p in answers[-1]["content"] if p["type"] == "text").strip(),
    }


def _reference(source, field_name: str) -> dict:
    """A media source as stored in a row: its path (or URL), or its encoded bytes. Decoded sources (a PIL image,
    an audio array) are encoded losslessly (PNG, 32-bit float WAV), so rows never hold pixels or samples."""
    path = data = None
    if isinstance(source, str):
        path = source
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, dict) and source.get("array") is not None:
        audio = np.asarray(source["array"], dtype=np.float32)
        buffer = io.BytesIO()
        soundfile.write(
            buffer, audio.T if audio.ndim == 2 else audio, int(source["sampling_rate"]), "FLOAT", format="WAV"
        )
        data = buffer.getvalue()
    elif isinstance(source, dict):
        path, data = source.get("path"), source.get("bytes")
    elif isinstance(source, Image.Image):
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise TypeError(f"{field_name}: unsupported media source of type {type(source).__name__}")
    return {"path": path, "bytes": data, "field": field_name}


def _source(reference: dict):
    """What `load_image` / `load_audio` read for a stored media reference: its bytes, or else its path."""
    return reference["bytes"] if reference["bytes"] is not None else reference["path"]


def _read_media(where: str, field_name: str, read, *args):
    """`read(*args)`, its `MediaError` turned into a `BadSampleError` naming the record and field."""
    try:
        return read(*args)
    except MediaError as error:
        raise BadSampleError(where, str(error), field_name) from error


def prepare_row(
    record: Record, processor, report: "SkipReport", *, max_length, on_bad_sample, on_overlong, validate_media
) -> dict | None:
    """`make_row(record, ...)`, or None for a bad or over-long sample that the settings skip (counted in `report`)."""
    report.read += 1
    try:
        row = make_row(record, processor, max_length, validate_media)
    except OverlongError as error:
        if on_overlong == "error":
            raise
        report.add("longer than max_length", error.where)
        return None
    except BadSampleError as error:
        if on_bad_sample == "error":
            raise
        report.add(error.key, error.where)
        return None
    report.kept += 1
    return row


def prepare_examples(
    records: Iterable[Record],
    processor,
    *,
    max_length: int | None = None,
    on_bad_sample: Literal["error", "skip"] = "error",
    on_overlong: Literal["error", "skip"] = "skip",
    validate_media: Literal["decode", "header", "none"] = "decode",
    name: str = "data",
) -> tuple[datasets.Dataset, SkipReport]:
    """Rows of every record, in one process, as an in-memory `datasets.Dataset`, and the skip report. Bad samples
    raise or are skipped and counted, per the settings. For data files at scale use
    `mmpeft.data.preparation.prepare_source` (parallel, cached, memory-mapped)."""
    report = SkipReport()
    settings = dict(
        max_length=max_length, on_bad_sample=on_bad_sample, on_overlong=on_overlong, validate_media=validate_media
    )
    rows = [
        row
        for record in tqdm(records, desc=f"Preparing {name}", unit=" samples", mininterval=2)
        if (row := prepare_row(record, processor, report, **settings)) is not None
    ]
    columns = {name: [row[name] for row in rows] for name in ROW_FEATURES}
    return datasets.Dataset.from_dict(columns, features=ROW_FEATURES), report


def expand_row(row: dict, processor, prompt_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`(input_ids, labels)` of a row with each placeholder repeated by its item's token count (the whole sample,
    or with `prompt_only` the generation prompt); placeholder positions never carry a label."""
    input_ids = np.asarray(row["input_ids"], dtype=np.int64)
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    spans = row["label_spans"]
    for start, end in zip(spans[::2], spans[1::2]):
        labels[start:end] = input_ids[start:end]
    if prompt_only:
        input_ids, labels = input_ids[: row["prompt_length"]], labels[: row["prompt_length"]]
    repeats = np.ones(len(input_ids), dtype=np.int64)
    for token_id, tokens in (
        (processor.image_token_id, processor.image_seq_length),
        (processor.audio_token_id, row["audio_tokens"]),
    ):
        if token_id is not None:
            placeholders = input_ids == token_id
            repeats[placeholders] = tokens if np.isscalar(tokens) else tokens[: int(placeholders.sum())]
            labels[placeholders] = IGNORE_INDEX
    return np.repeat(input_ids, repeats), np.repeat(labels, repeats)


def prompt_media(row: dict, processor) -> tuple[int, int]:
    """Images and audio clips in a row's generation prompt (the first ones of the sample)."""
    prompt = row["input_ids"][: row["prompt_length"]]
    return tuple(
        prompt.count(token_id) if token_id is not None else 0
        for token_id in (processor.image_token_id, processor.audio_token_id)
    )


# Samples in a row whose media fail to load before `MMPeftDataset` gives up (the data, not single files, is broken).
MAX_CONSECUTIVE_LOAD_FAILURES = 100


class MMPeftDataset(torch.utils.data.Dataset):
    """Prepared rows as model inputs; media are loaded and featurized here (so in DataLoader workers).

    `mode="train"` gives the whole sample with labels; `mode="generate"` gives the prompt before the last
    assistant answer, with only the media it contains.

    A sample whose media fail to load (possible when they were not decoded at preparation, `validate_media`) is,
    with `on_bad_sample="skip"`, replaced by the next sample that loads, and the item carries
    `skipped_samples: [{"index", "where", "reason"}]` for the trainer to count (the collator passes it on);
    with `"error"` it raises `BadSampleError` naming the file, line and field.

    Args:
        rows: a `datasets.Dataset` of `ROW_FEATURES` rows (`prepare_examples`, `prepare_source`).
        processor: the model's `MMPeftProcessor`.
        mode: `"train"` or `"generate"`.
        on_bad_sample: `"error"` or `"skip"`.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        processor,
        mode: Literal["train", "generate"] = "train",
        on_bad_sample: Literal["error", "skip"] = "error",
    ):
        self.rows, self.processor, self.mode, self.on_bad_sample = rows, processor, mode, on_bad_sample

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        """Tokens of each sample (placeholders expanded), from the rows' length column: for length-grouped sampling."""
        return list(self.rows["num_tokens"])

    def example(self, index: int) -> Example:
        """The sample at `index` as an `Example` (expanded ids and labels; media not loaded)."""
        row = self.rows[index]
        input_ids, labels = expand_row(row, self.processor)
        return Example(
            input_ids=input_ids.tolist(),
            labels=labels.tolist(),
            images=[_source(reference) for reference in row["images"]],
            audio=[_source(reference) for reference in row["audio"]],
            where=row["where"],
            task=row["task"],
            prompt_length=len(expand_row(row, self.processor, prompt_only=True)[0]),
            prompt_media=prompt_media(row, self.processor),
            reference=row["reference"],
        )

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for attempt in range(MAX_CONSECUTIVE_LOAD_FAILURES):
            row = self.rows[(index + attempt) % len(self.rows)]
            try:
                item = load_item(row, self.processor, prompt_only=self.mode == "generate")
            except BadSampleError as error:
                if self.on_bad_sample == "error":
                    raise
                skipped.append(
                    {"index": (index + attempt) % len(self.rows), "where": error.where, "reason": error.key}
                )
                continue
            if skipped:
                item["skipped_samples"] = skipped
            return item
        raise BadSampleError(
            skipped[-1]["where"],
            f"{MAX_CONSECUTIVE_LOAD_FAILURES} samples in a row failed to load (the last: {skipped[-1]['reason']}); "
            "are the media files still where the data says?",
        )


def load_item(row: dict, processor, prompt_only: bool = False) -> dict:
    """Model inputs of one row: expanded `input_ids` (and `labels` unless `prompt_only`), `pixel_values` and the
    audio features. Raises `BadSampleError` naming the row and field when a media item fails to load, or no longer
    matches the token count it was prepared with (a file changed since)."""
    input_ids, labels = expand_row(row, processor, prompt_only)
    images, audio = row["images"], row["audio"]
    if prompt_only:
        num_images, num_audio = prompt_media(row, processor)
        images, audio = images[:num_images], audio[:num_audio]
    item = {"input_ids": torch.from_numpy(input_ids)}
    if not prompt_only:
        item["labels"] = torch.from_numpy(labels)
    if images:
        loaded = [_read_media(row["where"], ref["field"], load_image, _source(ref)) for ref in images]
        item["pixel_values"] = processor.image_processor(loaded, return_tensors="pt")["pixel_values"]
    if audio:
        sampling_rate = processor.feature_extractor.sampling_rate
        clips = [_read_media(row["where"], ref["field"], load_audio, _source(ref), sampling_rate) for ref in audio]
        features, tokens = processor.process_audio(clips)
        for ref, clip_tokens, expected in zip(audio, tokens, row["audio_tokens"]):
            if clip_tokens != expected:
                raise BadSampleError(
                    row["where"],
                    f"audio gives {clip_tokens} tokens but was prepared with {expected}: the file changed since the "
                    "data was prepared (prepare it again)",
                    ref["field"],
                )
        item.update({name: torch.from_numpy(value) for name, value in features.items()})
    return item


__all__ = [
    "Example",
    "IGNORE_INDEX",
    "MMPeftDataset",
    "OverlongError",
    "ROW_FEATURES",
    "SkipReport",
    "VALIDATE_MEDIA",
    "expand_row",
    "load_item",
    "make_row",
    "prepare_examples",
    "prompt_media",
    "prepare_row",
    "tokenize_conversation",
]
