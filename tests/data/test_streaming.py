"""Streaming: records split across processes and DataLoader workers without loss or overlap, shuffled
reproducibly, bad samples counted, and the recipe trains from a stream."""

import json

import pytest
import torch
from recipe_helpers import TINY, finetune
from tiny_parts import build

from mmpeft.data import MMPeftDataCollator
from mmpeft.data.streaming import StreamingDataset


@pytest.fixture(scope="module")
def processor():
    return build("llama", None, None)[1]


def write_shards(folder, shards=3, per_shard=7, bad=()):
    folder.mkdir(exist_ok=True)
    for shard in range(shards):
        with open(folder / f"part-{shard}.jsonl", "w") as file:
            for index in range(per_shard):
                answer = f"a{shard}-{index}"
                row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}
                file.write("{not json\n" if (shard, index) in bad else json.dumps(row) + "\n")
    return str(folder / "*.jsonl")


def answers(dataset, processor, workers=0):
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, num_workers=workers, collate_fn=MMPeftDataCollator(processor.tokenizer.pad_token_id)
    )
    seen, skipped = [], []
    for batch in loader:
        skipped += batch.pop("skipped_samples", [])
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            seen.append(processor.tokenizer.decode(ids[labels != -100]).split("<")[0])
    return seen, skipped


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_is_split_across_processes_and_workers_without_loss_or_overlap(tmp_path, processor, workers):
    glob = write_shards(tmp_path / "shards")
    shares = [
        answers(StreamingDataset([(glob, "train")], processor, rank=rank, world_size=2, seed=1), processor, workers)[0]
        for rank in (0, 1)
    ]
    everything = [f"a{shard}-{index}" for shard in range(3) for index in range(7)]
    assert sorted(shares[0] + shares[1]) == sorted(everything) and not set(shares[0]) & set(shares[1])
    assert abs(len(shares[0]) - len(shares[1])) <= 1 + workers
    # Shuffled within the buffer, reproducibly; a new epoch, a new order.
    dataset = StreamingDataset([(glob, "train")], processor, seed=1, shuffle_buffer_size=8)
    first, again = answers(dataset, processor)[0], answers(dataset, processor)[0]
    dataset.set_epoch(1)
    assert first == again != answers(dataset, processor)[0] and first != sorted(first)
    assert sorted(first) == sorted(everything)


def test_bad_records_in_a_stream_are_skipped_and_reported_or_raised(tmp_path, processor):
    glob = write_shards(tmp_path / "shards", bad={(1, 3)})
    seen, skipped = answers(StreamingDataset([(glob, "train")], processor, on_bad_sample="skip"), processor)
    assert len(seen) == 20 and "a1-3" not in seen
    where = str(tmp_path / "shards" / "part-1.jsonl:4")
    assert [s["where"] for s in skipped] == [where] and skipped[0]["reason"].startswith("malformed JSON line")
    with pytest.raises(ValueError, match=rf"{where}: malformed JSON line"):
        answers(StreamingDataset([(glob, "train")], processor), processor)


def test_recipe_trains_from_a_stream_and_counts_its_skips(tmp_path):
    glob = write_shards(tmp_path / "shards", shards=2, per_shard=20, bad={(0, 5)})
    output = tmp_path / "out"
    trainer = finetune.main(
        [*TINY, "--train_data", glob, "--streaming", "true", "--max_steps", "4", "--report_to", "none",
         "--on_bad_sample", "skip", "--eval_strategy", "no", "--output_dir", str(output)]
    )  # fmt: skip
    assert isinstance(trainer.train_dataset, StreamingDataset) and trainer.state.global_step == 4
    report = json.loads((output / "data_report.json").read_text())["skipped while loading"]
    assert report["skipped"] == 1 and report["where"] == {
        next(iter(report["reasons"])): [str(tmp_path / "shards" / "part-0.jsonl:6")]
    }


@pytest.mark.parametrize(
    "setting, message",
    [
        (["--max_steps", "-1"], "give max_steps"),
        (["--train_sampling_strategy", "group_by_length"], "use padding_free: true"),
        (["--eval_fraction", "0.1"], "give eval_data instead"),
    ],
)
def test_settings_that_need_the_whole_data_are_refused_with_streaming(setting, message, tmp_path):
    glob = write_shards(tmp_path / "shards")
    with pytest.raises(ValueError, match=message):
        finetune.main([*TINY, "--train_data", glob, "--streaming", "true", "--max_steps", "4", *setting])


def test_resuming_a_streamed_run_continues_where_it_stopped(tmp_path):
    # 8 steps saving at 4, against a run resumed from that checkpoint: the same stream order, the same weights.
    glob = write_shards(tmp_path / "shards", shards=2, per_shard=40)
    args = [*TINY, "--train_data", glob, "--streaming", "true", "--max_steps", "8", "--report_to", "none",
            "--save_strategy", "steps", "--save_steps", "4", "--lora_dropout", "0"]  # fmt: skip
    whole = finetune.main([*args, "--output_dir", str(tmp_path / "whole")])
    resumed = finetune.main(
        [*args, "--output_dir", str(tmp_path / "resumed"),
         "--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-4")]
    )  # fmt: skip
    assert resumed.state.global_step == 8
    expected = {name: p for name, p in whole.model.named_parameters() if p.requires_grad}
    for name, parameter in resumed.model.named_parameters():
        if parameter.requires_grad:
            assert torch.equal(parameter, expected[name]), name
