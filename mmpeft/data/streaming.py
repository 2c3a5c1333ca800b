"""Streaming training data: records read, prepared and loaded as training consumes them, with no pass over the data
before the first step (`DataArguments.streaming`).

Records are split across processes and DataLoader workers by their position in the stream: reader `r` of `n` (`n` =
processes x workers per process) prepares records `r, r + n, r + 2n, ...`, so no record is prepared twice and none
is lost, whatever the number of files. (`datasets.distributed.split_dataset_by_node` splits by whole files only when
their number divides evenly, and Accelerate would split a `datasets.IterableDataset` again on its own; so the split is
done here, once, before any record is parsed.) Each reader shuffles its rows in a buffer of `shuffle_buffer_size`,
seeded by the seed, the epoch and the reader, so a run is reproducible.

Bad samples -- found when a record is prepared, or when its media are loaded -- are skipped and reported like the
samples `mmpeft.data.MMPeftDataset` replaces (`skipped_samples` on the next item: the trainer counts them) or raise,
per `on_bad_sample`.
"""

import random
from typing import Iterator

import torch

from .dataset import SkipReport, bad_sample_item, load_item, prepare_row
from .formats import BadSampleError, read_records
from .sources import MediaPolicy


class StreamingDataset(torch.utils.data.IterableDataset):
    """Training items of records streamed from `sources` (read one after another), prepared on the fly.

    Args:
        sources: `(source, split)` pairs, as `read_records` takes them.
        processor: the model's `MMPeftProcessor`.
        rank, world_size: this process and the number of processes (the stream is split across them).
        seed: seed of the shuffle buffer (with the epoch and the reader).
        shuffle_buffer_size: rows each reader shuffles among (1: the records' order).
        max_length, on_bad_sample, on_overlong, validate_media, media_policy: as for preparing data.
    """

    def __init__(
        self,
        sources: list[tuple[str, str]],
        processor,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer_size: int = 1000,
        max_length: int | None = None,
        on_bad_sample: str = "error",
        on_overlong: str = "skip",
        validate_media: str = "header",
        media_policy: MediaPolicy = MediaPolicy(),
    ):
        self.sources, self.processor = sources, processor
        self.rank, self.world_size, self.seed, self.shuffle_buffer_size = rank, world_size, seed, shuffle_buffer_size
        self.on_bad_sample, self.media_policy = on_bad_sample, media_policy
        self.settings = dict(
            max_length=max_length, on_bad_sample=on_bad_sample, on_overlong=on_overlong, validate_media=validate_media
        )
        self.epoch = 0

    def set_epoch(self, epoch: int):
        """Called by the Trainer at each epoch: a new shuffle order."""
        self.epoch = epoch

    def _reader(self) -> tuple[int, int]:
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        return self.rank * workers + worker_id, self.world_size * workers

    def rows(self) -> Iterator[tuple[dict | None, list[dict]]]:
        """`(row, skipped)` for this reader's records in stream order: a prepared row (None for a skipped record)
        and the skips to report with it."""
        reader, readers = self._reader()
        position = 0
        for source, split in self.sources:
            for record in read_records(source, split, self.media_policy):
                position += 1
                if (position - 1) % readers != reader:
                    continue
                report = SkipReport()
                row = prepare_row(record, self.processor, report, **self.settings)
                skipped = [{"where": where, "reason": reason} for reason, [where] in report.where.items()]
                yield row, skipped

    def __iter__(self) -> Iterator[dict]:
        reader, _ = self._reader()
        rng = random.Random(f"{self.seed}-{self.epoch}-{reader}")
        buffer, pending = [], []
        for row, skipped in self.rows():
            pending += skipped
            if row is None:
                continue
            buffer.append(row)
            if len(buffer) >= self.shuffle_buffer_size:
                item = self._item(buffer.pop(rng.randrange(len(buffer))), pending)
                if item is not None:
                    pending = []
                    yield item
        rng.shuffle(buffer)
        for row in buffer:
            item = self._item(row, pending)
            if item is not None:
                pending = []
                yield item

    def _item(self, row: dict, pending: list[dict]) -> dict | None:
        """The row's model inputs with the pending skips attached, or None (and the row added to `pending`) when
        its media fail to load and bad samples are skipped."""
        try:
            item = load_item(row, self.processor, media_policy=self.media_policy)
        except BadSampleError as error:
            if self.on_bad_sample == "error":
                return bad_sample_item(error)
            pending.append({"where": error.where, "reason": error.key})
            return None
        if pending:
            item["skipped_samples"] = list(pending)
        return item


__all__ = ["StreamingDataset"]
