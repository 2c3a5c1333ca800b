"""mmpeft.inference.load_for_inference: each kind of output folder is recognised and loaded as the model it holds,
and anything else is refused in one line."""

import json
import shutil

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel

from mmpeft import MMPeftForConditionalGeneration, MMPeftProcessor
from mmpeft.inference import load_for_inference, output_kind
from mmpeft.training import TuningArguments, quantization_config, setup_tuning


def inputs(processor):
    inputs = processor(text=["<|im_start|>user\nWhat colour is it?<|im_end|>\n"], return_tensors="pt")
    return {name: value for name, value in inputs.items() if name in ("input_ids", "attention_mask")}


def logits(model, processor):
    with torch.no_grad():
        return model(**inputs(processor)).logits


@pytest.fixture(scope="module")
def adapter_dir(reference_dir, tmp_path_factory):
    """A LoRA adapter (with the projectors) on the reference checkpoint, saved as finetune.py saves it."""
    torch.manual_seed(0)
    model = setup_tuning(MMPeftForConditionalGeneration.from_pretrained(reference_dir), TuningArguments())
    for name, parameter in model.named_parameters():  # LoRA starts as a no-op: make it change the outputs
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    MMPeftProcessor.from_pretrained(reference_dir).save_pretrained(folder)
    return folder, model.eval()


def test_full_weights_load_as_saved_in_eval_mode(reference_dir):
    assert output_kind(reference_dir) == "full"
    model, processor = load_for_inference(reference_dir)
    assert isinstance(model, MMPeftForConditionalGeneration) and not model.training
    expected = MMPeftForConditionalGeneration.from_pretrained(reference_dir).eval()
    assert torch.equal(logits(model, processor), logits(expected, processor))
    model, _ = load_for_inference(reference_dir, dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16


def test_adapter_loads_onto_its_base(adapter_dir, reference_dir):
    folder, trained = adapter_dir
    assert output_kind(folder) == "adapter"
    model, processor = load_for_inference(folder)
    assert isinstance(model, PeftModel) and not model.training
    assert torch.equal(logits(model, processor), logits(trained, processor))
    assert not torch.equal(logits(model, processor), logits(load_for_inference(reference_dir)[0], processor))


def test_adapter_without_processor_takes_the_bases(adapter_dir, tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter_dir[0] / name, folder / name)
    model, processor = load_for_inference(folder)
    assert isinstance(processor, MMPeftProcessor) and processor.image_token_id is not None


def test_qlora_adapter_base_is_quantized_as_recorded(adapter_dir, tmp_path):
    folder = tmp_path / "qlora"
    shutil.copytree(adapter_dir[0], folder)
    recorded = quantization_config(TuningArguments(method="qlora")).to_dict()
    (folder / "run_summary.json").write_text(json.dumps({"method": "qlora", "quantization_config": recorded}))
    model, _ = load_for_inference(folder)
    quantized = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert quantized and all("language_model.model.layers." in name for name in quantized)
    model, _ = load_for_inference(folder, quantized=False)  # as recipes/merge.py loads it
    assert not any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())


def test_anything_else_is_refused_in_one_line(tmp_path, adapter_dir):
    with pytest.raises(ValueError, match=r"no such folder"):
        load_for_inference(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"not an mmpeft output \(neither adapter_config.json"):
        load_for_inference(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json is of model_type 'llama', not 'mmpeft'"):
        load_for_inference(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapter_dir[0] / "adapter_config.json", pickled)
    with pytest.raises(ValueError, match=r"has no adapter_model.safetensors"):
        load_for_inference(pickled)
