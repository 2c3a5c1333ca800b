"""Preparing data at scale: parallel `datasets.map`, the cache and what invalidates it, input forms, media
validation policies and bad media found at load time."""

import io
import json
import logging
import os

import datasets
import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from tiny_parts import build

from mmpeft.data import BadSampleError, MMPeftDataCollator, MMPeftDataset, prepare_examples, read_records
from mmpeft.data.preparation import prepare_source
from mmpeft.data.sources import MediaPolicy


@pytest.fixture(scope="module")
def processor():
    return build("llama", "siglip", "whisper", audio_frames_per_token=2)[1]


def sample(*parts, answer="ok"):
    return {"messages": [{"role": "user", "content": list(parts)}, {"role": "assistant", "content": answer}]}


def image(path):
    return {"type": "image", "path": path}


def audio(path):
    return {"type": "audio", "path": path}


def text(value):
    return {"type": "text", "text": value}


def png(size=(24, 16), colour="red"):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def data(tmp_path):
    """A data folder: an image, a clip, an image whose pixels are cut off after a valid header, and three JSONL
    shards of mixed samples (the third line of shard 1 is the truncated image)."""
    media = tmp_path / "media"
    media.mkdir()
    (media / "red.png").write_bytes(png())
    (media / "cut.png").write_bytes(png((64, 64))[:80])  # header and size intact, pixel data cut off
    soundfile.write(media / "tone.wav", np.sin(np.arange(8000) / 5).astype(np.float32) * 0.3, 16000)
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = [
        sample(image("../media/red.png"), text("Colour?"), answer="red"),
        sample(audio("../media/tone.wav"), text("Sound?"), answer="tone"),
        sample(text("Hi"), answer="hello"),
    ]
    for shard in range(3):
        with open(shards / f"part-{shard}.jsonl", "w") as file:
            for index, row in enumerate(rows):
                row = sample(image("../media/cut.png"), text("?")) if (shard, index) == (1, 2) else row
                file.write(json.dumps({**row, "task": f"t{shard}"}) + "\n")
    return tmp_path


def prepare(source, processor, cache, **settings):
    settings = {"on_bad_sample": "skip", "media_policy": MediaPolicy(allow_outside=True), **settings}
    prepared = prepare_source(str(source), processor, str(cache), **settings)
    return prepared.rows, prepared.report


def test_parallel_preparation_equals_serial_and_is_reused_from_the_cache(data, processor, tmp_path, caplog):
    glob = str(data / "shards" / "*.jsonl")
    serial, serial_report = prepare_examples(
        read_records(glob, policy=MediaPolicy(allow_outside=True)), processor, on_bad_sample="skip"
    )
    with caplog.at_level(logging.INFO, logger="mmpeft"):
        rows, report = prepare(glob, processor, tmp_path / "cache", on_bad_sample="skip", num_workers=2)
    assert rows.to_dict() == serial.to_dict() and report.to_dict() == serial_report.to_dict()
    assert report.read == 9 and report.kept == 8  # validate_media auto -> decode (small data): cut.png found
    assert report.where == {
        "messages[0].content[0]: cannot decode image: the file is truncated": [str(data / "shards" / "part-1.jsonl:3")]
    }
    assert "prepared 8 samples" in caplog.text and "validate_media: auto -> decode" in caplog.text
    # Memory-mapped from the cache, not held in memory.
    assert rows.cache_files and all(f["filename"].startswith(str(tmp_path / "cache")) for f in rows.cache_files)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmpeft"):
        again, again_report = prepare(glob, processor, tmp_path / "cache", on_bad_sample="skip")
    assert "reused the prepared data" in caplog.text and "prepared 8" not in caplog.text
    assert again.to_dict() == rows.to_dict() and again_report.to_dict() == report.to_dict()


def test_any_change_to_data_processor_or_settings_prepares_again(data, processor, tmp_path, caplog):
    glob = str(data / "shards" / "*.jsonl")
    cache = tmp_path / "cache"
    prepare(glob, processor, cache)

    def built(source=glob, proc=processor, **settings):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mmpeft"):
            prepare(source, proc, cache, **settings)
        return "reused the prepared data" not in caplog.text

    assert not built()
    assert built(max_length=512) and built(validate_media="header") and built(split="validation")
    other = build("llama", "siglip", "whisper", audio_frames_per_token=4)[1]  # other audio token counts
    assert built(proc=other)
    with open(data / "shards" / "part-0.jsonl", "a") as file:  # a data file grows
        file.write(json.dumps(sample(text("more"))) + "\n")
    assert built() and not built()
    os.utime(data / "shards" / "part-2.jsonl", ns=(1, 1))  # same size, other modification time
    assert built()
    assert len(os.listdir(cache)) == 7 and not any(name.startswith(".") for name in os.listdir(cache))


def test_header_validation_finds_the_bad_file_at_load_time(data, processor, tmp_path):
    glob = str(data / "shards" / "*.jsonl")
    rows, report = prepare(glob, processor, tmp_path / "cache", validate_media="header")
    assert report.kept == 9  # a valid header: the cut-off pixels are only found when decoded
    where = [w for w in rows["where"] if w.endswith("part-1.jsonl:3")]
    [index] = [i for i, w in enumerate(rows["where"]) if w == where[0]]
    with pytest.raises(BadSampleError) as raised:
        MMPeftDataset(rows, processor, on_bad_sample="error")[index]
    assert raised.value.where == where[0] and raised.value.field == "messages[0].content[0]"
    assert raised.value.reason == "cannot decode image: the file is truncated"

    # skip: the next sample stands in, and the batch says which one was replaced and why.
    dataset = MMPeftDataset(rows, processor, on_bad_sample="skip")
    item = dataset[index]
    assert item["skipped_samples"] == [
        {
            "index": index,
            "where": where[0],
            "reason": "messages[0].content[0]: cannot decode image: the file is truncated",
        }
    ]
    replacement = dataset[index + 1]
    assert torch.equal(item["input_ids"], replacement["input_ids"])
    batch = MMPeftDataCollator(processor.tokenizer.pad_token_id)([dataset[0], item])
    assert batch["skipped_samples"] == item["skipped_samples"] and batch["input_ids"].shape[0] == 2

    # With decode (the default below 10,000 samples and for prepare_examples) it never reaches training.
    rows, report = prepare(glob, processor, tmp_path / "cache", on_bad_sample="skip", validate_media="decode")
    assert report.kept == 8 and report.where == {
        "messages[0].content[0]: cannot decode image: the file is truncated": [where[0]]
    }


def test_a_clip_changed_after_preparation_is_a_bad_sample_not_a_token_mismatch(data, processor, tmp_path):
    rows, _ = prepare(str(data / "shards"), processor, tmp_path / "cache")
    soundfile.write(data / "media" / "tone.wav", np.zeros(16000, np.float32), 16000)  # twice as long now
    [index] = [i for i, w in enumerate(rows["where"]) if w.endswith("part-0.jsonl:2")]
    with pytest.raises(BadSampleError, match="the file changed since the data was prepared"):
        MMPeftDataset(rows, processor)[index]


def test_parquet_and_saved_datasets_with_media_bytes(data, processor, tmp_path):
    wav = io.BytesIO()
    soundfile.write(wav, np.sin(np.arange(8000) / 5).astype(np.float32), 16000, format="WAV")
    columns = {
        "messages": [
            [{"role": "user", "content": [{"type": "image", "image": {"bytes": png(), "path": None}}]},
             {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
            [{"role": "user", "content": [{"type": "audio", "audio": {"bytes": wav.getvalue(), "path": None}}]},
             {"role": "assistant", "content": [{"type": "text", "text": "tone"}]}],
        ]
    }  # fmt: skip
    table = datasets.Dataset.from_list([{"messages": m} for m in columns["messages"]])
    table.to_parquet(str(tmp_path / "data.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    from_parquet, report = prepare(tmp_path / "data.parquet", processor, tmp_path / "cache")
    from_saved, _ = prepare(tmp_path / "saved", processor, tmp_path / "cache")
    assert report.kept == 2 and from_parquet["input_ids"] == from_saved["input_ids"]
    assert from_parquet["where"] == [f"{tmp_path / 'data.parquet'}[0]", f"{tmp_path / 'data.parquet'}[1]"]
    # The media travel as bytes (no path), and load as the same inputs as files would.
    assert from_parquet[0]["images"][0]["bytes"] == png() and from_parquet[0]["images"][0]["path"] is None
    item = MMPeftDataset(from_parquet, processor)[0]
    expected = processor.image_processor([Image.open(io.BytesIO(png())).convert("RGB")], return_tensors="pt")
    assert torch.equal(item["pixel_values"], expected["pixel_values"])
    assert "input_features" in MMPeftDataset(from_saved, processor)[1]


def test_a_source_without_usable_samples_is_a_clear_error(tmp_path, processor):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: holds no samples"):
        prepare(tmp_path / "empty.jsonl", processor, tmp_path / "cache")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: no usable samples \(.*read 1 samples, kept 0, skipped 1"):
        prepare(tmp_path / "bad.jsonl", processor, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing half-made left behind
