"""Tiny random parts (hidden 16-32, 1-2 layers) of every encoder / LM family the tests cover.

Each builder returns a config; `*_PREPROCESSORS` give the matching image processor / feature extractor.
Tokenizers come from `mmpeft.reference.train_byte_level_tokenizer`, trained in-process.
"""

import struct
import zlib

from transformers import (
    CLIPVisionConfig,
    Dinov2Config,
    GemmaConfig,
    GPT2Config,
    HubertConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
    ViTConfig,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    WavLMConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
)
from transformers.models.siglip import SiglipImageProcessorPil


IMAGE_SIZE, PATCH_SIZE = 32, 8
SAMPLING_RATE = 16000
_VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
)
_LM = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=512,
)
_CONV = dict(
    conv_dim=(16, 16),
    conv_kernel=(10, 4),
    conv_stride=(5, 4),
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
)
_W2V = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, **_CONV)

VISION_CONFIGS = {
    "clip": lambda: CLIPVisionConfig(**_VIT),
    "siglip": lambda: SiglipVisionConfig(**_VIT),
    "vit": lambda: ViTConfig(**_VIT),
    "dinov2": lambda: Dinov2Config(**_VIT),
}

AUDIO_CONFIGS = {
    # 1 s window: 100 mel frames = 2 * max_source_positions.
    "whisper": lambda: WhisperConfig(
        d_model=32,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        num_mel_bins=16,
        max_source_positions=50,
        vocab_size=100,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    ),
    "wav2vec2": lambda: Wav2Vec2Config(**_W2V),
    "hubert": lambda: HubertConfig(**_W2V),
    "wavlm": lambda: WavLMConfig(**_W2V, num_buckets=16, max_bucket_distance=32),
}

AUDIO_PREPROCESSORS = {
    "whisper": lambda: WhisperFeatureExtractor(feature_size=16, chunk_length=1, sampling_rate=SAMPLING_RATE),
    "wav2vec2": lambda: Wav2Vec2FeatureExtractor(sampling_rate=SAMPLING_RATE, return_attention_mask=True),
}
for _name in ("hubert", "wavlm"):
    AUDIO_PREPROCESSORS[_name] = AUDIO_PREPROCESSORS["wav2vec2"]


def image_processor():
    return SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def text_config(family: str, vocab_size: int):
    """A tiny LM config of `family` for a tokenizer of `vocab_size` tokens (pad/bos/eos = 0/1/2)."""
    ids = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=512, **ids)
    if family == "gemma":
        return GemmaConfig(**_LM, head_dim=8, **ids)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family](**_LM, **ids)


TEXT_FAMILIES = ["llama", "qwen2", "gpt2", "mistral", "gemma"]


def tokenizer():
    """A byte-level BPE tokenizer with the chat and placeholder tokens, trained in-process (ids 0-4 special)."""
    from mmpeft.reference import REFERENCE_CORPUS, train_byte_level_tokenizer

    return train_byte_level_tokenizer(REFERENCE_CORPUS, vocab_size=300)


def build(text="llama", vision="siglip", audio="whisper", tok=None, **config_kwargs):
    """A tiny `(model, processor)` of the given families (`vision` / `audio` may be None), seeded."""
    import torch

    from mmpeft import MMPeftConfig, MMPeftForConditionalGeneration, MMPeftProcessor

    tok = tok or tokenizer()
    config = MMPeftConfig(
        text_config=text_config(text, len(tok)),
        vision_config=VISION_CONFIGS[vision]() if vision else None,
        audio_config=AUDIO_CONFIGS[audio]() if audio else None,
        image_token_id=tok.convert_tokens_to_ids("<image>") if vision else None,
        audio_token_id=tok.convert_tokens_to_ids("<audio>") if audio else None,
        **config_kwargs,
    )
    torch.manual_seed(0)
    model = MMPeftForConditionalGeneration(config).eval()
    processor = MMPeftProcessor(
        image_processor=image_processor() if vision else None,
        feature_extractor=AUDIO_PREPROCESSORS[audio]() if audio else None,
        tokenizer=tok,
        image_seq_length=config.num_image_tokens if vision else None,
        audio_downsampling=config.audio_downsampling if audio else None,
        audio_frames_per_token=config.audio_frames_per_token,
    )
    return model, processor


def media(seed=0, num_images=1, audio_seconds=(0.6,)):
    """Deterministic random images (odd sizes, resized by the processor) and audio clips."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)) for i in range(num_images)]
    audio = [(0.1 * rng.standard_normal(int(s * SAMPLING_RATE))).astype(np.float32) for s in audio_seconds]
    return images, audio


def mixed_records(count: int) -> list:
    """`count` records of very different lengths: image only, audio only or both; short and long text."""
    import io

    import numpy as np
    from PIL import Image

    from mmpeft.data import Record

    rng = np.random.default_rng(0)
    records = []
    for index in range(count):
        content = []
        if index % 3 != 1:
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buffer, "PNG")
            content.append({"type": "image", "image": buffer.getvalue()})  # encoded bytes, as `datasets` stores them
        if index % 3 != 0:
            clip = (0.1 * rng.standard_normal(int((0.3 + 0.2 * (index % 3)) * SAMPLING_RATE))).astype(np.float32)
            content.append({"type": "audio", "audio": {"array": clip, "sampling_rate": SAMPLING_RATE}})
        content.append({"type": "text", "text": "what is" + " this" * (3 * index)})
        answer = "a thing " * (1 + 5 * index)
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        records.append(Record(data={"messages": messages}, where=f"sample {index}"))
    return records


def prepared_examples(records, processor, **settings):
    """`prepare_examples`, with its rows viewed as `Example`s (expanded ids and labels, media sources)."""
    from mmpeft.data import MMPeftDataset, prepare_examples

    rows, report = prepare_examples(records, processor, **settings)
    dataset = MMPeftDataset(rows, processor)
    return [dataset.example(index) for index in range(len(rows))], report


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (8-bit RGB) but whose pixel data stops after a few rows: were
    it decoded, it would fail as truncated, so a size error proves it was refused from the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 256))
