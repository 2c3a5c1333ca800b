"""mmpeft: compose any HF vision encoder and any HF audio encoder with any causal LM, and fine-tune it."""

from .models import (
    MMPeftConfig,
    MMPeftForConditionalGeneration,
    MMPeftPreTrainedModel,
    MMPeftProcessor,
    num_audio_tokens,
)


__version__ = "0.1.0"

__all__ = [
    "MMPeftConfig",
    "MMPeftForConditionalGeneration",
    "MMPeftPreTrainedModel",
    "MMPeftProcessor",
    "num_audio_tokens",
]
