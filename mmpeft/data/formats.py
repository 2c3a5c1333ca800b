"""Dataset formats -> canonical conversations.

A canonical conversation is a list of `{"role": "system" | "user" | "assistant", "content": [part, ...]}` with
parts `{"type": "text", "text": str}`, `{"type": "image", "image": source}`, `{"type": "audio", "audio": source}`
(sources as in `mmpeft.data.media`, paths resolved against the data file's folder).

Formats read:
1. OpenAI-style `messages` (JSONL / JSON), parts `{"type": "image", "path" | "url" | "image"}`,
   `{"type": "audio", "path" | "audio"}`, `{"type": "text", "text"}`; string content is text.
2. LLaVA `conversations` (`from` / `value`, with `<image>` / `<audio>` in the text and `image` / `audio` fields
   holding one source or a list, used in order).
3. Any `datasets` dataset (a `save_to_disk` folder or a Hub id) or Parquet file with either set of columns
   (media as paths, or as `{"bytes", "path"}` as `datasets` stores images and audio).

A source is a file, a glob of files (`data/shards/*.jsonl`), a folder of JSONL / JSON / Parquet files, a
`save_to_disk` folder or a Hub id (`data_files`).
"""

import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Iterator

from .media import MediaError
from .sources import MediaPolicy, resolve_media


ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
PLACEHOLDER = re.compile(r"(<image>|<audio>)")


class BadSampleError(ValueError):
    """A sample that cannot be trained on; `where` names the file and line (or dataset and index)."""

    def __init__(self, where: str, reason: str, field: str | None = None):
        self.where, self.reason, self.field = where, reason, field
        super().__init__(f"{where}: {f'field {field!r}: ' if field else ''}{reason}")

    def __reduce__(self):  # raised in worker processes (`datasets.map`, DataLoader): rebuilt with all its parts
        return type(self), (self.where, self.reason, self.field)

    @property
    def key(self) -> str:
        """What skip reports count: the field and the reason, without the sample's place."""
        return f"{self.field}: {self.reason}" if self.field else self.reason


@dataclass
class Record:
    """One raw sample and where it came from."""

    data: dict
    where: str  # "path/train.jsonl:12" or "dataset-name[12]"
    base_dir: str | None = None  # folder that relative media paths are resolved against (None: a Hub dataset)
    policy: MediaPolicy = MediaPolicy()  # what its media may reference (`mmpeft.data.sources`)
    error: str | None = None  # why the raw sample could not even be parsed (malformed JSON line)


def _media_source(source, record: Record, field_name: str):
    """`source` as `resolve_media` allows it under the record's policy, or a `BadSampleError` naming the field."""
    try:
        return resolve_media(source, record.base_dir, record.policy)
    except MediaError as error:
        raise BadSampleError(record.where, str(error), field_name) from error


def _media_part(kind: str, part: dict, record: Record, field_name: str) -> dict:
    source = part.get(kind)
    if source is None:
        source = part.get("path") or part.get("url")
        if source is None:
            raise BadSampleError(record.where, f"{kind} part has no 'path', 'url' or '{kind}'", field_name)
    return {"type": kind, kind: _media_source(source, record, field_name)}


def _text(value, record: Record, field_name: str) -> str:
    """`value` if it is a string that can be tokenized: JSON can escape lone UTF-16 surrogates (`"\\ud800"`),
    which are not Unicode text and would crash the tokenizer."""
    if not isinstance(value, str):
        raise BadSampleError(record.where, f"text must be a string, got {type(value).__name__}", field_name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise BadSampleError(
            record.where, f"text holds an invalid character {value[error.start]!r} at {error.start}", field_name
        ) from error
    return value


def _role(message, key: str) -> str | None:
    """The canonical role of a turn, or None when it has none (or a list, a number, ... where the name goes)."""
    role = message.get(key) if isinstance(message, dict) else None
    return ROLES.get(role) if isinstance(role, str) else None


def from_messages(record: Record) -> list[dict]:
    """Canonical conversation of an OpenAI-style `messages` record."""
    messages = record.data["messages"]
    if not isinstance(messages, list):
        raise BadSampleError(record.where, "must be a list of messages", "messages")
    conversation = []
    for turn, message in enumerate(messages):
        field_name = f"messages[{turn}]"
        role = _role(message, "role")
        if role is None:
            raise BadSampleError(record.where, f"unknown or missing role {message!r:.80}", field_name)
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": _text(content, record, f"{field_name}.content")}]
        if not isinstance(content, list):
            raise BadSampleError(record.where, "content must be a string or a list of parts", field_name)
        parts = []
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(
                    {"type": "text", "text": _text(part.get("text"), record, f"{field_name}.content[{index}]")}
                )
            elif kind in ("image", "audio"):
                parts.append(_media_part(kind, part, record, f"{field_name}.content[{index}]"))
            else:
                raise BadSampleError(
                    record.where, f"unknown content part {part!r:.80}", f"{field_name}.content[{index}]"
                )
        conversation.append({"role": role, "content": parts})
    return conversation


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def from_llava(record: Record) -> list[dict]:
    """Canonical conversation of a LLaVA `conversations` record."""
    media = {"image": _as_list(record.data.get("image")), "audio": _as_list(record.data.get("audio"))}
    used = {"image": 0, "audio": 0}
    if not isinstance(record.data["conversations"], list):
        raise BadSampleError(record.where, "must be a list of turns", "conversations")
    conversation = []
    for turn, message in enumerate(record.data["conversations"]):
        field_name = f"conversations[{turn}]"
        role = _role(message, "from")
        if role is None or not isinstance(message.get("value"), str):
            raise BadSampleError(
                record.where, f"needs 'from' (human/gpt/system) and a string 'value': {message!r:.80}", field_name
            )
        parts = []
        for piece in PLACEHOLDER.split(_text(message["value"], record, field_name)):
            if piece in ("<image>", "<audio>"):
                kind = piece[1:-1]
                if used[kind] >= len(media[kind]):
                    raise BadSampleError(
                        record.where,
                        f"more <{kind}> placeholders than {kind} sources ({len(media[kind])})",
                        field_name,
                    )
                parts.append({"type": kind, kind: _media_source(media[kind][used[kind]], record, kind)})
                used[kind] += 1
            elif piece:
                parts.append({"type": "text", "text": piece})
        conversation.append({"role": role, "content": parts})
    for kind in ("image", "audio"):
        if used[kind] != len(media[kind]):
            raise BadSampleError(
                record.where, f"{len(media[kind])} {kind} sources but {used[kind]} <{kind}> placeholders", kind
            )
    return conversation


def to_conversation(record: Record) -> list[dict]:
    """Canonical conversation of `record`, whichever format it is in."""
    if record.error is not None:
        raise BadSampleError(record.where, record.error)
    if not isinstance(record.data, dict):
        raise BadSampleError(record.where, f"a sample must be a JSON object, got {type(record.data).__name__}")
    if "messages" in record.data:
        return from_messages(record)
    if "conversations" in record.data:
        return from_llava(record)
    raise BadSampleError(record.where, f"has neither 'messages' nor 'conversations' (keys: {sorted(record.data)})")


DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def data_files(source: str) -> list[str] | None:
    """The data files a source names -- a JSONL / JSON / Parquet file, a glob of them (`shards/*.jsonl`) or a folder
    holding them -- sorted; None when it names a `datasets` dataset instead (a `save_to_disk` folder or a Hub id).
    A missing local path is a `FileNotFoundError`, not a Hub id to look up."""
    if glob.has_magic(source):
        files = sorted(path for path in glob.glob(source, recursive=True) if path.endswith(DATA_FILE_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"{source}: no {'/'.join(DATA_FILE_SUFFIXES)} files match")
        return [os.path.abspath(path) for path in files]
    if os.path.isfile(source):
        if not source.endswith(DATA_FILE_SUFFIXES):
            raise ValueError(f"{source}: data files are {', '.join(DATA_FILE_SUFFIXES)}")
        return [os.path.abspath(source)]
    if os.path.isdir(source) and not is_saved_dataset(source):
        files = sorted(entry.path for entry in os.scandir(source) if entry.name.endswith(DATA_FILE_SUFFIXES))
        if not files:
            raise FileNotFoundError(
                f"{source}: a folder without {'/'.join(DATA_FILE_SUFFIXES)} files or a saved dataset"
            )
        return [os.path.abspath(path) for path in files]
    looks_local = source.endswith(DATA_FILE_SUFFIXES) or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not os.path.exists(source):
        # Not a Hub id (`name` or `owner/name`): a local path that is not there, not a dataset to download.
        raise FileNotFoundError(f"{source}: no such data file or folder")
    return None


def is_saved_dataset(source: str) -> bool:
    """Whether `source` is a folder written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    return any(os.path.exists(os.path.join(source, name)) for name in ("dataset_info.json", "dataset_dict.json"))


def parse_line(line: bytes, where: str, base_dir: str, policy: MediaPolicy, first: bool = False) -> Record:
    """The record of one JSONL line. A malformed line (or one that is not UTF-8) becomes a record whose conversion
    fails naming the line, so that it is counted (or raised) like any other bad sample."""
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first line.
        data = json.loads(line.decode("utf-8-sig" if first else "utf-8"))
    except UnicodeDecodeError as error:
        return Record(None, where, base_dir, error=f"invalid UTF-8 at byte {error.start + 1} of the line")
    except json.JSONDecodeError as error:
        at = "the end of the line" if error.pos >= len(error.doc.rstrip()) else f"character {error.pos + 1}"
        return Record(None, where, base_dir, error=f"malformed JSON line: {error.msg} at {at}")
    except ValueError as error:  # valid JSON that Python refuses (an integer of 5000 digits)
        return Record(None, where, base_dir, error=f"malformed JSON line: {error}")
    except RecursionError:  # `[[[[...]]]]` thousands deep: the parser's stack, not the line, is the limit
        return Record(None, where, base_dir, error="malformed JSON line: nested too deeply to parse")
    return Record(data, where, base_dir, policy)


def read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """`(line number, line)` of every non-blank line of a JSONL file."""
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                yield number, line


def read_json_items(path: str) -> list:
    """The samples of a JSON file: a list, or `{"data": [...]}` / `{"samples": [...]}`."""
    with open(path, "rb") as file:
        try:
            data = json.load(file)
        except (ValueError, UnicodeDecodeError) as error:
            raise BadSampleError(path, f"invalid JSON: {error}") from error
    items = data.get("data", data.get("samples")) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise BadSampleError(
            path, f"a JSON file must hold a list of samples (or {{'data': [...]}}), got {type(items).__name__}"
        )
    return items


def read_records(source: str, split: str = "train", policy: MediaPolicy = MediaPolicy()) -> Iterator[Record]:
    """Records of JSONL / JSON / Parquet files (a file, a glob or a folder), or of a `datasets` dataset (a
    `save_to_disk` folder or a Hub id) split, in order, one at a time.

    Media references are held to `policy` (`mmpeft.data.sources`: paths inside the data file's folder, or the
    dataset folder, and no URLs unless it allows them).
    """
    files = data_files(source)
    if files is None:
        yield from _read_dataset(source, split, policy)
        return
    for path in files:
        base_dir = os.path.dirname(path)
        if path.endswith(".jsonl"):
            for number, line in read_lines(path):
                yield parse_line(line, f"{path}:{number}", base_dir, policy, first=number == 1)
        elif path.endswith(".json"):
            for index, item in enumerate(read_json_items(path)):
                yield Record(item, f"{path}[{index}]", base_dir, policy)
        else:
            import pyarrow.parquet

            index = 0
            for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=1024):
                for item in batch.to_pylist():
                    yield Record(item, f"{path}[{index}]", base_dir, policy)
                    index += 1


def load_hf_dataset(source: str, split: str):
    """A `datasets` dataset split (a `save_to_disk` folder or a Hub id) with media columns left undecoded:
    `datasets` decodes audio only through torchcodec (which fails with CPU torch), and images without mmpeft's
    checks (the decompression-bomb limit is checked from the header, before decoding)."""
    import datasets

    if is_saved_dataset(source):
        dataset = datasets.load_from_disk(source)
        dataset = dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
    else:
        dataset = datasets.load_dataset(source, split=split)
    for name, feature in dataset.features.items():
        if isinstance(feature, (datasets.Audio, datasets.Image)):
            dataset = dataset.cast_column(name, type(feature)(decode=False))
    return dataset


def _read_dataset(source: str, split: str, policy: MediaPolicy) -> Iterator[Record]:
    base_dir = source if os.path.isdir(source) else None
    for index, item in enumerate(load_hf_dataset(source, split)):
        yield Record(item, f"{source}[{split}][{index}]", base_dir, policy)


__all__ = [
    "BadSampleError",
    "Record",
    "data_files",
    "is_saved_dataset",
    "load_hf_dataset",
    "parse_line",
    "read_records",
    "to_conversation",
]
