"""Packed attention: each sample of a padding-free row attends to itself only, computed sample by sample; an LM that
would let packed samples see each other is refused."""

import pytest
import torch
from tiny_parts import TEXT_FAMILIES, build, mixed_records

import mmpeft.training.packing as packing
from mmpeft.data import MMPeftDataCollator, MMPeftDataset, prepare_examples
from mmpeft.training.packing import PACKED_SDPA, check_padding_free_attention, use_packed_attention


@pytest.mark.parametrize("text", TEXT_FAMILIES)
def test_packed_attention_runs_sample_by_sample_and_matches_the_padded_batch(text, tok, monkeypatch):
    model, processor = build(text=text, tok=tok)
    examples, _ = prepare_examples(mixed_records(5), processor)
    dataset = MMPeftDataset(examples, processor)
    items = [dataset[i] for i in range(len(dataset))]
    padded = MMPeftDataCollator(processor.tokenizer.pad_token_id)(items)
    packed = MMPeftDataCollator(processor.tokenizer.pad_token_id, padding_free=True)(items)
    reference = model(**padded).loss

    assert use_packed_attention(model) and model.language_model.config._attn_implementation == PACKED_SDPA
    lengths = []
    sdpa = packing.sdpa_attention_forward

    def spy(module, query, *args, **kwargs):
        lengths.append(query.shape[2])
        return sdpa(module, query, *args, **kwargs)

    monkeypatch.setattr(packing, "sdpa_attention_forward", spy)
    loss = model(**packed).loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    # One SDPA call per sample and LM layer, each over that sample's tokens only.
    layers = model.config.text_config.num_hidden_layers
    assert lengths == [len(item["input_ids"]) for item in items] * layers
    # Rows that are not packed (padded batches, generation) take plain SDPA, with their mask.
    lengths.clear()
    torch.testing.assert_close(model(**padded).loss, reference)
    assert lengths == [padded["input_ids"].shape[1]] * layers


def test_padding_free_is_refused_for_an_lm_that_lets_packed_samples_attend_to_each_other(tok):
    from transformers import AutoModelForCausalLM, OPTConfig

    model, _ = build(tok=tok)
    check_padding_free_attention(model)  # Llama builds its mask from position_ids
    # OPT's learned positions and mask come from the attention mask alone: packed samples would see each other.
    opt = OPTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64, vocab_size=len(tok),
        word_embed_proj_dim=32,
    )  # fmt: skip
    model.language_model = AutoModelForCausalLM.from_config(opt)
    with pytest.raises(ValueError, match=r"padding_free: the language model \(OPTForCausalLM\) lets packed samples"):
        check_padding_free_attention(model)
