"""`from_pretrained_parts` on tiny parts saved locally the way they are published on the Hub."""

import pytest
import torch
from tiny_parts import media

from mmpeft import MMPeftForConditionalGeneration, MMPeftProcessor


def assert_same_weights(module, reference):
    expected = reference.state_dict()
    got = module.state_dict()
    assert set(got) <= set(expected), set(got) - set(expected)
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("audio", ["whisper", "wav2vec2"])
def test_parts_keep_their_weights(parts, audio, tmp_path):
    root, originals = parts
    model, processor = MMPeftForConditionalGeneration.from_pretrained_parts(
        text=root / "lm",
        vision=root / "clip",
        audio=root / audio,
        vision_token_reduction="avg_pool",
        audio_frames_per_token=4,
    )
    assert isinstance(processor, MMPeftProcessor)
    assert_same_weights(model.vision_tower, originals["clip"].vision_model)
    audio_reference = originals["whisper"].model.encoder if audio == "whisper" else originals["wav2vec2"]
    assert_same_weights(model.audio_tower, audio_reference)

    # The LM keeps its weights; its embeddings grew by the four new tokens.
    tokenizer = processor.tokenizer
    for token in ("<image>", "<audio>", "<|im_start|>", "<|im_end|>"):
        assert token in tokenizer.get_vocab()
    lm, original = model.language_model, originals["lm"]
    old_vocab = original.get_input_embeddings().num_embeddings
    assert lm.get_input_embeddings().num_embeddings == len(tokenizer) == old_vocab + 4
    assert torch.equal(lm.get_input_embeddings().weight[:old_vocab], original.get_input_embeddings().weight)
    for name, tensor in original.state_dict().items():
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(lm.state_dict()[name], tensor), name
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert model.generation_config.eos_token_id[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")

    # The composite runs and round-trips through save / from_pretrained.
    model.eval()
    images, clips = media(0, num_images=1, audio_seconds=(0.8,))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=images, audio=clips, return_tensors="pt")
    expected = model(**inputs).logits
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = MMPeftForConditionalGeneration.from_pretrained(tmp_path).eval()
    reloaded_inputs = MMPeftProcessor.from_pretrained(tmp_path)(
        text=[text], images=images, audio=clips, return_tensors="pt"
    )
    assert torch.equal(reloaded(**reloaded_inputs).logits, expected)


def test_text_and_one_modality(parts):
    root, _ = parts
    model, processor = MMPeftForConditionalGeneration.from_pretrained_parts(text=root / "lm", audio=root / "whisper")
    assert model.vision_tower is None and model.config.vision_config is None
    assert "<image>" not in processor.tokenizer.get_vocab()
    _, clips = media(0, num_images=0, audio_seconds=(0.5,))
    inputs = processor(text=["<audio> hi"], audio=clips, return_tensors="pt")
    assert torch.isfinite(model(**inputs).logits).all()
