"""adapter_per_modality: a `vision` and a `speech` LoRA adapter on the LM, each batch activating those of its media.
Checked on what an optimizer step changes (bit for bit), on save -> reload, and on the settings it refuses."""

from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_parts import build, media

from mmpeft import MMPeftForConditionalGeneration
from mmpeft.inference import load_for_inference, merge_adapter, output_kind
from mmpeft.training import TuningArguments, setup_tuning
from mmpeft.training.arguments import ConfigError
from mmpeft.training.modality_adapters import (
    adapters_for,
    check_settings,
    load_modality_adapters,
    modality_adapter_base,
)


SETTINGS = dict(method="lora", adapter_per_modality=True, lora_r=4)


def batches(processor) -> dict[str, dict]:
    """One labelled batch per kind of input: text + image, text + audio, both, text only."""
    images, audio = media(0, num_images=1, audio_seconds=(0.5,))
    kinds = {
        "image": dict(text=["<image> what is this? a cat"], images=images),
        "audio": dict(text=["<audio> what was said? hello"], audio=audio),
        "both": dict(text=["<image><audio> hello there"], images=images, audio=audio),
        "text": dict(text=["just some text here"]),
    }
    out = {}
    for kind, inputs in kinds.items():
        encoded = processor(**inputs, return_tensors="pt")
        out[kind] = {**encoded, "labels": encoded["input_ids"]}
    return out


def adapter_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if f".{adapter}." in name}


def step(model, optimizer, inputs):
    model.train()
    optimizer.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    optimizer.step()


@pytest.fixture
def tuned(tok):
    model, processor = build(tok=tok, audio_frames_per_token=2)
    return setup_tuning(model, TuningArguments(**SETTINGS)), processor


def test_each_batch_activates_the_adapters_of_its_media(tuned):
    model, processor = tuned
    router = model.get_base_model()._modality_router
    expected = {"image": ["vision"], "audio": ["speech"], "both": ["vision", "speech"], "text": []}
    for kind, inputs in batches(processor).items():
        assert adapters_for(inputs) == expected[kind]
        with torch.no_grad():
            model(**inputs)
        assert router.active == expected[kind], kind
        layer = model.base_model.model.language_model.model.layers[0].self_attn.q_proj
        assert layer.active_adapters == expected[kind]
    # Both adapters stay trainable whatever the routing (DDP and the optimizer see a fixed parameter set), and
    # the projectors are trained once, with the vision adapter.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(any(f".lora_A.{name}." in p for p in trainable) for name in ("vision", "speech"))
    assert set(model.peft_config["vision"].modules_to_save) == {"vision_projector", "audio_projector"}
    assert not model.peft_config["speech"].modules_to_save


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_a_step_changes_only_the_adapters_of_its_media(tuned, weight_decay):
    model, processor = tuned
    inputs = batches(processor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay

    speech, vision = adapter_weights(model, "speech"), adapter_weights(model, "vision")
    step(model, optimizer, inputs["image"])
    # Inactive: no gradient at all (not zeros), so AdamW -- weight decay included -- skips it.
    assert all(p.grad is None for name, p in model.named_parameters() if ".speech." in name)
    after = adapter_weights(model, "speech")
    assert all(torch.equal(speech[name], after[name]) for name in speech)
    changed = {name for name, p in adapter_weights(model, "vision").items() if not torch.equal(p, vision[name])}
    assert {name for name in vision if ".lora_B." in name} <= changed  # every vision LoRA layer learnt

    # Then an audio step: the vision adapter, which now has AdamW state, is left bit-identical in turn.
    vision, speech = adapter_weights(model, "vision"), adapter_weights(model, "speech")
    step(model, optimizer, inputs["audio"])
    assert all(torch.equal(p, vision[name]) for name, p in adapter_weights(model, "vision").items() if "lora_" in name)
    changed = {name for name, p in adapter_weights(model, "speech").items() if not torch.equal(p, speech[name])}
    assert {name for name in speech if ".lora_B." in name} <= changed


def test_dora_adapters_are_routed_too(tok):
    model, processor = build(tok=tok, audio_frames_per_token=2)
    model = setup_tuning(model, TuningArguments(**{**SETTINGS, "method": "dora"}))
    assert all(config.use_dora for config in model.peft_config.values())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    vision, speech = adapter_weights(model, "vision"), adapter_weights(model, "speech")
    step(model, optimizer, batches(processor)["audio"])
    # (the vision adapter's modules_to_save copies, the projectors, train on any batch that uses them)
    assert all(torch.equal(p, vision[name]) for name, p in adapter_weights(model, "vision").items() if "lora_" in name)
    changed = {name for name, p in adapter_weights(model, "speech").items() if not torch.equal(p, speech[name])}
    assert any(".lora_magnitude_vector.speech" in name for name in changed)


def test_text_only_batches_run_the_base_lm(tuned):
    model, processor = tuned
    inputs = batches(processor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step(model, optimizer, inputs["both"])  # both adapters now differ from the base
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        routed = model(**inputs["text"]).logits
        with model.disable_adapter():
            base = model(**inputs["text"]).logits
        adapted = model(**inputs["both"]).logits
        with model.disable_adapter():
            assert not torch.equal(adapted, model(**inputs["both"]).logits)
    assert torch.equal(routed, base)
    # A text-only training step trains nothing (nothing trainable took part) and does not fail.
    step(model, optimizer, inputs["text"])
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_save_and_reload_give_the_trained_logits(tok, tmp_path):
    model, processor = build(tok=tok, audio_frames_per_token=2)
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    base = MMPeftForConditionalGeneration.from_pretrained(tmp_path / "base")
    model = setup_tuning(base, TuningArguments(**SETTINGS))
    inputs = batches(processor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for kind in ("image", "audio", "both"):
        step(model, optimizer, inputs[kind])
    output = tmp_path / "out"
    model.save_pretrained(output)

    # Named adapters in PEFT's subfolders; the projectors saved once, with the vision adapter.
    vision, speech = (load_file(output / name / "adapter_model.safetensors") for name in ("vision", "speech"))
    assert any("vision_projector" in key for key in vision) and any("audio_projector" in key for key in vision)
    assert not any("projector" in key for key in speech) and all("lora_" in key for key in speech)
    assert output_kind(output) == "adapter" and modality_adapter_base(output) == str(tmp_path / "base")

    model.eval()
    reloaded, _ = load_for_inference(output)
    fresh = load_modality_adapters(MMPeftForConditionalGeneration.from_pretrained(tmp_path / "base"), output)
    with torch.no_grad():
        for kind in ("image", "audio", "both", "text"):
            trained = model(**inputs[kind]).logits
            assert torch.equal(reloaded(**inputs[kind]).logits, trained), kind
            assert torch.equal(fresh(**inputs[kind]).logits, trained), kind
        # Plain PEFT loads the named adapters; with the vision adapter active it is the trained model on images.
        plain = PeftModel.from_pretrained(
            MMPeftForConditionalGeneration.from_pretrained(tmp_path / "base"), output / "vision", adapter_name="vision"
        )
        plain.load_adapter(output / "speech", adapter_name="speech")
        plain.set_adapter("vision")
        assert torch.equal(plain.eval()(**inputs["image"]).logits, model(**inputs["image"]).logits)
    # Generation keeps, at every decode step, the adapters the prompt's media chose.
    prompt = {key: value for key, value in inputs["audio"].items() if key != "labels"}
    reloaded.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert reloaded.get_base_model()._modality_router.active == ["speech"]
    with pytest.raises(ValueError, match="one adapter per modality"):
        merge_adapter(output, tmp_path / "merged")


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(method="freeze"), "needs language_tuning: lora"),
        (dict(method="lora", language_tuning="frozen", vision_tuning="lora"), "needs language_tuning: lora"),
        (dict(method="lora", audio_tuning="lora"), r"LoRA on the encoders \(audio_tuning: lora\)"),
    ],
)
def test_settings_that_cannot_work_are_refused(settings, message, tok):
    with pytest.raises(ConfigError, match=message):
        check_settings(TuningArguments(**settings, adapter_per_modality=True))
    model, _ = build(tok=tok)
    with pytest.raises(ConfigError, match=message):
        setup_tuning(model, TuningArguments(**settings, adapter_per_modality=True))


def test_a_model_without_both_modalities_is_refused(tok):
    model, _ = build(tok=tok, audio=None)
    with pytest.raises(ConfigError, match="the model has no audio_tower; one adapter per modality needs both"):
        setup_tuning(model, TuningArguments(**SETTINGS))


def training_args(**overrides):
    values = dict(
        deepspeed=None,
        fsdp=[],
        resume_from_checkpoint=None,
        auto_resume=False,
        load_best_model_at_end=False,
        push_to_hub=False,
        world_size=1,
        ddp_find_unused_parameters=None,
    )
    return SimpleNamespace(**{**values, **overrides})


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(deepspeed="zero3.json"), "not supported under DeepSpeed or FSDP"),
        (dict(fsdp=["full_shard"]), "not supported under DeepSpeed or FSDP"),
        (dict(auto_resume=True), "resuming is not supported yet"),
        (dict(load_best_model_at_end=True), "load_best_model_at_end"),
        (dict(push_to_hub=True), "push_to_hub is not supported yet"),
        (dict(world_size=2, ddp_find_unused_parameters=False), "needs ddp_find_unused_parameters: true"),
    ],
)
def test_training_setups_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_settings(TuningArguments(**SETTINGS), training_args(**overrides))


def test_ddp_finds_unused_parameters():
    args = training_args(world_size=2)
    check_settings(TuningArguments(**SETTINGS), args)
    assert args.ddp_find_unused_parameters is True
    check_settings(TuningArguments(method="full"), args := training_args(world_size=2, deepspeed="z.json"))
    assert args.ddp_find_unused_parameters is None  # the setting off: nothing checked or changed


def test_the_recipe_refuses_before_preparing_anything(tmp_path):
    from recipe_helpers import TINY, finetune

    argv = [*TINY, "--adapter_per_modality", "true", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    with pytest.raises(ConfigError, match="adapter_per_modality: needs language_tuning: lora"):
        finetune.main([*argv, "--method", "full"])
    assert not (tmp_path / "out" / "data_report.json").exists()
