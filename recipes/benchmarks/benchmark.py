"""mmpeft against what a user would pick instead: training samples/s and peak memory on the same data.

    python recipes/benchmarks/benchmark.py                     # ~10 minutes on 2 CPU cores (each run twice, best kept)
    python recipes/benchmarks/benchmark.py --lm-vocab 0        # the LM's vocabulary cut to the tokenizer's 512
    python recipes/benchmarks/benchmark.py --peak-tflops 989   # on a GPU: adds MFU against that peak (H100 bf16 dense)
    python recipes/benchmarks/benchmark.py --quick             # seconds: tiniest sizes, 2 steps (what the test runs)

Two pairs of matched models, each trained with a real `transformers.Trainer` and PEFT LoRA:
- image + text: transformers' `LlavaForConditionalGeneration` against mmpeft with the same CLIP vision tower
  (hidden state -2, CLS dropped), the same Llama LM, the same 2-layer GELU MLP projector and the same number
  of image tokens per image;
- audio + text: transformers' `Qwen2AudioForConditionalGeneration` against mmpeft with a Whisper encoder of
  the same width, depth, mel bins and window, and the same Qwen2 LM. Qwen2-Audio average-pools two encoder
  frames into one token, mmpeft stacks two (`audio_frames_per_token=2`); clip lengths are chosen so that both
  give every clip the same number of tokens (the output prints both totals).

Both sides of a pair get the same generated samples (identical token ids, images and audio), batch size,
steps, seed and thread count: LoRA on the LM's attention and MLP linears, the projector trained fully
(`modules_to_save`), towers frozen, AdamW, fp32. mmpeft trains the way its recipe does (`MMPeftDataset`,
`MMPeftDataCollator`, `setup_tuning`, `MMPeftTrainer`); the baselines with `Trainer`, their processors'
image processor / feature extractor run per sample as mmpeft's are, and a plain padding collate function. Both
decode each image and clip from the same encoded bytes (PNG, WAV) at every step.
Text lengths are skewed (most answers short, a fifth long), the case padding-free batches are for: a third
run per pair trains mmpeft padding-free on the same data.

Where mmpeft's time goes less: `MMPeftTrainer` computes logits only at the positions that predict an answer token
(the baselines at every position, which with a 32,000-word vocabulary is most of a step), and padding-free batches
spend nothing on padding and attend within each sample only.

Each run is its own process (`--run NAME`), so its peak memory is its own: peak resident set size on CPU
(every run imports the same libraries, so their share is common to all), accelerator memory on a GPU.
Samples/s counts whole training steps (data loading, forward, backward, optimizer step) after warm-up steps.
Model FLOP/s count 4 N per token (N: the base model's parameters; tokens: the LM's, padding excluded), the same N
and tokens on both sides of a pair.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from benchmark_methods import machine_description, run_worker

from mmpeft.data import load_audio, load_image


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------

# The LM dominates the compute, as in real use; the towers are small and frozen. The LM's vocabulary has Llama 2's
# 32,000 entries (the tokenizer uses the first 512): a real LM's output layer is a large share of its
# compute and of a step's activations, and matters to how fast a framework trains it.
SIZES = {
    "default": dict(
        lm_hidden=256, lm_intermediate=768, lm_layers=4, lm_heads=4, lm_kv_heads=2, lm_vocab=32000,
        tower_hidden=128, tower_intermediate=512, tower_layers=2, tower_heads=4,
        image_size=32, patch_size=4,  # 8 x 8 patches -> 64 image tokens
        mel_bins=80, audio_window_seconds=4,  # 400 mel frames -> 200 encoder frames -> up to 100 audio tokens
    ),
    "quick": dict(
        lm_hidden=32, lm_intermediate=64, lm_layers=1, lm_heads=2, lm_kv_heads=1, lm_vocab=0,
        tower_hidden=16, tower_intermediate=32, tower_layers=1, tower_heads=2,
        image_size=16, patch_size=4,
        mel_bins=16, audio_window_seconds=1,
    ),
}  # fmt: skip

# Answer lengths in words (~1.8 tokens each): `long_fraction` of the samples are long. Audio clips last between
# a quarter and the whole window.
DATA = {
    "default": dict(short_words=(4, 12), long_words=(100, 160), long_fraction=0.2),
    "quick": dict(short_words=(2, 4), long_words=(12, 20), long_fraction=0.25),
}
QUESTIONS = {"image": "Describe the image.", "audio": "Transcribe the audio."}
SAMPLING_RATE, MEL_HOP = 16000, 160  # the Whisper feature extractor: 100 mel frames per second

LORA = dict(r=16, alpha=32, dropout=0.05)
# The LM's attention and MLP linears, on both sides (a full match on module names).
LORA_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# name -> (pair, framework, padding-free batches)
RUNS = {
    "image/llava": ("image", "llava", False),
    "image/mmpeft": ("image", "mmpeft", False),
    "image/mmpeft-padding-free": ("image", "mmpeft", True),
    "audio/qwen2-audio": ("audio", "qwen2-audio", False),
    "audio/mmpeft": ("audio", "mmpeft", False),
    "audio/mmpeft-padding-free": ("audio", "mmpeft", True),
}
# (label, faster / smaller candidate, reference, samples/s target)
COMPARISONS = [
    ("image: mmpeft / Llava", "image/mmpeft", "image/llava", 1.0),
    ("audio: mmpeft / Qwen2-Audio", "audio/mmpeft", "audio/qwen2-audio", 1.0),
    ("image: mmpeft padding-free / padded", "image/mmpeft-padding-free", "image/mmpeft", 1.3),
    ("audio: mmpeft padding-free / padded", "audio/mmpeft-padding-free", "audio/mmpeft", 1.3),
    ("image: mmpeft padding-free / Llava", "image/mmpeft-padding-free", "image/llava", 1.0),
    ("audio: mmpeft padding-free / Qwen2-Audio", "audio/mmpeft-padding-free", "audio/qwen2-audio", 1.0),
]

# Where each framework keeps the parts whose sizes must match: (LM, tower, projector) module prefixes.
PARTS = {
    "llava": (("model.language_model.", "lm_head."), ("model.vision_tower.",), ("model.multi_modal_projector.",)),
    "qwen2-audio": (("model.language_model.", "lm_head."), ("model.audio_tower.",), ("model.multi_modal_projector.",)),
    "mmpeft": (("language_model.",), ("vision_tower.", "audio_tower."), ("vision_projector.", "audio_projector.")),
}


# ---------------------------------------------------------------------------------------------------------
# Models: the same sub-configs on both sides of a pair
# ---------------------------------------------------------------------------------------------------------


def text_config(family: str, sizes: dict, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    return config_class(
        vocab_size=max(len(tokenizer), sizes["lm_vocab"]),
        hidden_size=sizes["lm_hidden"],
        intermediate_size=sizes["lm_intermediate"],
        num_hidden_layers=sizes["lm_layers"],
        num_attention_heads=sizes["lm_heads"],
        num_key_value_heads=sizes["lm_kv_heads"],
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def vision_config(sizes: dict):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=sizes["tower_hidden"],
        intermediate_size=sizes["tower_intermediate"],
        num_hidden_layers=sizes["tower_layers"],
        num_attention_heads=sizes["tower_heads"],
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
    )


def audio_encoder_settings(sizes: dict) -> dict:
    """Whisper-encoder settings shared by `WhisperConfig` (mmpeft) and `Qwen2AudioEncoderConfig`."""
    return dict(
        d_model=sizes["tower_hidden"],
        encoder_layers=sizes["tower_layers"],
        encoder_attention_heads=sizes["tower_heads"],
        encoder_ffn_dim=sizes["tower_intermediate"],
        num_mel_bins=sizes["mel_bins"],
        max_source_positions=sizes["audio_window_seconds"] * SAMPLING_RATE // MEL_HOP // 2,
    )


def mmpeft_config(pair: str, sizes: dict, tokenizer):
    from transformers import WhisperConfig

    from mmpeft import MMPeftConfig

    if pair == "image":
        return MMPeftConfig(
            text_config=text_config("llama", sizes, tokenizer),
            vision_config=vision_config(sizes),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-2,  # Llava's default
            vision_projector_type="mlp",
        )
    audio_config = WhisperConfig(
        **audio_encoder_settings(sizes),
        decoder_layers=1,  # unused: mmpeft builds the encoder only
        decoder_attention_heads=sizes["tower_heads"],
        decoder_ffn_dim=sizes["tower_intermediate"],
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return MMPeftConfig(
        text_config=text_config("qwen2", sizes, tokenizer),
        audio_config=audio_config,
        audio_token_id=tokenizer.convert_tokens_to_ids("<audio>"),
        audio_projector_type="linear",  # Qwen2-Audio's projector is one linear layer
        audio_frames_per_token=2,  # Qwen2-Audio average-pools 2 frames per token
    )


def baseline_model_and_processor(framework: str, sizes: dict, tokenizer, media_processor):
    """The transformers model (random, seeded by the caller) and its processor."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
    )

    if framework == "llava":
        config = LlavaConfig(
            vision_config=vision_config(sizes),
            text_config=text_config("llama", sizes, tokenizer),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=(sizes["image_size"] // sizes["patch_size"]) ** 2,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        processor = LlavaProcessor(
            image_processor=media_processor,
            tokenizer=tokenizer,
            patch_size=sizes["patch_size"],
            vision_feature_select_strategy="default",
            image_token="<image>",
            num_additional_image_tokens=1,  # CLIP's CLS token
        )
        return LlavaForConditionalGeneration(config), processor
    config = Qwen2AudioConfig(
        audio_config=Qwen2AudioEncoderConfig(**audio_encoder_settings(sizes)),
        text_config=text_config("qwen2", sizes, tokenizer),
        audio_token_index=tokenizer.convert_tokens_to_ids("<audio>"),
    )
    processor = Qwen2AudioProcessor(feature_extractor=media_processor, tokenizer=tokenizer, audio_token="<audio>")
    return Qwen2AudioForConditionalGeneration(config), processor


def count_parts(model, framework: str, vision_model_type: str | None) -> dict:
    """Parameters of the LM, the tower and the projector, before adapters are added.

    The tower counts what the forward reads: a CLIP tower built by `AutoModel` also holds the final norm of its
    pooled output, which Llava never reads (it takes hidden state -2) and mmpeft drops when it builds the tower.
    """
    from mmpeft.models.configuration_mmpeft import encoder_spec

    unused = encoder_spec("vision", vision_model_type).unused_parts if framework != "mmpeft" else ()
    counts = {}
    for part, prefixes in zip(("lm", "tower", "projector"), PARTS[framework]):
        counts[part] = sum(
            parameter.numel()
            for name, parameter in model.named_parameters()
            if name.startswith(prefixes) and not any(f".{piece}." in name for piece in unused)
        )
    counts["tower_as_built"] = sum(p.numel() for n, p in model.named_parameters() if n.startswith(PARTS[framework][1]))
    return counts


# ---------------------------------------------------------------------------------------------------------
# Data: generated samples, identical on both sides
# ---------------------------------------------------------------------------------------------------------


def make_records(pair: str, count: int, seed: int, sizes: dict, data: dict) -> list:
    """`count` one-turn samples: an image or an audio clip with a question, and an answer of skewed length."""
    from PIL import Image

    from mmpeft.data import Record
    from mmpeft.reference import REFERENCE_CORPUS

    rng = np.random.default_rng(seed)
    words = REFERENCE_CORPUS.split()
    # Clips of 4k mel frames: Qwen2-Audio's conv + pool and mmpeft's conv + 2-frame stacking both give k tokens.
    window_frames = sizes["audio_window_seconds"] * SAMPLING_RATE // MEL_HOP
    records = []
    for index in range(count):
        long = rng.random() < data["long_fraction"]
        num_words = rng.integers(*data["long_words" if long else "short_words"], endpoint=True)
        answer = " ".join(rng.choice(words, num_words))
        if pair == "image":
            side = sizes["image_size"]
            media = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        else:
            frames = 4 * rng.integers(window_frames // 16, window_frames // 4, endpoint=True)
            media = {
                "array": 0.1 * rng.standard_normal(frames * MEL_HOP, dtype=np.float32),
                "sampling_rate": SAMPLING_RATE,
            }
        messages = [
            {"role": "user", "content": [{"type": pair, pair: media}, {"type": "text", "text": QUESTIONS[pair]}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        records.append(Record(data={"messages": messages}, where=f"benchmark[{index}]"))
    return records


def with_run_lengths(ids: list[int], labels: list[int], token_id: int, lengths: list[int]):
    """`ids` / `labels` with the k-th run of `token_id` resized to `lengths[k]` tokens (labels -100 there)."""
    new_ids, new_labels, runs, previous = [], [], iter(lengths), None
    for token, label in zip(ids, labels):
        if token == token_id:
            if previous != token_id:
                n = next(runs)
                new_ids += [token_id] * n
                new_labels += [-100] * n
        else:
            new_ids.append(token)
            new_labels.append(label)
        previous = token
    return new_ids, new_labels


class BaselineDataset(torch.utils.data.Dataset):
    """The baselines' samples: mmpeft's token ids with each placeholder run at the baseline processor's own
    length, media featurized per sample by that processor's image processor / feature extractor."""

    def __init__(self, examples, processor, token_id: int, tokens_per_item: list[int]):
        self.processor, self.items = processor, []
        for example, tokens in zip(examples, tokens_per_item):
            ids, labels = with_run_lengths(example.input_ids, example.labels, token_id, [tokens])
            self.items.append((torch.tensor(ids), torch.tensor(labels), example.images, example.audio))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        input_ids, labels, images, audio = self.items[index]
        item = {"input_ids": input_ids, "labels": labels}
        if images:  # decoded as mmpeft decodes them (its rows hold encoded media), so both pay the same
            pixels = self.processor.image_processor([load_image(image) for image in images], return_tensors="pt")
            item["pixel_values"] = pixels["pixel_values"]
        if audio:
            extractor = self.processor.feature_extractor
            features = extractor(
                [load_audio(clip, extractor.sampling_rate) for clip in audio],
                sampling_rate=extractor.sampling_rate,
                padding="max_length",  # as Qwen2AudioProcessor does
                return_attention_mask=True,
                return_tensors="pt",
            )
            item["input_features"] = features["input_features"]
            item["feature_attention_mask"] = features["attention_mask"]
        return item


def pad_collate(items: list[dict], pad_token_id: int) -> dict:
    """Right-pad the text of a batch, concatenate its media: the collate function a baseline user writes."""
    longest = max(len(item["input_ids"]) for item in items)

    def pad(name, value):
        return torch.stack([torch.nn.functional.pad(i[name], (0, longest - len(i[name])), value=value) for i in items])

    batch = {"input_ids": pad("input_ids", pad_token_id), "labels": pad("labels", -100)}
    batch["attention_mask"] = (
        torch.arange(longest) < torch.tensor([len(i["input_ids"]) for i in items])[:, None]
    ).long()
    for name in items[0].keys() - batch.keys():
        batch[name] = torch.cat([item[name] for item in items])
    return batch


def tokens_per_item_of(processor, examples, pair: str) -> list[int]:
    """Placeholder tokens the baseline's own processor gives each sample's image or clip."""
    token = processor.image_token if pair == "image" else processor.audio_token
    token_id = processor.tokenizer.convert_tokens_to_ids(token)
    counts = []
    for example in examples:
        if pair == "image":
            inputs = processor(text=token, images=[load_image(image) for image in example.images], return_tensors="pt")
        else:
            clips = [load_audio(clip, SAMPLING_RATE) for clip in example.audio]
            inputs = processor(text=token, audio=clips, sampling_rate=SAMPLING_RATE, return_tensors="pt")
        counts.append(int((inputs["input_ids"] == token_id).sum()))
    return counts


# ---------------------------------------------------------------------------------------------------------
# One run (in its own process)
# ---------------------------------------------------------------------------------------------------------


class CountingCollator:
    """Wraps a collate function and counts the tokens it hands out: real ones and padded positions."""

    def __init__(self, collate):
        self.collate, self.real, self.positions = collate, 0, 0

    def __getattr__(self, name):  # the wrapped collator's settings (MMPeftTrainer reads `padding_free`)
        return getattr(self.collate, name)

    def __call__(self, items):
        batch = self.collate(items)
        self.positions += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch


def setup_mmpeft(framework: str, config, processor, dataset, sizes: dict, padding_free: bool):
    """mmpeft as its recipe trains: `setup_tuning`, `MMPeftDataset`, `MMPeftDataCollator`, `MMPeftTrainer`."""
    from mmpeft import MMPeftForConditionalGeneration
    from mmpeft.data import MMPeftDataCollator
    from mmpeft.training import MMPeftTrainer, TuningArguments, setup_tuning

    model = MMPeftForConditionalGeneration(config)
    parts = count_parts(model, framework, None)
    tuning = TuningArguments(
        method="lora",  # LoRA on the LM, projectors trained fully (saved in the adapter), towers frozen
        lora_r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        lora_target_modules=LORA_TARGETS,
    )
    model = setup_tuning(model, tuning)
    options = {"padding_free": True} if padding_free else {}
    collate = MMPeftDataCollator(processor.tokenizer.pad_token_id, **options)
    token_id = config.image_token_id if config.vision_config is not None else config.audio_token_id
    media_tokens = [dataset.example(index).input_ids.count(token_id) for index in range(len(dataset))]
    return model, dataset, collate, MMPeftTrainer, parts, media_tokens


def setup_baseline(framework: str, config, processor, examples, sizes: dict, padding_free: bool):
    """A transformers model with PEFT LoRA, `BaselineDataset` and `pad_collate`, for the plain `Trainer`."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    pair = "image" if config.vision_config is not None else "audio"
    media_processor = processor.image_processor if pair == "image" else processor.feature_extractor
    model, baseline_processor = baseline_model_and_processor(framework, sizes, processor.tokenizer, media_processor)
    parts = count_parts(model, framework, config.vision_config.model_type if pair == "image" else None)
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA_TARGETS,
        modules_to_save=["multi_modal_projector"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    media_tokens = tokens_per_item_of(baseline_processor, examples, pair)
    token_id = config.image_token_id if pair == "image" else config.audio_token_id
    dataset = BaselineDataset(examples, baseline_processor, token_id, media_tokens)

    def collate(items):
        return pad_collate(items, processor.tokenizer.pad_token_id)

    return model, dataset, collate, Trainer, parts, media_tokens


def run(name: str, args) -> dict:
    """Train configuration `name` of `RUNS` and measure it."""
    import psutil
    from peft.tuners.lora import LoraLayer
    from transformers import TrainerCallback, TrainingArguments, WhisperFeatureExtractor, set_seed
    from transformers.models.siglip import SiglipImageProcessorPil

    from mmpeft import MMPeftProcessor
    from mmpeft.data import MMPeftDataset, prepare_examples
    from mmpeft.reference import REFERENCE_CORPUS, train_byte_level_tokenizer
    from mmpeft.training import count_parameters, peak_memory_mb

    # Every run imports the same modules above, so what they take is common to all runs' peak memory.
    imports_mb = psutil.Process().memory_info().rss / 2**20
    torch.set_num_threads(args.threads)
    pair, framework, padding_free = RUNS[name]
    scale = "quick" if args.quick else "default"
    sizes = SIZES[scale] if args.lm_vocab is None else {**SIZES[scale], "lm_vocab": args.lm_vocab}
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # Data: tokenized once, up front, by mmpeft (both sides get these token ids).
    tokenizer = train_byte_level_tokenizer(REFERENCE_CORPUS)
    config = mmpeft_config(pair, sizes, tokenizer)
    if pair == "image":
        media_processor = SiglipImageProcessorPil(size={"height": sizes["image_size"], "width": sizes["image_size"]})
    else:
        window = sizes["audio_window_seconds"]
        media_processor = WhisperFeatureExtractor(
            feature_size=sizes["mel_bins"], sampling_rate=SAMPLING_RATE, chunk_length=window
        )
    processor = MMPeftProcessor(
        image_processor=media_processor if pair == "image" else None,
        feature_extractor=media_processor if pair == "audio" else None,
        tokenizer=tokenizer,
        image_seq_length=config.num_image_tokens if pair == "image" else None,
        audio_downsampling=config.audio_downsampling if pair == "audio" else None,
        audio_frames_per_token=config.audio_frames_per_token,
    )
    records = make_records(pair, args.batch_size * (args.warmup + args.steps), args.seed, sizes, DATA[scale])
    rows, _ = prepare_examples(records, processor)
    mmpeft_dataset = MMPeftDataset(rows, processor)
    examples = [mmpeft_dataset.example(index) for index in range(len(rows))]  # what the baselines' datasets read

    # Model, adapters, batches
    set_seed(args.seed)
    setup = setup_mmpeft if framework == "mmpeft" else setup_baseline
    model, dataset, collate, trainer_class, parts, media_tokens = setup(
        framework, config, processor, mmpeft_dataset if framework == "mmpeft" else examples, sizes, padding_free
    )
    trainable, total = count_parameters(model)

    # Training
    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, training_args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    timer, counter = StepTimer(), CountingCollator(collate)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            max_steps=args.warmup + args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            seed=args.seed,
            use_cpu=device == "cpu",
        )
        trainer = trainer_class(
            model=model, args=training_args, train_dataset=dataset, data_collator=counter, callbacks=[timer]
        )
        output = trainer.train()

    ends = timer.ends[args.warmup - 1 :]  # from the end of the last warm-up step
    seconds = ends[-1] - ends[0]
    steps = len(ends) - 1
    lengths = [len(example) for example in examples]
    # Model FLOPs as usually counted for LoRA: 4 N per token (forward 2N, backward through the frozen weights 2N),
    # with N the base model's parameters and the tokens those the LM reads (padding excluded).
    tokens_per_second = counter.real / (args.warmup + args.steps) * steps / seconds
    return {
        "run": name,
        "pair": pair,
        "framework": framework,
        "padding_free": padding_free,
        "vocab_size": config.text_config.vocab_size,
        "samples_per_second": steps * args.batch_size / seconds,
        "ms_per_step": 1000 * statistics.median(b - a for a, b in zip(ends, ends[1:])),
        "peak_memory_mb": peak_memory_mb(),
        "imports_memory_mb": imports_mb,
        "device": device,
        "threads": torch.get_num_threads(),
        "train_loss": output.training_loss,
        "parameters": {**parts, "trainable": trainable, "total": total},
        "lora_layers": sum(isinstance(module, LoraLayer) for module in model.modules()),
        "media_tokens": sum(media_tokens),
        "samples": len(examples),
        "sample_lengths": {
            "mean": statistics.mean(lengths),
            "median": statistics.median(lengths),
            "max": max(lengths),
        },
        "tokens": {"real": counter.real, "positions": counter.positions},
        "model_flops_per_second": 4 * (parts["lm"] + parts["tower"] + parts["projector"]) * tokens_per_second,
    }


# ---------------------------------------------------------------------------------------------------------
# The benchmark: every run in its own process, then the table
# ---------------------------------------------------------------------------------------------------------


def report(results: dict, args) -> tuple[str, list[dict]]:
    sizes = SIZES["quick" if args.quick else "default"]
    data = DATA["quick" if args.quick else "default"]
    done = list(results.values())
    vocab = done[0]["vocab_size"] if done else "-"
    lines = [
        f"Machine: {machine_description()}; torch threads {args.threads}; batch "
        f"{args.batch_size}; {args.steps} timed steps after {args.warmup} warm-up steps; best of {args.repeats}",
        f"LM: {sizes['lm_hidden']} x {sizes['lm_layers']} layers (MLP {sizes['lm_intermediate']}, "
        f"{sizes['lm_heads']} heads / {sizes['lm_kv_heads']} KV, vocabulary {vocab}), "
        "Llama for image, Qwen2 for audio. Towers "
        f"{sizes['tower_hidden']} x {sizes['tower_layers']} layers: CLIP {sizes['image_size']} px / patch "
        f"{sizes['patch_size']}; Whisper encoder {sizes['mel_bins']} mel bins, "
        f"{sizes['audio_window_seconds']} s window.",
        f"Data: {done[0]['samples'] if done else 0} samples per run, answers of {data['short_words'][0]}-"
        f"{data['short_words'][1]} words, {data['long_fraction']:.0%} of {data['long_words'][0]}-"
        f"{data['long_words'][1]} words. LoRA r {LORA['r']}, alpha {LORA['alpha']} on the LM's attention + "
        "MLP linears; projector trained fully; towers frozen; AdamW; fp32.",
        "",
        "| run | samples/s | ms/step (median) | model GFLOP/s (4N/token)"
        + (" | MFU" if args.peak_tflops else "")
        + " | peak memory (above imports) | tokens/step real / padded "
        "| media tokens | LM / tower / projector params | trainable | LoRA layers |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.peak_tflops else ""),
    ]
    for name, r in results.items():
        p, steps = r["parameters"], args.warmup + args.steps
        flops = r["model_flops_per_second"]
        mfu = f" | {flops / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else ""
        lines.append(
            f"| {name} | {r['samples_per_second']:.1f} | {r['ms_per_step']:.0f} | {flops / 1e9:.1f}{mfu} "
            f"| {r['peak_memory_mb']:.0f} MB "
            f"(+{r['peak_memory_mb'] - r['imports_memory_mb']:.0f}) "
            f"| {r['tokens']['real'] / steps:.0f} / {r['tokens']['positions'] / steps:.0f} | {r['media_tokens']:,} "
            f"| {p['lm']:,} / {p['tower']:,} / {p['projector']:,} | {p['trainable']:,} | {r['lora_layers']} |"
        )
    lines += [
        "",
        "| comparison | samples/s ratio | peak memory ratio, reference / candidate (above imports) | target "
        "| result |",
        "|---|---|---|---|---|",
    ]
    comparisons = []
    for label, candidate, reference, target in COMPARISONS:
        c, r = results[candidate], results[reference]
        speed = c["samples_per_second"] / r["samples_per_second"]
        memory = r["peak_memory_mb"] / c["peak_memory_mb"]
        training_memory = (r["peak_memory_mb"] - r["imports_memory_mb"]) / (
            c["peak_memory_mb"] - c["imports_memory_mb"]
        )
        passed = speed >= target
        comparisons.append(
            dict(
                comparison=label,
                samples_per_second_ratio=speed,
                peak_memory_ratio=memory,
                peak_memory_above_imports_ratio=training_memory,
                target=target,
                passed=passed,
            )
        )
        lines.append(
            f"| {label} | {speed:.2f} | {memory:.2f} ({training_memory:.2f}) | samples/s >= {target} "
            f"| {'PASS' if passed else 'FAIL'} |"
        )
    return "\n".join(lines), comparisons


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 25; --quick: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --quick: 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per step (default 8; --quick: 4)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per run")
    parser.add_argument("--repeats", type=int, default=2, help="run each configuration this many times, keep the best")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (>1 only when timings do not matter)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lm-vocab", type=int, default=None, help="the LM's vocabulary size (default 32000; 0: the tokenizer's 512)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s at the run's precision: adds MFU"
    )
    parser.add_argument("--quick", action="store_true", help="tiniest sizes and 2 steps: checks that it all runs")
    parser.add_argument("--output", default="outputs/benchmark.json", help="where the results go (JSON)")
    parser.add_argument("--run", choices=list(RUNS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, default, quick in (("steps", 25, 2), ("warmup", 3, 1), ("batch_size", 8, 4)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (timing starts at the end of the last warm-up step)")
    if args.run:
        print(json.dumps(run(args.run, args)))
        return {}

    start = time.perf_counter()
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    common += ["--threads", str(args.threads), "--seed", str(args.seed), *(["--quick"] if args.quick else [])]
    common += ["--lm-vocab", str(args.lm_vocab)] if args.lm_vocab is not None else []
    names = list(RUNS)
    # Repeats alternate between configurations, so that a slow spell of a shared machine hits all of them.
    commands = [[sys.executable, os.path.abspath(__file__), "--run", name, *common] for name in names] * args.repeats
    with ThreadPoolExecutor(args.jobs) as pool:
        outputs = list(pool.map(run_worker, commands))
    results = {}
    for name in RUNS:
        runs = [output for output in outputs if output["run"] == name]
        best = max(runs, key=lambda r: r["samples_per_second"])
        results[name] = {**best, "peak_memory_mb": min(r["peak_memory_mb"] for r in runs)}

    table, comparisons = report(results, args)
    wall = time.perf_counter() - start
    print(table)
    print(f"\nWall time: {wall:.0f} s")
    summary = {"settings": vars(args), "wall_seconds": wall, "runs": results, "comparisons": comparisons}
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as file:
            json.dump(summary, file, indent=2)
        print(f"Results: {args.output}")
    return summary


if __name__ == "__main__":
    main()
