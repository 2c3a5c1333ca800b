"""Configuration of the mmpeft omni model: any vision encoder + any audio encoder + any causal LM.

This file is copied next to saved checkpoints for `trust_remote_code` loading, so it imports only the
standard library, `huggingface_hub` and `transformers`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec


@dataclass(frozen=True)
class EncoderSpec:
    """What mmpeft knows of one encoder family beyond its config: a row of `VISION_ENCODERS` / `AUDIO_ENCODERS`.

    A new encoder family is one row. Vision families without a row are built as `AutoModel` builds them, with
    nothing dropped, and only for `vision_feature_select_strategy="default"`; audio families need a row.

    Args:
        prefix_tokens: (vision) `config -> number` of tokens the encoder puts before its patch tokens (CLS,
            registers). Only needed for `vision_feature_select_strategy="full"`; "default" keeps the last
            grid * grid tokens, which are the patches.
        downsampling: (audio, required) `config -> [(kernel, stride, padding), ...]`, the strided layers that
            shorten the input length (mel frames for log-mel encoders, samples for waveform encoders); see
            `num_audio_tokens`.
        dummy_input_shape: (audio, required) `config -> shape` of the zero input an idle tower is run on in
            multi-process training (see `MMPeftForConditionalGeneration.forward`).
        encoder_class: `(module, class name)` of the class to build instead of `AutoModel`'s, for families whose
            `AutoModel` is more than the encoder (encoder-decoders such as Whisper).
        encoder_prefix: where the family's full-model checkpoints store the weights of `encoder_class`
            (`"model.encoder."`); stripped when a tower is loaded from one.
        unused_parts: submodules or parameters (dotted paths) that only produce outputs mmpeft never reads
            (pooled output, final norm of `last_hidden_state`, masked-image-modelling token): dropped, so that
            they hold no memory, are not saved and do not break DDP as unused parameters. mmpeft reads
            `hidden_states[vision_feature_layer]` of vision encoders.
    """

    prefix_tokens: Callable[[PreTrainedConfig], int] | None = None
    downsampling: Callable[[PreTrainedConfig], list[tuple[int, int, int]]] | None = None
    dummy_input_shape: Callable[[PreTrainedConfig], tuple[int, ...]] | None = None
    encoder_class: tuple[str, str] | None = None
    encoder_prefix: str | None = None
    unused_parts: tuple[str, ...] = ()


def _conv_feature_encoder_downsampling(config) -> list[tuple[int, int, int]]:
    return [(kernel, stride, 0) for kernel, stride in zip(config.conv_kernel, config.conv_stride)]


def _one_second_of_silence(config) -> tuple[int, ...]:
    return (1, 16000)


# Keyed by `model_type` (`vision_config.model_type`).
VISION_ENCODERS = {
    "clip_vision_model": EncoderSpec(prefix_tokens=lambda config: 1, unused_parts=("post_layernorm",)),
    "siglip_vision_model": EncoderSpec(prefix_tokens=lambda config: 0, unused_parts=("post_layernorm", "head")),
    "vit": EncoderSpec(prefix_tokens=lambda config: 1, unused_parts=("layernorm", "pooler")),
    "dinov2": EncoderSpec(prefix_tokens=lambda config: 1, unused_parts=("layernorm", "embeddings.mask_token")),
    "dinov2_with_registers": EncoderSpec(
        prefix_tokens=lambda config: 1 + config.num_register_tokens,
        unused_parts=("layernorm", "embeddings.mask_token"),
    ),
}

# Keyed by `model_type` (`audio_config.model_type`).
AUDIO_ENCODERS = {
    "whisper": EncoderSpec(
        downsampling=lambda config: [(3, 1, 1), (3, 2, 1)],  # conv1, conv2 of WhisperEncoder
        dummy_input_shape=lambda config: (1, config.num_mel_bins, 2 * config.max_source_positions),  # one window
        encoder_class=("transformers.models.whisper.modeling_whisper", "WhisperEncoder"),
        encoder_prefix="model.encoder.",
    ),
    **{
        model_type: EncoderSpec(
            downsampling=_conv_feature_encoder_downsampling, dummy_input_shape=_one_second_of_silence
        )
        for model_type in ("wav2vec2", "wav2vec2-conformer", "hubert", "wavlm", "data2vec-audio")
    },
}

# The registry of each part of the model that has one; "vision" and "audio" also name its config (`vision_config`),
# tower (`vision_tower`) and projector (`vision_projector`).
ENCODERS = {"vision": VISION_ENCODERS, "audio": AUDIO_ENCODERS}


def encoder_spec(part: str, model_type: str) -> EncoderSpec:
    """The row of `model_type` in the registry of `part` (`"vision"` / `"audio"`); an empty row if it has none."""
    return ENCODERS[part].get(model_type, EncoderSpec())


# Name of the padding mask the model takes next to each kind of audio input (`main_input_name` of the tower,
# first of the feature extractor's `model_input_names`).
AUDIO_MASK_NAMES = {"input_features": "feature_attention_mask", "input_values": "input_values_mask"}


def num_audio_tokens(length: int, downsampling: list, frames_per_token: int) -> int:
    """Number of LM tokens one audio clip becomes.

    Shared by the processor (to expand `<audio>` placeholders) and the model (to keep each clip's valid
    encoder frames), so that the two can never disagree.

    Args:
        length: valid input length of the clip (mel frames or waveform samples).
        downsampling: the encoder's strided layers as `(kernel, stride, padding)`.
        frames_per_token: encoder frames stacked into one token (the last group is zero-padded).
    """
    for kernel, stride, padding in downsampling:
        length = (length + 2 * padding - kernel) // stride + 1
    return max(0, math.ceil(length / frames_per_token))


@strict
class MMPeftConfig(PreTrainedConfig):
    r"""
    Configuration of [`MMPeftForConditionalGeneration`].

    Args:
        text_config (`dict` or `PreTrainedConfig`):
            Config of the causal language model (any `AutoModelForCausalLM` architecture).
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the vision encoder (any ViT-style `AutoModel`: CLIP, SigLIP, ViT, DINOv2, ...).
            `None` builds a model without the image modality.
        audio_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the audio encoder: a log-mel encoder (Whisper; the encoder half is used) or a waveform
            encoder (Wav2Vec2, HuBERT, WavLM, ...). `None` builds a model without the audio modality.
        image_token_id (`int`, *optional*):
            Token id of the `<image>` placeholder; each image fills `num_image_tokens` of them.
        audio_token_id (`int`, *optional*):
            Token id of the `<audio>` placeholder.
        vision_feature_layer (`int`, defaults to -1):
            Hidden state of the vision encoder fed to the projector (-2 is LLaVA's choice).
        vision_feature_select_strategy (`"default"` or `"full"`):
            `"default"` keeps the patch tokens and drops CLS/register tokens; `"full"` keeps every token.
        vision_projector_type, audio_projector_type (`"mlp"` or `"linear"`):
            LLaVA-style 2-layer MLP with `projector_hidden_act`, or one linear layer.
        vision_token_reduction (`"none"`, `"avg_pool"` or `"pixel_shuffle"`):
            Shrinks the patch grid by `vision_reduction_factor` per side before projection. Pooling averages
            neighbours; pixel-shuffle concatenates them into wider tokens (no information dropped).
        vision_reduction_factor (`int`, defaults to 2):
            Side of the square of patches merged into one token.
        audio_frames_per_token (`int`, defaults to 1):
            Consecutive audio encoder frames stacked into one token (e.g. 4 turns Whisper's 50 frames/s into
            12.5 tokens/s).
        projector_hidden_act (`str`, defaults to `"gelu"`):
            Activation of the MLP projectors.
    """

    model_type = "mmpeft"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model", optional=True),
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper", optional=True),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    audio_token_id: int | None = None
    vision_feature_layer: int = -1
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    vision_projector_type: Literal["mlp", "linear"] = "mlp"
    vision_token_reduction: Literal["none", "avg_pool", "pixel_shuffle"] = "none"
    vision_reduction_factor: int = 2
    audio_projector_type: Literal["mlp", "linear"] = "mlp"
    audio_frames_per_token: int = 1
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The LM decides whether its head is tied to its embeddings; the composite only mirrors it.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        if self.vision_config is not None:
            self._validate_vision()
        if self.audio_config is not None:
            self._validate_audio()

    def _validate_vision(self):
        vision = self.vision_config
        if not (hasattr(vision, "image_size") and hasattr(vision, "patch_size")):
            raise ValueError(
                f"vision_config of model_type {vision.model_type!r} has no `image_size`/`patch_size`: mmpeft needs "
                "a ViT-style encoder that returns one token per patch."
            )
        if self.image_token_id is None:
            raise ValueError("`image_token_id` is required when `vision_config` is set.")
        if self.vision_feature_select_strategy == "full":
            if encoder_spec("vision", vision.model_type).prefix_tokens is None:
                known = sorted(name for name, spec in VISION_ENCODERS.items() if spec.prefix_tokens is not None)
                raise ValueError(
                    f"vision_feature_select_strategy='full' needs the prefix-token count of {vision.model_type!r}; "
                    f"known types: {known}. Use 'default' or give its row in VISION_ENCODERS `prefix_tokens`."
                )
            if self.vision_token_reduction != "none":
                raise ValueError(
                    "vision_token_reduction works on the patch grid: use vision_feature_select_strategy='default'."
                )
        if self.vision_token_reduction != "none" and self.vision_grid_size % self.vision_reduction_factor:
            raise ValueError(
                f"vision_reduction_factor={self.vision_reduction_factor} must divide the patch grid side "
                f"{self.vision_grid_size} (image_size {vision.image_size} / patch_size {vision.patch_size})."
            )

    def _validate_audio(self):
        if self.audio_config.model_type not in AUDIO_ENCODERS:
            raise ValueError(
                f"audio_config model_type {self.audio_config.model_type!r} is not supported yet; known: "
                f"{sorted(AUDIO_ENCODERS)}. Add a row for it to AUDIO_ENCODERS (how it downsamples its input, "
                "the shape of a dummy input)."
            )
        if self.audio_token_id is None:
            raise ValueError("`audio_token_id` is required when `audio_config` is set.")
        if self.audio_frames_per_token < 1:
            raise ValueError(f"audio_frames_per_token must be >= 1, got {self.audio_frames_per_token}.")

    @property
    def vision_grid_size(self) -> int:
        """Patches per side of the vision encoder's input image."""
        image_size, patch_size = self.vision_config.image_size, self.vision_config.patch_size
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
        patch_size = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
        return image_size // patch_size

    @property
    def num_image_tokens(self) -> int:
        """LM tokens one image becomes (the processor expands each `<image>` to this many)."""
        grid = self.vision_grid_size
        if self.vision_feature_select_strategy == "full":
            return grid * grid + VISION_ENCODERS[self.vision_config.model_type].prefix_tokens(self.vision_config)
        if self.vision_token_reduction != "none":
            grid //= self.vision_reduction_factor
        return grid * grid

    @property
    def audio_downsampling(self) -> list[tuple[int, int, int]]:
        """The audio encoder's strided layers, as used by `num_audio_tokens`."""
        return AUDIO_ENCODERS[self.audio_config.model_type].downsampling(self.audio_config)


__all__ = [
    "AUDIO_ENCODERS",
    "AUDIO_MASK_NAMES",
    "ENCODERS",
    "EncoderSpec",
    "MMPeftConfig",
    "VISION_ENCODERS",
    "encoder_spec",
    "num_audio_tokens",
]
