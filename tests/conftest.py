import os
import sys
import tempfile


# Tests never touch the network (those that test the Hub point HF_ENDPOINT at a server they start).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The reference checkpoint and the synthetic dataset are built into a fresh cache, never the user's; nor do the
# user's own W&B folder, project or HF cache reach the tests (tests/test_hermetic.py runs tests with them set).
os.environ["MMPEFT_CACHE"] = tempfile.mkdtemp(prefix="mmpeft-test-cache-")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mmpeft-test-hf-home-")
for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_TAGS", "HF_DATASETS_CACHE", "HF_HUB_CACHE"):
    os.environ.pop(name, None)
sys.path.insert(0, os.path.dirname(__file__))  # tiny_parts

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tok():
    from tiny_parts import tokenizer

    return tokenizer()


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory):
    """The reference checkpoint, built once per session."""
    from mmpeft.reference import build_reference_checkpoint

    return build_reference_checkpoint(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """Tiny parts saved locally the way they are published: an LM whose tokenizer lacks placeholders and ChatML,
    a full CLIP (text + vision), a full Whisper (encoder + decoder) and a Wav2Vec2, each with its preprocessor."""
    root = tmp_path_factory.mktemp("parts")
    from tiny_parts import AUDIO_CONFIGS, AUDIO_PREPROCESSORS, image_processor, text_config
    from transformers import (
        AutoModelForCausalLM,
        CLIPConfig,
        CLIPModel,
        Wav2Vec2Model,
        WhisperForConditionalGeneration,
    )

    from mmpeft.reference import REFERENCE_CORPUS, train_byte_level_tokenizer

    torch.manual_seed(0)
    # An LM whose tokenizer knows nothing of placeholders or ChatML.
    tokenizer = train_byte_level_tokenizer(REFERENCE_CORPUS, vocab_size=300, special_tokens=["<|endoftext|>"])
    lm = AutoModelForCausalLM.from_config(text_config("qwen2", len(tokenizer)))
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    # A full CLIP (text + vision), as CLIP checkpoints are published.
    vision = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(root / "clip")
    image_processor().save_pretrained(root / "clip")
    # A full Whisper (encoder + decoder) and a Wav2Vec2.
    whisper = WhisperForConditionalGeneration(AUDIO_CONFIGS["whisper"]())
    whisper.save_pretrained(root / "whisper")
    AUDIO_PREPROCESSORS["whisper"]().save_pretrained(root / "whisper")
    wav2vec2 = Wav2Vec2Model(AUDIO_CONFIGS["wav2vec2"]())
    wav2vec2.save_pretrained(root / "wav2vec2")
    AUDIO_PREPROCESSORS["wav2vec2"]().save_pretrained(root / "wav2vec2")
    return root, {"lm": lm, "clip": clip, "whisper": whisper, "wav2vec2": wav2vec2}
