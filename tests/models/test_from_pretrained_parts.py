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


def test_new_encoder_family_is_one_row(parts, tmp_path, monkeypatch):
    # DeiT (a CLS and a distillation token before its patches) and Moonshine (an encoder-decoder, like Whisper, but
    # reading the waveform) are in transformers and not in the registries: one row each, and they compose.
    from tiny_parts import AUDIO_PREPROCESSORS, image_processor
    from transformers import DeiTConfig, DeiTModel, MoonshineConfig, MoonshineForConditionalGeneration

    from mmpeft.models import modeling_mmpeft
    from mmpeft.models.configuration_mmpeft import AUDIO_ENCODERS, VISION_ENCODERS, EncoderSpec

    monkeypatch.setitem(
        VISION_ENCODERS, "deit", EncoderSpec(prefix_tokens=lambda config: 2, unused_parts=("layernorm", "pooler"))
    )
    monkeypatch.setitem(
        AUDIO_ENCODERS,
        "moonshine",
        EncoderSpec(
            downsampling=lambda config: [(127, 64, 0), (7, 3, 0), (3, 2, 0)],  # conv1-3 of MoonshineEncoder
            dummy_input_shape=lambda config: (1, 16000),
            encoder_class=("transformers.models.moonshine.modeling_moonshine", "MoonshineEncoder"),
            encoder_prefix="model.encoder.",
        ),
    )
    root, _ = parts
    torch.manual_seed(0)
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    deit = DeiTModel(DeiTConfig(**vit, image_size=32, patch_size=8))
    deit.save_pretrained(tmp_path / "deit")
    image_processor().save_pretrained(tmp_path / "deit")
    moonshine = MoonshineForConditionalGeneration(
        MoonshineConfig(
            hidden_size=32,
            intermediate_size=64,
            encoder_num_hidden_layers=1,
            decoder_num_hidden_layers=1,
            encoder_num_attention_heads=2,
            decoder_num_attention_heads=2,
            vocab_size=100,
        )
    )
    moonshine.save_pretrained(tmp_path / "moonshine")
    AUDIO_PREPROCESSORS["wav2vec2"]().save_pretrained(tmp_path / "moonshine")

    model, processor = MMPeftForConditionalGeneration.from_pretrained_parts(
        text=root / "lm",
        vision=tmp_path / "deit",
        audio=tmp_path / "moonshine",
        vision_feature_select_strategy="full",
    )
    assert type(model.audio_tower).__name__ == "MoonshineEncoder"  # the encoder only, with its weights
    assert_same_weights(model.audio_tower, moonshine.model.encoder)
    assert_same_weights(model.vision_tower, deit)
    assert not any(name.startswith(("layernorm", "pooler")) for name in model.vision_tower.state_dict())

    # Token counts: the prefix tokens of the row, and the downsampling of the row against the encoder's output.
    images, clips = media(0, num_images=1, audio_seconds=(0.6,))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=images, audio=clips, return_tensors="pt")
    assert model.config.num_image_tokens == (32 // 8) ** 2 + 2
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == model.config.num_image_tokens
    with torch.no_grad():
        frames = model.audio_tower(inputs["input_values"]).last_hidden_state.shape[1]
    assert int((inputs["input_ids"] == model.config.audio_token_id).sum()) == frames > 0

    model.train()
    outputs = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    for part in ("vision_tower", "audio_tower"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, part).parameters()), part

    # Idle towers (as in multi-process training) run on the row's dummy input.
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(modeling_mmpeft, "_is_multi_process", lambda: True)
    text_only = processor(text=["hello"], return_tensors="pt")
    model(**text_only, labels=text_only["input_ids"]).loss.backward()
    for part in ("vision_tower", "audio_tower"):
        assert all(p.grad is not None for p in getattr(model, part).parameters() if p.requires_grad), part


@pytest.mark.parametrize("audio", ["whisper", "wav2vec2"])
def test_no_split_modules_are_the_layers_of_the_parts(parts, audio, tmp_path):
    # What device maps keep whole and FSDP shards layer by layer: taken from the parts the model was composed of,
    # the same built from its config and reloaded, and read by accelerate's FSDP2 auto-wrap policy as it is.
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    root, _ = parts
    model, _ = MMPeftForConditionalGeneration.from_pretrained_parts(
        text=root / "lm", vision=root / "clip", audio=root / audio
    )
    # Wav2Vec2Model declares no `_no_split_modules`: its layers are found as the layers transformers checkpoints.
    audio_layers = {
        "whisper": {"WhisperEncoderLayer"},
        "wav2vec2": {"Wav2Vec2EncoderLayer", "Wav2Vec2GroupNormConvLayer", "Wav2Vec2NoLayerNormConvLayer"},
    }[audio]
    # Not CLIP's text embeddings nor Whisper's decoder layers, which the parts name but the model does not hold.
    expected = {"Qwen2DecoderLayer", "CLIPEncoderLayer", "CLIPVisionEmbeddings"} | audio_layers
    assert model._no_split_modules == expected
    model.save_pretrained(tmp_path)
    assert MMPeftForConditionalGeneration.from_pretrained(tmp_path)._no_split_modules == expected
    assert MMPeftForConditionalGeneration(model.config)._no_split_modules == expected

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert {type(model.get_submodule(name)).__name__ for name in wrapped} == expected
