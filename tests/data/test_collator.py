"""Padded and padding-free batches: the same samples give the same loss and gradients, for every LM family."""

import numpy as np
import pytest
import torch
from tiny_parts import TEXT_FAMILIES, build, mixed_records

from mmpeft.data import MMPeftDataCollator, MMPeftDataset, prepare_examples
from mmpeft.data.dataset import IGNORE_INDEX


@pytest.fixture(scope="module")
def items(tok):
    _, processor = build(tok=tok)
    examples, _ = prepare_examples(mixed_records(5), processor)
    dataset = MMPeftDataset(examples, processor)
    return [dataset[i] for i in range(len(dataset))], processor.tokenizer.pad_token_id


def test_padding_free_batch_is_one_row_with_restarting_positions(items):
    items, pad = items
    padded = MMPeftDataCollator(pad)(items)
    flat = MMPeftDataCollator(pad, padding_free=True)(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert flat["input_ids"].shape == flat["labels"].shape == flat["position_ids"].shape == (1, sum(lengths))
    assert "attention_mask" not in flat
    assert flat["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert flat["input_ids"][0].tolist() == [t for item in items for t in item["input_ids"].tolist()]
    # Labels as padded, except that no sample's first token is a target (it would be predicted from the last
    # token of the sample before it).
    starts = np.cumsum([0, *lengths[:-1]])
    assert flat["labels"][0, starts].eq(IGNORE_INDEX).all()
    real = padded["labels"][padded["attention_mask"].bool()]
    real[starts] = IGNORE_INDEX
    assert torch.equal(flat["labels"][0], real)
    # Media are batched exactly as in padded batches, in sample order.
    for name in ("pixel_values", "input_features", "feature_attention_mask"):
        assert torch.equal(flat[name], padded[name])
    assert padded["input_ids"].numel() > flat["input_ids"].numel()  # the padding it saves


@pytest.mark.parametrize("text", TEXT_FAMILIES)
def test_padding_free_gives_the_padded_loss_and_gradients(text, tok, items):
    items, pad = items
    model, _ = build(text=text, tok=tok)  # eval mode: no dropout, so both layouts compute the same function
    results = []
    for padding_free in (False, True):
        batch = MMPeftDataCollator(pad, padding_free=padding_free)(items)
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (padded_loss, padded_grads), (flat_loss, flat_grads) = results
    torch.testing.assert_close(flat_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert len(flat_grads) == len(padded_grads) > 0
    for flat, padded in zip(flat_grads, padded_grads):
        torch.testing.assert_close(flat, padded, rtol=1e-4, atol=1e-6)


def test_padding_free_is_for_training_only():
    with pytest.raises(ValueError, match="left padding is for batched generation"):
        MMPeftDataCollator(0, padding_side="left", padding_free=True)
