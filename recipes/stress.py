"""Feed the real recipe a dataset that mixes good samples with every kind of hostile or broken one, and account
for every sample: each is either trained on or skipped for the reason its case calls for.

    python recipes/stress.py                                      # ~10 s on a 2-core CPU, in outputs/stress
    python recipes/stress.py --num_good 200 --per_device_train_batch_size 16   # other flags go to the run

The dataset (`<output_dir>/data/stress.jsonl`) holds `num_good` generated samples and one sample of each case
in `CASES`: truncated PNG / JPEG / FLAC, zero-byte files, directories, escaping and absolute paths, a link out
of the data folder, a path given as bytes, an http URL (remote media are off) and a `file://` URL, an image
declaring 20000x20000 pixels, one at the pixel limit referenced 40 times (over the sample budget), NaN /
infinite / 0-length / 2-hour audio, invalid UTF-8, malformed and 3000-deep JSON lines, a role given as a list
(all skipped, each for its own reason) and odd but valid samples -- 16-bit, CMYK, palette, RGBA and 1x1 images;
8 / 44.1 / 48 kHz, stereo, 6-channel and silent audio; user text with literal `<image>` / `<audio>`; a
conversation that opens with an assistant turn (all trained on). `mmpeft.training.run` (what recipes/finetune.py
runs) trains one epoch over it with `--on_bad_sample skip`, so every kept sample is trained on once. The run prints
samples read, trained on and skipped by reason, and exits non-zero unless read == trained on + skipped and every
case ended where it should.
"""

import argparse
import io
import json
import os
import random
import re
import struct
import sys
import zlib
from collections import Counter

import numpy as np
import soundfile
from PIL import Image

from mmpeft.data import generate_synthetic_dataset
from mmpeft.training import configure_logging, parse_args, run


KEPT = "trained on"
TRUNCATED_IMAGE = r"cannot decode image: the file is truncated"
EMPTY = r"file is empty \(0 bytes\): .*"
NOT_A_FILE = r"not a file: .*"
OUTSIDE = r"media path .* is outside the data folder .*"
NON_FINITE = r"audio contains NaN or infinite samples"
# case -> what the recipe must do with its sample: train on it, or skip it for a reason matching this regex
# (the report's reason, which starts with the field when there is one).
CASES = {
    "truncated PNG": rf"messages\[0\]\.content\[0\]: {TRUNCATED_IMAGE}",
    "truncated JPEG": rf"messages\[0\]\.content\[0\]: {TRUNCATED_IMAGE}",
    "truncated FLAC": r"messages\[0\]\.content\[0\]: cannot decode audio: .*",
    "zero-byte image": rf"messages\[0\]\.content\[0\]: {EMPTY}",
    "zero-byte audio": rf"messages\[0\]\.content\[0\]: {EMPTY}",
    "directory as image": rf"messages\[0\]\.content\[0\]: {NOT_A_FILE}",
    "directory as audio": rf"messages\[0\]\.content\[0\]: {NOT_A_FILE}",
    "../../etc/passwd": rf"messages\[0\]\.content\[0\]: {OUTSIDE}",
    "absolute path": rf"messages\[0\]\.content\[0\]: {OUTSIDE}",
    "20000x20000 image": r"messages\[0\]\.content\[0\]: image is over the limit of \d+ pixels, refused before .*",
    "NaN audio": rf"messages\[0\]\.content\[0\]: {NON_FINITE}",
    "infinite audio": rf"messages\[0\]\.content\[0\]: {NON_FINITE}",
    "0-length audio": r"messages\[0\]\.content\[0\]: audio is empty \(0 samples\)",
    "2-hour audio": r"longer than max_length",
    "invalid UTF-8": r"invalid UTF-8 at byte \d+ of the line",
    "malformed JSON": r"malformed JSON line: Expecting .*",
    "path given as image bytes": r"messages\[0\]\.content\[0\]: 'bytes' must hold the encoded file, got str .*",
    "image URL (remote media off)": r"messages\[0\]\.content\[0\]: media URL .* refused: remote media are off .*",
    "file:// URL": r"messages\[0\]\.content\[0\]: unsupported URL scheme in .*",
    "link out of the data folder": rf"messages\[0\]\.content\[0\]: {OUTSIDE}",
    "40 x one 8192x8192 image": r"40 images of \d+ pixels in all are over the sample budget of \d+ pixels .*",
    "JSON nested 3000 deep": r"malformed JSON line: nested too deeply to parse",
    "role given as a list": r"messages\[0\]: unknown or missing role .*",
    "16-bit image": KEPT,
    "CMYK image": KEPT,
    "palette image": KEPT,
    "RGBA image": KEPT,
    "1x1 image": KEPT,
    "8 kHz audio": KEPT,
    "44.1 kHz stereo audio": KEPT,
    "48 kHz 6-channel audio": KEPT,
    "silent audio": KEPT,
    "<image> / <audio> in user text": KEPT,
    "opens with an assistant turn": KEPT,
}


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.repeat((0.3 * np.sin(2 * np.pi * 440 * t))[:, None], channels, axis=1).astype(np.float32)


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height (RGB) with a few hundred bytes of pixel data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 256))


def write_hostile_samples(folder: str, long_audio_rate: int) -> dict:
    """Write the media of every case in `CASES` under `folder/media/hostile` and return case -> JSONL line."""
    media = os.path.join(folder, "media", "hostile")
    os.makedirs(media, exist_ok=True)

    def file(name: str, data: bytes | None = None) -> str:
        if data is not None:
            with open(os.path.join(media, name), "wb") as handle:
                handle.write(data)
        return f"media/hostile/{name}"

    def ask(kind: str, source, question: str = "What is it?") -> str:
        content = [{"type": kind, kind: source}, {"type": "text", "text": question}]
        return json.dumps({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "x"}]})

    def audio(name: str, samples: np.ndarray, rate: int, **kwargs) -> str:
        soundfile.write(os.path.join(media, name), samples, rate, **kwargs)
        return file(name)

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    png, jpeg = _encoded(noise, "PNG"), _encoded(noise, "JPEG")
    flac = io.BytesIO()
    soundfile.write(flac, _tone(1.0, 16000), 16000, format="FLAC")
    nan, inf = _tone(0.5, 16000), _tone(0.5, 16000, 2)
    nan[100], inf[200, 1] = np.nan, np.inf
    os.makedirs(os.path.join(media, "folder.png"), exist_ok=True)
    if not os.path.lexists(os.path.join(media, "link.png")):
        os.symlink("/etc/passwd", os.path.join(media, "link.png"))
    os.makedirs(os.path.join(media, "folder.wav"), exist_ok=True)
    palette = Image.new("P", (30, 20), 1)
    palette.putpalette([0, 0, 0, 30, 170, 40] + [0] * 762)
    with soundfile.SoundFile(os.path.join(media, "two_hours.wav"), "w", long_audio_rate, 1, "PCM_16") as handle:
        minute = _tone(60, long_audio_rate)
        for _ in range(120):  # a real 2-hour recording, written a minute at a time
            handle.write(minute)

    return {
        "truncated PNG": ask("image", file("truncated.png", png[: len(png) // 2])),
        "truncated JPEG": ask("image", file("truncated.jpg", jpeg[: len(jpeg) // 2])),
        "truncated FLAC": ask("audio", file("truncated.flac", flac.getvalue()[: len(flac.getvalue()) // 2])),
        "zero-byte image": ask("image", file("empty.png", b"")),
        "zero-byte audio": ask("audio", file("empty.wav", b"")),
        "directory as image": ask("image", file("folder.png")),
        "directory as audio": ask("audio", file("folder.wav")),
        "../../etc/passwd": ask("image", "../../etc/passwd"),
        "absolute path": ask("audio", "/etc/passwd"),
        "20000x20000 image": ask("image", file("bomb.png", _png_header_only(20000, 20000))),
        "NaN audio": ask("audio", audio("nan.wav", nan, 16000, subtype="FLOAT")),
        "infinite audio": ask("audio", audio("inf.wav", inf, 16000, subtype="FLOAT")),
        "0-length audio": ask("audio", audio("zero_length.wav", np.zeros((0, 1), np.float32), 16000)),
        "2-hour audio": ask("audio", file("two_hours.wav")),
        "invalid UTF-8": b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',
        "malformed JSON": b'{"messages": [{"role": "user", "content": "hi"}',
        "path given as image bytes": ask("image", {"bytes": "/etc/passwd"}),
        "image URL (remote media off)": ask("image", "http://169.254.169.254/latest/meta-data/"),
        "file:// URL": ask("audio", "file:///etc/passwd"),
        "link out of the data folder": ask("image", file("link.png")),
        "40 x one 8192x8192 image": json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "path": file("max.png", _png_header_only(8192, 8192))}] * 40,
                    },
                    {"role": "assistant", "content": "x"},
                ]
            }
        ),
        "JSON nested 3000 deep": b'{"messages": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        "role given as a list": json.dumps(
            {"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "x"}]}
        ),
        "16-bit image": ask(
            "image", file("grey16.png", _encoded(Image.fromarray(np.full((20, 30), 40000, np.uint16)), "PNG"))
        ),
        "CMYK image": ask("image", file("cmyk.jpg", _encoded(Image.new("CMYK", (30, 20), (0, 200, 200, 0)), "JPEG"))),
        "palette image": ask("image", file("palette.png", _encoded(palette, "PNG", transparency=0))),
        "RGBA image": ask("image", file("rgba.png", _encoded(Image.new("RGBA", (30, 20), (200, 0, 0, 100)), "PNG"))),
        "1x1 image": ask("image", file("pixel.png", _encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"))),
        "8 kHz audio": ask("audio", audio("8k.wav", _tone(0.5, 8000), 8000)),
        "44.1 kHz stereo audio": ask("audio", audio("44k.wav", _tone(0.5, 44100, 2), 44100)),
        "48 kHz 6-channel audio": ask("audio", audio("48k.flac", _tone(0.5, 48000, 6), 48000)),
        "silent audio": ask("audio", audio("silence.wav", np.zeros((8000, 2), np.int16), 16000)),
        "<image> / <audio> in user text": json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Is <image> an image? And <audio>?"},
                    {"role": "assistant", "content": "no"},
                ]
            }
        ),
        "opens with an assistant turn": json.dumps(
            {
                "messages": [
                    {"role": "assistant", "content": "Hello! Ask me about an image or a sound."},
                    {"role": "user", "content": "What is 2 + 2?"},
                    {"role": "assistant", "content": "4"},
                ]
            }
        ),
    }


def write_stress_dataset(folder: str, num_good: int, long_audio_rate: int = 8000, seed: int = 0):
    """`folder/stress.jsonl`: `num_good` generated samples and every case of `CASES`, shuffled. Returns its path
    and `{where: case}` for each line ("good" for the generated ones)."""
    good = generate_synthetic_dataset(folder, num_train=num_good, num_eval=0, seed=seed)["train"]
    with open(good, "rb") as handle:
        lines = [("good", line.rstrip(b"\n")) for line in handle if line.strip()]
    hostile = write_hostile_samples(folder, long_audio_rate)
    lines += [(case, line if isinstance(line, bytes) else line.encode()) for case, line in hostile.items()]
    random.Random(seed).shuffle(lines)
    path = os.path.join(folder, "stress.jsonl")
    with open(path, "wb") as handle:
        handle.write(b"".join(line + b"\n" for _, line in lines))
    return path, {f"{path}:{number}": case for number, (case, _) in enumerate(lines, start=1)}


def account(cases: dict, report: dict, trained: list[str]) -> tuple[dict, list[str]]:
    """Check every sample against its case. Returns `{"read", "trained on", "skipped", "by reason"}` and a list
    of problems (empty when every sample is accounted for)."""
    problems = []
    counts = {"read": report["read"], KEPT: len(trained), "skipped": report["skipped"], "by reason": report["reasons"]}
    if report["read"] != len(cases):
        problems.append(f"read {report['read']} samples but the dataset has {len(cases)}")
    if report["read"] != len(trained) + report["skipped"]:
        problems.append(f"read {report['read']} != trained on {len(trained)} + skipped {report['skipped']}")
    expected_kept = sorted(where for where, case in cases.items() if case == "good" or CASES[case] == KEPT)
    if sorted(trained) != expected_kept:
        missing, extra = set(expected_kept) - set(trained), set(trained) - set(expected_kept)
        problems.append(f"trained on the wrong samples: missing {sorted(missing)}, unexpected {sorted(extra)}")
    # Each reason counts exactly the cases that call for it, and named the right lines.
    expected = Counter(CASES[case] for case in cases.values() if case != "good" and CASES[case] != KEPT)
    observed = Counter()
    for reason, count in report["reasons"].items():
        patterns = [p for p in expected if re.fullmatch(p, reason, flags=re.DOTALL)]
        if not patterns:
            problems.append(f"unexpected skip reason: {count} x {reason!r}")
            continue
        observed[patterns[0]] += count
        for where in report["where"][reason]:
            if not re.fullmatch(CASES.get(cases[where], ""), reason, flags=re.DOTALL):
                problems.append(f"{where} ({cases[where]}) skipped for {reason!r}")
    for pattern, count in expected.items():
        if observed[pattern] != count:
            problems.append(f"{observed[pattern]} samples skipped for {pattern!r}, expected {count}")
    return counts, problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/stress", help="data in <output_dir>/data, run in /run")
    parser.add_argument("--num_good", type=int, default=48, help="generated good samples mixed in")
    parser.add_argument("--long_audio_rate", type=int, default=8000, help="sampling rate of the 2-hour WAV")
    args, overrides = parser.parse_known_args(argv)
    data_path, cases = write_stress_dataset(os.path.join(args.output_dir, "data"), args.num_good, args.long_audio_rate)

    run_dir = os.path.join(args.output_dir, "run")
    model_args, data_args, tuning_args, training_args, _ = parse_args(
        ["--train_data", data_path, "--on_bad_sample", "skip", "--output_dir", run_dir,
         "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--warmup_steps", "0",
         "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
         *overrides]
    )  # fmt: skip
    configure_logging(training_args)
    trainer = run(model_args, data_args, tuning_args, training_args).trainer
    with open(os.path.join(run_dir, "data_report.json")) as handle:
        report = json.load(handle)[data_path]
    trained = list(trainer.train_dataset.rows["where"])
    counts, problems = account(cases, report, trained)

    odd = sum(1 for where in trained if cases[where] != "good")
    print(f"\nmmpeft stress | {data_path}")
    print(
        f"  read {counts['read']} | trained on {counts[KEPT]} ({counts[KEPT] - odd} generated + {odd} odd but valid; "
        f"{trainer.state.global_step} steps) | skipped {counts['skipped']}:"
    )
    for reason, count in sorted(counts["by reason"].items(), key=lambda item: (-item[1], item[0])):
        print(f"  - {count} x {reason}")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    print("  every sample accounted for" if not problems else f"  {len(problems)} problem(s)")
    return {**counts, "problems": problems, "cases": cases, "trainer": trainer}


if __name__ == "__main__":
    sys.exit(1 if main()["problems"] else 0)
