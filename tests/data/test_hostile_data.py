"""Hostile and broken data: every case gives a clear error naming the sample (file:line) and field, or a counted
skip, and the other samples of the same file are kept unchanged. Odd but valid media (16-bit, CMYK, palette,
RGBA and 1x1 images; 8 / 44.1 / 48 kHz, stereo, 6-channel and silent audio) are converted, not refused."""

import io
import json
import re
import tracemalloc

import numpy as np
import pytest
import soundfile
from PIL import Image
from scipy.signal import resample_poly
from tiny_parts import SAMPLING_RATE, build, png_header_only, prepared_examples

from mmpeft.data import BadSampleError, MMPeftDataset, load_audio, load_image, prepare_examples, read_records
from mmpeft.data import media as media_module
from mmpeft.data.dataset import IGNORE_INDEX
from mmpeft.data.sources import MediaPolicy


@pytest.fixture(scope="module")
def processor():
    return build("llama", "siglip", "whisper", audio_frames_per_token=2)[1]


def tone(seconds: float, rate: int, frequency: float = 440.0, gains=(1.0,)) -> np.ndarray:
    """(samples, channels) sine at `frequency`, channel c scaled by gains[c]."""
    t = np.arange(int(round(seconds * rate))) / rate
    wave = 0.3 * np.sin(2 * np.pi * frequency * t)
    return np.stack([gain * wave for gain in gains], axis=1).astype(np.float32)


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def random_image(size=(24, 20)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_media(media) -> None:
    """Every hostile media file of the battery, in `media`."""
    png, jpeg = encoded(random_image()), encoded(random_image(), "JPEG")
    (media / "truncated.png").write_bytes(png[: len(png) // 2])
    (media / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (media / "empty.png").write_bytes(b"")
    (media / "empty.wav").write_bytes(b"")
    (media / "folder.png").mkdir()
    (media / "folder.wav").mkdir()
    (media / "bomb.png").write_bytes(png_header_only(20000, 20000))  # 400 M pixels: over Pillow's own limit too
    (media / "large.png").write_bytes(png_header_only(10000, 10000))  # 100 M: over ours, Pillow only warns
    nan = tone(0.2, SAMPLING_RATE)
    nan[100] = np.nan
    soundfile.write(media / "nan.wav", nan, SAMPLING_RATE, subtype="FLOAT")
    inf = tone(0.2, SAMPLING_RATE, gains=(1, 1))
    inf[1000, 1] = np.inf
    soundfile.write(media / "inf.wav", inf, SAMPLING_RATE, subtype="FLOAT")
    soundfile.write(media / "zero_length.wav", np.zeros((0, 1), np.float32), SAMPLING_RATE)
    soundfile.write(media / "odd_rate.wav", tone(0.2, 44101), 44101)
    flac = io.BytesIO()
    soundfile.write(flac, tone(1.0, SAMPLING_RATE), SAMPLING_RATE, format="FLAC")
    (media / "truncated.flac").write_bytes(flac.getvalue()[: len(flac.getvalue()) // 2])
    soundfile.write(media / "tone.wav", tone(0.5, 22050, gains=(1, 1)), 22050)
    random_image().save(media / "good.png")
    (media / "max.png").write_bytes(png_header_only(8192, 8192))  # exactly at the per-image limit


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "media").mkdir()
    write_media(tmp_path / "media")
    return tmp_path


def part(kind, path):
    return {"type": kind, "path": path}


def sample(*content, answer="x"):
    content = [{"type": "text", "text": c} if isinstance(c, str) else c for c in content]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


GOOD = [sample("fine", answer="yes"), sample(part("image", "media/good.png"), part("audio", "media/tone.wav"), "?")]
FIELD = "messages[0].content[0]"

# case -> (line 2 of the file: a sample or raw bytes, field named, reason (a regex, matched whole))
HOSTILE = {
    "truncated PNG": (
        sample(part("image", "media/truncated.png")),
        FIELD,
        r"cannot decode image: the file is truncated",
    ),
    "truncated JPEG": (
        sample(part("image", "media/truncated.jpg")),
        FIELD,
        r"cannot decode image: the file is truncated",
    ),
    "zero-byte image": (sample(part("image", "media/empty.png")), FIELD, r"file is empty \(0 bytes\): .*/empty\.png"),
    "zero-byte audio": (sample(part("audio", "media/empty.wav")), FIELD, r"file is empty \(0 bytes\): .*/empty\.wav"),
    "directory as image": (sample(part("image", "media/folder.png")), FIELD, r"not a file: .*/media/folder\.png"),
    "directory as audio": (sample(part("audio", "media/folder.wav")), FIELD, r"not a file: .*/media/folder\.wav"),
    "20000x20000 image": (
        sample(part("image", "media/bomb.png")),
        FIELD,
        r"image is over the limit of 67108864 pixels, refused before decoding \(Pillow: Image size \(400000000 "
        r"pixels\) exceeds .*\)",
    ),
    "10000x10000 image": (
        sample(part("image", "media/large.png")),
        FIELD,
        r"image of 10000x10000 pixels \(100000000\) is over the limit of 67108864 pixels, refused before decoding "
        r"\(a possible decompression bomb; mmpeft\.data\.media\.MAX_IMAGE_PIXELS\)",
    ),
    "NaN audio": (sample(part("audio", "media/nan.wav")), FIELD, r"audio contains NaN or infinite samples"),
    "infinite audio": (sample(part("audio", "media/inf.wav")), FIELD, r"audio contains NaN or infinite samples"),
    "0-length audio": (sample(part("audio", "media/zero_length.wav")), FIELD, r"audio is empty \(0 samples\)"),
    "unresamplable rate": (
        sample(part("audio", "media/odd_rate.wav")),
        FIELD,
        r"cannot resample 44101 Hz to 16000 Hz: the ratio 16000/44101 needs a filter of 882021 taps "
        r"\(resample the file first\)",
    ),
    "truncated FLAC": (sample(part("audio", "media/truncated.flac")), FIELD, r"cannot decode audio: .*"),
    "audio array with a bad rate": (
        sample({"type": "audio", "audio": {"array": [0.1, 0.2], "sampling_rate": "fast"}}),
        FIELD,
        r"audio array needs numbers and an integer 'sampling_rate': .*",
    ),
    "path ../../etc/passwd": (
        sample(part("image", "../../etc/passwd")),
        FIELD,
        r"media path '\.\./\.\./etc/passwd' is outside the data folder .* "
        r"\(set allow_media_outside_data_dir to allow\)",
    ),
    "absolute path": (
        sample(part("audio", "/etc/passwd")),
        FIELD,
        r"media path '/etc/passwd' is outside the data folder .*",
    ),
    "absolute path in a datasets-style dict": (
        sample({"type": "image", "image": {"bytes": None, "path": "/etc/passwd"}}),
        FIELD,
        r"media path '/etc/passwd' is outside the data folder .*",
    ),
    "NUL in a path": (
        sample(part("image", "media/good.png\0.txt")),
        FIELD,
        r"media path must be a non-empty string without NUL: .*",
    ),
    "invalid UTF-8": (b'{"messages": "caf\xe9"}', None, r"invalid UTF-8 at byte 18 of the line"),
    "malformed JSON": (
        b'{"messages": [{"role": "user", "content": "hi"}',
        None,
        r"malformed JSON line: Expecting ',' delimiter at the end of the line",
    ),
    "malformed JSON mid-line": (
        b'{"messages": [1 2]}',
        None,
        r"malformed JSON line: Expecting ',' delimiter at character 17",
    ),
    "5000-digit number": (
        b'{"messages": ' + b"9" * 5000 + b"}",
        None,
        r"malformed JSON line: Exceeds the limit \(4300 digits\) for integer string conversion.*",
    ),
    "lone surrogate in text": (
        json.dumps(sample("a\ud800b")).encode(),
        "messages[0].content[0]",
        r"text holds an invalid character '\\ud800' at 1",
    ),
    "LLaVA <audio> without an audio source": (
        {"conversations": [{"from": "human", "value": "Hear <audio>?"}, {"from": "gpt", "value": "x"}]},
        "conversations[0]",
        r"more <audio> placeholders than audio sources \(0\)",
    ),
    "conversations not a list": ({"conversations": 5}, "conversations", r"must be a list of turns"),
    "task not a string": ({**sample("hi"), "task": ["a"]}, "task", r"must be a string, got list"),
    # Containment: `bytes` are data, never a path; URLs are off unless allowed; http(s) is the only scheme.
    "absolute path as image bytes": (
        sample({"type": "image", "image": {"bytes": "/etc/passwd"}}),
        FIELD,
        r"'bytes' must hold the encoded file, got str '/etc/passwd' \(give a file as 'path'\)",
    ),
    "relative path as audio bytes": (
        sample({"type": "audio", "audio": {"bytes": "media/tone.wav", "path": None}}),
        FIELD,
        r"'bytes' must hold the encoded file, got str 'media/tone\.wav' \(give a file as 'path'\)",
    ),
    "path as LLaVA image bytes": (
        {
            "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "x"}],
            "image": {"bytes": "/etc/passwd"},
        },
        "image",
        r"'bytes' must hold the encoded file, got str '/etc/passwd' .*",
    ),
    "image url without allow_remote_media": (
        sample({"type": "image", "url": "http://169.254.169.254/latest/meta-data/iam"}),
        FIELD,
        r"media URL http://169\.254\.169\.254/latest/meta-data/iam refused: remote media are off "
        r"\(set allow_remote_media\)",
    ),
    "https image path without allow_remote_media": (
        sample(part("image", "https://example.com/cat.png")),
        FIELD,
        r"media URL https://example\.com/cat\.png refused: remote media are off \(set allow_remote_media\)",
    ),
    "LLaVA image url without allow_remote_media": (
        {
            "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "x"}],
            "image": "http://10.0.0.1/a.png",
        },
        "image",
        r"media URL http://10\.0\.0\.1/a\.png refused: .*",
    ),
    "file:// URL": (
        sample(part("audio", "file:///etc/passwd")),
        FIELD,
        r"unsupported URL scheme in file:///etc/passwd \(http and https only\)",
    ),
    # Crashes that must be bad samples instead.
    "3000-deep nesting": (
        b'{"messages": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        None,
        r"malformed JSON line: nested too deeply to parse",
    ),
    "role as a list": (
        {"messages": [{"role": ["user"], "content": "q"}, {"role": "assistant", "content": "a"}]},
        "messages[0]",
        r"unknown or missing role .*",
    ),
    "role as a dict": (
        {"messages": [{"role": {"name": "user"}, "content": "q"}, {"role": "assistant", "content": "a"}]},
        "messages[0]",
        r"unknown or missing role .*",
    ),
    "LLaVA 'from' as a list": (
        {"conversations": [{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "x"}]},
        "conversations[0]",
        r"needs 'from' \(human/gpt/system\) and a string 'value': .*",
    ),
    # One file at the per-image limit, referenced 40 times: ~2.7 G pixels to decode, refused from the headers.
    "40 references to one 8192x8192 image": (
        sample(*[part("image", "media/max.png")] * 40),
        None,
        r"40 images of 2684354560 pixels in all are over the sample budget of 134217728 pixels "
        r"\(max_image_pixels_per_sample\)",
    ),
}


def write_jsonl(path, rows) -> str:
    with open(path, "wb") as file:
        for row in rows:
            file.write((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n")
    return str(path)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_sample_is_a_clear_error_or_a_counted_skip(case, data_dir, processor):
    row, field, reason = HOSTILE[case]
    path = write_jsonl(data_dir / "d.jsonl", [GOOD[0], row, GOOD[1]])
    named = f"field {field!r}: " if field else ""
    with pytest.raises(BadSampleError) as raised:
        prepare_examples(read_records(path), processor)
    assert raised.value.where == f"{path}:2" and raised.value.field == field
    assert str(raised.value) == f"{path}:2: {named}{raised.value.reason}"
    assert re.fullmatch(reason, raised.value.reason, flags=re.DOTALL), raised.value.reason

    examples, report = prepared_examples(read_records(path), processor, on_bad_sample="skip")
    assert report.read == 3 and report.kept == 2 and report.skipped == 1
    [(key, count)] = report.reasons.items()
    assert count == 1 and key == (f"{field}: {raised.value.reason}" if field else raised.value.reason)
    assert report.where[key] == [f"{path}:2"]
    # The other samples are exactly what they are without the hostile one.
    alone, _ = prepared_examples(read_records(write_jsonl(data_dir / "good.jsonl", GOOD)), processor)
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:3"]
    assert [(e.input_ids, e.labels, e.images, e.audio) for e in examples] == [
        (e.input_ids, e.labels, e.images, e.audio) for e in alone
    ]


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd"])
def test_escaping_paths_are_refused_by_the_path_rule_unless_allowed(path, data_dir, processor):
    data = write_jsonl(data_dir / "d.jsonl", [sample(part("image", path))])
    with pytest.raises(BadSampleError, match=r"is outside the data folder"):
        prepare_examples(read_records(data), processor)
    # Allowed, the path is read -- and /etc/passwd is then refused for what it is, not where it is.
    with pytest.raises(
        BadSampleError, match=rf"{data}:1: field '{re.escape(FIELD)}': (cannot decode image|file not found)"
    ):
        prepare_examples(read_records(data, policy=MediaPolicy(allow_outside=True)), processor)


def test_datasets_image_columns_are_checked_before_decoding(data_dir, processor):
    import datasets

    images = [{"bytes": encoded(random_image()), "path": None}, {"bytes": png_header_only(20000, 20000), "path": None}]
    rows = {
        "image": images,
        "conversations": [[{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "x"}]] * 2,
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(data_dir / "hf"))
    examples, report = prepared_examples(read_records(str(data_dir / "hf")), processor, on_bad_sample="skip")
    assert [e.where for e in examples] == [f"{data_dir / 'hf'}[train][0]"]
    [(reason, count)] = report.reasons.items()
    assert count == 1 and reason.startswith(
        f"{FIELD}: image is over the limit of 67108864 pixels, refused before decoding"
    )


def test_jsonl_with_a_byte_order_mark_reads_its_first_line(data_dir, processor):
    path = data_dir / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode() + b"\n" + json.dumps(GOOD[0]).encode() + b"\n")
    examples, report = prepared_examples(read_records(str(path)), processor)
    assert report.kept == 2 and examples[0].input_ids == examples[1].input_ids


@pytest.mark.parametrize("text", ["<image>", "<audio>", "look: <image><audio> and <|im_start|>assistant"])
def test_placeholder_strings_in_text_never_become_media_slots(text, data_dir, processor):
    rows = [
        {"messages": [{"role": "system", "content": text}, *sample(text, answer=text)["messages"]]},
        sample(part("audio", "media/tone.wav"), text),
    ]
    [text_only, with_audio], report = prepared_examples(
        read_records(write_jsonl(data_dir / "d.jsonl", rows)), processor
    )
    assert report.skipped == 0
    assert processor.image_token_id not in text_only.input_ids and processor.audio_token_id not in text_only.input_ids
    assert text_only.images == [] and text_only.audio == []
    assert processor.tokenizer.decode(text_only.input_ids).count(text) == 3  # system, user and answer
    # The one real clip gets its tokens; the typed `<audio>` adds none.
    clip_tokens = processor.process_audio([load_audio(str(data_dir / "media/tone.wav"), SAMPLING_RATE)])[1][0]
    assert with_audio.input_ids.count(processor.audio_token_id) == clip_tokens
    labelled = [t for t, label in zip(text_only.input_ids, text_only.labels) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(labelled) == f"{text}<|im_end|>\n"


# name -> (image, format, pixel at (0, 0) after conversion)
_palette = Image.new("P", (6, 6), 0)
_palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
_palette.putpixel((3, 3), 1)
ODD_IMAGES = {
    "16-bit greyscale": (Image.fromarray(np.full((6, 5), 32896, np.uint16)), "PNG", (128, 128, 128)),
    "16-bit greyscale, full range": (Image.fromarray(np.full((6, 5), 65535, np.uint16)), "PNG", (255, 255, 255)),
    "CMYK JPEG": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
    "palette with a transparent colour": (_palette, "PNG", (255, 255, 255)),
    "RGBA, transparent": (Image.new("RGBA", (5, 5), (0, 0, 0, 0)), "PNG", (255, 255, 255)),
    "RGBA, half transparent red": (Image.new("RGBA", (5, 5), (255, 0, 0, 128)), "PNG", (255, 127, 127)),
    "LA, opaque dark grey": (Image.new("LA", (5, 5), (40, 255)), "PNG", (40, 40, 40)),
    "1-bit": (Image.new("1", (5, 5), 1), "PNG", (255, 255, 255)),
    "1x1": (Image.new("RGB", (1, 1), (200, 10, 10)), "PNG", (200, 10, 10)),
}


@pytest.mark.parametrize("case", list(ODD_IMAGES))
def test_odd_images_are_converted_to_rgb_and_kept(case, data_dir, processor):
    image, fmt, pixel = ODD_IMAGES[case]
    (data_dir / "media/odd").write_bytes(encoded(image, fmt, **({"transparency": 0} if image.mode == "P" else {})))
    loaded = load_image(str(data_dir / "media/odd"))
    assert loaded.mode == "RGB" and loaded.size == image.size
    assert np.abs(np.subtract(loaded.getpixel((0, 0)), pixel)).max() <= (6 if fmt == "JPEG" else 1)
    if case == "palette with a transparent colour":
        assert loaded.getpixel((3, 3)) == (10, 200, 30)  # the opaque colour is kept
    rows, report = prepare_examples(
        read_records(write_jsonl(data_dir / "d.jsonl", [sample(part("image", "media/odd"), "?")])), processor
    )
    item = MMPeftDataset(rows, processor)[0]
    # Resized by the image processor like any image (a 1x1 image too), to the same values as its RGB version.
    expected = processor.image_processor([loaded], return_tensors="pt")["pixel_values"]
    assert item["pixel_values"].shape == (1, 3, 32, 32) and (item["pixel_values"] == expected).all()


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2, 6])
def test_audio_rates_and_channels_are_mixed_down_and_resampled(rate, channels, data_dir, processor):
    gains = np.linspace(0.2, 1.0, channels)  # different per channel: the mix is their mean, not channel 0
    soundfile.write(data_dir / "media/clip.wav", tone(0.5, rate, 440.0, gains), rate, subtype="PCM_24")
    audio = load_audio(str(data_dir / "media/clip.wav"), SAMPLING_RATE)
    assert audio.dtype == np.float32 and audio.shape == (8000,)  # 0.5 s at 16 kHz, exactly
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * SAMPLING_RATE / audio.size - 440.0) <= 2  # same pitch
    rms = np.sqrt(np.mean(audio[800:-800] ** 2))  # away from the edges
    assert rms == pytest.approx(0.3 / np.sqrt(2) * gains.mean(), rel=0.01)
    [example], _ = prepared_examples(
        read_records(write_jsonl(data_dir / "d.jsonl", [sample(part("audio", "media/clip.wav"), "?")])), processor
    )
    assert example.input_ids.count(processor.audio_token_id) == processor.process_audio([audio])[1][0]


def test_silence_is_valid_audio(data_dir, processor):
    soundfile.write(data_dir / "media/silence.wav", np.zeros((8000, 2), np.int16), SAMPLING_RATE)
    rows, report = prepare_examples(
        read_records(write_jsonl(data_dir / "d.jsonl", [sample(part("audio", "media/silence.wav"), "?")])), processor
    )
    assert report.skipped == 0 and len(rows) == 1
    item = MMPeftDataset(rows, processor)[0]
    assert item["input_features"].shape[0] == 1 and item["input_features"].isfinite().all()
    silence = np.zeros(8000, np.float32)
    assert item["input_ids"].eq(processor.audio_token_id).sum() == processor.process_audio([silence])[1][0] > 0


@pytest.mark.parametrize("block_samples", [7, 1000, 1 << 20])
@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_block_decoding_equals_resampling_the_whole_clip(rate, block_samples, monkeypatch):
    monkeypatch.setattr(media_module, "AUDIO_BLOCK_SAMPLES", block_samples)
    clip = np.random.default_rng(rate).uniform(-0.5, 0.5, (5003, 3)).astype(np.float32)
    data = io.BytesIO()
    soundfile.write(data, clip, rate, format="WAV", subtype="FLOAT")
    whole = resample_poly(clip.mean(axis=1), *(np.array([SAMPLING_RATE, rate]) // np.gcd(SAMPLING_RATE, rate)))
    audio = load_audio(data.getvalue(), SAMPLING_RATE)
    assert audio.shape == whole.shape == (media_module.audio_length(data.getvalue(), SAMPLING_RATE),)
    np.testing.assert_allclose(audio, whole, atol=1e-6)


@pytest.mark.parametrize("audio", ["whisper", "wav2vec2"])
def test_audio_tokens_from_a_length_equal_those_of_the_samples(audio):
    processor = build("llama", None, audio, audio_frames_per_token=2)[1]
    rng = np.random.default_rng(0)
    for length in [1, 159, 160, 161, 399, 400, 401, 481, 15999, 16000, 16001, 32001, 50000]:
        clip = rng.standard_normal(length).astype(np.float32)
        try:
            expected = processor.process_audio([clip])[1][0]
        except ValueError:  # too short: both refuse
            with pytest.raises(ValueError, match="too short"):
                processor.num_audio_tokens_for_samples(length)
            continue
        assert processor.num_audio_tokens_for_samples(length) == expected, length


@pytest.fixture(scope="module")
def two_hours(tmp_path_factory):
    """A data folder with a real 2-hour stereo WAV with a 300 Hz tone, `media/two_hours.wav`, written in
    blocks: 4 kHz keeps it at 115 MB on disk (decoded to float32 stereo it would be 230 MB)."""
    folder = tmp_path_factory.mktemp("long")
    (folder / "media").mkdir()
    minute = tone(60, 4000, 300.0, (1.0, 0.5))
    with soundfile.SoundFile(folder / "media/two_hours.wav", "w", 4000, 2, subtype="PCM_16") as file:
        for _ in range(120):
            file.write(minute)
    return folder


def test_two_hour_audio_is_refused_as_overlong_from_its_header(two_hours, processor):
    path = write_jsonl(two_hours / "d.jsonl", [GOOD[0], sample(part("audio", "media/two_hours.wav"), "?"), GOOD[0]])
    tracemalloc.start()
    try:
        examples, report = prepared_examples(read_records(path), processor, max_length=1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.reasons == {"longer than max_length": 1} and report.where["longer than max_length"] == [f"{path}:2"]
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:3"]
    # Decoding it would hold 460 MB (2 h of 16 kHz float32); it was measured from its header instead.
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_two_hour_audio_decodes_in_bounded_memory(two_hours):
    tracemalloc.start()
    try:
        audio = load_audio(str(two_hours / "media/two_hours.wav"), 1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert audio.shape == (7200 * 1000,)
    # The output (27 MiB) plus a few blocks, not the decoded source (230 MB of float32 stereo).
    assert peak < audio.nbytes + 24 * 2**20, f"peak {peak / 2**20:.1f} MiB for {audio.nbytes / 2**20:.1f} MiB out"
    spectrum = np.abs(np.fft.rfft(audio[-60000:]))  # the last minute: blocks joined without drift
    assert abs(np.argmax(spectrum) * 1000 / 60000 - 300.0) <= 0.1
    assert np.sqrt(np.mean(audio[-60000:] ** 2)) == pytest.approx(0.3 / np.sqrt(2) * 0.75, rel=0.01)


@pytest.mark.parametrize("content, kind", [("5", "int"), ('"samples"', "str"), ('{"data": 3}', "int")])
def test_a_json_file_that_is_not_a_list_of_samples_is_a_clear_error(content, kind, tmp_path):
    (tmp_path / "d.json").write_text(content)
    with pytest.raises(BadSampleError) as raised:
        list(read_records(str(tmp_path / "d.json")))
    assert str(raised.value) == (
        f"{tmp_path / 'd.json'}: a JSON file must hold a list of samples (or {{'data': [...]}}), got {kind}"
    )


@pytest.mark.parametrize("source", ["./trian.jsonl", "data/trian.jsonl", "trian.json", "/data/x", "a/b/c"])
def test_a_mistyped_local_path_is_not_looked_up_on_the_hub(source):
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(source)}: no such data file or folder$"):
        list(read_records(source))
