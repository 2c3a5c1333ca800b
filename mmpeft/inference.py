"""Using what `recipes/finetune.py` wrote: loading any of its outputs for inference, the batched greedy
generation + scoring that training-time evaluation and `recipes/eval.py` share (so their numbers agree), and
merging a LoRA / QLoRA adapter into a plain checkpoint.

    model, processor = load_for_inference("outputs/tiny-lora")  # full weights, an adapter, or a merged export
"""

import json
import os
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object
from peft import PeftConfig, PeftModel
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as SAFE_ADAPTER_NAME
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import BitsAndBytesConfig

from .data import MMPeftDataCollator, MMPeftDataset
from .data.dataset import take_load_reports
from .metrics import compute_metrics
from .models import MMPeftConfig, MMPeftForConditionalGeneration, MMPeftProcessor
from .summary import RUN_SUMMARY


# Written by recipes/finetune.py next to a QLoRA adapter: the bitsandbytes config its base was trained under.


def output_kind(path: str | os.PathLike) -> str:
    """`"adapter"` (a LoRA / QLoRA adapter folder, base named in its config; or one adapter per modality, in its
    `vision` / `speech` subfolders) or `"full"` (full weights: a full fine-tune, a merged export, any saved mmpeft
    checkpoint); `ValueError` in one line for anything else."""
    path = str(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such folder (give the output_dir of recipes/finetune.py or recipes/merge.py)")
    per_modality = _modality_adapters().is_modality_adapter_output(path)  # adapter_per_modality: vision/, speech/
    if per_modality or os.path.isfile(os.path.join(path, "adapter_config.json")):
        return "adapter"
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        with open(config) as file:
            model_type = json.load(file).get("model_type")
        if model_type == MMPeftConfig.model_type:
            return "full"
        raise ValueError(f"{path}: config.json is of model_type {model_type!r}, not {MMPeftConfig.model_type!r}")
    raise ValueError(f"{path}: not an mmpeft output (neither adapter_config.json nor an mmpeft config.json)")


def adapter_quantization(adapter_dir: str | os.PathLike) -> BitsAndBytesConfig | None:
    """The quantization a QLoRA adapter's base was trained under (recorded in the run summary), else None."""
    summary = os.path.join(adapter_dir, RUN_SUMMARY)
    if not os.path.isfile(summary):
        return None
    with open(summary) as file:
        recorded = json.load(file).get("quantization_config")
    return BitsAndBytesConfig.from_dict(recorded) if recorded else None


def load_for_inference(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantized: bool = True,
) -> tuple[torch.nn.Module, MMPeftProcessor]:
    """`(model, processor)` of an output folder, in eval mode.

    - full weights (`config.json` of model_type mmpeft: a full fine-tune or a merged export): loaded as saved;
    - an adapter (`adapter_config.json`): the base named in it (`base_model_name_or_path`) with the adapter on top,
      a `PeftModel` (`merge_and_unload()` it for speed). A QLoRA adapter's base is quantized as in training (the
      config recorded next to it), so outputs are the trained model's; `quantized=False` loads it unquantized.
      One adapter per modality (`adapter_per_modality`) loads both, each input activating those of its media as
      in training (`mmpeft.training.modality_adapters`).

    Weights come from safetensors files only. The processor is the one saved in the folder, else the base's.
    `dtype` defaults to the saved one; `device` to where `from_pretrained` puts it (CPU).
    """
    path = str(path)
    options = {} if dtype is None else {"dtype": dtype}
    if output_kind(path) == "full":
        model, processor_path = MMPeftForConditionalGeneration.from_pretrained(path, **options), path
    else:
        # One adapter per modality (adapter_per_modality): in PEFT's subfolders, `vision` naming the base.
        modality_adapters = _modality_adapters()
        per_modality = modality_adapters.is_modality_adapter_output(path)
        folders = [os.path.join(path, name) for name in modality_adapters.ADAPTERS] if per_modality else [path]
        for folder in folders:
            if not os.path.isfile(os.path.join(folder, SAFE_ADAPTER_NAME)):  # PEFT would fall back to a pickle
                raise ValueError(f"{folder} has no {SAFE_ADAPTER_NAME}: mmpeft loads adapters from safetensors only.")
        base_path = PeftConfig.from_pretrained(folders[0]).base_model_name_or_path
        quantization = adapter_quantization(path) if quantized else None
        if quantization is not None:
            options["quantization_config"] = quantization
        base = MMPeftForConditionalGeneration.from_pretrained(base_path, **options)
        if per_modality:  # both adapters, each batch routed to those of its media as in training
            model = modality_adapters.load_modality_adapters(base, path)
        else:
            model = PeftModel.from_pretrained(base, path)
        has_processor = os.path.isfile(os.path.join(path, "processor_config.json"))
        processor_path = path if has_processor else base_path
    if device is not None:
        model.to(device)
    return model.eval(), MMPeftProcessor.from_pretrained(processor_path)


def _modality_adapters():
    # Imported when used: mmpeft.training imports this module.
    from .training import modality_adapters

    return modality_adapters


@torch.no_grad()
def generate_answers(
    model,
    processor,
    dataset: MMPeftDataset,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
) -> tuple[list[str], set[int]]:
    """Greedy answers to the prompts of `dataset` (`"generate"` mode), and the indices of samples whose media
    failed to load (their answers are meaningless). With several processes, each generates a share and all get
    all (every process must call this)."""
    was_training = model.training
    model.eval()
    device = model.device if device is None else device
    # Equal shares (the last padded with a repeat): under ZeRO-3 every process must take part in every
    # generation step, so none may run out of batches before the others.
    share = -(-len(dataset) // num_processes)
    indices = [min(i, len(dataset) - 1) for i in range(process_index * share, (process_index + 1) * share)]
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        collate_fn=MMPeftDataCollator(processor.tokenizer.pad_token_id, padding_side="left"),
        num_workers=num_workers,
    )
    answers, failed = [], []
    for batch in tqdm(loader, desc="Generating", disable=not progress, leave=False):
        failed += [sample["index"] for sample in take_load_reports(batch)]
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        answers.extend(processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    gathered = dict(gather_object(list(zip(indices, answers))))
    return [gathered[i].strip() for i in range(len(dataset))], set(gather_object(failed))


@dataclass
class GenerationResults:
    """What `evaluate_generation` found: the scores, each sample's answer (`None` where its media failed to load)
    and the indices of those samples."""

    scores: dict[str, float]
    answers: list[str | None]
    failed: set[int] = field(default_factory=set)


def evaluate_generation(
    model, processor, dataset: MMPeftDataset, metrics=("accuracy",), **options
) -> GenerationResults:
    """Generate answers to `dataset` (`generate_answers`, `options` are its keyword arguments) and score them:
    each of `metrics` (`mmpeft.metrics.METRICS`; `accuracy` is exact match) overall, and accuracy per task
    (`accuracy_<task>`). Samples whose media failed to load are left out of the scores."""
    answers, failed = generate_answers(model, processor, dataset, **options)
    rows = dataset.rows.select_columns(["reference", "task"])
    kept = [index for index in range(len(dataset)) if index not in failed]
    references, tasks = list(rows["reference"]), list(rows["task"])
    scores = compute_metrics(list(metrics), [answers[i] for i in kept], [references[i] for i in kept])
    for task in sorted({tasks[i] for i in kept if tasks[i]}):
        picked = [i for i in kept if tasks[i] == task]
        accuracy = compute_metrics(["accuracy"], [answers[i] for i in picked], [references[i] for i in picked])
        scores[f"accuracy_{task}"] = accuracy["accuracy"]
    return GenerationResults(scores, [None if i in failed else answer for i, answer in enumerate(answers)], failed)


def merge_adapter(
    adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16
) -> str:
    """Merge the adapter in `adapter_dir` into its base loaded unquantized in `dtype` (QLoRA adapters too),
    and save model + processor to `output_dir`: an ordinary checkpoint that needs neither PEFT nor the base.

    The fully trained modules saved with the adapter (projectors, ...) replace the base's. Adapter and base are
    read from safetensors files only (`load_for_inference`).
    """
    if output_kind(adapter_dir) != "adapter":
        raise ValueError(f"{adapter_dir} holds full weights already: there is no adapter to merge.")
    if _modality_adapters().is_modality_adapter_output(adapter_dir):
        raise ValueError(
            f"{adapter_dir} holds one adapter per modality (vision, speech), chosen per input: merged, both would "
            "apply to every input; load it with load_for_inference instead."
        )
    model, processor = load_for_inference(adapter_dir, dtype=dtype, quantized=False)
    model.merge_and_unload().save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return str(output_dir)


__all__ = [
    "GenerationResults",
    "adapter_quantization",
    "evaluate_generation",
    "generate_answers",
    "load_for_inference",
    "merge_adapter",
    "output_kind",
]
