import pytest
from tiny_parts import build

from mmpeft.training import MMPeftTrainer, MMPeftTrainingArguments, TuningArguments, setup_tuning
from mmpeft.training.trainer import ENCODER_PARAMETER


@pytest.mark.parametrize(
    "settings", [dict(method="full"), dict(method="lora", vision_tuning="lora", audio_tuning="full")]
)
def test_encoders_train_at_a_scaled_learning_rate(settings, tok, tmp_path):
    model, processor = build(tok=tok)
    model = setup_tuning(model, TuningArguments(**settings))
    args = MMPeftTrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to="none", weight_decay=0.1)
    trainer = MMPeftTrainer(model=model, args=args, processing_class=processor, encoder_learning_rate_scale=0.1)
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(lr_of) == len(trainable)  # every trainable parameter is optimised, once
    encoders = [p for name, p in trainable if ENCODER_PARAMETER.search(name)]
    assert encoders and all(lr_of[id(p)] == pytest.approx(1e-4) for p in encoders)
    assert all(lr_of[id(p)] == pytest.approx(1e-3) for name, p in trainable if not ENCODER_PARAMETER.search(name))
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0, 0.1}  # decay split kept
