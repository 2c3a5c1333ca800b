import numpy as np
import pytest
import torch
from tiny_parts import build, media
from transformers import AutoProcessor

from mmpeft import MMPeftProcessor, num_audio_tokens


def test_chat_template_renders_content_parts(tok):
    _, processor = build(tok=tok)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "audio"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>and<audio><|im_end|>\n"
        "<|im_start|>assistant\na red circle<|im_end|>\n"
    )
    assert processor.apply_chat_template(messages[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_placeholders_expand_to_exact_token_counts(tok):
    model, processor = build(audio_frames_per_token=2, tok=tok)
    images, audio = media(0, num_images=3, audio_seconds=(0.3, 0.95, 2.5))
    texts = ["<image><audio> first <image>", "<audio><image> second <audio>"]
    inputs = processor(text=texts, images=images, audio=audio, padding=True, return_tensors="pt")
    image_id, audio_id = processor.image_token_id, processor.audio_token_id
    assert (inputs["input_ids"] == image_id).sum(-1).tolist() == [2 * 16, 16]  # 32px / 8px patches -> 4x4 grid
    # Whisper window is 1 s: 0.3 s and 0.95 s are one chunk each, 2.5 s is three.
    frames = [30, 95, 84, 84, 84]  # ceil(samples / hop 160)
    per_chunk = [num_audio_tokens(f, model.config.audio_downsampling, 2) for f in frames]
    assert inputs["feature_attention_mask"].sum(-1).tolist() == frames
    assert (inputs["input_ids"] == audio_id).sum(-1).tolist() == [per_chunk[0], per_chunk[1] + sum(per_chunk[2:])]
    # The processor's count and the model's agree, so the model accepts the batch as it is.
    assert torch.isfinite(model(**inputs).logits).all()


def test_placeholder_and_media_count_mismatch(tok):
    _, processor = build(tok=tok)
    images, audio = media(0, num_images=2, audio_seconds=(0.5,))
    with pytest.raises(ValueError, match=r"Found total 1 <image> tokens and 2 images"):
        processor(text=["<image><audio>"], images=images, audio=audio)
    with pytest.raises(ValueError, match=r"Found 1 <audio> tokens in the text but no audio"):
        processor(text=["<image><audio>"], images=images[:1])


def test_bad_audio_is_refused_with_its_index(tok):
    _, processor = build(vision=None, tok=tok)
    with pytest.raises(ValueError, match=r"audio 1: expected a non-empty mono waveform .*\(2, 800\)"):
        processor(text=["<audio><audio>"], audio=[np.zeros(800, np.float32), np.zeros((2, 800), np.float32)])
    with pytest.raises(ValueError, match=r"audio 0: expected a non-empty mono waveform"):
        processor(text=["<audio>"], audio=[np.zeros(0, np.float32)])


def test_waveform_audio_inputs(tok):
    model, processor = build(vision=None, audio="wav2vec2", audio_frames_per_token=4, tok=tok)
    _, audio = media(0, num_images=0, audio_seconds=(0.2, 0.7))
    inputs = processor(text=["<audio>", "<audio> longer"], audio=audio, padding=True, return_tensors="pt")
    assert set(inputs) >= {"input_values", "input_values_mask"}
    assert inputs["input_values_mask"].sum(-1).tolist() == [3200, 11200]
    expected = [num_audio_tokens(n, model.config.audio_downsampling, 4) for n in (3200, 11200)]
    assert (inputs["input_ids"] == processor.audio_token_id).sum(-1).tolist() == expected
    assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("vision,audio", [("siglip", "whisper"), (None, "whisper"), ("clip", None), (None, None)])
def test_save_load_roundtrip(vision, audio, tmp_path, tok):
    _, processor = build(vision=vision, audio=audio, tok=tok)
    processor.save_pretrained(tmp_path)
    for loaded in (MMPeftProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, MMPeftProcessor)
        assert (getattr(loaded, "image_processor", None) is None) == (vision is None)
        assert (getattr(loaded, "feature_extractor", None) is None) == (audio is None)
        assert loaded.chat_template == processor.chat_template
        assert loaded.image_seq_length == processor.image_seq_length
        assert loaded.audio_downsampling == processor.audio_downsampling
        images, clips = media(2, num_images=1 if vision else 0, audio_seconds=(0.4,) if audio else ())
        text = "".join(["<image>"] * len(images) + ["<audio>"] * len(clips)) + " hello"
        kwargs = dict(text=[text], images=images or None, audio=clips or None, return_tensors="pt")
        expected, got = processor(**kwargs), loaded(**kwargs)
        assert set(expected) == set(got)
        for key in expected:
            assert torch.equal(expected[key], got[key]), key


def test_processor_from_its_components_alone(tok):
    from tiny_parts import AUDIO_PREPROCESSORS, image_processor

    processor = MMPeftProcessor(
        image_processor=image_processor(), feature_extractor=AUDIO_PREPROCESSORS["whisper"](), tokenizer=tok
    )
    assert processor(text=["no media here"], return_tensors="pt")["input_ids"].shape[0] == 1
    images, audio = media(0, num_images=1, audio_seconds=(0.5,))
    with pytest.raises(ValueError, match=r"no `image_seq_length`.*image_seq_length=config.num_image_tokens"):
        processor(text=["<image>"], images=images)
    with pytest.raises(ValueError, match=r"no `audio_downsampling`.*audio_downsampling=config.audio_downsampling"):
        processor(text=["<audio>"], audio=audio)


def test_num_multimodal_tokens_match_the_processed_inputs(tok):
    _, processor = build(audio_frames_per_token=2, tok=tok)
    images, audio = media(0, num_images=2, audio_seconds=(0.3, 2.5))  # the second clip is chunked
    counts = processor._get_num_multimodal_tokens(
        image_sizes=[image.size[::-1] for image in images], audio_lengths=[len(clip) for clip in audio]
    )
    inputs = processor(text=["<image><image>", "<audio>", "<audio>"], images=images, audio=audio)
    per_text = [
        [ids.count(processor.image_token_id), ids.count(processor.audio_token_id)] for ids in inputs["input_ids"]
    ]
    assert counts.num_image_tokens == [per_text[0][0] // 2] * 2 and counts.num_image_patches == [1, 1]
    assert counts.num_audio_tokens == [per_text[1][1], per_text[2][1]]
    assert "num_video_tokens" not in counts


def test_apply_chat_template_loads_audio_by_path(tmp_path, tok):
    import soundfile

    _, processor = build(vision=None, tok=tok)
    clip = (0.1 * np.random.default_rng(0).standard_normal(4000)).astype(np.float32)
    soundfile.write(tmp_path / "clip.wav", clip, 8000)  # half the extractor's rate: resampled (soxr) on loading
    messages = [{"role": "user", "content": [{"type": "audio", "path": str(tmp_path / "clip.wav")}]}]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    tokens = int((inputs["input_ids"] == processor.audio_token_id).sum())
    assert tokens == processor.num_audio_tokens_for_samples(8000) > 0
    assert inputs["feature_attention_mask"].sum() == 8000 // 160
