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
    subprocess.run([sys.executable, os.path.join(REPO, "hub", "build_reference.py"), str(tmp_path)], check=True,
                   capture_output=True)
    assert digest(tmp_path) == digest(reference_dir)
    assert {"model.safetensors", "config.json", "tokenizer.json", "processor_config.json", "modeling_mmpeft.py"} <= set(
        os.listdir(reference_dir)
    )
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
