"""QLoRA on CPU (bitsandbytes 0.50 runs 4-bit and 8-bit here): the policy, training, and every way back."""

import json
import os

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from recipe_helpers import TINY, finetune, losses

from mmpeft import MMPeftForConditionalGeneration, MMPeftProcessor
from mmpeft.data import MMPeftDataCollator, MMPeftDataset
from mmpeft.inference import merge_adapter
from mmpeft.training import TuningArguments, count_parameters, precision_summary, quantization_config, setup_tuning


TINY = [*TINY, "--report_to", "none", "--learning_rate", "3e-3", "--method", "qlora"]
QUANTIZED_LINEAR = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}


def logits(model, processor, examples):
    dataset = MMPeftDataset(examples, processor)
    batch = MMPeftDataCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_policy_keeps_encoders_projectors_and_head_unquantized():
    config = quantization_config(TuningArguments(method="qlora"))
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert set(config.llm_int8_skip_modules) == {
        "vision_tower",
        "audio_tower",
        "vision_projector",
        "audio_projector",
        "lm_head",
    }
    config = quantization_config(
        TuningArguments(method="qlora", quantization_bits=8, quantized_parts=["language", "vision"])
    )
    assert config.load_in_8bit and "vision_tower" not in config.llm_int8_skip_modules
    assert quantization_config(TuningArguments(method="lora")) is None
    with pytest.raises(ValueError, match=r"quantized_parts: unknown parts \['decoder'\]"):
        TuningArguments(method="qlora", quantized_parts=["decoder"])


def test_parameter_counts_see_through_4_bit_packing(reference_dir):
    plain = MMPeftForConditionalGeneration.from_pretrained(reference_dir)
    config = quantization_config(TuningArguments(method="qlora"))
    quantized = MMPeftForConditionalGeneration.from_pretrained(reference_dir, quantization_config=config)
    assert any(isinstance(parameter, bnb.nn.Params4bit) for parameter in quantized.parameters())
    # Two 4-bit weights per byte of storage, counted as two: the same total as the unquantized model's.
    total = count_parameters(plain)[1]
    assert count_parameters(quantized)[1] == total
    assert sum(kind["params"] for kinds in precision_summary(quantized).values() for kind in kinds.values()) == total
    lora = setup_tuning(plain, TuningArguments(method="lora"))
    qlora = setup_tuning(quantized, TuningArguments(method="qlora"))
    assert count_parameters(qlora) == qlora.get_nb_trainable_parameters() == count_parameters(lora)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_saves_and_reloads(bits, tmp_path):
    output = tmp_path / f"qlora{bits}"
    trainer = finetune.main([*TINY, "--quantization_bits", str(bits), "--output_dir", str(output)])
    history = losses(trainer)
    assert sum(history[-3:]) < 0.7 * sum(history[:3])

    # The policy as loaded: the LM's block linears quantized, everything else not.
    model = trainer.model.get_base_model()
    quantized = {n for n, m in model.named_modules() if isinstance(m, QUANTIZED_LINEAR[bits])}
    assert quantized and all(n.startswith("language_model.model.layers.") for n in quantized)
    assert not isinstance(model.language_model.lm_head, QUANTIZED_LINEAR[bits])
    summary = precision_summary(trainer.model)
    assert set(summary["language_model"]) >= {f"{bits}-bit", "32-bit"}
    for part in ("vision_tower", "audio_tower", "vision_projector", "audio_projector"):
        assert set(summary[part]) == {"32-bit"}, part  # encoders not upcast or quantized: as loaded

    examples = trainer.eval_dataset.rows.select(range(4))
    processor = MMPeftProcessor.from_pretrained(output)
    expected = logits(trainer.model, processor, examples)
    adapter = json.loads((output / "adapter_config.json").read_text())
    base_path = adapter["base_model_name_or_path"]
    config = quantization_config(TuningArguments(method="qlora", quantization_bits=bits))

    # Onto a quantized base: the same model. Not bit-exact: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit
    # weights for inference at the first eval forward (the trained model's evaluation did) and unpacks them
    # slightly differently; the difference stays at the level of that rounding.
    quantized_base = MMPeftForConditionalGeneration.from_pretrained(base_path, quantization_config=config)
    reloaded = logits(PeftModel.from_pretrained(quantized_base, output), processor, examples)
    torch.testing.assert_close(reloaded, expected, atol=2e-2, rtol=0)
    assert torch.equal(reloaded.argmax(-1), expected.argmax(-1))

    # Onto an unquantized base: same adapter weights, outputs within the quantization error.
    plain = PeftModel.from_pretrained(MMPeftForConditionalGeneration.from_pretrained(base_path), output)
    trained = dict(trainer.model.named_parameters())
    for name, parameter in plain.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            assert torch.equal(parameter, trained[name].to(parameter.dtype)), name
    unquantized = logits(plain, processor, examples)
    agreement = (unquantized.argmax(-1) == expected.argmax(-1)).float().mean()
    assert agreement > 0.9

    # Merged into a 16-bit base: a plain checkpoint that reloads without PEFT.
    merged_dir = merge_adapter(output, tmp_path / "merged", dtype=torch.bfloat16)
    assert not os.path.exists(os.path.join(merged_dir, "adapter_config.json"))
    merged = MMPeftForConditionalGeneration.from_pretrained(merged_dir)
    assert merged.dtype == torch.bfloat16
    assert not any("lora" in name for name, _ in merged.named_parameters())
    merged_logits = logits(merged, MMPeftProcessor.from_pretrained(merged_dir), examples).float()
    assert (merged_logits.argmax(-1) == unquantized.argmax(-1)).float().mean() > 0.9
