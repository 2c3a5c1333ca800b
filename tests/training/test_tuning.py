"""Each tuning setting trains exactly the parameters it claims: checked on requires_grad and on what an
optimizer step actually changes."""

import pytest
import torch
from tiny_parts import build, media
from torch import nn

from mmpeft.training import TuningArguments, count_parameters, parse_args, setup_tuning
from mmpeft.training.tuning import lora_target_regex


PARTS = ("vision_tower", "audio_tower", "vision_projector", "audio_projector", "language_model")


def batch(processor):
    images, audio = media(0, num_images=1, audio_seconds=(0.5,))
    inputs = processor(text=["<image><audio> hello there"], images=images, audio=audio, return_tensors="pt")
    return {**inputs, "labels": inputs["input_ids"]}


def changed_by_one_step(model, inputs):
    """Names (without PEFT prefixes) of the parameters an AdamW step changes."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**inputs).loss.backward()
    optimizer.step()
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


def part_of(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    return next(part for part in PARTS if name.startswith(part))


CASES = {
    # method / overrides -> parts whose own weights train, parts that get LoRA adapters
    "full": (dict(method="full"), set(PARTS), set()),
    "freeze": (dict(method="freeze"), {"vision_projector", "audio_projector", "language_model"}, set()),
    "stage 1: projectors only": (
        dict(method="freeze", language_tuning="frozen"),
        {"vision_projector", "audio_projector"},
        set(),
    ),
    "lora": (dict(method="lora"), {"vision_projector", "audio_projector"}, {"language_model"}),
    "lora + vision lora, audio full": (
        dict(method="lora", vision_tuning="lora", audio_tuning="full"),
        {"vision_projector", "audio_projector", "audio_tower"},
        {"language_model", "vision_tower"},
    ),
    "lora, projectors frozen": (dict(method="lora", projector_tuning="frozen"), set(), {"language_model"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_method_trains_what_it_claims(case, tok):
    settings, full_parts, lora_parts = CASES[case]
    model, processor = build(tok=tok, audio_frames_per_token=2)
    model = setup_tuning(model, TuningArguments(**settings))
    changed = changed_by_one_step(model, batch(processor))

    adapters = {name for name in changed if "lora_" in name}
    own = changed - adapters
    assert {part_of(name) for name in adapters} == lora_parts
    assert {part_of(name) for name in own} == full_parts
    # Every trainable tensor moved, and nothing frozen did.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    # Under LoRA the fully trained parts are saved inside the adapter (modules_to_save).
    if lora_parts:
        saved = set(model.peft_config["default"].modules_to_save or [])
        assert saved == {p for p in full_parts}


def test_lora_targets_the_lm_only_and_not_its_head(tok):
    model, _ = build(tok=tok)
    pattern = lora_target_regex(model, ["language_model"])
    model = setup_tuning(model, TuningArguments(method="lora"))
    adapted = {name.split(".lora_")[0] for name, _ in model.named_parameters() if ".lora_" in name}
    assert adapted and all(name.startswith("base_model.model.language_model.model.layers.") for name in adapted)
    # every linear layer of every LM block: q, k, v, o, gate, up, down
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert "lm_head" not in pattern


def test_lora_kwargs_reach_the_adapter_config(tok):
    model, _ = build(tok=tok)
    model = setup_tuning(model, TuningArguments(method="lora", lora_kwargs={"use_rslora": True, "bias": "lora_only"}))
    config = model.peft_config["default"]
    assert config.use_rslora and config.bias == "lora_only" and config.r == 16


def test_dora_is_one_row_lora_with_use_dora(tok):
    model, processor = build(tok=tok)
    tuning_args = parse_args(["--method", "dora", "--lora_kwargs", '{"use_rslora": true}', "--report_to", "none"])[2]
    model = setup_tuning(model, tuning_args)
    config = model.peft_config["default"]
    assert config.use_dora and config.use_rslora
    changed = changed_by_one_step(model, batch(processor))
    assert any(".lora_magnitude_vector." in name for name in changed)  # DoRA's own weights train


def test_trainable_modules_are_checked_and_trained(tok):
    model, processor = build(tok=tok)
    with pytest.raises(ValueError, match=r"trainable_modules: the model has no module 'language_model.nope'"):
        setup_tuning(model, TuningArguments(trainable_modules=["language_model.nope"]))
    model = setup_tuning(model, TuningArguments(method="lora", trainable_modules=["language_model.lm_head"]))
    changed = changed_by_one_step(model, batch(processor))
    assert any("lm_head.modules_to_save" in name for name in changed)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(method="full", language_tuning="lora"), "set method: lora"),
        (dict(method="lora", language_tuning="full"), "needs at least one part with"),
        (dict(method="lora", lora_r=0), "lora_r must be >= 1"),
    ],
)
def test_inconsistent_settings_fail_fast(settings, message):
    with pytest.raises(ValueError, match=message):
        TuningArguments(**settings).components


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(method="dorra"), r"method: unknown method 'dorra'; choose from \['full', 'freeze', 'lora', 'qlora'"),
        (dict(lora_kwargs={"use_dorra": True}), r"lora_kwargs: 'use_dorra' is not a field of peft.LoraConfig"),
        (dict(lora_kwargs={"r": 8}), r"lora_kwargs: 'r' is set by mmpeft; set lora_r instead"),
        (dict(lora_kwargs={"task_type": "SEQ_CLS"}), r"lora_kwargs: 'task_type' is set by mmpeft and PEFT"),
        (
            dict(lora_kwargs={"layers_pattern": "layers"}),
            r"`layers_pattern` cannot be used when `target_modules` is a str",
        ),
        (dict(method="dora", lora_kwargs={"lora_bias": True}), r"lora_bias=True is not supported for DoRA"),
    ],
)
def test_settings_outside_the_tables_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        TuningArguments(**settings)


def test_count_parameters_counts_shared_tensors_once_and_zero3_shards_whole():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(3, 5))
    model[1].weight = model[0].weight  # tied: 16 + 4 + 4 in the first two
    model[1].bias.requires_grad_(False)
    sharded = model[2].weight
    sharded.data, sharded.ds_numel = torch.empty(0), 15  # as ZeRO-3 leaves a parameter held by another rank
    assert count_parameters(model) == (16 + 4 + 15 + 5, 16 + 4 + 4 + 15 + 5)
