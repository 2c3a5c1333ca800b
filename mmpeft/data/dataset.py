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
import jinja2
import numpy as np
import soundfile
import torch
from PIL import Image
from torch.utils.data import get_worker_info
from tqdm.auto import tqdm
from transformers.utils.chat_template_utils import _get_control_token_patterns, mark_control_tokens

from ..models.processing_mmpeft import ChatTemplateTimeout, rendering_time_limit
from .formats import BadSampleError, Record, to_conversation
from .media import MediaError, audio_length, check_image, load_audio, load_image
from .sources import MediaPolicy, check_budget, check_unchanged, fetch, is_remote


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


class ConversationTooLong(ValueError):
    """Raised by `tokenize_conversation(..., max_length=n)` for a conversation of more than `n` tokens, before the
    work that would otherwise encode it in full. `tokens` is its token count, exact or (`exact=False`) a lower bound
    that is already over the limit."""

    def __init__(self, tokens: int, max_length: int, exact: bool):
        self.tokens, self.max_length, self.exact = tokens, max_length, exact
        super().__init__(f"{'at least ' if not exact else ''}{tokens} > {max_length} tokens")


def tokenize_conversation(
    processor, conversation: list[dict], max_length: int | None = None
) -> tuple[list[int], list[int], int]:
    """Token ids of the rendered conversation, labels that keep only assistant turns, and the length of the
    prompt before the last assistant turn. Placeholders are single tokens here (not yet expanded).

    Assistant spans are found by rendering growing prefixes of the conversation with the processor's chat
    template, so any template works as long as a prefix renders as a prefix. Control tokens that the data's
    own text contains (a literal `<image>`, `<|im_end|>`) are encoded as plain text: only media parts become
    placeholders, and user text cannot forge turns or media slots. Every prefix is rendered, but the text is
    tokenized about once, cut where the prefixes end (`_label_spans_by_cuts`).

    With `max_length`, a conversation of more tokens raises `ConversationTooLong` as soon as that is certain: from
    the size of its text where the tokenizer bounds the bytes a token covers, else after encoding it once -- never
    after the per-turn work. A caller that counts more tokens than these ids (`make_row`: expanded media) passes
    the limit less those.
    """
    tokenizer = processor.tokenizer
    control_tokens, _ = _get_control_token_patterns(tokenizer._get_control_tokens(processor.chat_template))
    view = mark_control_tokens(_template_view(conversation), control_tokens)
    answers = [turn for turn, message in enumerate(view) if message["role"] == "assistant"]
    text = processor.apply_chat_template(view, tokenize=False)
    input_ids = None
    if max_length is not None:
        at_least = _min_tokens(tokenizer, text)
        if at_least is not None and at_least > max_length:
            raise ConversationTooLong(at_least, max_length, exact=False)
        input_ids = _encode(tokenizer, [text])[0]
        if len(input_ids) > max_length:
            raise ConversationTooLong(len(input_ids), max_length, exact=True)

    # The text before each answer (the generation prompt) and up to its end. Rendering them costs far less than
    # tokenizing them, so only the whole text is tokenized when they are prefixes of it (below).
    ends = _render(processor, view, [turn + 1 for turn in answers if turn != len(view) - 1], text=text) + [text]
    prompts = _render(processor, view, answers, text=text, add_generation_prompt=True)
    spans = _label_spans_by_cuts(tokenizer, text, input_ids, prompts, ends)
    if spans is None:  # a template or tokenizer that the cuts do not fit: every prefix is tokenized, as it renders
        encoded = _encode(tokenizer, ends + prompts)
        input_ids, prefixes, starts = encoded[len(ends) - 1], encoded[: len(ends) - 1] + [None], encoded[len(ends) :]
        spans = []
        for prefix, prompt in zip(prefixes, starts):
            prefix = input_ids if prefix is None else prefix
            if input_ids[: len(prefix)] != prefix or len(prompt) > len(prefix):
                spans = None
                break
            spans.append((len(prompt), len(prefix)))
        if spans is None:
            raise ValueError("the chat template does not render a conversation prefix as a prefix of the whole")
    else:
        input_ids, spans = spans
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        labels[start:end] = input_ids[start:end]
    return input_ids, labels, spans[-1][0] if spans else 0


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of rendered chats whose data text was marked by `mark_control_tokens` (marked control tokens as text)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, sanitize_control_tokens=True)["input_ids"]


def _render(processor, view: list[dict], lengths: list[int], text: str, add_generation_prompt: bool = False):
    """The chat template's renderings of `view[:length]` for each of `lengths`.

    Rendered through the processor, a prefix is first normalized message by message, which costs ten times the
    rendering itself and makes an n-turn conversation's prefixes cost n^2 message copies. The normalized view is
    made once here and its prefixes rendered with the compiled template, when that renders the whole conversation
    exactly as the processor did (`text`); otherwise through the processor.
    """
    from transformers.utils import chat_template_utils as chat_utils

    if not lengths:
        return []
    if isinstance(processor.chat_template, str):
        try:
            template = chat_utils._compile_jinja_template(processor.chat_template)
            plain = chat_utils._plain_template_data
            messages = chat_utils._alias_reasoning_fields(plain(chat_utils._normalize_chat_messages(view)))
            variables = dict(tools=None, documents=None, **plain(dict(processor.tokenizer.special_tokens_map)))

            def render(messages, add_generation_prompt):  # each rendering limited, as `apply_chat_template` limits it
                with rendering_time_limit():
                    return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)

            if render(messages, False) == text:
                return [render(messages[:length], add_generation_prompt) for length in lengths]
        except (AttributeError, TypeError):  # another transformers: the processor renders
            pass
    return processor.apply_chat_template(
        [view[:length] for length in lengths], add_generation_prompt=add_generation_prompt, tokenize=False
    )


def _label_spans_by_cuts(tokenizer, text, input_ids, prompts, ends):
    """`(input_ids, [(start, end) per answer])` of `text` with each prompt and end rendering's token count, from
    one encoding of the text cut where those renderings end; None where they are not prefixes of the text in order,
    or the pieces do not encode as the whole does.

    Encoding every prefix costs tokens quadratic in the number of turns. Here the text is cut at each prefix's end
    and each piece encoded on its own (linear): when the pieces' ids join into the ids of the whole, the tokenizer
    splits the whole at every cut, and a prefix's ids are taken to be the pieces' before its end. The last of those
    pieces is encoded with nothing after it, as the prefix alone is, and the others with what the whole has around
    them; so this only assumes that how a piece encodes does not depend on text beyond the next cut, which holds
    for BPE, WordPiece and Unigram models and pre-tokenizers that look one character ahead. Where the pieces do not
    join into the whole (a cut inside a token, a piece that encodes differently alone) every prefix is encoded.
    """
    cuts, position = [], 0
    for prompt, end in zip(prompts, ends):
        for rendered in (prompt, end):
            if len(rendered) < position or not text.startswith(rendered):
                return None
            position = len(rendered)
            cuts.append(position)
    bounds = sorted(set(cuts) | {0, len(text)})
    pieces = [text[start:end] for start, end in zip(bounds, bounds[1:])]
    try:
        encoded = _encode(tokenizer, pieces + ([text] if input_ids is None else []))
    except ValueError:  # a piece that cannot be sanitized alone
        return None
    input_ids = encoded.pop() if input_ids is None else input_ids
    tokens_before, joined = {0: 0}, []
    for end, piece in zip(bounds[1:], encoded):
        joined += piece
        tokens_before[end] = len(joined)
    if joined != input_ids:
        return None
    return input_ids, [(tokens_before[start], tokens_before[end]) for start, end in zip(cuts[::2], cuts[1::2])]


def _min_tokens(tokenizer, text: str) -> int | None:
    """A lower bound of the tokens `text` (a rendered chat, data text marked) encodes to, from its size alone; None
    where the tokenizer allows none.

    A token covers at most as many bytes of the text as its own string has, when every byte of the text becomes
    part of some token: then tokens >= bytes / (the longest token's bytes). That holds for a BPE model that has a
    token for every byte (byte-level, or byte fallback), no normalizer that can shorten the text, no pre-tokenizer
    that drops characters, and no added token that takes in the whitespace around it (lstrip / rstrip). It does
    not hold where one unknown token stands for a whole word of any length (WordLevel, WordPiece, BPE without
    byte fallback), nor where text is dropped: there the conversation is encoded once instead.
    """
    longest = _longest_token_bytes(tokenizer)
    if longest is None:
        return None
    from transformers.utils.chat_template_utils import _CONTROL_TOKEN_END, _CONTROL_TOKEN_START

    # The markers around data control tokens are dropped when encoding: each is 4 UTF-8 bytes.
    size = len(text.encode("utf-8", "surrogatepass")) - 4 * (
        text.count(_CONTROL_TOKEN_START) + text.count(_CONTROL_TOKEN_END)
    )
    return -(-size // longest)


_LONGEST_TOKEN_BYTES: dict = {}  # id(tokenizer) -> (weak reference, vocabulary size, bytes or None)


def _longest_token_bytes(tokenizer) -> int | None:
    """The most bytes of text one token of `tokenizer` covers, when that is bounded (see `_min_tokens`); else None.
    Cached per tokenizer (a vocabulary's scan costs tens of milliseconds)."""
    import weakref

    cached = _LONGEST_TOKEN_BYTES.get(id(tokenizer))
    if cached is not None and cached[0]() is tokenizer and cached[1] == len(tokenizer):
        return cached[2]
    longest = _bounded_token_bytes(tokenizer)
    _LONGEST_TOKEN_BYTES[id(tokenizer)] = (weakref.ref(tokenizer), len(tokenizer), longest)
    return longest


# Normalizers and pre-tokenizers that never shorten nor drop text (Replace and Split are checked further).
_KEEPS_TEXT = {"Sequence", "Prepend", "Replace", "ByteLevel", "Metaspace", "Digits", "Split", "Punctuation"}


def _bounded_token_bytes(tokenizer) -> int | None:
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a Python ("slow") tokenizer: nothing to read its model from
        return None
    spec = json.loads(backend.to_str())
    model, added = spec["model"], spec.get("added_tokens") or []
    parts = []

    def walk(node, key):
        if node is None:
            return True
        parts.append(node)
        inner = node.get(key)
        return node["type"] in _KEEPS_TEXT and all(walk(child, key) for child in (inner or []))

    if not (walk(spec.get("normalizer"), "normalizers") and walk(spec.get("pre_tokenizer"), "pretokenizers")):
        return None
    for part in parts:
        if part["type"] == "Replace" and (
            "String" not in part["pattern"] or len(part["content"].encode()) < len(part["pattern"]["String"].encode())
        ):
            return None  # a regular expression or a shorter replacement may shorten the text
        if part["type"] in ("Split", "Punctuation") and part.get("behavior") == "Removed":
            return None
    if model["type"] != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    if any(token.get("lstrip") or token.get("rstrip") for token in added):
        return None
    vocab = model["vocab"]
    if any(part["type"] == "ByteLevel" for part in parts):
        from tokenizers.pre_tokenizers import ByteLevel

        every_byte = all(character in vocab for character in ByteLevel.alphabet())
    else:
        every_byte = model.get("byte_fallback") and all(f"<0x{byte:02X}>" in vocab for byte in range(256))
    if not every_byte:
        return None
    return max(len(token.encode("utf-8", "surrogatepass")) for token in [*vocab, *(t["content"] for t in added)])


# What rendering a conversation with a chat template can raise on unusual data: jinja2's own errors (including a
# template's `raise_exception`), and Python's from a template or transformers' normalisation indexing, looking up
# or comparing what the data holds.
TEMPLATE_ERRORS = (jinja2.TemplateError, ValueError, IndexError, KeyError, TypeError, RecursionError)


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
    policy = record.policy
    if policy.allow_remote:  # fetched once, here: the row keeps the bytes, training never fetches
        media = {
            kind: [(_fetched(source, record.where, field_name, policy), field_name) for source, field_name in items]
            for kind, items in media.items()
        }
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

    extra = len(media["image"]) * ((processor.image_seq_length or 1) - 1) + sum(audio_tokens) - len(audio_tokens)
    try:  # refused before the per-turn work: the limit less what the media add when expanded
        limit = None if max_length is None else max_length - extra
        input_ids, labels, prompt_length = tokenize_conversation(processor, conversation, limit)
    except ConversationTooLong as error:
        at_least = "" if error.exact else "at least "
        raise OverlongError(
            record.where, f"longer than max_length ({at_least}{error.tokens + extra} > {max_length} tokens)"
        ) from error
    except ChatTemplateTimeout as error:  # the template rendered this sample too long (a loop over its content?)
        raise BadSampleError(record.where, str(error), "messages") from error
    except TEMPLATE_ERRORS as error:  # a template that raises on this conversation fails this sample, not the run
        raise BadSampleError(
            record.where, f"the chat template cannot render it ({type(error).__name__}: {error})", "messages"
        ) from error
    for token_id, count in (
        (processor.image_token_id, len(media["image"])),
        (processor.audio_token_id, len(audio_tokens)),
    ):
        found = input_ids.count(token_id) if token_id is not None else 0
        if found != count:  # a chat template that writes placeholders of its own
            raise BadSampleError(record.where, f"{found} placeholder tokens for {count} media items", "messages")
    num_tokens = len(input_ids) + extra
    if max_length is not None and num_tokens > max_length:
        raise OverlongError(record.where, f"longer than max_length ({num_tokens} > {max_length} tokens)")

    # The per-sample budget, from headers, before anything is decoded (with validate_media: none image headers are
    # not read here; `load_item` checks the budget again before decoding in any case).
    image_sizes = [
        _read_media(record.where, field_name, check_image, source)
        for source, field_name in (media["image"] if validate_media != "none" else [])
    ]
    _read_media(record.where, None, check_budget, image_sizes, [n / sampling_rate for n in audio_lengths], policy)
    if validate_media == "decode":
        for source, field_name in media["image"]:
            _read_media(record.where, field_name, load_image, source)
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


def _fetched(source, where: str, field_name: str, policy: MediaPolicy):
    """A remote source as `{"bytes": <its body>, "path": <its URL>}` (other sources as they are)."""
    if not is_remote(source):
        return source
    return {"bytes": _read_media(where, field_name, fetch, source, policy), "path": source}


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


def bad_sample_item(error: BadSampleError) -> dict:
    """Raise `error` in the main process; in a DataLoader worker, an item that carries it to the main process
    instead (`take_load_reports` raises it there): a worker's exception would reach the main process only as a
    traceback in a string, and end the run with that rather than with the error's one line."""
    if get_worker_info() is None:
        raise error
    return {"bad_sample": error}


def raise_bad_sample(batch: dict) -> dict:
    """`batch`, unless it carries the `BadSampleError` of a sample that failed to load under `on_bad_sample: error`
    (`bad_sample_item`): then that is raised."""
    if "bad_sample" in batch:
        raise batch["bad_sample"]
    return batch


def take_load_reports(batch: dict) -> list[dict]:
    """Remove and return the batch's `skipped_samples` (those `MMPeftDataset` replaced), after `raise_bad_sample`."""
    return raise_bad_sample(batch).pop("skipped_samples", [])


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
        media_policy: the per-sample media budget checked (again) before decoding (`mmpeft.data.sources`).
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        processor,
        mode: Literal["train", "generate"] = "train",
        on_bad_sample: Literal["error", "skip"] = "error",
        media_policy: MediaPolicy = MediaPolicy(),
    ):
        self.rows, self.processor, self.mode, self.on_bad_sample = rows, processor, mode, on_bad_sample
        self.media_policy = media_policy

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
                item = load_item(row, self.processor, self.mode == "generate", self.media_policy)
            except BadSampleError as error:
                if self.on_bad_sample == "error":
                    return bad_sample_item(error)
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


def load_item(row: dict, processor, prompt_only: bool = False, media_policy: MediaPolicy = MediaPolicy()) -> dict:
    """Model inputs of one row: expanded `input_ids` (and `labels` unless `prompt_only`), `pixel_values` and the
    audio features. Raises `BadSampleError` naming the row and field when a media item fails to load, is over the
    policy's per-sample budget, is now reached through a symbolic link, or no longer matches the token count it
    was prepared with (a file changed since)."""
    input_ids, labels = expand_row(row, processor, prompt_only)
    images, audio = row["images"], row["audio"]
    if prompt_only:
        num_images, num_audio = prompt_media(row, processor)
        images, audio = images[:num_images], audio[:num_audio]
    item = {"input_ids": torch.from_numpy(input_ids)}
    if not prompt_only:
        item["labels"] = torch.from_numpy(labels)
    where = row["where"]
    for ref in images + audio:
        if ref["bytes"] is None:
            _read_media(where, ref["field"], check_unchanged, ref["path"])
    # Headers first: the budget (and each clip's token count) holds before anything is decoded, whatever happened
    # to the files since preparation.
    sampling_rate = processor.feature_extractor.sampling_rate if audio else None
    lengths = [_read_media(where, ref["field"], audio_length, _source(ref), sampling_rate) for ref in audio]
    for ref, length, expected in zip(audio, lengths, row["audio_tokens"]):
        _read_media(where, ref["field"], _check_audio_tokens, processor, length, expected)
    sizes = [_read_media(where, ref["field"], check_image, _source(ref)) for ref in images]
    _read_media(where, None, check_budget, sizes, [length / sampling_rate for length in lengths], media_policy)
    if images:
        loaded = [_read_media(where, ref["field"], load_image, _source(ref)) for ref in images]
        item["pixel_values"] = processor.image_processor(loaded, return_tensors="pt")["pixel_values"]
    if audio:
        clips = [_read_media(where, ref["field"], load_audio, _source(ref), sampling_rate) for ref in audio]
        features, _ = processor.process_audio(clips)  # `load_audio` checked each clip's length against its header
        item.update({name: torch.from_numpy(value) for name, value in features.items()})
    return item


def _check_audio_tokens(processor, num_samples: int, expected: int):
    try:
        tokens = processor.num_audio_tokens_for_samples(num_samples)
    except ValueError as error:  # too short for a single token now
        raise MediaError(str(error)) from error
    if tokens != expected:
        raise MediaError(
            f"audio gives {tokens} tokens but was prepared with {expected}: the file changed since the data was "
            "prepared (prepare it again)"
        )


__all__ = [
    "Example",
    "IGNORE_INDEX",
    "MMPeftDataset",
    "OverlongError",
    "ROW_FEATURES",
    "SkipReport",
    "VALIDATE_MEDIA",
    "bad_sample_item",
    "expand_row",
    "load_item",
    "make_row",
    "prepare_examples",
    "prompt_media",
    "raise_bad_sample",
    "take_load_reports",
    "prepare_row",
    "tokenize_conversation",
]
