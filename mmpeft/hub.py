"""Publishing a fine-tuning output to the Hub: what is pushed per method, the model card, and failures that
leave the local output intact and say how to retry.

What is pushed: full weights for methods without an adapter (full, freeze); the adapter (with the fully trained
modules such as the projectors) and a note of its base for methods with one (LoRA, QLoRA, DoRA: told apart by the
output's files), or with `merge=True` the adapter merged into a 16-bit base. Always the processor, the model code
needed for `trust_remote_code`, and a model card rendered from the template shipped in the package
(`templates/model_card.md`, or one of your own). A push only reads the output folder: the card and the model code
it lacks go into the commit from memory and from the package.
"""

import json
import os
import shutil

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from .inference import merge_adapter
from .models import MMPeftConfig
from .summary import RUN_SUMMARY, RunSummary


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CARD_TEMPLATE = os.path.join(PACKAGE_DIR, "templates", "model_card.md")
MODEL_CODE_DIR = os.path.join(PACKAGE_DIR, "models")
MODEL_CODE = ("configuration_mmpeft.py", "modeling_mmpeft.py", "processing_mmpeft.py")
# Never uploaded: resumable state, trackers' folders, training_args.bin (a pickle that can hold a token), the lock.
IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    "initial_adapter/**",  # PiSSA / OLoRA: the adapter before training, the output's conversion only needed it
    "wandb/**",
    "runs/**",
    "*.bin",
    "data_report.json",
    ".mmpeft.lock",
]


class PushError(RuntimeError):
    """A push that failed; the message names the repository, the reason and the command to retry."""


def _hub_id(name_or_path: str | None) -> str | None:
    """`name_or_path` if it names a Hub repository (not a local folder)."""
    if not name_or_path or os.path.isabs(name_or_path) or os.path.exists(name_or_path) or name_or_path.count("/") != 1:
        return None
    return name_or_path


def _source(name_or_path: str | None, model_type: str | None = None) -> dict:
    """Where a model came from, for the card: `hub_id` for a Hub repository (the only kind the Hub accepts as
    `base_model`), `local` for a local folder, named by its basename (its full path means nothing to a reader and
    may name the user's home), neither when none is recorded (a part initialised from scratch); and `model`, how
    the card's body names it."""
    hub_id = _hub_id(name_or_path)
    local = None if hub_id or not name_or_path else os.path.basename(os.path.normpath(name_or_path))
    if hub_id:
        model = f"`{hub_id}`"
    elif local:
        model = f"local folder `{local}` ({f'{model_type}, ' if model_type else ''}not on the Hub)"
    else:
        model = f"{model_type} (random init)"
    return {"hub_id": hub_id, "local": local, "model": model}


def _composition(config: MMPeftConfig) -> list[dict]:
    parts = []
    if config.vision_config is not None:
        details = f"{config.num_image_tokens} tokens per image, {config.vision_projector_type} projector"
        if config.vision_token_reduction != "none":
            details += f", {config.vision_token_reduction} x{config.vision_reduction_factor}"
        parts.append({"role": "vision encoder", "config": config.vision_config, "details": details})
    if config.audio_config is not None:
        details = f"{config.audio_frames_per_token} frames per token, {config.audio_projector_type} projector"
        parts.append({"role": "audio encoder", "config": config.audio_config, "details": details})
    text = config.text_config
    parts.append(
        {"role": "language model", "config": text, "details": f"{text.num_hidden_layers} layers x {text.hidden_size}"}
    )
    for part in parts:
        part.update(_source(part["config"]._name_or_path, part["config"].model_type))
    return parts


def _bases_sentence(hub_ids: list[str], local: list[str]) -> str:
    """The card body's line on what the model is built on: Hub repositories, then local folders, said to be off
    the Hub, or that there is none."""
    named = [f"`{name}`" for name in hub_ids]
    if local:
        folders = ", ".join(f"`{name}`" for name in local)
        named.append(f"local folder{'s' if len(local) > 1 else ''} {folders} (not on the Hub)")
    if not named:
        return "Base model: none, the parts were initialised from scratch"
    return f"Base model{'s' if len(hub_ids) + len(local) > 1 else ''}: {'; '.join(named)}"


def _usage(repo_id: str, base: dict | None) -> str:
    """The usage snippet: the model from `repo_id`, or the adapter there on `base` (a `_source`) when given."""
    if base:
        where = "" if base["hub_id"] else "  # a local folder, not on the Hub: the path of your copy"
        return (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
            f'base = AutoModelForImageTextToText.from_pretrained("{base["hub_id"] or base["local"]}", '
            f"trust_remote_code=True){where}\n"
            f'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
            f'processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)'
        )
    return (
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
        f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        f'processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, '
        '{"type": "text", "text": "Describe them."}]}]\n'
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
        'inputs = processor(text=[prompt], images=[image], audio=[waveform], return_tensors="pt")  # a PIL image, '
        "a 1-D float array at processor.feature_extractor.sampling_rate\n"
        "print(processor.batch_decode(model.generate(**inputs, max_new_tokens=32), skip_special_tokens=True))"
    )


def model_card(
    folder: str,
    repo_id: str,
    template: str | None = None,
    comparison: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """The `ModelCard` of the output in `folder`: metadata, composition, method and hyperparameters, eval
    metrics, the comparison table when given, and a usage snippet for plain transformers. `template` is a Jinja
    model-card template; by default the one shipped in the package.

    The base (an adapter's base; otherwise the pretrained parts) is named in the body wherever it is. In the
    metadata, `base_model` lists Hub repositories only (the Hub checks them) and `base_model_local` the names of
    local folders, which the Hub keeps as they are."""
    adapter_file = os.path.join(folder, "adapter_config.json")
    adapter = json.load(open(adapter_file)) if os.path.exists(adapter_file) else None
    base = _source(adapter["base_model_name_or_path"]) if adapter else None
    config = MMPeftConfig.from_pretrained(adapter["base_model_name_or_path"] if adapter else folder)
    summary = RunSummary.load(folder)  # None for an output trained elsewhere
    parts = _composition(config)
    metrics = {k: round(v, 4) for k, v in summary.metrics.items() if k.startswith("eval_")} if summary else {}
    method = summary.method if summary else "lora" if adapter else "full"
    # A base on the Hub stands for its parts; a local one is named together with the parts it is made of.
    bases = [base] if base and base["hub_id"] else [*([base] if base else []), *parts]
    hub_ids = list(dict.fromkeys(b["hub_id"] for b in bases if b["hub_id"]))
    local = list(dict.fromkeys(b["local"] for b in bases if b["local"]))
    card_data = ModelCardData(
        license=license,
        library_name="peft" if adapter else "transformers",
        base_model=hub_ids or None,
        base_model_local=local or None,
        tags=["mmpeft", "multimodal", "image-text-to-text", "audio-text-to-text", method],
        datasets=[d for d in summary.datasets if _hub_id(d)] or None if summary else None,
        pipeline_tag="image-text-to-text",
    )
    return ModelCard.from_template(
        card_data,
        template_path=template or CARD_TEMPLATE,
        model_name=repo_id.split("/")[-1],
        composition_sentence=", ".join(f"{p['role']} {p['model']}" for p in parts) + ", joined by projectors.",
        parts=parts,
        bases_sentence=_bases_sentence(hub_ids, local),
        method=method,
        adapter=bool(adapter),
        adapter_modules=", ".join(adapter.get("modules_to_save") or []) if adapter else "",
        base_model=base["model"] if base else None,
        trainable=f"{summary.trainable_params:,} ({100 * summary.trainable_fraction:.2f} %)" if summary else "n/a",
        hyperparameters=summary.hyperparameters if summary else {},
        metrics=metrics,
        comparison=comparison,
        usage=_usage(repo_id, base),
    )


def _commit_operations(folder: str, card: ModelCard) -> list[CommitOperationAdd]:
    """What a push of `folder` commits: its files less `IGNORE_PATTERNS`, the model code it lacks (adapters hold
    none) from the package, and `card` as `README.md` in place of any README.md of its own. `folder` is only read,
    so a failed push leaves it exactly as it was."""
    files = [
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for name in names
    ]
    files = sorted(filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS))
    operations = [CommitOperationAdd(file, os.path.join(folder, file)) for file in files if file != "README.md"]
    operations += [
        CommitOperationAdd(name, os.path.join(MODEL_CODE_DIR, name)) for name in MODEL_CODE if name not in files
    ]
    return [*operations, CommitOperationAdd("README.md", str(card).encode())]


def push_output(
    output_dir: str,
    repo_id: str,
    *,
    template: str | None = None,
    private: bool = False,
    token: str | None = None,
    merge: bool = False,
    comparison: str | None = None,
) -> str:
    """Push a `recipes/finetune.py` output to `repo_id` and return the repository URL. `template`: as in
    `model_card`.

    `output_dir` is only read: the model card and the model code go into the commit, never into the folder, and
    with `merge` the merged checkpoint is written to a new folder, `<output_dir>-merged`, first. A failed push
    raises `PushError` and leaves every local file as it was, to retry with `recipes/push.py`. The token is only
    handed to the Hub client.
    """
    folder = output_dir
    adapter = os.path.exists(os.path.join(output_dir, "adapter_config.json"))
    if merge and adapter:
        folder = merge_adapter(output_dir, output_dir.rstrip("/") + "-merged")
        for name in (RUN_SUMMARY, "eval_results.json"):
            if os.path.exists(os.path.join(output_dir, name)):
                shutil.copy(os.path.join(output_dir, name), folder)
    operations = _commit_operations(folder, model_card(folder, repo_id, template, comparison))

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations, commit_message="Upload model trained with mmpeft")
    except Exception as error:  # network, HTTP and authentication errors all end the same way
        reason = (str(error).replace(token, "<token>") if token else str(error)) or type(error).__name__
        raise PushError(
            f"Pushing {folder} to the Hub repository {repo_id} failed: {reason.splitlines()[0]}\n"
            f"The local output in {output_dir} is complete and untouched"
            + (f" (merged weights in {folder})" if folder != output_dir else "")
            + "; retry with:\n"
            f"    python recipes/push.py {output_dir} {repo_id}{' --merge' if merge else ''}"
        ) from None
    return str(url)


__all__ = ["PushError", "model_card", "push_output"]
