"""Padding-free (packed) training: attention that keeps packed samples apart without computing across them, and a
check that the LM keeps them apart at all.

`MMPeftDataCollator(padding_free=True)` lays a batch's samples end to end in one row, with `position_ids` that
restart at 0 for every sample and no `attention_mask`. transformers' LMs turn those position ids into a
block-diagonal causal mask; flash attention uses them as sequence boundaries (varlen). SDPA with that mask still
computes the attention of every token to every other in the row and throws the cross-sample blocks away: for a
row of 8 samples, 8 x the work of attending within each sample. `packed_sdpa_attention_forward` runs SDPA sample
by sample instead -- the same numbers, the work of the samples themselves.
"""

import torch
from transformers import AttentionInterface
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


PACKED_SDPA = "mmpeft_packed_sdpa"


def _sample_bounds(position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> list[int] | None:
    """Start offsets of the samples in a packed row (and its end), or None when the row is not packed."""
    if position_ids is None or query.shape[0] != 1 or position_ids.shape[0] != 1:
        return None
    if not query.shape[2] == key.shape[2] == position_ids.shape[1]:  # a cache (generation): not a packed row
        return None
    starts = (position_ids[0, 1:] != position_ids[0, :-1] + 1).nonzero().flatten() + 1
    if starts.numel() == 0:
        return None
    return [0, *starts.tolist(), query.shape[2]]


def packed_sdpa_attention_forward(module, query, key, value, attention_mask, *, position_ids=None, **kwargs):
    """transformers' SDPA attention; on a packed row, run causally within each sample, one sample at a time.

    Args are those of `transformers.integrations.sdpa_attention.sdpa_attention_forward`: query / key / value
    (batch, heads, seq, head_dim), returning (batch, seq, heads, head_dim). A packed row (batch 1, position ids
    that restart) ignores `attention_mask`, the block-diagonal mask it stands for.
    """
    bounds = _sample_bounds(position_ids, query, key)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)
    outputs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
        for a, b in zip(bounds, bounds[1:])
    ]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # masks as for SDPA (used when a row is not packed)


def use_packed_attention(model) -> bool:
    """Switch `model`'s LM from SDPA to `packed_sdpa_attention_forward`; other implementations (flash attention
    is packed-aware already, eager) are left as they are. Returns whether it switched. The setting is not saved
    with the model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    language_model = base.language_model
    if language_model.config._attn_implementation != "sdpa":
        return False
    language_model.set_attn_implementation(PACKED_SDPA)
    return True


def check_padding_free_attention(model, tolerance: float = 1e-2) -> None:
    """Raise unless `model`'s language model keeps the samples of a padding-free batch apart.

    transformers' LMs build the per-sample causal mask from `position_ids` when no `attention_mask` is given;
    an LM that does not would silently let every sample attend to the ones before it in the row. Two short
    sequences are run packed and the second alone, and their logits compared (relative to their size, so that
    bf16 / 4-bit LMs pass). Skipped under DeepSpeed ZeRO-3, whose sharded weights only run inside the engine.
    """
    if is_deepspeed_zero3_enabled():
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    language_model = base.language_model
    device = next(language_model.parameters()).device
    vocab = language_model.get_input_embeddings().num_embeddings
    first, second = torch.arange(3) % vocab, (torch.arange(4) * 7 + 3) % vocab
    packed = torch.cat([first, second])[None].to(device)
    positions = torch.cat([torch.arange(3), torch.arange(4)])[None].to(device)
    was_training = language_model.training
    language_model.eval()
    with torch.no_grad():
        together = language_model(input_ids=packed, position_ids=positions, use_cache=False).logits[0, 3:]
        alone = language_model(input_ids=second[None].to(device), use_cache=False).logits[0]
    language_model.train(was_training)
    difference = ((together.float() - alone.float()).abs().max() / alone.float().abs().max().clamp_min(1e-6)).item()
    if difference > tolerance:
        raise ValueError(
            f"padding_free: the language model ({type(language_model).__name__}) lets packed samples attend to each "
            f"other (a sample's logits change by {difference:.1%} when another precedes it in the row): it does not "
            "build its attention mask from position_ids. Train with padding_free: false."
        )


__all__ = ["PACKED_SDPA", "check_padding_free_attention", "packed_sdpa_attention_forward", "use_packed_attention"]
