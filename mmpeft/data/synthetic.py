"""The embedded synthetic dataset: coloured shapes and beep patterns, written as ordinary files.

It is generated deterministically, offline, in seconds, as PNG + WAV files and `messages` JSONL, so that the
recipe reads it exactly as it reads a user's dataset. Question families (the `task` field):

- `image`: the colour or the shape of one centred, large shape (`red`, `circle`, ...);
- `audio`: the number of beeps (`one` .. `four`) or whether the tone is `high` or `low`;
- `image+audio`: the colour of the shape and the pitch of the tone together (`red, high`);
- `text`: counting without media (`What number comes after two?` -> `three`), mixed in as text-only samples.

Each question is answerable from what a tiny random-init tower still sees: colour and coarse layout of an
image, energy over time and frequency band of a sound (fine visual detail at random positions is not).
"""

import json
import os

import numpy as np
import soundfile
from PIL import Image, ImageDraw


COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PITCHES = {"low": 400.0, "high": 1600.0}  # Hz, +-10 % per clip
SAMPLING_RATE = 16000
IMAGE_SIZE = 48

QUESTIONS = {
    "colour": ["What colour is the shape?", "Which colour does the shape have?"],
    "shape": ["What shape is in the image?", "Which shape do you see?"],
    "beeps": ["How many beeps do you hear?", "Count the beeps in the audio."],
    "pitch": ["Is the tone high or low?", "Is the pitch of the beeps high or low?"],
    "colour+pitch": ["What colour is the shape, and is the tone high or low?"],
    "next": ["What number comes after {n}?", "Which number follows {n}?"],
}
# task -> (question kinds, share of samples)
FAMILIES = {
    "image": (("colour", "shape"), 0.35),
    "audio": (("beeps", "pitch"), 0.35),
    "image+audio": (("colour+pitch",), 0.2),
    "text": (("next",), 0.1),
}
VERSION = 1  # bump when the generator changes, so cached copies are rebuilt


def draw_shape(rng: np.random.Generator, colour: str, shape: str) -> Image.Image:
    """A centred (+-3 px), large (50-75 % of the side) shape on a light, noisy background."""
    background = rng.integers(200, 256, (IMAGE_SIZE, IMAGE_SIZE, 1)) + rng.integers(-8, 9, (IMAGE_SIZE, IMAGE_SIZE, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    half = rng.uniform(0.25, 0.375) * IMAGE_SIZE
    cx, cy = IMAGE_SIZE / 2 + rng.uniform(-3, 3, 2)
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=COLOURS[colour])
    return image


def beeps(rng: np.random.Generator, count: int, pitch: str) -> np.ndarray:
    """`count` beeps of 0.15-0.2 s with 0.15-0.2 s gaps at a `pitch` tone, after 0.05-0.2 s of quiet."""
    frequency = PITCHES[pitch] * rng.uniform(0.9, 1.1)
    beep, gap = rng.uniform(0.15, 0.2), rng.uniform(0.15, 0.2)
    lead = rng.uniform(0.05, 0.2)
    duration = lead + count * (beep + gap)
    t = np.arange(int(duration * SAMPLING_RATE)) / SAMPLING_RATE
    envelope = np.zeros_like(t)
    for k in range(count):
        start = lead + k * (beep + gap)
        envelope[(t >= start) & (t < start + beep)] = 1.0
    audio = rng.uniform(0.3, 0.6) * envelope * np.sin(2 * np.pi * frequency * t)
    return (audio + rng.normal(0, 0.01, t.shape)).astype(np.float32)


def _sample(rng: np.random.Generator, index: int, media_dir: str, split: str) -> dict:
    task = rng.choice(list(FAMILIES), p=[share for _, share in FAMILIES.values()])
    kind = rng.choice(FAMILIES[task][0])
    question = rng.choice(QUESTIONS[kind])
    content = []
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    count, pitch = int(rng.integers(1, 5)), rng.choice(list(PITCHES))
    if task in ("image", "image+audio"):
        name = f"{split}-{index:05d}.png"
        draw_shape(rng, colour, shape).save(os.path.join(media_dir, name))
        content.append({"type": "image", "path": f"media/{name}"})
    if task in ("audio", "image+audio"):
        name = f"{split}-{index:05d}.wav"
        soundfile.write(os.path.join(media_dir, name), beeps(rng, count, pitch), SAMPLING_RATE)
        content.append({"type": "audio", "path": f"media/{name}"})
    n = int(rng.integers(0, 10))
    answer = {
        "colour": colour,
        "shape": shape,
        "beeps": NUMBERS[count],
        "pitch": pitch,
        "colour+pitch": f"{colour}, {pitch}",
        "next": NUMBERS[n + 1],
    }[kind]
    content.append({"type": "text", "text": question.format(n=NUMBERS[n])})
    return {
        "task": task,
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
    }


def generate_synthetic_dataset(output_dir: str, num_train: int = 3000, num_eval: int = 300, seed: int = 0) -> dict:
    """Write `train.jsonl`, `eval.jsonl` and `media/` to `output_dir` (reused if already generated with the
    same settings) and return `{"train": path, "eval": path}`."""
    settings = {"version": VERSION, "num_train": num_train, "num_eval": num_eval, "seed": seed}
    paths = {split: os.path.join(output_dir, f"{split}.jsonl") for split in ("train", "eval")}
    info_path = os.path.join(output_dir, "info.json")
    if os.path.exists(info_path) and json.load(open(info_path)) == settings:
        return paths
    media_dir = os.path.join(output_dir, "media")
    os.makedirs(media_dir, exist_ok=True)
    for split, size, split_seed in (("train", num_train, seed), ("eval", num_eval, seed + 1)):
        rng = np.random.default_rng(split_seed)
        with open(paths[split], "w") as file:
            for index in range(size):
                file.write(json.dumps(_sample(rng, index, media_dir, split)) + "\n")
    with open(info_path, "w") as file:  # written last: its presence means the dataset is complete
        json.dump(settings, file)
    return paths


__all__ = ["generate_synthetic_dataset", "draw_shape", "beeps"]
