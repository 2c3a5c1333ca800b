"""From records to training examples: validate, load media, tokenize with assistant-only labels, expand
placeholders, and apply the length rule -- once, up front, so that every bad or over-long sample is known
(raised or counted) before training starts.
"""

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch
from tqdm.auto import tqdm
from transformers.utils.chat_template_utils import _get_control_token_patterns, mark_control_tokens

from .formats import BadSampleError, Record, to_conversation
from .media import MediaError, audio_length, load_audio, load_image


logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclass
class Example:
    """A validated sample: expanded token ids and labels, and its media (sources, loaded again on use)."""

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
        self.reasons[reason] += 1
        self.where.setdefault(reason, [])
        if len(self.where[reason]) < 5:
            self.where[reason].append(where)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def summary(self, name: str = "data") -> str:
        line = f"{name}: read {self.read} samples, kept {self.kept}, skipped {self.skipped}"
        for reason, count in self.reasons.most_common():
            line += f"\n  - {count} x {reason} (e.g. {', '.join(self.where[reason])})"
        return line

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

    def encode(messages, add_generation_prompt=False):
        text = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return tokenizer(text, add_special_tokens=False, sanitize_control_tokens=True)["input_ids"]

    input_ids = encode(view)
    labels = [IGNORE_INDEX] * len(input_ids)
    prompt_length = 0
    for turn, message in enumerate(view):
        if message["role"] != "assistant":
            continue
        # Each prefix rendered once (the whole conversation is one): rendering is most of a sample's preparation.
        prefix = input_ids if turn == len(view) - 1 else encode(view[: turn + 1])
        start, end = len(encode(view[:turn], add_generation_prompt=True)), len(prefix)
        if input_ids[:end] != prefix or start > end:
            raise ValueError("the chat template does not render a conversation prefix as a prefix of the whole")
        labels[start:end] = input_ids[start:end]
        prompt_length = start
    return input_ids, labels, prompt_length


def expand_placeholders(input_ids: list[int], labels: list[int], counts: dict[int, list[int]]):
    """Repeat each placeholder token by its item's token count (`counts[token_id]`, in order); placeholder
    positions never carry a label."""
    iterators = {token_id: iter(per_item) for token_id, per_item in counts.items()}
    new_ids, new_labels = [], []
    for token, label in zip(input_ids, labels):
        if token in iterators:
            n = next(iterators[token])
            new_ids.extend([token] * n)
            new_labels.extend([IGNORE_INDEX] * n)
        else:
            new_ids.append(token)
            new_labels.append(label)
    return new_ids, new_labels


def _media(conversation, kind):
    """`(source, field)` of every `kind` part, in order."""
    return [
        (part[kind], f"messages[{turn}].content[{index}]")
        for turn, message in enumerate(conversation)
        for index, part in enumerate(message["content"])
        if part["type"] == kind
    ]


class OverlongError(BadSampleError):
    """A sample longer than `max_length`: dropped whole (or raised), never truncated."""


def make_example(record: Record, processor, max_length: int | None) -> Example:
    """Validate and encode one record. Raises `BadSampleError` naming the record and field.

    Audio is measured from its file header first, so that a sample over `max_length` is refused
    (`OverlongError`) before any of its media is decoded: a two-hour recording costs no memory. The media of
    a sample within the limit are then decoded once, to find broken files now rather than mid-training.
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
        _read_media(record, field_name, audio_length, source, sampling_rate) for source, field_name in media["audio"]
    ]

    input_ids, labels, prompt_length = tokenize_conversation(processor, conversation)
    counts = {}
    if media["image"]:
        counts[processor.image_token_id] = [processor.image_seq_length] * len(media["image"])
    if media["audio"]:
        counts[processor.audio_token_id] = []
        for length, (_, field_name) in zip(audio_lengths, media["audio"]):
            try:
                counts[processor.audio_token_id].append(processor.num_audio_tokens_for_samples(length))
            except ValueError as error:
                raise BadSampleError(record.where, str(error), field_name) from error
    for token_id, per_item in counts.items():
        found = input_ids.count(token_id)
        if found != len(per_item):  # a chat template that writes placeholders of its own
            raise BadSampleError(
                record.where, f"{found} placeholder tokens for {len(per_item)} media items", "messages"
            )
    # Before expansion each placeholder is one token: count the media the generation prompt holds.
    prompt_media = tuple(
        input_ids[:prompt_length].count(token_id) for token_id in (processor.image_token_id, processor.audio_token_id)
    )
    prompt_ids, _ = expand_placeholders(input_ids[:prompt_length], labels[:prompt_length], counts)
    input_ids, labels = expand_placeholders(input_ids, labels, counts)
    if max_length is not None and len(input_ids) > max_length:
        raise OverlongError(record.where, f"longer than max_length ({len(input_ids)} > {max_length} tokens)")

    # Decode every media item once (and drop it): broken files are found now, not mid-training.
    for source, field_name in media["image"]:
        _read_media(record, field_name, load_image, source)
    for (source, field_name), length in zip(media["audio"], audio_lengths):
        decoded = _read_media(record, field_name, load_audio, source, sampling_rate).shape[0]
        if decoded != length:  # the token count above came from the header
            raise BadSampleError(
                record.where, f"audio decodes to {decoded} samples but its header says {length}", field_name
            )
    return Example(
        input_ids=input_ids,
        labels=labels,
        images=[source for source, _ in media["image"]],
        audio=[source for source, _ in media["audio"]],
        where=record.where,
        task=task,
        prompt_length=len(prompt_ids),
        prompt_media=prompt_media,
        reference="".join(p["text"] for p in answers[-1]["content"] if p["type"] == "text").strip(),
    )


def _read_media(record: Record, field_name: str, read, *args):
    """`read(*args)`, its `MediaError` turned into a `BadSampleError` naming the record and field."""
    try:
        return read(*args)
    except MediaError as error:
        raise BadSampleError(record.where, str(error), field_name) from error


def prepare_examples(
    records: Iterable[Record],
    processor,
    *,
    max_length: int | None = None,
    on_bad_sample: Literal["error", "skip"] = "error",
    on_overlong: Literal["error", "skip"] = "skip",
    name: str = "data",
) -> tuple[list[Example], SkipReport]:
    """Validate and encode every record. Bad samples raise or are skipped and counted, per the settings."""
    examples, report = [], SkipReport()
    for record in tqdm(records, desc=f"Preparing {name}", unit=" samples", mininterval=2):
        report.read += 1
        try:
            examples.append(make_example(record, processor, max_length))
        except OverlongError as error:
            if on_overlong == "error":
                raise
            report.add("longer than max_length", error.where)
        except BadSampleError as error:
            if on_bad_sample == "error":
                raise
            report.add(error.reason if not error.field else f"{error.field}: {error.reason}", error.where)
    report.kept = len(examples)
    return examples, report


class MMPeftDataset(torch.utils.data.Dataset):
    """Examples as model inputs; media are loaded and featurized here (so in DataLoader workers).

    `mode="train"` gives the whole sample with labels; `mode="generate"` gives the prompt before the last
    assistant answer, with only the media it contains.
    """

    def __init__(self, examples: list[Example], processor, mode: Literal["train", "generate"] = "train"):
        self.examples, self.processor, self.mode = examples, processor, mode

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        """Tokens of each sample (placeholders expanded), known without loading it: for length-grouped sampling."""
        return [len(example) for example in self.examples]

    def __getitem__(self, index: int) -> dict:
        example, processor = self.examples[index], self.processor
        input_ids = example.input_ids
        images, audio = example.images, example.audio
        item = {}
        if self.mode == "generate":
            input_ids = input_ids[: example.prompt_length]
            images, audio = images[: example.prompt_media[0]], audio[: example.prompt_media[1]]
        else:
            item["labels"] = torch.tensor(example.labels)
        item["input_ids"] = torch.tensor(input_ids)
        if images:
            loaded = [load_image(source) for source in images]
            item["pixel_values"] = processor.image_processor(loaded, return_tensors="pt")["pixel_values"]
        if audio:
            sampling_rate = processor.feature_extractor.sampling_rate
            features, _ = processor.process_audio([load_audio(source, sampling_rate) for source in audio])
            item.update({name: torch.from_numpy(value) for name, value in features.items()})
        return item


__all__ = [
    "Example",
    "IGNORE_INDEX",
    "MMPeftDataset",
    "OverlongError",
    "SkipReport",
    "expand_placeholders",
    "make_example",
    "prepare_examples",
    "tokenize_conversation",
]
