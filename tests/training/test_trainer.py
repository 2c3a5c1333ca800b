import random
import re

import pytest
import torch
from tiny_parts import build, mixed_records
from transformers.trainer_pt_utils import LengthGroupedSampler

from mmpeft.data import MMPeftDataCollator, MMPeftDataset, prepare_examples
from mmpeft.training import MMPeftTrainer, MMPeftTrainingArguments, TuningArguments, setup_tuning
from mmpeft.training.trainer import logits_for_labels_only


@pytest.mark.parametrize(
    "settings", [dict(method="full"), dict(method="lora", vision_tuning="lora", audio_tuning="full")]
)
def test_encoders_train_at_a_scaled_learning_rate(settings, tok, tmp_path):
    model, processor = build(tok=tok)
    tuning = TuningArguments(**settings, encoder_learning_rate_scale=0.1)
    model = setup_tuning(model, tuning)
    args = MMPeftTrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to="none", weight_decay=0.1)
    trainer = MMPeftTrainer(model=model, args=args, processing_class=processor, policy=tuning.policy)
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(lr_of) == len(trainable)  # every trainable parameter is optimised, once
    encoder = re.compile(r"(^|\.)(vision_tower|audio_tower)\.")
    encoders = [p for name, p in trainable if encoder.search(name)]
    assert encoders and all(lr_of[id(p)] == pytest.approx(1e-4) for p in encoders)
    assert all(lr_of[id(p)] == pytest.approx(1e-3) for name, p in trainable if not encoder.search(name))
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0, 0.1}  # decay split kept


def test_logits_only_where_labels_are_predicted_give_the_same_loss_and_gradients(tok):
    model, processor = build(tok=tok)
    examples, _ = prepare_examples(mixed_records(5), processor)
    dataset = MMPeftDataset(examples, processor)
    for padding_free in (False, True):
        batch = MMPeftDataCollator(processor.tokenizer.pad_token_id, padding_free=padding_free)(
            [dataset[i] for i in range(len(dataset))]
        )
        results = []
        for inputs in (batch, logits_for_labels_only(batch)):
            model.zero_grad()
            outputs = model(**inputs)
            outputs.loss.backward()
            results.append((outputs, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (full, full_grads), (kept, kept_grads) = results
        labelled = int((batch["labels"][..., 1:] != -100).sum())
        assert kept.logits.shape == (labelled, full.logits.shape[-1]) and labelled < batch["input_ids"].numel() / 2
        torch.testing.assert_close(kept.loss, full.loss)
        for a, b in zip(kept_grads, full_grads, strict=True):
            torch.testing.assert_close(a, b)


def test_group_by_length_reads_lengths_without_loading_samples(tok, tmp_path):
    model, processor = build(tok=tok)
    examples, _ = prepare_examples(mixed_records(96), processor)

    class CountingDataset(MMPeftDataset):
        loaded = 0

        def __getitem__(self, index):
            CountingDataset.loaded += 1
            return super().__getitem__(index)

    dataset = CountingDataset(examples, processor)
    args = MMPeftTrainingArguments(
        output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=4,
        train_sampling_strategy="group_by_length",
    )  # fmt: skip
    trainer = MMPeftTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    sampler = trainer._get_train_sampler()
    expected = [len(dataset.example(index)) for index in range(len(dataset))]
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == expected
    torch.manual_seed(0)
    order = list(sampler)
    assert CountingDataset.loaded == 0 and sorted(order) == list(range(96))
    # Batches of similar lengths (sorted within random groups of 24): far less padding than a shuffled order.
    lengths = dataset.lengths

    def padded_positions(indices):
        batches = [indices[i : i + 4] for i in range(0, len(indices), 4)]
        return sum(4 * max(lengths[i] for i in batch) for batch in batches)

    assert padded_positions(order) < 0.8 * padded_positions(random.Random(0).sample(range(96), 96))
