"""Batching: pad text, concatenate media. It never truncates: a sample longer than `max_length` here is a
bug upstream (prepare_examples drops or raises on those), so it raises naming the sample."""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .dataset import IGNORE_INDEX


@dataclass
class MMPeftDataCollator:
    """Collates `MMPeftDataset` items into model inputs.

    Text is padded (`padding_side="right"` for training, `"left"` for batched generation); images and audio
    chunks of all samples are concatenated in order, audio padded to the longest chunk in the batch.

    Args:
        pad_token_id: id used to pad `input_ids`.
        max_length: longest sample accepted (checked, never enforced by cutting).
        padding_side: `"right"` or `"left"`.
    """

    pad_token_id: int
    max_length: int | None = None
    padding_side: Literal["right", "left"] = "right"

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(item["input_ids"]) for item in items]
        if self.max_length is not None and max(lengths) > self.max_length:
            index = max(range(len(items)), key=lengths.__getitem__)
            raise ValueError(
                f"sample {index} of the batch has {lengths[index]} tokens > max_length {self.max_length}; samples are "
                "never truncated (that would cut placeholder runs), prepare_examples drops or rejects them."
            )
        longest = max(lengths)
        batch = {
            "input_ids": self._pad([item["input_ids"] for item in items], longest, self.pad_token_id),
            "attention_mask": self._pad([torch.ones_like(item["input_ids"]) for item in items], longest, 0),
        }
        if "labels" in items[0]:
            batch["labels"] = self._pad([item["labels"] for item in items], longest, IGNORE_INDEX)
        for name in {key for item in items for key in item} - {"input_ids", "labels"}:
            tensors = [item[name] for item in items if name in item]
            width = max(t.shape[-1] for t in tensors)  # waveform / mask lengths differ across chunks
            batch[name] = torch.cat([F.pad(t, (0, width - t.shape[-1])) for t in tensors])
        return batch

    def _pad(self, sequences: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
        def padding(sequence):
            extra = length - len(sequence)
            return (extra, 0) if self.padding_side == "left" else (0, extra)

        return torch.stack([F.pad(sequence, padding(sequence), value=value) for sequence in sequences])


__all__ = ["MMPeftDataCollator"]
