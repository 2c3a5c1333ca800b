"""DoRA, rsLoRA and the LoRA initialisations PiSSA, OLoRA and EVA, each trained end to end on the tiny reference
model through the recipe: the loss goes down, the saved output reloads on the untouched base with the trained
model's logits, and merges into a plain checkpoint with the same logits. PiSSA / OLoRA rewrite the base weights
and EVA reads the data before training (`mmpeft.training.peft_init`): their runs also resume from a checkpoint to
the same result."""

import json
from types import SimpleNamespace

import pytest
import torch
from recipe_helpers import TINY, finetune, losses
from safetensors.torch import load_file
from tiny_parts import build

from mmpeft import MMPeftForConditionalGeneration
from mmpeft.data import MMPeftDataCollator, MMPeftDataset
from mmpeft.inference import load_for_inference, merge_adapter
from mmpeft.training import ConfigError, TuningArguments, setup_tuning
from mmpeft.training.peft_init import INITIAL_ADAPTER, initialise, rewrites_base_weights


STEPS = [
    "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--report_to", "none",
    "--generation_num_samples", "2",
]  # fmt: skip
METHODS = {
    "dora": ["--method", "dora"],
    "rslora": ["--lora_kwargs", '{"use_rslora": true}'],
    "pissa": ["--lora_kwargs", '{"init_lora_weights": "pissa"}'],
    "olora": ["--lora_kwargs", '{"init_lora_weights": "olora"}'],
    # DoRA's magnitudes are not LoRA matrices: the conversion of PiSSA must carry them over as they are
    "dora+pissa": ["--method", "dora", "--lora_kwargs", '{"init_lora_weights": "pissa"}'],
    # rho 2: layers may take up to twice lora_r, taken from the others (a rank_pattern)
    "eva": ["--lora_kwargs", '{"init_lora_weights": "eva", "eva_config": {"rho": 2.0, "tau": 0.9}}'],
}
# PiSSA / OLoRA reload as a LoRA of the original base: W + (A B - A0 B0) equals the trained W_res + A B up to
# float32 rounding, not bit for bit.
RELOAD_TOLERANCE = {"pissa": 1e-5, "olora": 1e-5, "dora+pissa": 1e-5}
MERGE_TOLERANCE = 1e-4


def train(name, output, *extra):
    return finetune.main(
        [*TINY, *STEPS, "--learning_rate", "3e-3", *METHODS[name], "--output_dir", str(output), *extra]
    )


RUNS = {}


def run_of(name, tmp_path_factory):
    """`(name, trainer, output_dir)` of the one short run of method `name`, shared by the tests below."""
    if name not in RUNS:
        output = tmp_path_factory.mktemp(name) / "out"
        RUNS[name] = name, train(name, output), output
    return RUNS[name]


@pytest.fixture(scope="module", params=list(METHODS))
def trained(request, tmp_path_factory):
    yield run_of(request.param, tmp_path_factory)
    RUNS.pop(request.param)  # done with it: its memory back


def logits(model, trainer, count=6):
    dataset = MMPeftDataset(trainer.eval_dataset.rows.select(range(count)), trainer.processing_class)
    batch = MMPeftDataCollator(trainer.processing_class.tokenizer.pad_token_id)(
        [dataset[i] for i in range(len(dataset))]
    )
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_loss_goes_down_and_the_adapter_trains(trained):
    name, trainer, output = trained
    history = losses(trainer)
    assert len(history) == 8 and sum(history[-2:]) < sum(history[:2]) * 0.8, history
    config = trainer.model.peft_config["default"]
    assert config.use_dora == ("dora" in name) and config.use_rslora == (name == "rslora")
    lora_b = {k: v for k, v in trainer.model.state_dict().items() if ".lora_B." in k}
    if rewrites_base_weights(trainer.model):  # B starts from the base's principal components, elsewhere from zero
        initial = load_file(output / INITIAL_ADAPTER / "adapter_model.safetensors")
        start = {k: initial[k.replace(".default", "")] for k in lora_b}
    else:
        start = {k: torch.zeros_like(v) for k, v in lora_b.items()}
    assert all(not torch.equal(lora_b[k], start[k]) for k in lora_b)  # every adapter moved


def test_output_reloads_on_the_untouched_base_with_the_trained_logits(trained):
    name, trainer, output = trained
    reloaded, _ = load_for_inference(output)  # PeftModel.from_pretrained on the base named in adapter_config.json
    base = MMPeftForConditionalGeneration.from_pretrained(reloaded.peft_config["default"].base_model_name_or_path)
    untouched = dict(base.named_parameters())
    for key, value in reloaded.get_base_model().state_dict().items():  # PiSSA / OLoRA did not rewrite it on load
        if key in untouched and ".base_layer." not in key:
            assert torch.equal(value, untouched[key]), key
    expected, got = logits(trainer.model, trainer), logits(reloaded, trainer)
    difference = (got - expected).abs().max().item()
    print(f"{name}: reload max |logit difference| {difference:.3g}")
    if name in RELOAD_TOLERANCE:
        assert difference < RELOAD_TOLERANCE[name]
        saved = json.loads((output / "adapter_config.json").read_text())
        assert saved["r"] == 2 * trainer.model.peft_config["default"].r and saved["init_lora_weights"] is True
    else:
        assert torch.equal(got, expected)


def test_merge_gives_the_trained_logits(trained, tmp_path):
    name, trainer, output = trained
    merged = MMPeftForConditionalGeneration.from_pretrained(merge_adapter(output, tmp_path, dtype=torch.float32))
    difference = (logits(merged, trainer) - logits(trainer.model, trainer)).abs().max().item()
    print(f"{name}: merge max |logit difference| {difference:.3g}")
    assert difference < MERGE_TOLERANCE


@pytest.mark.parametrize("name", ["pissa", "eva"])
def test_resumed_from_a_checkpoint_it_ends_as_the_uninterrupted_run(name, tmp_path_factory, tmp_path):
    """The checkpoint keeps the adapter as trained: resuming initialises again (PiSSA: the same SVD of the same base;
    EVA: the checkpoint's ranks, not a new pass over the data), loads it, and ends where the uninterrupted run did."""
    _, trainer, output = run_of(name, tmp_path_factory)
    resumed = train(name, tmp_path / "resumed", "--resume_from_checkpoint", str(output / "checkpoint-4"))
    assert losses(resumed)[:4] == losses(trainer)[:4]  # from the checkpoint's history
    assert losses(resumed)[4:] == pytest.approx(losses(trainer)[4:], rel=1e-4)
    saved, again = (
        json.loads((folder / "adapter_config.json").read_text()) for folder in (output, tmp_path / "resumed")
    )
    assert again["rank_pattern"] == saved["rank_pattern"] and again["r"] == saved["r"]
    difference = (logits(load_for_inference(tmp_path / "resumed")[0], trainer) - logits(trainer.model, trainer)).abs()
    assert difference.max().item() < RELOAD_TOLERANCE.get(name, 1e-5)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(lora_kwargs={"init_lora_weights": "corda"}), r"init_lora_weights corda needs a calibration pass"),
        (dict(lora_kwargs={"init_lora_weights": "lora_ga"}), r"init_lora_weights lora_ga needs a calibration pass"),
        (dict(method="qlora", lora_kwargs={"init_lora_weights": "pissa"}), r"pissa rewrites the base weights"),
        (
            dict(
                lora_kwargs={"init_lora_weights": "olora", "use_rslora": True}, vision={"tuning": "lora", "lora_r": 4}
            ),
            r"olora with use_rslora and per-part lora_r / lora_alpha",
        ),
    ],
)
def test_initialisations_mmpeft_cannot_reproduce_are_refused_at_config_time(settings, message):
    with pytest.raises(ConfigError, match=message):
        TuningArguments(**settings)


def test_pissa_and_olora_under_zero3_are_refused_before_training(tok):
    """The final conversion reads the live adapter, which ZeRO-3 holds in shards: refused before any step."""
    model, _ = build(tok=tok)
    model = setup_tuning(model, TuningArguments(lora_kwargs={"init_lora_weights": "olora"}))
    zero3 = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    trainer = SimpleNamespace(model=model, is_deepspeed_enabled=True, is_fsdp_enabled=False, accelerator=zero3)
    with pytest.raises(ConfigError, match=r"init_lora_weights olora is not supported under DeepSpeed ZeRO-3"):
        initialise(trainer)
