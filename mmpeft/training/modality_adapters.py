"""One LoRA adapter per modality on the LM (`adapter_per_modality: true`), the Phi-4-multimodal pattern.

Two LoRA adapters of the same config adapt the LM: `vision` and `speech`. Each forward activates, for the whole
batch, the adapters of the media it carries: `pixel_values` -> vision, `input_features` / `input_values` -> speech,
both -> both, none (a text-only batch) -> none, i.e. the LM without LoRA, as Phi-4-multimodal does, so that text
prompts get the base model's answers. Routing is per batch: a batch mixing image-only and audio-only samples runs
all of them with both adapters (training, evaluation and generation alike). An adapter that is not active is not
part of the forward, so its parameters get no gradient at all (`grad` stays None) and AdamW, weight decay included,
leaves them bit-identical.

The fully trained modules (projectors, `trainable_modules`) belong to the `vision` adapter only (its
`modules_to_save`), and stay active whatever the routing: they are saved once, in `<output>/vision/`, and the
`speech` adapter holds its LoRA weights alone (`<output>/speech/`). Routing therefore switches the LoRA layers'
active adapters directly (PEFT's `set_adapter` would also switch the modules_to_save copies, and their
`requires_grad`); `requires_grad` never changes, so the optimizer's and DDP's parameter sets stay fixed.

    model = setup_tuning(model, TuningArguments(method="lora", adapter_per_modality=True))
    model = load_modality_adapters(base, "outputs/run")  # a saved one, routed the same way
"""

import copy
import inspect
import os
from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .arguments import ConfigError


VISION, SPEECH = "vision", "speech"
ADAPTERS = (VISION, SPEECH)
# The forward inputs that carry each adapter's modality.
MODALITY_INPUTS = {VISION: ("pixel_values",), SPEECH: ("input_features", "input_values")}
# The adapter whose checkpoint holds the fully trained modules (saved once, there).
OWNER = VISION
TOWERS = {VISION: "vision_tower", SPEECH: "audio_tower"}


def adapters_for(inputs: Mapping) -> list[str]:
    """The adapters a batch with these forward `inputs` activates, in `ADAPTERS` order: those whose media it holds
    (none for a text-only batch)."""
    return [name for name in ADAPTERS if any(inputs.get(key) is not None for key in MODALITY_INPUTS[name])]


def check_settings(tuning_args, training_args=None) -> None:
    """Raise `ConfigError` (one line) unless `adapter_per_modality` can work with these settings: LoRA on the LM
    and on no encoder, and no training setup that needs every rank to run the same modules or that reloads one
    adapter only. Under DDP `ddp_find_unused_parameters` is set to True when left unset: ranks whose batches hold
    different media train different adapters. Nothing to check when the setting is off."""
    if not getattr(tuning_args, "adapter_per_modality", False):
        return
    components = tuning_args.components
    if components["language"] != "lora":
        raise ConfigError(
            f"adapter_per_modality: needs language_tuning: lora (one LoRA adapter per modality on the LM), got "
            f"{components['language']}"
        )
    encoders = [part for part in ("vision", "audio") if components[part] == "lora"]
    if encoders:
        raise ConfigError(
            f"adapter_per_modality: LoRA on the encoders ({', '.join(encoders)}_tuning: lora) is not supported; set "
            "them to frozen or full"
        )
    if training_args is None:
        return
    if training_args.deepspeed or training_args.fsdp:
        raise ConfigError(
            "adapter_per_modality: not supported under DeepSpeed or FSDP (a rank skipping the other modality's "
            "adapter would leave their parameter gathering waiting); use DDP"
        )
    if training_args.resume_from_checkpoint or getattr(training_args, "auto_resume", False):
        raise ConfigError(
            "adapter_per_modality: resuming is not supported yet (the Trainer reloads one adapter of a checkpoint)"
        )
    if training_args.push_to_hub:
        raise ConfigError(
            "adapter_per_modality: push_to_hub is not supported yet (the model card describes one adapter); push "
            "the output folder with huggingface_hub instead"
        )
    if training_args.load_best_model_at_end:
        raise ConfigError(
            "adapter_per_modality: load_best_model_at_end / early_stopping_patience are not supported (the "
            "Trainer reloads one adapter of the best checkpoint)"
        )
    if training_args.world_size > 1:
        if training_args.ddp_find_unused_parameters is False:
            raise ConfigError(
                "adapter_per_modality: needs ddp_find_unused_parameters: true under DDP (ranks whose batches hold "
                "different media train different adapters)"
            )
        training_args.ddp_find_unused_parameters = True


def check_model(model) -> None:
    """Raise `ConfigError` unless `model` has both a vision and an audio tower (each adapter serves one)."""
    missing = [tower for tower in TOWERS.values() if getattr(model, tower, None) is None]
    if missing:
        raise ConfigError(
            f"adapter_per_modality: the model has no {' and no '.join(missing)}; one adapter per modality needs "
            "both (train one lora adapter instead)"
        )


def add_modality_adapters(model, config: LoraConfig) -> PeftModel:
    """`model` with a `vision` and a `speech` LoRA adapter of `config`, both trainable, routed per batch
    (`route_by_modality`). `config.modules_to_save` go with the `vision` adapter only (saved once)."""
    check_model(model)
    speech_config = copy.deepcopy(config)  # before get_peft_model records the base in `config`
    speech_config.modules_to_save = None
    peft_model = get_peft_model(model, config, adapter_name=VISION)
    peft_model.add_adapter(SPEECH, speech_config)
    # Both adapters trainable, and the modules_to_save copies (the vision adapter's) active.
    peft_model.base_model.set_adapter(list(ADAPTERS))
    route_by_modality(peft_model)
    return peft_model


class ModalityRouter:
    """Forward pre-hook that sets the active adapters of `layers` (the LoRA layers) from a forward's inputs.

    A forward whose cache already holds tokens continues a sequence (a decode step of `generate`, which passes
    the media at the first step only) and keeps the adapters its first step chose.
    """

    def __init__(self, layers: list[BaseTunerLayer], signature: inspect.Signature):
        self.layers, self.signature = layers, signature
        self.active: list[str] = list(ADAPTERS)

    def route(self, names: Sequence[str]) -> None:
        """Activate exactly the adapters `names` (a subset of `ADAPTERS`) in every LoRA layer."""
        self.active = [name for name in ADAPTERS if name in names]
        for layer in self.layers:
            # Not `layer.set_adapter`: it also flips `requires_grad`, which must stay fixed (DDP, the optimizer).
            layer._active_adapter = list(self.active)

    def __call__(self, module, args, kwargs):
        inputs = self.signature.bind_partial(*args, **kwargs).arguments
        cache = inputs.get("cache", inputs.get("past_key_values", kwargs.get("past_key_values")))
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            return None
        self.route(adapters_for(inputs))
        return None


def _loss_for_backward(module, args, kwargs, output):
    # A text-only training batch runs the base LM: when nothing trainable took part (no trainable_modules in the
    # LM), its loss has no graph and backward would raise. It then trains nothing, which is what it should do.
    loss = getattr(output, "loss", None)
    if module.training and torch.is_grad_enabled() and loss is not None and not loss.requires_grad:
        loss.requires_grad_(True)  # a tensor that does not require grad is a leaf
    return None


def route_by_modality(model: PeftModel) -> ModalityRouter:
    """Route `model` (a `PeftModel` holding the `vision` and `speech` adapters) per batch from now on; returns the
    router (`router.active`: the adapters of the last routed forward). Installing it twice is a no-op."""
    missing = [name for name in ADAPTERS if name not in model.peft_config]
    if missing:
        raise ValueError(f"route_by_modality: the model has no adapter {missing} (it has {list(model.peft_config)})")
    base = model.get_base_model()
    if getattr(base, "_modality_router", None) is not None:
        return base._modality_router
    layers = [
        module
        for module in base.modules()
        if isinstance(module, BaseTunerLayer)
        and not isinstance(module, AuxiliaryTrainingWrapper)
        and set(ADAPTERS) <= set(getattr(module, "lora_A", {}))
    ]
    router = ModalityRouter(layers, inspect.signature(base.forward))
    # On the wrapped model itself: PEFT's forward and `generate`'s steps both call it.
    base.register_forward_pre_hook(router, with_kwargs=True)
    base.register_forward_hook(_loss_for_backward, with_kwargs=True)
    base._modality_router = router
    return router


def is_modality_adapter_output(path: str | os.PathLike) -> bool:
    """Whether `path` holds a `vision` and a `speech` adapter (PEFT's subfolders for named adapters)."""
    return all(os.path.isfile(os.path.join(path, name, "adapter_config.json")) for name in ADAPTERS)


def modality_adapter_base(path: str | os.PathLike) -> str:
    """The base model the adapters in `path` were trained on (as their config records it)."""
    return LoraConfig.from_pretrained(os.path.join(path, OWNER)).base_model_name_or_path


def load_modality_adapters(base: nn.Module, path: str | os.PathLike, is_trainable: bool = False) -> PeftModel:
    """`base` with the `vision` and `speech` adapters saved in `path` (and the fully trained modules saved with
    `vision`), routed per batch like in training. Plain PEFT loads them the same way:
    `PeftModel.from_pretrained(base, f"{path}/vision", adapter_name="vision")`, then
    `load_adapter(f"{path}/speech", adapter_name="speech")`."""
    path = str(path)
    model = PeftModel.from_pretrained(base, os.path.join(path, OWNER), adapter_name=OWNER, is_trainable=is_trainable)
    model.load_adapter(os.path.join(path, SPEECH), adapter_name=SPEECH, is_trainable=is_trainable)
    model.base_model.set_adapter(list(ADAPTERS), inference_mode=not is_trainable)
    route_by_modality(model)
    return model


__all__ = [
    "ADAPTERS",
    "MODALITY_INPUTS",
    "ModalityRouter",
    "SPEECH",
    "VISION",
    "adapters_for",
    "add_modality_adapters",
    "check_model",
    "check_settings",
    "is_modality_adapter_output",
    "load_modality_adapters",
    "modality_adapter_base",
    "route_by_modality",
]
