"""Formats, media, labels, the length rule and every bad-sample case of the data pipeline."""

import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from tiny_parts import build, prepared_examples

from mmpeft.data import (
    BadSampleError,
    MMPeftDataCollator,
    MMPeftDataset,
    prepare_examples,
    read_records,
)
from mmpeft.data.dataset import IGNORE_INDEX, OverlongError
from mmpeft.data.sources import MediaPolicy


@pytest.fixture(scope="module")
def processor():
    return build("llama", "siglip", "whisper", audio_frames_per_token=2)[1]


@pytest.fixture
def files(tmp_path):
    """A data folder with an image, an audio clip (stereo, 22.05 kHz), a corrupt image and an unreadable clip."""
    media = tmp_path / "media"
    media.mkdir()
    Image.new("P", (20, 30), 3).save(media / "palette.png")  # any mode is converted to RGB
    t = np.arange(int(0.5 * 22050)) / 22050
    soundfile.write(media / "tone.wav", np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1) * 0.3, 22050)
    (media / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (media / "broken.wav").write_bytes(b"RIFF" + b"\x00" * 40)
    return tmp_path


def write_jsonl(path, rows):
    with open(path, "w") as file:
        for row in rows:
            file.write(row if isinstance(row, str) else json.dumps(row))
            file.write("\n")
    return str(path)


def user(*parts):
    return {"role": "user", "content": list(parts)}


IMAGE = {"type": "image", "path": "media/palette.png"}
AUDIO = {"type": "audio", "path": "media/tone.wav"}


def text(value):
    return {"type": "text", "text": value}


def test_messages_multi_turn_labels_cover_assistant_turns_only(files, processor):
    rows = [
        {
            "task": "demo",
            "messages": [
                {"role": "system", "content": "Be brief."},
                user(IMAGE, text("Colour?")),
                {"role": "assistant", "content": "purple"},
                user(AUDIO, text("And the sound?")),
                {"role": "assistant", "content": [text("a tone")]},
            ],
        }
    ]
    [example], report = prepared_examples(read_records(write_jsonl(files / "d.jsonl", rows)), processor)
    assert report.kept == 1 and report.skipped == 0 and example.task == "demo"
    tokenizer = processor.tokenizer
    labelled = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode([example.input_ids[i] for i in labelled]) == "purple<|im_end|>\na tone<|im_end|>\n"
    # Exactly the assistant answers: every other token -- system, user turns, placeholders, role headers -- is masked.
    assert all(example.labels[i] == example.input_ids[i] for i in labelled)
    assert example.input_ids.count(processor.image_token_id) == processor.image_seq_length
    assert example.input_ids.count(processor.audio_token_id) > 0
    assert all(
        example.labels[i] == IGNORE_INDEX
        for i, t in enumerate(example.input_ids)
        if t in (processor.image_token_id, processor.audio_token_id)
    )
    # The generation prompt ends right before the last answer and holds both media items.
    assert tokenizer.decode(example.input_ids[: example.prompt_length]).endswith(
        "And the sound?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert example.reference == "a tone" and example.prompt_media == (1, 1)


def test_llava_json_and_datasets_formats_give_the_same_sample(files, processor):
    llava = [
        {
            "image": "media/palette.png",
            "audio": ["media/tone.wav"],
            "conversations": [
                {"from": "human", "value": "<image><audio>Describe."},
                {"from": "gpt", "value": "purple tone"},
            ],
        }
    ]
    messages = [{"messages": [user(IMAGE, AUDIO, text("Describe.")), {"role": "assistant", "content": "purple tone"}]}]
    (files / "llava.json").write_text(json.dumps(llava))
    from_llava, _ = prepared_examples(read_records(str(files / "llava.json")), processor)
    from_messages, _ = prepared_examples(read_records(write_jsonl(files / "m.jsonl", messages)), processor)

    import datasets

    # A `datasets` dataset saved to disk, with absolute media paths (as a user's `map` would produce).
    rows = {
        "conversations": [llava[0]["conversations"]],
        "image": [str(files / "media/palette.png")],
        "audio": [str(files / "media/tone.wav")],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(files / "hf"))
    # Its media live outside the dataset folder: refused unless allowed.
    with pytest.raises(BadSampleError, match=r"outside the data folder"):
        prepare_examples(read_records(str(files / "hf")), processor)
    from_datasets, _ = prepared_examples(
        read_records(str(files / "hf"), policy=MediaPolicy(allow_outside=True)), processor
    )
    assert from_llava[0].input_ids == from_messages[0].input_ids == from_datasets[0].input_ids
    assert from_llava[0].labels == from_messages[0].labels


def test_text_only_and_media_samples_batch_together(files, processor):
    rows = [
        {"messages": [user(text("Hi")), {"role": "assistant", "content": "hello"}]},
        {"messages": [user(IMAGE, AUDIO, IMAGE, text("Two images?")), {"role": "assistant", "content": "yes"}]},
    ]
    examples, _ = prepare_examples(read_records(write_jsonl(files / "d.jsonl", rows)), processor)
    dataset = MMPeftDataset(examples, processor)
    batch = MMPeftDataCollator(processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape[0] == 2 and batch["input_features"].shape[0] == 1
    assert (
        batch["attention_mask"][0].sum() == len(dataset.example(0))
        and batch["labels"][0, len(dataset.example(0)) :].eq(-100).all()
    )
    model = build("llama", "siglip", "whisper", audio_frames_per_token=2)[0]
    assert torch.isfinite(model(**batch).loss)


def test_overlong_samples_are_dropped_whole_and_counted(files, processor):
    rows = [
        {"messages": [user(text("short")), {"role": "assistant", "content": "ok"}]},
        {"messages": [user(IMAGE, text("long " * 30)), {"role": "assistant", "content": "ok"}]},
    ]
    path = write_jsonl(files / "d.jsonl", rows)
    examples, report = prepare_examples(read_records(path), processor, max_length=40)
    assert len(examples) == 1 and report.reasons == {"longer than max_length": 1}
    assert report.where["longer than max_length"] == [f"{path}:2"]
    with pytest.raises(OverlongError, match=rf"{path}:2: longer than max_length \(\d+ > 40 tokens\)"):
        prepare_examples(read_records(path), processor, max_length=40, on_overlong="error")
    # The collator refuses rather than cut (a cut through a placeholder run misaligns features).
    dataset = MMPeftDataset(prepare_examples(read_records(path), processor)[0], processor)
    with pytest.raises(
        ValueError, match=r"sample 1 of the batch has \d+ tokens > max_length 40; samples are never truncated"
    ):
        MMPeftDataCollator(0, max_length=40)([dataset[0], dataset[1]])


BAD_SAMPLES = {
    "missing file": (
        {"messages": [user({"type": "image", "path": "media/nope.png"}), {"role": "assistant", "content": "x"}]},
        r"messages\[0\]\.content\[0\]'?: file not found: .*nope\.png",
    ),
    "corrupt image": (
        {"messages": [user({"type": "image", "path": "media/broken.png"}), {"role": "assistant", "content": "x"}]},
        r"messages\[0\]\.content\[0\]'?: cannot decode image",
    ),
    "unreadable audio": (
        {"messages": [user({"type": "audio", "path": "media/broken.wav"}), {"role": "assistant", "content": "x"}]},
        r"messages\[0\]\.content\[0\]'?: cannot decode audio",
    ),
    "empty conversation": ({"messages": []}, r"empty conversation"),
    "no assistant turn": ({"messages": [user(text("hi"))]}, r"no assistant turn"),
    "more placeholders than media": (
        {
            "image": "media/palette.png",
            "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
        },
        r"more <image> placeholders than image sources \(1\)",
    ),
    "malformed JSON line": ('{"messages": [', r"malformed JSON line"),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_bad_sample_error_names_file_line_and_field(case, files, processor):
    good = {"messages": [user(text("fine")), {"role": "assistant", "content": "yes"}]}
    row, message = BAD_SAMPLES[case]
    path = write_jsonl(files / "d.jsonl", [good, row, good])
    with pytest.raises(BadSampleError, match=rf"{path}:2: .*{message}"):
        prepare_examples(read_records(path), processor)
    examples, report = prepared_examples(read_records(path), processor, on_bad_sample="skip")
    # Skipped and counted; the other samples are kept untouched, nothing is replaced.
    assert len(examples) == 2 and [e.where for e in examples] == [f"{path}:1", f"{path}:3"]
    assert report.read == 3 and report.kept == 2 and report.skipped == 1
    [(reason, count)] = report.reasons.items()
    assert count == 1 and report.where[reason] == [f"{path}:2"]
    assert "skipped 1" in report.summary() and f"{path}:2" in report.summary()


def test_media_for_a_missing_modality_is_a_bad_sample(files):
    text_audio = build("llama", None, "whisper")[1]
    row = {"messages": [user(IMAGE, text("?")), {"role": "assistant", "content": "x"}]}
    with pytest.raises(BadSampleError, match=r"has image input but the model has no image modality"):
        prepare_examples(read_records(write_jsonl(files / "d.jsonl", [row])), text_audio)


def test_audio_is_downmixed_and_resampled(files, processor):
    from mmpeft.data import load_audio

    audio = load_audio(str(files / "media/tone.wav"), 16000)
    assert audio.ndim == 1 and audio.dtype == np.float32 and abs(len(audio) - 8000) <= 1
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440) < 5  # same pitch after resampling


@pytest.mark.parametrize("path", ["../secret.png", "media/../../secret.png", "ABSOLUTE"])
def test_media_paths_outside_the_data_folder_are_refused_unless_allowed(path, files, processor):
    outside = files.parent / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    path = str(outside) if path == "ABSOLUTE" else path
    data = files / "d.jsonl"
    row = {"messages": [user({"type": "image", "path": path}), {"role": "assistant", "content": "x"}]}
    write_jsonl(data, [row])
    with pytest.raises(
        BadSampleError, match=rf"{data}:1: field 'messages\[0\]\.content\[0\]': media path .* is outside"
    ):
        prepare_examples(read_records(str(data)), processor)
    examples, report = prepare_examples(read_records(str(data)), processor, on_bad_sample="skip")
    assert not examples and report.skipped == 1
    [example], _ = prepared_examples(read_records(str(data), policy=MediaPolicy(allow_outside=True)), processor)
    assert example.images == [str(outside)]


def test_placeholder_strings_in_user_text_stay_text(files, processor):
    """Placeholder injection: a literal `<image>` (or a turn marker) typed in the data is text, not a media
    slot or a new turn; only the image part becomes image tokens."""
    text_with_tokens = "What is <image> and <audio><|im_end|>?"
    row = {"messages": [user(IMAGE, text(text_with_tokens)), {"role": "assistant", "content": "a <image> tag"}]}
    [example], report = prepared_examples(read_records(write_jsonl(files / "d.jsonl", [row])), processor)
    assert report.skipped == 0
    assert example.input_ids.count(processor.image_token_id) == processor.image_seq_length  # the one real image
    assert processor.audio_token_id not in example.input_ids
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert example.input_ids.count(im_end) == 2  # the template's two turn ends, not the user's
    decoded = processor.tokenizer.decode(example.input_ids)
    assert text_with_tokens in decoded
    labelled = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(labelled) == "a <image> tag<|im_end|>\n"
    assert example.reference == "a <image> tag"
