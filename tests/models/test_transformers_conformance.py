"""mmpeft's model, config and processor under transformers' own common tests, as transformers tests Llava and
Qwen2-Audio: `ModelTesterMixin`, `PipelineTesterMixin` and `ConfigTester` against `MMPeftForConditionalGeneration`,
`ProcessorTesterMixin` against `MMPeftProcessor`, on a tiny composition (SigLIP + Whisper encoder + Llama).

The mixins come from the transformers sdist of the installed version (`transformers_common`). Tests that cannot
apply to a composition of parts are skipped with the reason; contract breaks still open are `xfail(strict=True)`.
"""

import copy
import functools
import unittest

import pytest
import torch
import torch.nn.functional as F
from tiny_parts import AUDIO_CONFIGS, AUDIO_PREPROCESSORS, VISION_CONFIGS, image_processor, text_config, tokenizer
from transformers.testing_utils import torch_device
from transformers_common import mixin

from mmpeft import MMPeftConfig, MMPeftForConditionalGeneration, MMPeftProcessor
from mmpeft.models.configuration_mmpeft import num_audio_tokens


ModelTesterMixin = mixin("test_modeling_common", "ModelTesterMixin")
ConfigTester = mixin("test_configuration_common", "ConfigTester")
PipelineTesterMixin = mixin("test_pipeline_mixin", "PipelineTesterMixin")
ProcessorTesterMixin = mixin("test_processing_common", "ProcessorTesterMixin")
# Not in the sdist: a stand-in that `ModelTesterMixin` sees a generative model's tester inherit (transformers_common).
GenerationTesterMixin = mixin("generation.test_utils", "GenerationTesterMixin")

# Contract breaks of mmpeft that transformers' tests find, each an expected failure (strict: a fix must remove it).
AUTO_MAP_AFTER_SAVE = (
    "mmpeft contract: save_pretrained of a processor registered for AutoProcessor (trust_remote_code) leaves "
    "`auto_map` on it, so its to_dict() differs from the reloaded one's"
)


def expect_failures(cls, reasons: dict):
    """Mark the inherited tests of `cls` named in `reasons` (a name, or a prefix ending in "_" for the variants of
    a parameterized test) `xfail(strict=True, reason=...)`, without touching the mixin's own functions."""
    # parameterized leaves the undecorated function under its name, marked `__test__ = False`: not a test.
    tests = [name for name in dir(cls) if name.startswith("test_") and getattr(getattr(cls, name), "__test__", True)]
    for name in tests:
        reason = next(
            (why for key, why in reasons.items() if name == key or key.endswith("_") and name.startswith(key)), None
        )
        if reason is not None:
            method = getattr(cls, name)

            def test(self, *args, _method=method, **kwargs):
                return _method(self, *args, **kwargs)

            # Not `functools.wraps`: parameterized's variants wrap a function pytest cannot show a traceback of.
            test.__name__, test.__qualname__, test.__doc__ = name, f"{cls.__name__}.{name}", method.__doc__
            setattr(cls, name, pytest.mark.xfail(strict=True, reason=reason)(test))
    return cls


class MMPeftModelTester:
    """Tiny configs and inputs for the common tests: every sample has one image and one audio clip."""

    def __init__(self, parent, batch_size=3, text_length=7, image_token_id=3, audio_token_id=4):
        self.parent = parent
        self.batch_size = batch_size
        self.image_token_id, self.audio_token_id = image_token_id, audio_token_id
        self.is_training = True
        self.vocab_size = 99
        self.text_config = text_config("llama", self.vocab_size)  # pad / bos / eos = 0 / 1 / 2
        # Dicts with "num_hidden_layers", where the mixins read the layer count of a tower's outputs (Whisper calls it
        # `encoder_layers`, which its config maps `num_hidden_layers` to).
        self.vision_config = VISION_CONFIGS["siglip"]().to_dict()
        self.audio_config = AUDIO_CONFIGS["whisper"]().to_dict()
        self.audio_config["num_hidden_layers"] = self.audio_config["encoder_layers"]
        self.pad_token_id = self.text_config.pad_token_id
        self.hidden_size = self.text_config.hidden_size
        self.num_hidden_layers = self.text_config.num_hidden_layers
        self.num_attention_heads = self.text_config.num_attention_heads
        self.image_size, self.num_channels = self.vision_config["image_size"], self.vision_config["num_channels"]
        self.num_mel_bins = self.audio_config["num_mel_bins"]
        self.audio_frames = 2 * self.audio_config["max_source_positions"]  # Whisper's fixed window
        config = self.get_config()
        self.num_image_tokens = config.num_image_tokens
        self.num_audio_tokens = num_audio_tokens(self.audio_frames, config.audio_downsampling, 1)
        self.seq_length = text_length + self.num_image_tokens + self.num_audio_tokens
        self.encoder_seq_length = self.seq_length

    def get_config(self):
        return MMPeftConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            audio_config=self.audio_config,
            image_token_id=self.image_token_id,
            audio_token_id=self.audio_token_id,
        )

    def prepare_config_and_inputs(self):
        shape = (self.batch_size, self.num_channels, self.image_size, self.image_size)
        pixel_values = torch.rand(shape, device=torch_device)
        input_features = torch.rand(self.batch_size, self.num_mel_bins, self.audio_frames, device=torch_device)
        return self.get_config(), pixel_values, input_features

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, input_features = self.prepare_config_and_inputs()
        # Text ids above the special ones (0-4), then one image's and one clip's placeholders up front.
        input_ids = torch.randint(5, self.vocab_size, (self.batch_size, self.seq_length), device=torch_device)
        input_ids[:, : self.num_image_tokens] = self.image_token_id
        audio = slice(self.num_image_tokens, self.num_image_tokens + self.num_audio_tokens)
        input_ids[:, audio] = self.audio_token_id
        inputs_dict = {
            "input_ids": input_ids,
            "attention_mask": torch.ones(input_ids.shape, dtype=torch.long, device=torch_device),
            "pixel_values": pixel_values,
            "input_features": input_features,
            "feature_attention_mask": torch.ones(
                self.batch_size, self.audio_frames, dtype=torch.long, device=torch_device
            ),
        }
        return config, inputs_dict


class MMPeftForConditionalGenerationModelTest(
    ModelTesterMixin, GenerationTesterMixin, PipelineTesterMixin, unittest.TestCase
):
    """`ModelTesterMixin` (and the pipeline mixin) on `MMPeftForConditionalGeneration`."""

    all_model_classes = (MMPeftForConditionalGeneration,)
    pipeline_model_mapping = {
        "image-text-to-text": MMPeftForConditionalGeneration,
        "any-to-any": MMPeftForConditionalGeneration,
    }
    _is_composite = True

    def setUp(self):
        self.model_tester = MMPeftModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=MMPeftConfig,
            has_text_modality=False,
            common_properties=["image_token_id", "audio_token_id", "vision_feature_layer"],
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # transformers adds labels to the classes its static name tables list as causal LMs, which a model
        # registered from outside transformers never is.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs_dict["labels"] = torch.zeros_like(inputs_dict["input_ids"])
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(
        reason="A composition with no base model: the towers, projectors and language_model sit at the root by "
        "design (simple PEFT targets and quantization skip lists), so model.base_model is the model itself"
    )
    def test_model_base_model_prefix(self):
        pass

    def test_mismatching_num_media_tokens(self):
        """Media whose features do not fill their placeholders raise a clear error; placeholders without any media
        stay ordinary tokens, as in transformers' VLMs (generation passes the media at the first step only)."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = MMPeftForConditionalGeneration(config).to(torch_device).eval()
        model(**inputs)
        for names in (("pixel_values",), ("input_features", "feature_attention_mask")):
            fewer = copy.deepcopy(inputs)
            for name in names:
                fewer[name] = fewer[name][-1:]
            with self.assertRaisesRegex(ValueError, "do not match"):
                model(**fewer)
            model(**{key: value for key, value in inputs.items() if key not in names})


@functools.partial(
    expect_failures,
    reasons={
        "test_processor_from_and_save_pretrained": AUTO_MAP_AFTER_SAVE,
        "test_processor_from_and_save_pretrained_as_nested_dict": AUTO_MAP_AFTER_SAVE,
    },
)
class MMPeftProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    """`ProcessorTesterMixin` on `MMPeftProcessor` with a SigLIP image processor, a Whisper feature extractor and
    the byte-level tokenizer of `tiny_parts`."""

    processor_class = MMPeftProcessor

    @classmethod
    def _setup_image_processor(cls):
        return image_processor()

    @classmethod
    def _setup_feature_extractor(cls):
        return AUDIO_PREPROCESSORS["whisper"]()

    @classmethod
    def _setup_tokenizer(cls):
        return tokenizer()

    @staticmethod
    def prepare_processor_dict():
        return {"image_seq_length": 16, "audio_downsampling": [[3, 1, 1], [3, 2, 1]]}


class MMPeftGenerationTest(unittest.TestCase):
    """What `GenerationTesterMixin` would check, for the sdist lacks it (`transformers_common`): greedy decoding
    with a cache equals step-by-step decoding without one, and a static cache, assisted decoding, prompt lookup and
    a continued cache give its tokens; left padding changes no sample's tokens; sampling and beam search expand the
    media with the prompts; generation sees `logits_to_keep`."""

    def setUp(self):
        self.model_tester = MMPeftModelTester(self)
        self.config, self.inputs = self.model_tester.prepare_config_and_inputs_for_common()
        torch.manual_seed(0)
        self.model = MMPeftForConditionalGeneration(self.config).to(torch_device).eval()
        # Only text tokens: no placeholder (the model suppresses those itself) and no early end of sequence.
        self.suppress = [self.config.text_config.eos_token_id, self.model_tester.image_token_id]
        self.suppress.append(self.model_tester.audio_token_id)

    def _greedy_without_cache(self, inputs, steps):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        media = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
        for _ in range(steps):
            with torch.no_grad():
                logits = self.model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **media
                ).logits
            logits = logits[:, -1]
            logits[:, self.suppress] = -float("inf")
            input_ids = torch.cat([input_ids, logits.argmax(-1, keepdim=True)], dim=-1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=-1)
        return input_ids

    def _generate(self, inputs, **kwargs):
        kwargs = {"max_new_tokens": 5, "do_sample": False, "suppress_tokens": self.suppress, **kwargs}
        return self.model.generate(**inputs, **kwargs)

    def test_greedy_with_cache_matches_without(self):
        expected = self._greedy_without_cache(self.inputs, steps=5)
        torch.testing.assert_close(self._generate(self.inputs), expected, rtol=0, atol=0)

    def test_static_cache_and_assisted_decoding_match_greedy(self):
        """A static cache, an assistant model and prompt lookup give greedy decoding's tokens."""
        single = {key: value[:1] for key, value in self.inputs.items()}  # assisted decoding takes one sample
        expected = self._generate(single)
        ways = {"static": {"cache_implementation": "static"}, "assisted": {"assistant_model": self.model}}
        ways["prompt_lookup"] = {"prompt_lookup_num_tokens": 2}
        for name, kwargs in ways.items():
            with self.subTest(name):
                torch.testing.assert_close(self._generate(single, **kwargs), expected)

    def test_continue_from_past_key_values(self):
        """Generating 3 tokens, then 1 more from the returned cache and the tokens so far, gives the 4 tokens of one
        call. The media go to the first call only: their features are in the cache (transformers' Llava, too,
        refuses media whose placeholders are all cached)."""
        kwargs = {"max_new_tokens": 4, "do_sample": False, "suppress_tokens": self.suppress, "use_cache": True}
        expected = self.model.generate(**self.inputs, **kwargs)
        first = self.model.generate(**self.inputs, **{**kwargs, "max_new_tokens": 3}, return_dict_in_generate=True)
        inputs = {"input_ids": first.sequences, "past_key_values": first.past_key_values}
        inputs["attention_mask"] = F.pad(self.inputs["attention_mask"], (0, 3), value=1)
        torch.testing.assert_close(self.model.generate(**inputs, **{**kwargs, "max_new_tokens": 1}), expected)

    def test_left_padding_changes_no_tokens(self):
        single = {key: value[:1] for key, value in self.inputs.items()}
        longer = {key: value[1:2] for key, value in self.inputs.items()}
        extra = torch.full((1, 2), 7, dtype=torch.long, device=torch_device)
        pad = torch.full((1, 2), self.model_tester.pad_token_id, dtype=torch.long, device=torch_device)
        batch = {
            "input_ids": torch.cat(
                [torch.cat([pad, single["input_ids"]], -1), torch.cat([longer["input_ids"], extra], -1)]
            ),
            "attention_mask": torch.cat(
                [
                    torch.cat([torch.zeros_like(pad), single["attention_mask"]], -1),
                    torch.ones(1, pad.shape[1] + longer["attention_mask"].shape[1], dtype=torch.long),
                ]
            ),
        }
        for key in ("pixel_values", "input_features", "feature_attention_mask"):
            batch[key] = torch.cat([single[key], longer[key]])
        alone, padded = self._generate(single), self._generate(batch)
        prompt = single["input_ids"].shape[1]
        self.assertEqual(padded[0, prompt + 2 :].tolist(), alone[0, prompt:].tolist())

    def test_sample_and_beam_search_expand_media(self):
        prompt = self.inputs["input_ids"]
        for kwargs in ({"do_sample": True, "num_return_sequences": 2}, {"num_beams": 2, "num_return_sequences": 2}):
            with self.subTest(**kwargs):
                torch.manual_seed(0)
                sequences = self._generate(self.inputs, **kwargs)
                self.assertEqual(tuple(sequences.shape), (2 * prompt.shape[0], prompt.shape[1] + 5))
                torch.testing.assert_close(sequences[::2, : prompt.shape[1]], prompt)

    def test_generation_sees_logits_to_keep(self):
        """Generation computes the logits of the last position only where `forward` declares `logits_to_keep`."""
        self.assertTrue(self.model._supports_logits_to_keep())
        logits = self.model(**self.inputs, logits_to_keep=1).logits
        self.assertEqual(logits.shape[1], 1)


class MMPeftIntegrationConformanceTest(unittest.TestCase):
    """transformers' entry points other than the mixins: export, the Auto classes and the pipelines."""

    def setUp(self):
        self.model_tester = MMPeftModelTester(self)
        self.config, self.inputs = self.model_tester.prepare_config_and_inputs_for_common()
        self.model = MMPeftForConditionalGeneration(self.config).to(torch_device).eval()

    def test_torch_export(self):
        """`torch.export` traces a prefill with images and audio (the exporters' mixin is not in the sdist)."""
        inputs = {**self.inputs, "use_cache": False}  # a DynamicCache is no output torch.export knows
        exported = torch.export.export(self.model, args=(), kwargs=inputs, strict=False)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(**inputs).logits, self.model(**inputs).logits)

    def test_image_text_to_text_auto_class(self):
        """`AutoModelForImageTextToText` (the image-text-to-text pipeline's Auto class) builds it from its config."""
        from transformers import AutoModelForImageTextToText

        self.assertIsInstance(AutoModelForImageTextToText.from_config(self.config), MMPeftForConditionalGeneration)

    def test_any_to_any_auto_class(self):
        """`AutoModelForMultimodalLM` (the any-to-any pipeline's Auto class) builds it from its config."""
        from transformers import AutoModelForMultimodalLM

        self.assertIsInstance(AutoModelForMultimodalLM.from_config(self.config), MMPeftForConditionalGeneration)

    def test_image_text_to_text_pipeline(self):
        """`pipeline("image-text-to-text")` answers a chat with an image (the pipeline tests are not in the sdist)."""
        from tiny_parts import build, media
        from transformers import pipeline

        model, processor = build()
        images, _ = media()
        chat = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "what"}]}]
        answer = pipeline("image-text-to-text", model=model, processor=processor)(text=chat, max_new_tokens=3)
        self.assertEqual(answer[0]["generated_text"][-1]["role"], "assistant")
