"""The per-part policy: its YAML / command-line forms, what each part's settings do to the adapter and the
optimizer, LoRA+, trainable token rows, and the check after the first optimizer step."""

import json
import types

import pytest
import torch
import yaml
from peft import PeftModel
from recipe_helpers import TINY, finetune, losses
from test_qlora import logits
from test_tuning import batch, changed_by_one_step, part_of
from tiny_parts import build, media

from mmpeft import MMPeftForConditionalGeneration, MMPeftProcessor
from mmpeft.inference import merge_adapter
from mmpeft.training import (
    ConfigError,
    MMPeftTrainer,
    MMPeftTrainingArguments,
    TuningArguments,
    parse_args,
    quantization_config,
)
from mmpeft.training.callbacks import PolicyCheckCallback, PolicyCheckError
from mmpeft.training.methods import compute_dtype
from mmpeft.training.tuning import setup_tuning


def test_part_mappings_override_flat_settings_which_override_the_method(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "method": "lora",
                "lora_r": 12,
                "audio_tuning": "full",
                "encoder_learning_rate_scale": 0.2,
                "vision": {"tuning": "lora", "lora_r": 8, "learning_rate": 2e-5},
                "projector": {"weight_decay": 0.0, "learning_rate_scale": 0.5},
            }
        )
    )
    _, _, tuning, _, _ = parse_args(["--config", str(config), "--language", '{"lora_dropout": 0.1}'])
    policy = tuning.policy
    assert tuning.components == {"vision": "lora", "audio": "full", "projector": "full", "language": "lora"}
    assert (policy["vision"].lora_r, policy["vision"].resolved_learning_rate(1e-3)) == (8, 2e-5)
    assert policy["audio"].resolved_learning_rate(1e-3) == pytest.approx(2e-4)  # encoder_learning_rate_scale
    assert policy["projector"].resolved_learning_rate(1e-3) == pytest.approx(5e-4)
    assert (policy["projector"].resolved_weight_decay(0.1), policy["language"].resolved_weight_decay(0.1)) == (
        0.0,
        0.1,
    )
    assert (policy["language"].lora_r, policy["language"].lora_dropout) == (12, 0.1)  # flat lora_r, own dropout


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(vision={"tuning": "lora"}, vision_tuning="full"), "vision.tuning: lora contradicts vision_tuning: full"),
        (dict(audio={"lora_rank": 8}), "audio.lora_rank: unknown part setting"),
        (dict(vision={"use_dora": True}), "vision.use_dora: .* apply to the whole adapter .* lora_kwargs"),
        (dict(projector={"learning_rate": 1e-4, "learning_rate_scale": 0.1}), "projector: give learning_rate or"),
        (dict(language={"lora_r": 0}), "language.lora_r: a positive integer, got 0"),
        (dict(vision={"tuning": "lora", "lora_dropout": 1.5}), r"vision.lora_dropout: a number in \[0, 1\)"),
        (dict(vision={"lora_target_modules": "q_proj("}), "vision.lora_target_modules: not a valid regex"),
        (dict(method="full", vision={"tuning": "lora"}), "method: full trains without adapters"),
        (dict(method="qlora", quantized_parts=["language", "audio"], audio={"tuning": "full"}), "audio trains fully"),
        (dict(method="full", trainable_tokens=["<image>"]), "trainable_tokens: needs an adapter method"),
        (dict(loraplus_lr_ratio=0), "loraplus_lr_ratio: a positive number"),
        (dict(vision="[1]"), "vision: a mapping of settings"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_part_and_key(settings, message):
    with pytest.raises(ConfigError, match=message):
        TuningArguments(**settings)


def test_each_lora_part_gets_its_rank_alpha_dropout_and_targets(tok):
    model, processor = build(tok=tok, audio_frames_per_token=2)
    args = TuningArguments(
        vision={"tuning": "lora", "lora_r": 4, "lora_alpha": 4, "lora_dropout": 0.0},
        audio={"tuning": "lora", "lora_target_modules": ["q_proj", "v_proj"]},
        language={"lora_r": 8, "lora_dropout": 0.2},
    )
    model = setup_tuning(model, args)
    adapted = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            adapted[name.removeprefix("base_model.model.")] = module
    ranks = {
        part_of(name): {m.r["default"] for n, m in adapted.items() if part_of(n) == part_of(name)} for name in adapted
    }
    assert ranks == {"vision_tower": {4}, "audio_tower": {16}, "language_model": {8}}
    scalings = {part_of(n): m.scaling["default"] for n, m in adapted.items()}
    assert scalings == {"vision_tower": 1.0, "audio_tower": 32 / 16, "language_model": 32 / 8}
    dropout = {part_of(n): type(m.lora_dropout["default"]).__name__ for n, m in adapted.items()}
    assert dropout == {"vision_tower": "Identity", "audio_tower": "Dropout", "language_model": "Dropout"}
    assert {m.lora_dropout["default"].p for n, m in adapted.items() if part_of(n) == "language_model"} == {0.2}
    assert {n.rsplit(".", 1)[-1] for n in adapted if part_of(n) == "audio_tower"} == {"q_proj", "v_proj"}
    # One adapter that PEFT saves and loads whole: the per-part ranks travel in its rank_pattern.
    changed = changed_by_one_step(model, batch(processor))
    assert {part_of(name) for name in changed if "lora_B" in name} == {"vision_tower", "audio_tower", "language_model"}


def optimizer_of(model, processor, tmp_path, args: TuningArguments, **training):
    training_args = MMPeftTrainingArguments(output_dir=str(tmp_path), report_to="none", **training)
    trainer = MMPeftTrainer(
        model=model,
        args=training_args,
        processing_class=processor,
        policy=args.policy,
        loraplus_lr_ratio=args.loraplus_lr_ratio,
    )
    optimizer = trainer.create_optimizer()
    return {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}


def test_each_part_trains_at_its_learning_rate_and_weight_decay_with_loraplus(tok, tmp_path):
    model, processor = build(tok=tok)
    args = TuningArguments(
        vision={"tuning": "lora", "learning_rate": 1e-5},
        audio={"tuning": "full", "weight_decay": 0.3},
        projector={"learning_rate_scale": 0.5},
        loraplus_lr_ratio=16,
    )
    model = setup_tuning(model, args)
    settings = optimizer_of(model, processor, tmp_path, args, learning_rate=1e-3, weight_decay=0.1)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(settings) == len(trainable)  # every trainable parameter optimised, once
    expected_lr = {"vision_tower": 1e-5, "audio_tower": 1e-4, "language_model": 1e-3}
    for name, parameter in trainable:
        lr, decay = settings[id(parameter)]
        part = part_of(name)
        base = 5e-4 if "projector" in part else expected_lr[part]
        assert lr == pytest.approx(base * (16 if ".lora_B." in name else 1)), name
        decays = parameter.ndim > 1 and "norm" not in name.lower()
        assert decay == ((0.3 if part == "audio_tower" else 0.1) if decays else 0.0), name


def test_trainable_tokens_train_only_their_rows_and_reload(tok, tmp_path):
    output = tmp_path / "tokens"
    tokens = ["<image>", "<audio>", "<|im_end|>"]
    trainer = finetune.main(
        [*TINY, "--report_to", "none", "--learning_rate", "3e-3", "--output_dir", str(output),
         "--loraplus_lr_ratio", "4", "--vision", '{"tuning": "lora", "lora_r": 4}', "--trainable_tokens", *tokens]
    )  # fmt: skip
    history = losses(trainer)
    assert sum(history[-3:]) < 0.8 * sum(history[:3])
    recorded = json.loads((output / "run_summary.json").read_text())["hyperparameters"]
    assert recorded["parts"].startswith("vision: lora r=4 lr=0.0003 wd=0; audio: frozen; projector: full lr=0.003")
    assert (recorded["loraplus_lr_ratio"], recorded["trainable_tokens"]) == (4, tokens)
    model = trainer.model
    ids = [trainer.processing_class.tokenizer.convert_tokens_to_ids(token) for token in tokens]
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["trainable_token_indices"] == sorted(ids)

    # Only the chosen rows moved: the rest of the embedding is the base's, bit for bit.
    base_path = adapter["base_model_name_or_path"]
    base = MMPeftForConditionalGeneration.from_pretrained(base_path)
    embedding = model.get_input_embeddings()(torch.arange(base.config.text_config.vocab_size)).detach()
    original = base.get_input_embeddings().weight
    moved = {i for i in range(len(original)) if not torch.equal(embedding[i], original[i])}
    # <|im_end|> closes every answer and trains; the placeholders' rows stay: at their positions the model puts the
    # projected media features, so their embeddings get no gradient (they would next to a placeholder without media).
    assert moved == {ids[2]}

    processor = MMPeftProcessor.from_pretrained(output)
    rows = trainer.eval_dataset.rows.select(range(4))
    expected = logits(model, processor, rows)
    reloaded = logits(PeftModel.from_pretrained(base, output), processor, rows)
    assert torch.equal(reloaded, expected)
    merged_dir = merge_adapter(output, tmp_path / "merged", dtype=torch.float32)
    merged = MMPeftForConditionalGeneration.from_pretrained(merged_dir)
    torch.testing.assert_close(logits(merged, processor, rows), expected, atol=1e-4, rtol=1e-4)


def image_batch(processor):
    images, _ = media(1, num_images=1)
    return processor(text=["<image> what is shown"], images=images, return_tensors="pt")


def check_one_step(model, processor, policy, trainable_modules=()):
    """Run the policy check around one AdamW step of `model`, as the Trainer calls it (a window of one step)."""
    callback = PolicyCheckCallback(policy, trainable_modules, window=1)
    args, state = types.SimpleNamespace(device=torch.device("cpu")), types.SimpleNamespace(global_step=0)
    callback.on_train_begin(args, state, None, model=model)
    changed_by_one_step(model, batch(processor))
    callback.on_optimizer_step(args, state, None, model=model)


def test_policy_check_passes_a_correct_setup_and_names_a_silent_failure(tok, caplog):
    args = TuningArguments(method="lora", vision_tuning="lora")
    model, processor = build(tok=tok)
    model = setup_tuning(model, args)
    with caplog.at_level("INFO", logger="mmpeft"):
        check_one_step(model, processor, args.policy)
    assert "trained parts changed (vision, projector, language); frozen weights bit-identical (audio," in caplog.text

    # The projectors silently frozen (the bug other frameworks ship): an error naming them.
    model, processor = build(tok=tok)
    model = setup_tuning(model, args)
    for name, parameter in model.named_parameters():
        if "projector" in name:
            parameter.requires_grad_(False)
    with pytest.raises(
        PolicyCheckError, match="projector should train \\(full\\) but none of its weights changed in 1"
    ):
        check_one_step(model, processor, args.policy)

    # A part its batches do not reach is checked in later steps: no audio in the first step, audio in the second.
    model, processor = build(tok=tok)
    audio_lora = TuningArguments(method="lora", audio_tuning="lora")
    model = setup_tuning(model, audio_lora)
    callback = PolicyCheckCallback(audio_lora.policy, window=2)
    state = types.SimpleNamespace(global_step=0)
    callback.on_train_begin(None, state, None, model=model)
    steps = [{**inputs, "labels": inputs["input_ids"]} for inputs in (image_batch(processor), batch(processor))]
    changed_by_one_step(model, steps[0])
    callback.on_optimizer_step(types.SimpleNamespace(device=torch.device("cpu")), state, None, model=model)
    assert callback.pending == ["audio"]
    changed_by_one_step(model, steps[1])
    callback.on_optimizer_step(types.SimpleNamespace(device=torch.device("cpu")), state, None, model=model)
    assert callback.pending == [] and callback.before is None

    # A frozen encoder that trains anyway: an error naming its weights.
    model, processor = build(tok=tok)
    model = setup_tuning(model, args)
    model.base_model.model.audio_tower.requires_grad_(True)
    with pytest.raises(PolicyCheckError, match=r"audio has frozen weights that changed: .*audio_tower\."):
        check_one_step(model, processor, args.policy)


def test_quantized_encoders_train_lora_and_keep_their_base_weights(tok, tmp_path):
    pytest.importorskip("bitsandbytes")
    args = TuningArguments(method="qlora", quantized_parts=["language", "vision", "audio"], vision_tuning="lora")
    reference, processor = build(tok=tok)
    reference.save_pretrained(tmp_path)
    model = MMPeftForConditionalGeneration.from_pretrained(tmp_path, quantization_config=quantization_config(args))
    quantized = {name.split(".")[0] for name, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    assert quantized == {"vision_tower", "audio_tower", "language_model"}
    model = setup_tuning(model, args)
    check_one_step(model, processor, args.policy)  # raises unless the 4-bit vision LoRA trained, its base kept


def test_qlora_under_fsdp_stores_4bit_weights_in_the_compute_dtype(monkeypatch, tmp_path, tok):
    pytest.importorskip("bitsandbytes")
    args = TuningArguments(method="qlora")
    assert quantization_config(args).bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    config = quantization_config(args)
    assert config.bnb_4bit_quant_storage == compute_dtype()
    reference, processor = build(tok=tok)
    reference.save_pretrained(tmp_path)
    model = MMPeftForConditionalGeneration.from_pretrained(tmp_path, quantization_config=config)
    packed = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    assert packed and {p.dtype for p in packed} == {compute_dtype()}
    check_one_step(setup_tuning(model, args), processor, args.policy)
