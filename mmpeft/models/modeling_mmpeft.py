"""The mmpeft omni model: a vision encoder and an audio encoder in front of a causal LM.

Read top to bottom: building and loading the parts (the towers as the encoder registries of
`configuration_mmpeft.py` say), token-reduction helpers, the projector, the model (towers -> features ->
scatter into the placeholder positions of the LM's input embeddings -> LM).

This file is copied next to saved checkpoints for `trust_remote_code` loading, so it imports only torch,
transformers and its sibling `configuration_mmpeft.py`.
"""

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, MultimodalCausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple
from transformers.utils.import_utils import torch_compilable_check

from .configuration_mmpeft import AUDIO_MASK_NAMES, EncoderSpec, MMPeftConfig, encoder_spec, num_audio_tokens


def _drop_unused_parts(tower: nn.Module, paths: tuple[str, ...]) -> nn.Module:
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = tower.get_submodule(parent_path)
        if not hasattr(parent, name):  # optional by config (SigLIP's `head` with vision_use_head=False)
            continue
        if isinstance(getattr(parent, name), nn.Parameter):
            parent.register_parameter(name, None)
        else:
            setattr(parent, name, nn.Identity())
    return tower


def _encoder_class(spec: EncoderSpec) -> type[PreTrainedModel]:
    module, name = spec.encoder_class
    return getattr(importlib.import_module(module), name)


def build_tower(config, part: str) -> PreTrainedModel:
    """The encoder for `config` as its row in the registry of `part` (`"vision"` / `"audio"`) says: the encoder half
    of encoder-decoders, without the parts mmpeft does not use."""
    spec = encoder_spec(part, config.model_type)
    tower = _encoder_class(spec)(config) if spec.encoder_class else AutoModel.from_config(config)
    return _drop_unused_parts(tower, spec.unused_parts)


def load_tower(name_or_path: str | os.PathLike, part: str, **kwargs) -> PreTrainedModel:
    """The pretrained `part` (`"vision"` / `"audio"`) encoder of a checkpoint (safetensors weights only), as
    `build_tower` builds it: for dual encoders (CLIP, SigLIP) its `part` half, for encoder-decoders (Whisper) its
    encoder half."""
    kwargs["trust_remote_code"] = False  # never a checkpoint's own code (nor a "[y/N]" prompt)
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    config = getattr(config, f"{part}_config", None) or config
    spec = encoder_spec(part, config.model_type)
    if spec.encoder_class is None:
        tower = AutoModel.from_pretrained(name_or_path, config=config, use_safetensors=True, **kwargs)
    else:  # a full-model checkpoint stores the encoder under `encoder_prefix`
        key_mapping = {f"^{re.escape(spec.encoder_prefix)}": ""} if spec.encoder_prefix else None
        tower = _encoder_class(spec).from_pretrained(
            name_or_path, config=config, key_mapping=key_mapping, use_safetensors=True, **kwargs
        )
    return _drop_unused_parts(tower, spec.unused_parts)


def _load_language_model(text: str | os.PathLike, vocab_size: int, dtype: torch.dtype | None) -> PreTrainedModel:
    """The pretrained causal LM at `text` (safetensors weights only), its embeddings grown to `vocab_size` rows if
    it has fewer (the tokens a composed model adds)."""
    language_model = AutoModelForCausalLM.from_pretrained(
        text, dtype=dtype, use_safetensors=True, trust_remote_code=False
    )
    if vocab_size > language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(vocab_size)
    return language_model


def _chat_generation_config(generation_config: GenerationConfig, tokenizer, suppress_tokens) -> GenerationConfig:
    """An LM's `generation_config` for chat: it also stops at `<|im_end|>`, pads with the tokenizer's pad token (or
    the first eos token) where it has none, and never emits `suppress_tokens` (the placeholders)."""
    eos = generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation_config.eos_token_id = eos + [im_end] if im_end not in eos else eos
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0] if eos else None
        )
    generation_config.suppress_tokens = suppress_tokens
    return generation_config


# ---------------------------------------------------------------------------------------------------------
# Token reduction: (num_items, tokens, dim) -> (num_items, fewer tokens, dim * width_multiplier)
# ---------------------------------------------------------------------------------------------------------


def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Merge each `factor x factor` square of patches into one token `factor**2` times wider.

    `features`: (num_images, grid * grid, dim) -> (num_images, (grid / factor) ** 2, dim * factor ** 2).
    """
    num_images, num_patches, dim = features.shape
    grid = int(num_patches**0.5)
    features = features.reshape(num_images, grid // factor, factor, grid // factor, factor, dim)
    features = features.permute(0, 1, 3, 2, 4, 5)
    return features.reshape(num_images, (grid // factor) ** 2, dim * factor * factor)


def avg_pool(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Average each `factor x factor` square of patches.

    `features`: (num_images, grid * grid, dim) -> (num_images, (grid / factor) ** 2, dim).
    """
    num_images, num_patches, dim = features.shape
    grid = int(num_patches**0.5)
    features = features.transpose(1, 2).reshape(num_images, dim, grid, grid)
    features = F.avg_pool2d(features, factor)
    return features.flatten(2).transpose(1, 2)


def stack_frames(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Concatenate every `factor` consecutive frames into one token (the last group zero-padded).

    `features`: (num_clips, frames, dim) -> (num_clips, ceil(frames / factor), dim * factor).
    """
    num_clips, frames, dim = features.shape
    features = F.pad(features, (0, 0, 0, -frames % factor))
    return features.reshape(num_clips, -1, dim * factor)


class TokenReduction(NamedTuple):
    """A way to shorten a tower's token sequence before projection, by an integer `factor`."""

    reduce: Callable[[torch.Tensor, int], torch.Tensor]  # (features, factor) -> fewer tokens
    widen: Callable[[int], int]  # factor -> how many times wider a token gets


# By `vision_token_reduction`.
VISION_TOKEN_REDUCTIONS = {
    "none": TokenReduction(reduce=lambda features, factor: features, widen=lambda factor: 1),
    "avg_pool": TokenReduction(reduce=avg_pool, widen=lambda factor: 1),
    "pixel_shuffle": TokenReduction(reduce=pixel_shuffle, widen=lambda factor: factor * factor),
}

# Audio's one, by `audio_frames_per_token`.
AUDIO_TOKEN_REDUCTION = TokenReduction(reduce=stack_frames, widen=lambda factor: factor)


class Modality(NamedTuple):
    """One kind of media, as `MMPeftForConditionalGeneration.forward` merges it into the LM's input embeddings."""

    name: str  # "image" / "audio": its placeholder is the config's `{name}_token_id`
    part: str  # "vision" / "audio": names its config (`vision_config`), tower and projector
    inputs: tuple[str, ...]  # `forward`'s inputs of this modality; any given means it is present
    inputs_description: str  # how errors name the inputs
    features: Callable  # (model, media dict) -> `BaseModelOutputWithPooling`, projected features as `pooler_output`
    dummy_input_shape: Callable[[PreTrainedConfig], tuple[int, ...]]  # tower config -> an idle tower's input


AUDIO_INPUT_NAMES = tuple(name for pair in AUDIO_MASK_NAMES.items() for name in pair)


@dataclass
class MMPeftCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    """The LM's outputs (`loss`, `logits`, `cache`, `hidden_states`, `attentions`) and the encoders' of the media
    merged in this step (`image_outputs` / `audio_outputs`: `get_image_features` / `get_audio_features`, `None`
    where none were given, as at every decode step)."""

    @property
    def image_hidden_states(self) -> torch.Tensor | None:
        """The projected image features, (num_images, num_image_tokens, text hidden size), as Llava names them."""
        return None if self.image_outputs is None else self.image_outputs.pooler_output

    @property
    def audio_hidden_states(self) -> tuple[torch.Tensor, ...] | None:
        """The projected audio features, one (tokens, text hidden size) per clip."""
        return None if self.audio_outputs is None else self.audio_outputs.pooler_output


class MMPeftProjector(nn.Module):
    """Maps encoder features to the LM's embedding width: LLaVA's 2-layer MLP (`"mlp"`) or one `"linear"` layer."""

    def __init__(self, in_features: int, out_features: int, projector_type: str, hidden_act: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        if projector_type == "mlp":
            self.act = ACT2FN[hidden_act]
            self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden_states = self.linear_1(features)
        if hasattr(self, "linear_2"):
            hidden_states = self.linear_2(self.act(hidden_states))
        return hidden_states


class MMPeftPreTrainedModel(PreTrainedModel):
    config: MMPeftConfig
    base_model_prefix = ""
    input_modalities = ("image", "audio", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def initialize_weights(self):
        """Initialise what is not yet initialised (at construction, or the weights a checkpoint lacks), each part as
        its own class would: the towers and the LM through their own `initialize_weights` and `_init_weights`, then
        the projectors.

        `PreTrainedModel.initialize_weights` passes the outer model's "custom code" flag down to its sub-models, and
        for custom code it takes a module without parameters of its own as initialised without running
        `_init_weights` on it. mmpeft's classes are custom code, so a tower's weights missing at load were left as
        torch made them wherever its class initialises through a parent module (SigLIP's attention and MLP
        projections, Whisper's sinusoidal `embed_positions`). The parts are transformers' own classes, which are
        not custom code; mmpeft's own modules initialise through `transformers.initialization` like theirs.
        """
        if is_deepspeed_zero3_enabled():
            # Under ZeRO-3 transformers gathers only the parameters not yet initialised around this call; the towers'
            # own functions read the shapes of loaded ones too (Whisper's positions), sharded to nothing here.
            return super().initialize_weights()
        for part in self.children():
            if isinstance(part, PreTrainedModel):
                part.initialize_weights()
        self._initialize_weights_of(self)

    @init.guard_torch_init_functions()
    def _initialize_weights_of(self, module: nn.Module):
        for child in module.children():
            self._initialize_weights_of(child)
        self._initialize_weights(module)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *model_args, use_safetensors: bool | None = True, **kwargs
    ):
        """`PreTrainedModel.from_pretrained`, reading safetensors weights only unless `use_safetensors` says
        otherwise: a `pytorch_model.bin` is a pickle, and unpickling is running code from the checkpoint."""
        return super().from_pretrained(
            pretrained_model_name_or_path, *model_args, use_safetensors=use_safetensors, **kwargs
        )


class MMPeftForConditionalGeneration(MMPeftPreTrainedModel, GenerationMixin):
    """Vision encoder + audio encoder + causal LM, joined by projectors.

    Submodules (root-level, so PEFT targets and quantization skip lists stay simple): `vision_tower`,
    `vision_projector`, `audio_tower`, `audio_projector` (each `None` when the modality is absent) and
    `language_model` (any `AutoModelForCausalLM`).
    """

    def __init__(self, config: MMPeftConfig):
        super().__init__(config)
        self.vision_tower = self.vision_projector = None
        self.audio_tower = self.audio_projector = None
        if config.vision_config is not None:
            self.vision_tower = build_tower(config.vision_config, "vision")
            self.vision_projector = self._build_projector("vision")
        if config.audio_config is not None:
            self.audio_tower = build_tower(config.audio_config, "audio")
            self.audio_projector = self._build_projector("audio")
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        # What this model takes, not what the class could: pipelines check it (`any-to-any` needs torchvision
        # only for a model that takes images).
        self.input_modalities = tuple(
            name
            for name, sub_config in (("image", config.vision_config), ("audio", config.audio_config))
            if sub_config
        ) + ("text",)
        self.post_init()
        # Per instance, as post_init sets it and as transformers (device maps) and accelerate (FSDP auto wrap) read
        # it: which layers a model holds depends on its config. post_init's union of the parts' lists is replaced.
        self._no_split_modules = self._layer_classes()
        if self._auto_class is not None:
            # `save_pretrained` records one Auto class per model class in `auto_map`; add the others it is: a causal
            # LM, and a multimodal LM (the `any-to-any` pipeline's class).
            reference = f"{__name__.split('.')[-1]}.{type(self).__name__}"
            config.auto_map = {
                **(getattr(config, "auto_map", None) or {}),
                **dict.fromkeys(("AutoModelForCausalLM", "AutoModelForMultimodalLM"), reference),
            }
        # An untrained model must never emit a placeholder: generation could not continue past it.
        placeholders = [i for i in (config.image_token_id, config.audio_token_id) if i is not None]
        self.generation_config.suppress_tokens = placeholders or None

    @classmethod
    def from_pretrained_parts(
        cls,
        text: str | os.PathLike,
        vision: str | os.PathLike | None = None,
        audio: str | os.PathLike | None = None,
        *,
        dtype: torch.dtype | None = None,
        chat_template: str | None = None,
        **config_kwargs,
    ):
        """Compose a new model from pretrained parts, keeping their weights (read from safetensors files only).

        Args:
            text: Hub id or directory of a causal LM (with its tokenizer).
            vision: Hub id or directory of a vision encoder (with its image processor), or `None`.
            audio: Hub id or directory of an audio encoder (with its feature extractor), or `None`.
            dtype: dtype to load the parts in (projectors follow).
            chat_template: processor chat template; defaults to ChatML with image / audio / text parts.
            config_kwargs: projector and feature settings of `MMPeftConfig` (`vision_projector_type`,
                `vision_token_reduction`, `audio_frames_per_token`, `vision_feature_layer`, ...).

        Returns:
            `(model, processor)`. The placeholder tokens (and the ChatML markers if missing) are added to the
            tokenizer and the LM's embeddings resized; the projectors are newly initialised.

        Example:
            ```python
            model, processor = MMPeftForConditionalGeneration.from_pretrained_parts(
                text="Qwen/Qwen2.5-0.5B-Instruct",
                vision="google/siglip-base-patch16-224",
                audio="openai/whisper-base",
                audio_frames_per_token=4,
            )
            ```
        """
        from .processing_mmpeft import AUDIO_TOKEN, IMAGE_TOKEN, MMPeftProcessor, load_tokenizer_for_parts

        tokenizer = load_tokenizer_for_parts(text, image=bool(vision), audio=bool(audio))
        language_model = _load_language_model(text, len(tokenizer), dtype)
        vision_tower = load_tower(vision, "vision", dtype=dtype) if vision else None
        audio_tower = load_tower(audio, "audio", dtype=dtype) if audio else None
        config = MMPeftConfig(
            text_config=language_model.config,
            vision_config=vision_tower.config if vision else None,
            audio_config=audio_tower.config if audio else None,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if vision else None,
            audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN) if audio else None,
            **config_kwargs,
        )
        model = cls._from_parts(config, language_model, vision_tower, audio_tower, dtype)
        model.generation_config = _chat_generation_config(
            language_model.generation_config, tokenizer, suppress_tokens=model.generation_config.suppress_tokens
        )
        processor = MMPeftProcessor.from_pretrained_parts(
            config, tokenizer, vision=vision, audio=audio, chat_template=chat_template
        )
        return model, processor

    @classmethod
    def _from_parts(
        cls,
        config: MMPeftConfig,
        language_model: PreTrainedModel,
        vision_tower: PreTrainedModel | None,
        audio_tower: PreTrainedModel | None,
        dtype: torch.dtype | None,
    ) -> "MMPeftForConditionalGeneration":
        """A model of `config` made of the given pretrained parts and new, initialised projectors."""
        # Build the shell on the meta device (no memory, no init), then put the pretrained parts in and
        # initialise only the projectors, which are new.
        with torch.device("meta"):
            model = cls(config)
        model.language_model = language_model
        model.vision_tower, model.audio_tower = vision_tower, audio_tower
        if vision_tower is not None:
            model.vision_projector = model._build_projector("vision")
        if audio_tower is not None:
            model.audio_projector = model._build_projector("audio")
        for projector in (model.vision_projector, model.audio_projector):
            if projector is not None:
                projector.apply(model._init_weights)
        # The shell's were its own parts'; the classes are the same for the same configs, but take them from the
        # parts the model now holds.
        model._no_split_modules = model._layer_classes()
        if dtype is not None:
            model.to(dtype)
        return model

    def _layer_classes(self) -> set[str]:
        """Names of the classes of this composition's layers: what `device_map` keeps on one device and FSDP shards
        one by one (accelerate's `TRANSFORMER_BASED_WRAP` reads `model._no_split_modules` when no
        `transformer_layer_cls_to_wrap` is given).

        Each part's own `_no_split_modules`, plus the classes of its `GradientCheckpointingLayer`s, the layers
        transformers checkpoints one at a time: some encoder classes declare no `_no_split_modules` (Wav2Vec2,
        WavLM) or not the layer variant their config builds (HuBERT's stable-layer-norm layers). Kept to the
        classes the model holds: a part's list also names what mmpeft does not build (Whisper's decoder layers,
        SigLIP's text embeddings and dropped pooling head).
        """
        names = set()
        for part in (self.vision_tower, self.audio_tower, self.language_model):
            if part is not None:
                names.update(getattr(part, "_no_split_modules", None) or ())
                names.update(type(m).__name__ for m in part.modules() if isinstance(m, GradientCheckpointingLayer))
        return names & {type(module).__name__ for module in self.modules()}

    def _token_reduction(self, part: str) -> tuple[TokenReduction, int]:
        """How the config has the tokens of `part` (`"vision"` / `"audio"`) reduced, and by what factor."""
        config = self.config
        if part == "vision":
            return VISION_TOKEN_REDUCTIONS[config.vision_token_reduction], config.vision_reduction_factor
        return AUDIO_TOKEN_REDUCTION, config.audio_frames_per_token

    def _build_projector(self, part: str) -> MMPeftProjector:
        """A new projector for `part` (`"vision"` / `"audio"`), from its tower's tokens as its token reduction
        widens them to the LM's embedding width."""
        config = self.config
        reduction, factor = self._token_reduction(part)
        # Whisper calls its width `d_model`; most others `hidden_size`. `attribute_map` makes both work.
        return MMPeftProjector(
            getattr(config, f"{part}_config").hidden_size * reduction.widen(factor),
            config.text_config.hidden_size,
            getattr(config, f"{part}_projector_type"),
            config.projector_hidden_act,
        )

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module):
        self.language_model.set_output_embeddings(value)

    def _require(self, modality: str, tower: nn.Module | None):
        if tower is None:
            raise ValueError(
                f"{modality} inputs were given, but this model was built without the {modality} modality "
                f"(its config has no {'vision' if modality == 'image' else 'audio'}_config)."
            )

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        """Encode and project images.

        Args:
            pixel_values: (num_images, channels, height, width).
            output_hidden_states: also return the vision tower's hidden states (embeddings + each layer).
            return_dict: return a `BaseModelOutputWithPooling` (default) or its tuple.
            kwargs: passed to the vision tower (`output_attentions`, ...).

        Returns:
            `BaseModelOutputWithPooling`: `pooler_output` (num_images, config.num_image_tokens, text hidden size),
            the projected features that fill each image's placeholders; `last_hidden_state` (num_images, patches,
            vision hidden size), the tower's; `hidden_states` / `attentions` of the tower when asked for.
        """
        self._require("image", self.vision_tower)
        config = self.config
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
        features = outputs.hidden_states[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            features = features[:, -(config.vision_grid_size**2) :]  # drop CLS / register tokens
        reduction, factor = self._token_reduction("vision")
        outputs = BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.vision_projector(reduction.reduce(features, factor)),
            hidden_states=outputs.hidden_states if _wanted(output_hidden_states, config) else None,
            attentions=outputs.attentions,
        )
        return outputs if _wanted(return_dict, config, "return_dict") else outputs.to_tuple()

    def get_audio_features(
        self,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        input_values_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        """Encode and project audio clips, with the model's own input names: whichever the audio tower takes of
        log-mel `input_features` (Whisper) and raw `input_values` (Wav2Vec2, HuBERT, WavLM).

        Args:
            input_features, feature_attention_mask: (num_clips, mel_bins, frames) and (num_clips, frames).
            input_values, input_values_mask: (num_clips, samples) and (num_clips, samples).
                A mask is 1 on valid positions; without one every position is valid.
            output_hidden_states: also return the audio tower's hidden states.
            return_dict: return a `BaseModelOutputWithPooling` (default) or its tuple.
            kwargs: passed to the audio tower (`output_attentions`, ...).

        Returns:
            `BaseModelOutputWithPooling`: `pooler_output` a tuple of one (tokens, text hidden size) tensor per clip,
            its valid tokens only (`num_audio_tokens` of its valid length), in placeholder order;
            `last_hidden_state` (num_clips, frames, audio hidden size), the tower's, padding included;
            `hidden_states` / `attentions` of the tower when asked for.
        """
        self._require("audio", self.audio_tower)
        config = self.config
        audio_inputs, audio_mask = (
            (input_features, feature_attention_mask)
            if input_features is not None
            else (input_values, input_values_mask)
        )
        if audio_inputs is None:
            raise ValueError("get_audio_features needs `input_features` or `input_values`.")
        if audio_mask is None:  # every position valid
            audio_mask = torch.ones(
                audio_inputs.shape[0], audio_inputs.shape[-1], dtype=torch.long, device=audio_inputs.device
            )
        outputs = self.audio_tower(
            **{self.audio_tower.main_input_name: audio_inputs.to(self.audio_tower.dtype)},
            attention_mask=audio_mask,
            # Not given: the tower's own config decides (Whisper reads it only when the argument is absent).
            **({} if output_hidden_states is None else {"output_hidden_states": output_hidden_states}),
            return_dict=True,
            **kwargs,
        )
        reduction, factor = self._token_reduction("audio")
        features = self.audio_projector(reduction.reduce(outputs.last_hidden_state, factor))
        lengths = [
            num_audio_tokens(length, config.audio_downsampling, config.audio_frames_per_token)
            for length in audio_mask.sum(-1).tolist()
        ]
        outputs = BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=tuple(clip[:length] for clip, length in zip(features, lengths)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return outputs if _wanted(return_dict, config, "return_dict") else outputs.to_tuple()

    def _image_features(self, media: dict) -> BaseModelOutputWithPooling:
        return self.get_image_features(media["pixel_values"], return_dict=True)

    def _audio_features(self, media: dict) -> BaseModelOutputWithPooling:
        return self.get_audio_features(**{name: media.get(name) for name in AUDIO_INPUT_NAMES}, return_dict=True)

    # The media `forward` merges, in this order (every process runs the towers in the same order).
    _modalities = (
        Modality(
            name="image",
            part="vision",
            inputs=("pixel_values",),
            inputs_description="`pixel_values`",
            features=_image_features,
            dummy_input_shape=lambda config: (1, config.num_channels, config.image_size, config.image_size),
        ),
        Modality(
            name="audio",
            part="audio",
            inputs=tuple(AUDIO_MASK_NAMES),
            inputs_description="audio inputs (`input_features` / `input_values`)",
            features=_audio_features,
            dummy_input_shape=lambda config: encoder_spec("audio", config.model_type).dummy_input_shape(config),
        ),
    )

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, token_id: int
    ) -> torch.BoolTensor:
        """(batch, seq), True at the placeholders of `token_id`: found in `input_ids`, or without them (only
        `inputs_embeds` given) where an embedding equals the placeholder token's own, as Llava finds them."""
        if input_ids is not None:
            return input_ids == token_id
        placeholder = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == placeholder.to(inputs_embeds.dtype)).all(-1)

    def _scatter(self, placeholders, inputs_embeds, outputs, modality):
        """Put the features of `outputs` (a modality's `BaseModelOutputWithPooling`) into the `placeholders`
        (batch, seq) positions of `inputs_embeds`, checking counts first."""
        items = outputs.pooler_output
        if isinstance(items, torch.Tensor):  # images: (num_images, tokens, hidden), all of one length
            tokens_per_item, features = [items.shape[1]] * items.shape[0], items.flatten(0, 1)
        else:  # audio: one (tokens, hidden) per clip
            tokens_per_item, features = [item.shape[0] for item in items], torch.cat(items)

        def mismatch() -> str:  # built only when the counts differ
            tokens_per_sample = placeholders.sum(-1).tolist()
            sample = _first_misaligned_sample(tokens_per_sample, tokens_per_item)
            return (
                f"{modality} features and {modality} tokens do not match: input_ids hold "
                f"{sum(tokens_per_sample)} {modality} tokens (per sample: {tokens_per_sample}) but the {modality} "
                f"inputs give {features.shape[0]} features (per {modality} input: {tokens_per_item}); first "
                f"mismatch at sample {sample}. Was a placeholder run truncated or an input dropped?"
            )

        # A hint rather than a branch when traced (torch.export / compile), as in Llava's get_placeholder_mask.
        torch_compilable_check(placeholders.sum() == features.shape[0], mismatch)
        return inputs_embeds.masked_scatter(placeholders.unsqueeze(-1), features.to(inputs_embeds.dtype))

    def _merge(
        self,
        modality: Modality,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        media: dict[str, torch.Tensor | None],
        run_idle_tower: bool,
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling | None]:
        """Merge one modality into `inputs_embeds`: the features of its inputs in `media` go into its placeholder
        positions, their counts checked, and its encoder output is returned with the new embeddings. Without
        inputs its placeholders (if any) stay ordinary tokens, as in transformers' VLMs: an assistant model in
        assisted decoding gets no media, and generation passes media at the first step only (the decode steps
        must not count placeholders: a data-dependent count is a device-to-host sync per token and breaks
        `torch.export`). With `run_idle_tower` an idle tower (if any) runs on a dummy input and adds 0 x its
        output (see `forward`)."""
        if any(media.get(name) is not None for name in modality.inputs):
            outputs = modality.features(self, media)
            token_id = getattr(self.config, f"{modality.name}_token_id")
            placeholders = self.get_placeholder_mask(input_ids, inputs_embeds, token_id)
            return self._scatter(placeholders, inputs_embeds, outputs, modality.name), outputs
        tower = getattr(self, f"{modality.part}_tower")
        if tower is not None and run_idle_tower:
            shape = modality.dummy_input_shape(getattr(self.config, f"{modality.part}_config"))
            idle = modality.features(self, {tower.main_input_name: inputs_embeds.new_zeros(shape)}).pooler_output
            idle = sum(item.sum() for item in idle)
            inputs_embeds = inputs_embeds + 0.0 * idle.to(inputs_embeds.dtype)
        return inputs_embeds, None

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, **kwargs):
        """`GenerationMixin`'s, which passes the media at the first step only (with a cache); the audio masks go
        with their inputs, so that a decode step holds nothing but tokens. (`inputs_embeds` by name: `generate`
        accepts them only from a model whose signature names them.)"""
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        for name, mask in AUDIO_MASK_NAMES.items():
            if model_inputs.get(name) is None:
                model_inputs.pop(mask, None)
        return model_inputs

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        input_values_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> tuple | MMPeftCausalLMOutputWithPast:
        r"""
        Args:
            input_ids: (batch, seq); each image fills `config.num_image_tokens` positions of `image_token_id`,
                each audio clip `num_audio_tokens(...)` positions of `audio_token_id`. Placeholders of a modality
                whose inputs are not given are ordinary tokens.
            attention_mask: (batch, seq). Padding-free batches (several samples laid end to end in one row) give
                none, and `position_ids` (1, seq) that restart at 0 at every sample instead (with `labels`, or
                with `use_cache=False`: a cache hides the packing from the LM).
            pixel_values: (num_images, 3, height, width), images in order of their placeholders.
            input_features, feature_attention_mask: (num_clips, mel_bins, frames) and (num_clips, frames), for
                log-mel audio encoders (Whisper).
            input_values, input_values_mask: (num_clips, samples) and (num_clips, samples), for waveform audio
                encoders (Wav2Vec2, HuBERT, WavLM).
            inputs_embeds: (batch, seq, text hidden size), instead of `input_ids`; media placeholders are found
                where an embedding equals the placeholder token's.
            labels: (batch, seq), -100 where no loss is taken.
            position_ids: (batch, seq).
            cache: the LM's key/value cache (`past_key_values` is its former name).
            use_cache: return the cache; off by default with `labels`.
            logits_to_keep: an int keeps the last that many positions' logits (0: all; `generate` asks for 1), a
                tensor the positions it selects (a boolean (batch, seq) mask gives (kept, vocab) logits).
            kwargs: passed to the language model (`output_hidden_states`, `shift_labels`, ...).

        Returns:
            `MMPeftCausalLMOutputWithPast`: the language model's loss, logits (batch, kept positions, vocab), cache,
            hidden states and attentions, and `image_outputs` / `audio_outputs` (`get_image_features` /
            `get_audio_features` of the given media, else `None`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if labels is not None and use_cache is None:
            # A loss needs no cache, and a cache would hide packed (padding-free) batches from the LM: transformers
            # builds the per-sample attention mask from `position_ids` only when there is no cache.
            use_cache = False
        media = {
            "pixel_values": pixel_values,
            "input_features": input_features,
            "feature_attention_mask": feature_attention_mask,
            "input_values": input_values,
            "input_values_mask": input_values_mask,
        }
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        # With several processes every rank runs every tower in every step, in the same order, feeding an idle
        # tower a placeholder input and adding 0 x its output: under ZeRO-3 a tower's forward gathers its
        # sharded weights collectively, so a rank that skipped it (its batch had no image) would deadlock the
        # others, and DDP without unused-parameter detection fails on parameters that got no gradient.
        run_idle_towers = _is_multi_process()
        encoder_outputs = {}
        for modality in self._modalities:
            inputs_embeds, encoder_outputs[modality.name] = self._merge(
                modality, input_ids, inputs_embeds, media, run_idle_towers
            )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **kwargs,
        )
        return MMPeftCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=encoder_outputs["image"],
            audio_outputs=encoder_outputs["audio"],
        )


def _wanted(flag: bool | None, config: PreTrainedConfig, name: str = "output_hidden_states") -> bool:
    """An output flag, the config's when not given."""
    return getattr(config, name) if flag is None else flag


def _is_multi_process() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _first_misaligned_sample(tokens_per_sample: list[int], tokens_per_item: list[int]) -> int:
    """Index of the first sample whose placeholder count does not line up with the media items in order."""
    items = iter(tokens_per_item)
    for sample, needed in enumerate(tokens_per_sample):
        taken = 0
        while taken < needed:
            item = next(items, None)
            if item is None:
                return sample
            taken += item
        if taken != needed:
            return sample
    return len(tokens_per_sample) - 1  # placeholders all matched: items are left over after the last sample


__all__ = [
    "MMPeftCausalLMOutputWithPast",
    "MMPeftForConditionalGeneration",
    "MMPeftPreTrainedModel",
    "MMPeftProjector",
    "TokenReduction",
]
