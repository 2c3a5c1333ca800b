"""Data: dataset formats -> records -> prepared rows (cached, memory-mapped, or streamed) -> model inputs -> batches
(see mmpeft/ARCHITECTURE.md)."""

from .collator import MMPeftDataCollator
from .dataset import Example, MMPeftDataset, SkipReport, prepare_examples
from .formats import BadSampleError, Record, read_records, to_conversation
from .media import MediaError, load_audio, load_image
from .sources import MediaPolicy
from .synthetic import generate_synthetic_dataset


__all__ = [
    "BadSampleError",
    "Example",
    "MMPeftDataCollator",
    "MMPeftDataset",
    "MediaError",
    "MediaPolicy",
    "Record",
    "SkipReport",
    "generate_synthetic_dataset",
    "load_audio",
    "load_image",
    "prepare_examples",
    "read_records",
    "to_conversation",
]
