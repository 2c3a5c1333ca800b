"""The per-part training policy: for each part (vision, audio, projector, language) how it trains (frozen | lora |
full), at which learning rate and weight decay, and with which LoRA rank, alpha, dropout and target layers.

A run's policy is resolved from three layers, the later winning: the method's defaults (`METHODS`), the flat
settings (`vision_tuning`, `lora_r`, `encoder_learning_rate_scale`, ...) and the per-part mappings:

    vision: {tuning: lora, lora_r: 8, learning_rate: 2e-5}
    audio: {tuning: full, learning_rate_scale: 0.05, weight_decay: 0.0}

All LoRA parts share one PEFT adapter (one `adapter_config.json` that `PeftModel.from_pretrained` reads): ranks and
alphas differ per part through the adapter's `rank_pattern` / `alpha_pattern`, target layers are one regex joined
from the parts', and dropout, which PEFT keeps per layer but configures per adapter, is set on each part's layers
after the adapter is added. The other `LoraConfig` fields (use_dora, init_lora_weights, ...) are the adapter's:
`lora_kwargs`.
"""

import re
from dataclasses import dataclass, fields

from peft import LoraConfig

from .methods import PART_MODULES, PART_TUNINGS


# Keys a part's mapping may hold -> what they mean (the help of `--vision` etc. lists them).
PART_SETTINGS = {
    "tuning": f"one of {' | '.join(PART_TUNINGS)}",
    "learning_rate": "absolute learning rate of the part",
    "learning_rate_scale": "learning rate as a fraction of learning_rate",
    "weight_decay": "weight decay of the part's decaying parameters (not biases and norms)",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA scaling numerator (scale = alpha / r)",
    "lora_dropout": "dropout on the LoRA path",
    "lora_target_modules": "all-linear, a list of layer names (q_proj, ...) or a regex of full module names",
}
ALL_LINEAR = "all-linear"
# Parameters of PEFT's LoRA B matrices: LoRA+ trains them at `loraplus_lr_ratio` x the part's learning rate.
LORA_B = re.compile(r"\.lora_(embedding_)?B\.")


class PolicyError(ValueError):
    """A per-part setting that cannot work, named (`vision.lora_r: ...`)."""


@dataclass(frozen=True)
class PartPolicy:
    """How one part trains. `learning_rate` / `weight_decay` None: the run's (times `learning_rate_scale`)."""

    tuning: str
    learning_rate: float | None = None
    learning_rate_scale: float = 1.0
    weight_decay: float | None = None
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] | None = None

    def resolved_learning_rate(self, base: float) -> float:
        return self.learning_rate if self.learning_rate is not None else base * self.learning_rate_scale

    def resolved_weight_decay(self, base: float) -> float:
        return self.weight_decay if self.weight_decay is not None else base


def resolve_policy(args) -> dict[str, PartPolicy]:
    """`{part: PartPolicy}` of `TuningArguments` `args`: method defaults < flat settings < per-part mappings.
    Raises `PolicyError` naming the part and key of a setting that cannot work."""
    method_parts = args.tuning_method.parts
    lora_fields = {f.name for f in fields(LoraConfig) if f.init}
    policy = {}
    for part in PART_MODULES:
        given = dict(getattr(args, part) or {})
        for key in given:
            if key in PART_SETTINGS:
                continue
            if key in lora_fields:
                raise PolicyError(
                    f"{part}.{key}: LoRA settings other than {', '.join(k for k in PART_SETTINGS if 'lora' in k)} "
                    "apply to the whole adapter (all LoRA parts share one, so that PeftModel loads it): set it in "
                    "lora_kwargs"
                )
            raise PolicyError(f"{part}.{key}: unknown part setting; a part takes {', '.join(PART_SETTINGS)}")
        flat_tuning = getattr(args, f"{part}_tuning")
        if flat_tuning is not None and "tuning" in given and given["tuning"] != flat_tuning:
            raise PolicyError(f"{part}.tuning: {given['tuning']} contradicts {part}_tuning: {flat_tuning}; give one")
        if "learning_rate" in given and "learning_rate_scale" in given:
            raise PolicyError(f"{part}: give learning_rate or learning_rate_scale, not both")
        encoder = part in ("vision", "audio")
        settings = {
            "tuning": flat_tuning or method_parts[part],
            "learning_rate_scale": args.encoder_learning_rate_scale if encoder else 1.0,
            "lora_r": args.lora_r,
            "lora_alpha": args.lora_alpha,
            "lora_dropout": args.lora_dropout,
            "lora_target_modules": None,
            **given,
        }
        policy[part] = PartPolicy(**settings)
        _check_part(part, policy[part])
    return policy


def _check_part(part: str, policy: PartPolicy) -> None:
    def positive(key, value, integer=False):
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
            raise PolicyError(f"{part}.{key}: a positive {'integer' if integer else 'number'}, got {value!r}")

    if policy.tuning not in PART_TUNINGS:
        raise PolicyError(f"{part}.tuning: one of {' | '.join(PART_TUNINGS)}, got {policy.tuning!r}")
    if policy.learning_rate is not None:
        positive("learning_rate", policy.learning_rate)
    positive("learning_rate_scale", policy.learning_rate_scale)
    if policy.weight_decay is not None and (
        isinstance(policy.weight_decay, bool)
        or not isinstance(policy.weight_decay, (int, float))
        or policy.weight_decay < 0
    ):
        raise PolicyError(f"{part}.weight_decay: a number >= 0, got {policy.weight_decay!r}")
    positive("lora_r", policy.lora_r, integer=True)
    positive("lora_alpha", policy.lora_alpha)
    if isinstance(policy.lora_dropout, bool) or not isinstance(policy.lora_dropout, (int, float)):
        raise PolicyError(f"{part}.lora_dropout: a number in [0, 1), got {policy.lora_dropout!r}")
    if not 0 <= policy.lora_dropout < 1:
        raise PolicyError(f"{part}.lora_dropout: a number in [0, 1), got {policy.lora_dropout!r}")
    targets = policy.lora_target_modules
    if targets is not None and not (
        isinstance(targets, str)
        or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        raise PolicyError(
            f"{part}.lora_target_modules: {ALL_LINEAR}, a list of layer names or a regex, got {targets!r}"
        )
    if isinstance(targets, str) and targets != ALL_LINEAR:
        try:
            re.compile(targets)
        except re.error as error:
            raise PolicyError(f"{part}.lora_target_modules: not a valid regex ({error}): {targets}") from None


def describe_parts(policy: dict, learning_rate: float, weight_decay: float) -> str:
    """The policy in one line, as the run summary and the model card record it:
    `vision: lora r=8 lr=0.0002 wd=0; audio: frozen; ...`."""
    parts = []
    for part, how in policy.items():
        if how.tuning == "frozen":
            parts.append(f"{part}: frozen")
            continue
        rank = f" r={how.lora_r}" if how.tuning == "lora" else ""
        rates = f"lr={how.resolved_learning_rate(learning_rate):.3g} wd={how.resolved_weight_decay(weight_decay):.3g}"
        parts.append(f"{part}: {how.tuning}{rank} {rates}")
    return "; ".join(parts)


def part_of_parameter(name: str) -> str | None:
    """The part a parameter belongs to, by its name in the model or the `PeftModel` around it (None: none)."""
    root = name.removeprefix("base_model.model.").split(".", 1)[0]
    return MODULE_PARTS.get(root)


MODULE_PARTS = {module: part for part, modules in PART_MODULES.items() for module in modules}


def optimizer_groups(
    param_groups, named_parameters, decaying: set[str], policy, learning_rate, weight_decay, loraplus_lr_ratio=None
):
    """The optimizer's parameter groups split per part, each at its part's learning rate and weight decay (only
    for the parameters in `decaying`: the Trainer's rule keeps biases and norms undecayed) and, with LoRA+
    (`loraplus_lr_ratio`), LoRA's B matrices at that multiple of their part's rate (the rule of
    `peft.optimizers.create_loraplus_optimizer`, here combined with the per-part rates)."""
    names = {id(parameter): name for name, parameter in named_parameters}
    groups = []
    for group in param_groups:
        options = {key: value for key, value in group.items() if key != "params"}
        split = {}
        for parameter in group["params"]:
            name = names.get(id(parameter), "")
            part = part_of_parameter(name) or "language"
            boost = loraplus_lr_ratio if loraplus_lr_ratio and LORA_B.search(f".{name}") else 1.0
            split.setdefault((part, boost, name in decaying), []).append(parameter)
        for (part, boost, decays), parameters in split.items():
            decay = policy[part].resolved_weight_decay(weight_decay) if decays else 0.0
            lr = policy[part].resolved_learning_rate(learning_rate) * boost
            groups.append({**options, "params": parameters, "lr": lr, "weight_decay": decay})
    return groups


__all__ = [
    "ALL_LINEAR",
    "PART_SETTINGS",
    "PartPolicy",
    "PolicyError",
    "describe_parts",
    "optimizer_groups",
    "part_of_parameter",
    "resolve_policy",
]
