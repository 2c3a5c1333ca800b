"""Batching: pad text (or flatten it, padding-free), concatenate media. It never truncates: a sample longer than
`max_length` here is a bug upstream (prepare_examples drops or raises on those), so it raises naming the sample."""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .dataset import IGNORE_INDEX


@dataclass
class MMPeftDataCollator:
    """Collates `MMPeftDataset` items into model inputs.

    Text is padded (`padding_side="right"` for training, `"left"` for batched generation) or, with
    `padding_free=True`, the samples are laid end to end in one row, as `DataCollatorWithFlattening` does for
    text: `input_ids` / `labels` of shape (1, total tokens), `position_ids` restarting at 0 for every sample and
    no `attention_mask`, from which the LM's attention keeps each sample to itself (transformers builds the
    block-diagonal causal mask from the position ids; flash attention uses them as sequence boundaries). No
    compute is spent on padding, and each sample's first label is ignored so that no token is predicted across
    a boundary. Images and audio chunks of all samples are concatenated in order either way, audio padded to
    the longest chunk in the batch: their placeholder runs stay in sample order, so the model's scatter is
    the same. Samples that `MMPeftDataset` replaced (their media failed to load) are passed on as
    `skipped_samples` for the trainer to count.

    Args:
        pad_token_id: id used to pad `input_ids`.
        max_length: longest sample accepted (checked, never enforced by cutting).
        padding_side: `"right"` or `"left"`.
        padding_free: flatten the batch into one row instead of padding it (training only).
    """

    pad_token_id: int
    max_length: int | None = None
    padding_side: Literal["right", "left"] = "right"
    padding_free: bool = False

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.padding_free and self.padding_side == "left":
            raise ValueError("padding_free batches are for training; left padding is for batched generation.")

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        for item in items:
            if "bad_sample" in item:  # raised by the consumer of the batch (`take_load_reports`)
                return {"bad_sample": item["bad_sample"]}
        lengths = [len(item["input_ids"]) for item in items]
        if self.max_length is not None and max(lengths) > self.max_length:
            index = max(range(len(items)), key=lengths.__getitem__)
            raise ValueError(
                f"sample {index} of the batch has {lengths[index]} tokens > max_length {self.max_length}; samples are "
                "never truncated (that would cut placeholder runs), prepare_examples drops or rejects them."
            )
        batch = self._flatten(items, lengths) if self.padding_free else self._pad_text(items, max(lengths))
        for name in {key for item in items for key in item} - {"input_ids", "labels", "skipped_samples"}:
            tensors = [item[name] for item in items if name in item]
            width = max(t.shape[-1] for t in tensors)  # waveform / mask lengths differ across chunks
            batch[name] = torch.cat([F.pad(t, (0, width - t.shape[-1])) for t in tensors])
        skipped = [sample for item in items for sample in item.get("skipped_samples", ())]
        if skipped:  # samples replaced because their media failed to load: the trainer counts them
            batch["skipped_samples"] = skipped
        return batch

    def _pad_text(self, items: list[dict], longest: int) -> dict[str, torch.Tensor]:
        batch = {
            "input_ids": self._pad([item["input_ids"] for item in items], longest, self.pad_token_id),
            "attention_mask": self._pad([torch.ones_like(item["input_ids"]) for item in items], longest, 0),
        }
        if "labels" in items[0]:
            batch["labels"] = self._pad([item["labels"] for item in items], longest, IGNORE_INDEX)
        return batch

    def _flatten(self, items: list[dict], lengths: list[int]) -> dict[str, torch.Tensor]:
        batch = {
            "input_ids": torch.cat([item["input_ids"] for item in items])[None],
            "position_ids": torch.cat([torch.arange(length) for length in lengths])[None],
        }
        if "labels" in items[0]:
            # The LM's loss predicts labels[t + 1] from token t: without this, the last token of one sample would
            # be trained to predict the first token of the next.
            labels = [F.pad(item["labels"][1:], (1, 0), value=IGNORE_INDEX) for item in items]
            batch["labels"] = torch.cat(labels)[None]
        return batch

    def _pad(self, sequences: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
        def padding(sequence):
            extra = length - len(sequence)
            return (extra, 0) if self.padding_side == "left" else (0, extra)

        return torch.stack([F.pad(sequence, padding(sequence), value=value) for sequence in sequences])


__all__ = ["MMPeftDataCollator"]
