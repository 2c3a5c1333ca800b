"""LoRA initialisations (`lora_kwargs: {init_lora_weights: ...}`) that need more than PEFT's `LoraConfig` field.

- `pissa`, `pissa_niter_<n>`, `olora` rewrite the base weights they adapt when the adapter is created (W becomes
  the residual W - A0 B0). The adapter trained on that residual is no LoRA of the original base, so the adapter
  exactly as created is saved first (`initial_adapter/` in `output_dir`, `save_initial_adapter`) and the final
  output is converted, as PEFT does it (`save_pretrained(path_initial_model_for_weight_conversion=...)`), into an
  ordinary LoRA of rank 2r (dW = A B - A0 B0) that reloads and merges on the untouched base
  (`save_as_lora_of_the_base`). Checkpoints keep the adapter as trained, for resuming: the same initialisation
  runs again on the same base (deterministic: PiSSA's SVD, OLoRA's QR; `pissa_niter_<n>` from the run's seed),
  then the checkpoint's adapter is loaded over it. Refused under ZeRO-3 / FSDP, whose sharded parameters the
  conversion cannot read.
- `eva` takes its initial `lora_A` from an SVD of the layers' inputs over training batches
  (`peft.initialize_lora_eva_weights`), and may redistribute ranks among layers (`rank_pattern` in the saved
  adapter config). It runs once before training (`initialise`); a resumed run takes the ranks from its
  checkpoint's adapter instead of computing them again, then the checkpoint's weights are loaded.
- `corda` and `lora_ga` need a calibration pass (`peft.tuners.lora.corda.preprocess_corda`,
  `peft.tuners.lora.loraga.preprocess_loraga`) that mmpeft does not run: refused at config time
  (`check_initialisation`), as are combinations whose result could not be reproduced.
"""

import os

import torch
from peft import PeftModel, PeftType, initialize_lora_eva_weights
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as SAFE_ADAPTER_NAME
from safetensors.torch import load_file, save_file

from ..data.dataset import take_load_reports
from .errors import ConfigError


# Folder of output_dir holding the adapter of a base-rewriting initialisation as created, before training.
INITIAL_ADAPTER = "initial_adapter"
# init_lora_weights values (prefixes) that rewrite the base weights when the adapter is created.
BASE_REWRITING = ("pissa", "olora")
NEEDS_CALIBRATION = ("corda", "lora_ga")


def init_kind(init_lora_weights) -> str:
    """`"pissa"`, `"olora"`, `"eva"`, `"corda"`, `"lora_ga"` or `"other"` (PEFT's default and the rest) for an
    `init_lora_weights` value."""
    value = str(init_lora_weights).lower()
    for kind in (*BASE_REWRITING, "eva", *NEEDS_CALIBRATION):
        if value.startswith(kind):
            return kind
    return "other"


def check_initialisation(lora_kwargs: dict, quantized: bool = False, ranks_per_part: bool = False) -> None:
    """Raise `ValueError` in one line for an `init_lora_weights` of `lora_kwargs` mmpeft cannot train
    reproducibly (PEFT checks the values themselves when the `LoraConfig` is built). `ranks_per_part`: the LoRA
    parts differ in rank or alpha (the adapter gets a `rank_pattern` / `alpha_pattern`)."""
    kind = init_kind(lora_kwargs.get("init_lora_weights", True))
    if kind in NEEDS_CALIBRATION:
        raise ValueError(
            f"lora_kwargs: init_lora_weights {kind} needs a calibration pass over data before the adapter is created "
            "(peft's preprocess_corda / preprocess_loraga), which mmpeft does not run; use pissa, olora or eva"
        )
    if kind in BASE_REWRITING:
        if quantized:
            raise ValueError(
                f"lora_kwargs: init_lora_weights {kind} rewrites the base weights, which qlora quantizes: the saved "
                "adapter would not reproduce the trained model on the quantized base; use method lora, or eva"
            )
        if lora_kwargs.get("use_rslora") and ranks_per_part:
            raise ValueError(
                f"lora_kwargs: init_lora_weights {kind} with use_rslora and per-part lora_r / lora_alpha cannot be "
                "converted into a LoRA of the original base when saved (PEFT); give the LoRA parts one rank and alpha"
            )


def _lora_config(model):
    """The `LoraConfig` of a PeftModel's active adapter, or None for any other model."""
    if not isinstance(model, PeftModel):
        return None
    config = model.peft_config[model.active_adapter]
    return config if config.peft_type == PeftType.LORA else None


def rewrites_base_weights(model) -> bool:
    """Whether `model` is a PeftModel whose LoRA initialisation rewrote the base weights (PiSSA, OLoRA)."""
    config = _lora_config(model)
    return config is not None and init_kind(config.init_lora_weights) in BASE_REWRITING


def initial_adapter_dir(output_dir: str) -> str:
    """Where a run in `output_dir` keeps the adapter of a base-rewriting initialisation as created."""
    return os.path.join(output_dir, INITIAL_ADAPTER)


def initialise(trainer, checkpoint: str | None = None) -> None:
    """What the adapter's initialisation needs before training, once the trainer is built (before its optimizer):
    PiSSA / OLoRA: save the adapter as created (`initial_adapter_dir`); EVA: initialise `lora_A` from the training
    batches, or, resuming from `checkpoint`, take the ranks its adapter was trained with."""
    model = trainer.model
    config = _lora_config(model)
    if config is None:
        return
    kind = init_kind(config.init_lora_weights)
    if kind in BASE_REWRITING and _shards_parameters(trainer):
        # The conversion of the final adapter reads the live parameters, which ZeRO-3 / FSDP hold in shards.
        raise ConfigError(
            f"lora_kwargs: init_lora_weights {kind} is not supported under DeepSpeed ZeRO-3 or FSDP (the saved "
            "adapter could not be converted into a LoRA of the original base); use DDP or ZeRO-2, or another "
            "initialisation"
        )
    if kind in BASE_REWRITING:
        # Saved again on resume: the same initialisation ran again, and the conversion needs the one in memory.
        model.save_pretrained(initial_adapter_dir(trainer.args.output_dir), is_main_process=trainer.args.should_save)
    elif kind == "eva":
        if checkpoint is not None:
            initialize_lora_eva_weights(model, eva_state_dict=_ranks_of_checkpoint(model, checkpoint))
            return
        was_training = model.training
        model.eval()  # the SVD is of the layers' inputs as the model computes them, without dropout
        try:
            initialize_lora_eva_weights(
                model,
                trainer.get_train_dataloader(),
                forward_fn=_forward,
                show_progress_bar=trainer.is_local_process_zero() and not trainer.args.disable_tqdm,
            )
        finally:
            model.train(was_training)


def _shards_parameters(trainer) -> bool:
    """Whether `trainer` trains under DeepSpeed ZeRO-3 or FSDP (parameters split across processes)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool(getattr(trainer, "is_deepspeed_enabled", False) and plugin and plugin.zero_stage == 3)


def _forward(model, inputs: dict):
    # Samples replaced while loading (on_bad_sample: skip) are counted by training, which reads them again.
    take_load_reports(inputs)
    return model(**inputs)


def _ranks_of_checkpoint(model, checkpoint: str) -> dict[str, torch.Tensor]:
    """An EVA state dict (layer name -> initial lora_A) giving each LoRA layer the rank it has in the adapter saved
    in `checkpoint` (0: the layer lost its adapter); the values are placeholders, the checkpoint's weights replace
    them."""
    saved = load_file(os.path.join(checkpoint, SAFE_ADAPTER_NAME))
    suffix = ".lora_A.weight"
    ranks = {key[: -len(suffix)]: tensor.shape[0] for key, tensor in saved.items() if key.endswith(suffix)}
    state = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and model.active_adapter in module.lora_A:
            in_features = module.lora_A[model.active_adapter].in_features
            state[name] = torch.zeros(ranks.get(name, 0), in_features, device=module.get_base_layer().weight.device)
    return state


def save_as_lora_of_the_base(trainer, output_dir: str) -> None:
    """After `trainer` saved the final adapter in `output_dir`: for PiSSA / OLoRA, replace it by the ordinary LoRA
    of the untouched base it amounts to (PEFT's conversion against `initial_adapter_dir`). PEFT's conversion keeps
    the LoRA matrices only; the other tensors (fully trained modules, DoRA magnitudes) are the same on either base
    and are kept from the adapter as saved. Nothing to do for other models."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not rewrites_base_weights(model) or not trainer.args.should_save:
        return
    path = os.path.join(output_dir, SAFE_ADAPTER_NAME)
    kept = {key: value for key, value in load_file(path).items() if ".lora_A." not in key and ".lora_B." not in key}
    model.save_pretrained(
        output_dir, path_initial_model_for_weight_conversion=initial_adapter_dir(trainer.args.output_dir)
    )
    save_file({**load_file(path), **kept}, path, metadata={"format": "pt"})


__all__ = [
    "INITIAL_ADAPTER",
    "check_initialisation",
    "init_kind",
    "initial_adapter_dir",
    "initialise",
    "rewrites_base_weights",
    "save_as_lora_of_the_base",
]
