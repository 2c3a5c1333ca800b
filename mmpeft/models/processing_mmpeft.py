"""Processor of the mmpeft omni model: tokenizer + image processor + audio feature extractor + chat template.

This file is copied next to saved checkpoints for `trust_remote_code` loading, so it imports only numpy,
transformers and its sibling `configuration_mmpeft.py`.
"""

import contextlib
import math
import os
import signal
import threading

import numpy as np
from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer
from transformers.processing_utils import MultiModalData, ProcessorMixin

from .configuration_mmpeft import AUDIO_MASK_NAMES, num_audio_tokens


# Turn markers of the default chat template; `from_pretrained_parts` adds them to tokenizers that lack them.
CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
# Placeholders of the default chat template, each expanded to one image's or clip's tokens.
IMAGE_TOKEN, AUDIO_TOKEN = "<image>", "<audio>"

# ChatML with multimodal content parts: `{"type": "image"}`, `{"type": "audio"}`, `{"type": "text", "text": ...}`.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<image>' }}"
    "{%- elif part['type'] == 'audio' %}{{- '<audio>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Longest one `apply_chat_template` call may render, in seconds (wall clock). A chat template comes with the
# checkpoint and is a program: nested loops (`range` is capped at 100,000, not their product) render for hours.
# Real templates render a conversation in milliseconds.
CHAT_TEMPLATE_TIME_LIMIT = 5.0


class ChatTemplateTimeout(TimeoutError):
    """A chat template that rendered for longer than its time limit (`CHAT_TEMPLATE_TIME_LIMIT`)."""


@contextlib.contextmanager
def time_limit(seconds: float, message: str):
    """Raise `ChatTemplateTimeout(message)` inside the block once it has run for `seconds` (wall clock).

    A `SIGALRM` timer interrupts pure-Python work such as rendering a Jinja template. Signals reach only the main
    thread, so elsewhere (and where a timer is already set, or on platforms without one) the block runs unlimited;
    data preparation runs in the main thread of its worker processes.
    """
    usable = (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    )
    if not usable:
        yield
        return
    running = [True]

    def expire(signum, frame):
        if running[0]:  # not once the block has ended and the timer is being cleared
            raise ChatTemplateTimeout(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        running[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def rendering_time_limit(conversations: int = 1):
    """`time_limit` for rendering `conversations` conversations with a chat template: `CHAT_TEMPLATE_TIME_LIMIT`
    seconds each (a batch of the prefixes of a long conversation is not a loop)."""
    limit = CHAT_TEMPLATE_TIME_LIMIT
    return time_limit(limit * conversations, f"chat template: rendering took over {limit:g} s")


# Valid positions in the padding mask a feature extractor returns for a chunk of `n` samples, by extractor class:
# what counting a clip's tokens needs, without computing its features (log-mel featurizing a chunk only to count
# its frames was most of the cost of preparing a dataset). Extractors not listed here are asked with silence.
AUDIO_MASK_LENGTHS = {
    "WhisperFeatureExtractor": lambda extractor, n: -(-n // extractor.hop_length),  # its mask is taken every hop
    "Wav2Vec2FeatureExtractor": lambda extractor, n: n,  # one position per sample
}


def load_tokenizer_for_parts(text: str | os.PathLike, image: bool, audio: bool):
    """The tokenizer of the LM at `text`, with the tokens a model composed from it needs added where missing: the
    ChatML markers of the default chat template and the placeholders of the modalities it has."""
    tokenizer = load_without_code(AutoTokenizer, text)
    wanted = [*CHAT_SPECIAL_TOKENS, *([IMAGE_TOKEN] if image else []), *([AUDIO_TOKEN] if audio else [])]
    tokenizer.add_tokens([token for token in wanted if token not in tokenizer.get_vocab()], special_tokens=True)
    return tokenizer


def load_without_code(auto_class, name_or_path, **kwargs):
    """`auto_class.from_pretrained(name_or_path)` (a tokenizer, image processor or feature extractor) that never runs
    code from the checkpoint: an `auto_map` to custom code is refused in one line, where transformers would ask
    "[y/N]" on the terminal (a non-interactive job hangs, or runs the code if something answers y)."""
    kwargs["trust_remote_code"] = False  # mmpeft's parts are transformers classes; none needs a checkpoint's code
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise ValueError(
            f"{name_or_path}: its {auto_class.__name__[4:]} config maps to custom code (auto_map); mmpeft never runs "
            "code from a checkpoint: use a checkpoint whose parts are transformers classes"
        ) from None


class MMPeftProcessor(ProcessorMixin):
    r"""
    Turns text with `<image>` / `<audio>` placeholders, images and audio into model inputs.

    Each `<image>` expands to `image_seq_length` image tokens; each `<audio>` expands to the number of tokens
    its clip becomes in the model (`num_audio_tokens`, the same function the model uses). A clip longer
    than `max_audio_seconds` is split into equal chunks that the encoder sees one by one; their tokens follow
    each other under the one placeholder, so no audio is ever cut off.

    Args:
        image_processor: any image processor (`None` for a model without images).
        feature_extractor: a log-mel (Whisper) or waveform (Wav2Vec2) feature extractor (`None`: no audio).
        tokenizer: the LM's tokenizer, with the placeholder tokens added.
        chat_template: Jinja template; defaults to ChatML with image / audio / text content parts.
        image_token, audio_token: the placeholder strings.
        image_seq_length: tokens per image (`MMPeftConfig.num_image_tokens`). Only the model knows it: a
            processor built from its components alone processes text, and raises at the first image.
        audio_downsampling: the audio encoder's strided layers (`MMPeftConfig.audio_downsampling`); likewise
            needed at the first audio clip only.
        audio_frames_per_token: `MMPeftConfig.audio_frames_per_token`.
        max_audio_seconds: longest chunk given to the audio encoder. Defaults to the window of fixed-window
            extractors (Whisper's `chunk_length`, 30 s for Whisper) and to 30 s otherwise.
    """

    def __init__(
        self,
        image_processor=None,
        feature_extractor=None,
        tokenizer=None,
        chat_template=None,
        image_token=IMAGE_TOKEN,
        audio_token=AUDIO_TOKEN,
        image_seq_length=None,
        audio_downsampling=None,
        audio_frames_per_token=1,
        max_audio_seconds=None,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("MMPeftProcessor needs a tokenizer.")
        self.image_token = image_token if image_processor is not None else None
        self.audio_token = audio_token if feature_extractor is not None else None
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token) if image_processor is not None else None
        self.audio_token_id = tokenizer.convert_tokens_to_ids(audio_token) if feature_extractor is not None else None
        self.image_seq_length = image_seq_length
        self.audio_downsampling = [list(layer) for layer in audio_downsampling] if audio_downsampling else None
        self.audio_frames_per_token = audio_frames_per_token
        if feature_extractor is not None and max_audio_seconds is None:
            max_audio_seconds = getattr(feature_extractor, "chunk_length", 30)
        self.max_audio_seconds = max_audio_seconds

        # ProcessorMixin expects every sub-processor in the signature to exist; a modality the model lacks
        # has none. Narrow this instance's attribute list to the present ones (the class keeps all three,
        # so `from_pretrained` still knows every possible one).
        present = {
            name: value
            for name, value in (
                ("image_processor", image_processor),
                ("feature_extractor", feature_extractor),
                ("tokenizer", tokenizer),
            )
            if value is not None
        }
        self.get_attributes = lambda: list(present)
        super().__init__(**present, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)

    @classmethod
    def from_pretrained_parts(
        cls,
        config,
        tokenizer,
        vision: str | os.PathLike | None = None,
        audio: str | os.PathLike | None = None,
        chat_template: str | None = None,
    ) -> "MMPeftProcessor":
        """The processor of a model composed from pretrained parts, for
        `MMPeftForConditionalGeneration.from_pretrained_parts`.

        Args:
            config: the composed model's `MMPeftConfig` (tokens per image, the audio encoder's downsampling).
            tokenizer: the LM's tokenizer, with the tokens the model needs (`load_tokenizer_for_parts`).
            vision: Hub id or directory of the vision encoder, whose image processor is loaded, or `None`.
            audio: Hub id or directory of the audio encoder, whose feature extractor is loaded, or `None`.
            chat_template: defaults to ChatML with image / audio / text parts.
        """
        return cls(
            image_processor=load_without_code(AutoImageProcessor, vision) if vision else None,
            feature_extractor=load_without_code(AutoFeatureExtractor, audio) if audio else None,
            tokenizer=tokenizer,
            chat_template=chat_template,
            image_seq_length=config.num_image_tokens if vision else None,
            audio_downsampling=config.audio_downsampling if audio else None,
            audio_frames_per_token=config.audio_frames_per_token,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`ProcessorMixin.from_pretrained`, refusing a chat template that cannot render a short conversation within
        `CHAT_TEMPLATE_TIME_LIMIT` (it would hang data preparation); sub-processors never run checkpoint code."""
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        probe = [
            {"role": "user", "content": [{"type": "text", "text": "Hello."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
        ]
        try:
            processor.apply_chat_template([probe, probe[:1]], tokenize=False)
        except ChatTemplateTimeout:
            source = os.path.join(pretrained_model_name_or_path, "chat_template.jinja")
            source = source if os.path.isfile(source) else f"the chat template of {pretrained_model_name_or_path}"
            raise ValueError(
                f"{source}: rendering a two-message conversation took over {CHAT_TEMPLATE_TIME_LIMIT:g} s; "
                "mmpeft refuses the template (does it loop for long?)"
            ) from None
        except Exception:  # noqa: BLE001 -- other failures are the data's to report, sample by sample
            pass
        return processor

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """`ProcessorMixin.apply_chat_template`; rendering to text (`tokenize=False`, the default) is limited to
        `CHAT_TEMPLATE_TIME_LIMIT` seconds a conversation and raises `ChatTemplateTimeout` beyond (tokenizing also
        loads media, which takes its own time)."""
        if kwargs.get("tokenize"):
            return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(conversation[0], list)
        with rendering_time_limit(len(conversation) if batched else 1):
            return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # A saved processor lists only the sub-processors it has in processor_config.json.
        processor_dict = processor_dict or {}
        kwargs.pop("subfolder", None)
        image_processor = feature_extractor = None
        if processor_dict.get("image_processor") is not None:
            image_processor = load_without_code(AutoImageProcessor, pretrained_model_name_or_path, **kwargs)
        if processor_dict.get("feature_extractor") is not None:
            feature_extractor = load_without_code(AutoFeatureExtractor, pretrained_model_name_or_path, **kwargs)
        tokenizer = load_without_code(AutoTokenizer, pretrained_model_name_or_path, **kwargs)
        return [image_processor, feature_extractor, tokenizer]

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self._model_setting("image_seq_length", "num_image_tokens")

    def num_audio_tokens(self, length: int) -> int:
        """Tokens one audio chunk of `length` valid input positions (frames or samples) becomes."""
        downsampling = self._model_setting("audio_downsampling", "audio_downsampling")
        return num_audio_tokens(length, downsampling, self.audio_frames_per_token)

    def _model_setting(self, name: str, config_name: str):
        """The setting `name` (the model config's `<config_name>`), or an error that says where it comes from."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(
                f"MMPeftProcessor has no `{name}`: it comes from the model; build the processor with "
                f"`{name}=config.{config_name}` (as `MMPeftProcessor.from_pretrained_parts` does)."
            )
        return value

    def _get_num_multimodal_tokens(self, image_sizes=None, audio_lengths=None, **kwargs) -> MultiModalData:
        """Placeholder tokens of media of the given sizes, for serving engines (vLLM) that reserve them.

        Args:
            image_sizes: (height, width) per image; every image becomes `image_seq_length` tokens (the image
                processor resizes it to the encoder's size).
            audio_lengths: samples per mono clip at the feature extractor's sampling rate.

        Returns:
            `MultiModalData` with `num_image_tokens` and `num_image_patches` (1 per image) and / or
            `num_audio_tokens` (a long clip's chunks together, as `process_audio` counts them).
        """
        counts = {}
        if image_sizes is not None:
            tokens = self._model_setting("image_seq_length", "num_image_tokens")
            counts.update(num_image_tokens=[tokens] * len(image_sizes), num_image_patches=[1] * len(image_sizes))
        if audio_lengths is not None:
            counts["num_audio_tokens"] = [self.num_audio_tokens_for_samples(int(n)) for n in audio_lengths]
        return MultiModalData(**counts)

    def process_audio(self, audio: list) -> tuple[dict, list[int]]:
        """Audio features of `audio` (mono waveforms at the extractor's sampling rate) and tokens per clip.

        Returns:
            `({input_name: (num_chunks, ...), mask_name: (num_chunks, length)}, tokens_per_clip)`, where
            `input_name` is `input_features` (log-mel extractors) or `input_values` (waveform extractors).
        """
        chunks, chunks_per_clip = [], []
        for index, clip in enumerate(audio):
            clip = np.asarray(clip, dtype=np.float32)
            if clip.ndim != 1 or clip.size == 0:
                raise ValueError(
                    f"audio {index}: expected a non-empty mono waveform (1-D array), got shape {clip.shape}."
                )
            num_chunks = self._num_audio_chunks(clip.size)
            chunks.extend(np.array_split(clip, num_chunks))
            chunks_per_clip.append(num_chunks)
        outputs, tokens_per_chunk = self._featurize_audio_chunks(chunks)
        tokens_per_clip, start = [], 0
        for index, num_chunks in enumerate(chunks_per_clip):
            tokens = tokens_per_chunk[start : start + num_chunks]
            if min(tokens) < 1:
                raise ValueError(f"audio {index} is too short: a chunk of it gives no audio tokens.")
            tokens_per_clip.append(sum(tokens))
            start += num_chunks
        input_name = self.feature_extractor.model_input_names[0]
        features = {input_name: outputs[input_name], AUDIO_MASK_NAMES[input_name]: outputs["attention_mask"]}
        return features, tokens_per_clip

    def num_audio_tokens_for_samples(self, num_samples: int) -> int:
        """Tokens that `process_audio` gives a mono clip of `num_samples` samples, from the length alone.

        A clip can thus be measured from its file header (`mmpeft.data.media.audio_length`) and refused as
        too long without being decoded. The extractor's mask depends only on a chunk's length: it is computed
        from the length (`AUDIO_MASK_LENGTHS`), or for other extractors from silence of that length.
        """
        if num_samples < 1:
            raise ValueError(f"expected a non-empty audio clip, got {num_samples} samples.")
        num_chunks = self._num_audio_chunks(num_samples)
        size, longer = divmod(num_samples, num_chunks)  # as np.array_split: the first `longer` chunks are longer
        counts = {length: count for length, count in ((size + 1, longer), (size, num_chunks - longer)) if count}
        tokens = {length: self.num_audio_tokens(self._audio_mask_length(length)) for length in counts}
        if min(tokens.values()) < 1:
            raise ValueError(f"audio of {num_samples} samples is too short: a chunk of it gives no audio tokens.")
        return sum(tokens[length] * count for length, count in counts.items())

    def _audio_mask_length(self, num_samples: int) -> int:
        """Valid positions of the extractor's padding mask for one chunk of `num_samples` samples."""
        known = AUDIO_MASK_LENGTHS.get(type(self.feature_extractor).__name__)
        if known is not None:
            return known(self.feature_extractor, num_samples)
        outputs, _ = self._featurize_audio_chunks([np.zeros(num_samples, dtype=np.float32)])
        return int(outputs["attention_mask"].sum())

    def _num_audio_chunks(self, num_samples: int) -> int:
        # Equal chunks rather than full ones plus a sliver, so every chunk carries enough signal.
        return math.ceil(num_samples / int(self.max_audio_seconds * self.feature_extractor.sampling_rate))

    def _featurize_audio_chunks(self, chunks: list) -> tuple[dict, list[int]]:
        """The extractor's outputs for `chunks` and the tokens each chunk becomes."""
        extractor = self.feature_extractor
        # Fixed-window extractors (Whisper) pad to their window; others pad to the longest chunk.
        padding = "max_length" if hasattr(extractor, "n_samples") else "longest"
        outputs = extractor(
            chunks,
            sampling_rate=extractor.sampling_rate,
            padding=padding,
            return_attention_mask=True,
            return_tensors="np",
        )
        return outputs, [self.num_audio_tokens(int(length)) for length in outputs["attention_mask"].sum(-1)]

    def _process_audio(self, audio, **kwargs):
        features, tokens_per_clip = self.process_audio(audio)
        return features, [self.audio_token * tokens for tokens in tokens_per_clip]

    @property
    def model_input_names(self) -> list[str]:
        names = list(self.tokenizer.model_input_names)
        if getattr(self, "image_processor", None) is not None:
            names += self.image_processor.model_input_names
        if getattr(self, "feature_extractor", None) is not None:
            input_name = self.feature_extractor.model_input_names[0]
            names += [input_name, AUDIO_MASK_NAMES[input_name]]
        return names


__all__ = [
    "AUDIO_TOKEN",
    "CHAT_SPECIAL_TOKENS",
    "CHAT_TEMPLATE_TIME_LIMIT",
    "ChatTemplateTimeout",
    "DEFAULT_CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "MMPeftProcessor",
    "load_tokenizer_for_parts",
    "load_without_code",
    "rendering_time_limit",
    "time_limit",
]
