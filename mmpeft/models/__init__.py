"""The omni model, its config and its processor, registered with the transformers Auto classes."""

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

from .configuration_mmpeft import MMPeftConfig, num_audio_tokens
from .modeling_mmpeft import MMPeftForConditionalGeneration, MMPeftPreTrainedModel
from .processing_mmpeft import MMPeftProcessor


AutoConfig.register("mmpeft", MMPeftConfig)
AutoModelForCausalLM.register(MMPeftConfig, MMPeftForConditionalGeneration)
AutoModelForImageTextToText.register(MMPeftConfig, MMPeftForConditionalGeneration)
AutoModelForMultimodalLM.register(MMPeftConfig, MMPeftForConditionalGeneration)
AutoProcessor.register(MMPeftConfig, MMPeftProcessor)

# `save_pretrained` copies these files next to the weights and writes `auto_map`, so checkpoints load with
# plain transformers + `trust_remote_code=True` where mmpeft is not installed.
MMPeftConfig.register_for_auto_class()
MMPeftForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
MMPeftProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "MMPeftConfig",
    "MMPeftForConditionalGeneration",
    "MMPeftPreTrainedModel",
    "MMPeftProcessor",
    "num_audio_tokens",
]
