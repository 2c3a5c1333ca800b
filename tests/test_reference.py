import hashlib
import os
import subprocess
import sys

import torch

from mmpeft import MMPeftForConditionalGeneration, MMPeftProcessor
from mmpeft.reference import build_reference_checkpoint


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digest(directory):
    return {
        name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(directory))
    }


def test_builder_is_deterministic_small_and_complete(reference_dir, tmp_path):
    # The command-line builder gives the very same files as the library function.
    subprocess.run(
        [sys.executable, os.path.join(REPO, "hub", "build_reference.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    assert digest(tmp_path) == digest(reference_dir)
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "processor_config.json",
        "modeling_mmpeft.py",
    } <= set(os.listdir(reference_dir))
    size = sum(os.path.getsize(os.path.join(reference_dir, n)) for n in os.listdir(reference_dir))
    assert 1e6 < size < 10e6
    model = MMPeftForConditionalGeneration.from_pretrained(reference_dir)
    assert model.vision_tower is not None and model.audio_tower is not None
    assert build_reference_checkpoint(tmp_path / "other_seed", seed=1) and digest(tmp_path / "other_seed") != digest(
        reference_dir
    )


def test_tokenizer_is_byte_level(reference_dir):
    tokenizer = MMPeftProcessor.from_pretrained(reference_dir).tokenizer
    text = "Zebra-Quagga 42 naïve café — 漢字 😀 \t\n ÿ"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    # Placeholders and turn markers are single tokens.
    for token in ("<image>", "<audio>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1


def test_reference_generates_from_image_audio_text(reference_dir):
    import numpy as np
    from PIL import Image

    model = MMPeftForConditionalGeneration.from_pretrained(reference_dir).eval()
    processor = MMPeftProcessor.from_pretrained(reference_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "What?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.new("RGB", (64, 48), "red")
    audio = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
    inputs = processor(text=[text], images=[image], audio=[audio], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_random_towers_keep_what_the_synthetic_questions_ask():
    """A frozen random tower must still carry the information the embedded task asks about:
    the pitch of a tone and the shape in an image, recoverable by a linear probe on the features."""
    import numpy as np

    from mmpeft.data.synthetic import COLOURS, SHAPES, beeps, draw_shape
    from mmpeft.reference import build_reference_model

    model, processor = build_reference_model()
    rng = np.random.default_rng(0)

    def linear_probe_accuracy(features, labels, train=0.75):
        """Held-out accuracy of a ridge-regression classifier (one-vs-rest) on the raw features: a weak
        direction (tiny variance) is regularised away here as it is hard to find for training."""
        features = np.hstack([features, np.ones((len(features), 1))])
        cut = int(len(labels) * train)
        targets = np.eye(labels.max() + 1)[labels[:cut]]
        x = features[:cut]
        weights = np.linalg.solve(x.T @ x + 1.0 * np.eye(x.shape[1]), x.T @ targets)
        return float(np.mean((features[cut:] @ weights).argmax(1) == labels[cut:]))

    pitches = np.array([i % 2 for i in range(160)])
    clips = [beeps(rng, int(rng.integers(1, 5)), ("low", "high")[p]) for p in pitches]
    audio, _ = processor.process_audio(clips)
    with torch.no_grad():
        hidden = model.audio_tower(torch.from_numpy(audio["input_features"])).last_hidden_state
    valid = torch.from_numpy(audio["feature_attention_mask"]).sum(-1) // 2
    pooled = torch.stack([h[:n].mean(0) for h, n in zip(hidden, valid)]).numpy()
    assert linear_probe_accuracy(pooled, pitches) >= 0.9

    shapes = np.array([i % 3 for i in range(240)])
    images = [draw_shape(rng, str(rng.choice(list(COLOURS))), SHAPES[s]) for s in shapes]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = (
            model.get_image_features(pixels).pooler_output.flatten(1).numpy()
        )  # through the random projector too
    assert linear_probe_accuracy(features, shapes) >= 0.6
