import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_parts import AUDIO_CONFIGS, TEXT_FAMILIES, VISION_CONFIGS, build, media

from mmpeft import MMPeftForConditionalGeneration


PROMPT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "What is it?"}]},
]


def make_inputs(processor, num_images=1, audio_seconds=(0.6,), messages=PROMPT, seed=0):
    images, audio = media(seed, num_images, audio_seconds)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=images or None, audio=audio or None, return_tensors="pt")


# Every LM family with every vision encoder; the audio encoders take turns (each appears 5 times).
MATRIX = [
    (text, vision, list(AUDIO_CONFIGS)[i % len(AUDIO_CONFIGS)])
    for i, (text, vision) in enumerate(itertools.product(TEXT_FAMILIES, VISION_CONFIGS))
]


@pytest.mark.parametrize("text,vision,audio", MATRIX)
def test_forward_backward_generate(text, vision, audio, tok):
    model, processor = build(text, vision, audio, tok, audio_frames_per_token=2)
    inputs = make_inputs(processor)
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_audio = int((inputs["input_ids"] == model.config.audio_token_id).sum())
    assert n_image == model.config.num_image_tokens > 0 and n_audio > 0

    model.train()
    outputs = model(**inputs, labels=inputs["input_ids"])
    assert outputs.logits.shape == (*inputs["input_ids"].shape, len(tok))
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    # Gradient reaches every part: both encoders through their projectors, and the LM.
    for part in ("vision_tower", "vision_projector", "audio_tower", "audio_projector", "language_model"):
        grads = [p.grad for p in getattr(model, part).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), part

    model.eval()
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 6
    assert torch.equal(cached, uncached)


def test_generation_never_emits_placeholders(tok):
    model, processor = build(tok=tok)
    # Make the placeholder ids the most likely tokens; generation must still avoid them.
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight[model.config.image_token_id] = 0
        head.weight[model.config.audio_token_id] = 0
        head.weight[model.config.image_token_id, 0] = 100.0
    inputs = make_inputs(processor)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    assert not torch.isin(generated, torch.tensor([model.config.image_token_id, model.config.audio_token_id])).any()


@pytest.mark.parametrize("reduction,factor", [("none", 1), ("avg_pool", 2), ("pixel_shuffle", 2)])
@pytest.mark.parametrize("projector", ["mlp", "linear"])
def test_projector_and_token_reduction(reduction, factor, projector, tok):
    model, processor = build(
        vision_token_reduction=reduction,
        vision_reduction_factor=max(factor, 1),
        vision_projector_type=projector,
        audio_projector_type=projector,
        audio_frames_per_token=3,
        tok=tok,
    )
    grid = 32 // 8 // factor
    assert model.config.num_image_tokens == grid * grid
    pixel_values = make_inputs(processor)["pixel_values"]
    features = model.get_image_features(pixel_values).pooler_output
    assert features.shape == (1, grid * grid, model.config.text_config.hidden_size)
    assert hasattr(model.vision_projector, "linear_2") == (projector == "mlp")
    outputs = model(**make_inputs(processor))
    assert torch.isfinite(outputs.logits).all()


def test_pixel_shuffle_keeps_every_feature():
    from mmpeft.models.modeling_mmpeft import pixel_shuffle, stack_frames

    features = torch.arange(2 * 16 * 3, dtype=torch.float).reshape(2, 16, 3)
    shuffled = pixel_shuffle(features, 2)
    assert shuffled.shape == (2, 4, 12)
    assert torch.equal(shuffled.flatten().sort().values, features.flatten())
    # Top-left token holds patches (0,0), (0,1), (1,0), (1,1) of the 4x4 grid.
    assert shuffled[0, 0].reshape(4, 3)[:, 0].tolist() == [0.0, 3.0, 12.0, 15.0]
    stacked = stack_frames(torch.ones(1, 5, 2), 2)
    assert stacked.shape == (1, 3, 4) and stacked[0, 2].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_save_load_exact_logits(tmp_path, tok):
    # GPT-2 ties its head to its embeddings.
    model, processor = build("gpt2", "clip", "wav2vec2", tok, audio_frames_per_token=4)
    inputs = make_inputs(processor)
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = MMPeftForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    assert torch.equal(reloaded(**inputs).logits, expected)

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):
        model = auto_class.from_pretrained(tmp_path).eval()
        assert isinstance(model, MMPeftForConditionalGeneration)
        assert torch.equal(model(**inputs).logits, expected)


# The start of a script run in a subprocess: mmpeft cannot be imported there, as where it is not installed.
HIDE_MMPEFT = textwrap.dedent(
    """
    import importlib.abc, sys

    class HideMMPeft(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "mmpeft" or name.startswith("mmpeft."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")

    sys.meta_path.insert(0, HideMMPeft())
    try:
        import mmpeft  # noqa: F401
        raise SystemExit("mmpeft is importable")
    except ModuleNotFoundError:
        pass
    """
)

REMOTE_SCRIPT = HIDE_MMPEFT + textwrap.dedent(
    """

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    checkpoint, inputs_file, out_file = sys.argv[1:4]
    text, images, audio = torch.load(inputs_file, weights_only=False)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    inputs = processor(text=[text], images=images, audio=audio, return_tensors="pt")
    results = {}
    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):
        model = auto_class.from_pretrained(checkpoint, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            results[auto_class.__name__] = model(**inputs).logits
    results["input_ids"] = inputs["input_ids"]
    torch.save(results, out_file)
    """
)


def test_remote_code_load_without_mmpeft(tmp_path, tok):
    model, processor = build("qwen2", "siglip", "whisper", tok, vision_token_reduction="pixel_shuffle")
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    for name in ("modeling_mmpeft.py", "configuration_mmpeft.py", "processing_mmpeft.py"):
        assert (checkpoint / name).exists(), name

    images, audio = media(1, num_images=2, audio_seconds=(0.5, 1.7))
    content = [{"type": "image"}, {"type": "audio"}, {"type": "image"}, {"type": "audio"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    torch.save((text, images, audio), tmp_path / "inputs.pt")
    inputs = processor(text=[text], images=images, audio=audio, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits

    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    cwd = tmp_path  # not the repository root, so `mmpeft/` is not importable from the working directory
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert torch.equal(remote["input_ids"], inputs["input_ids"])
    assert torch.equal(remote["AutoModelForImageTextToText"], expected)
    assert torch.equal(remote["AutoModelForCausalLM"], expected)


def test_placeholder_count_mismatch_names_counts_and_sample(tok):
    model, processor = build(tok=tok)
    one = make_inputs(processor)
    ids = one["input_ids"]
    batch = {
        "input_ids": torch.cat([ids, ids]),
        "attention_mask": torch.cat([one["attention_mask"]] * 2),
        "pixel_values": one["pixel_values"].repeat(2, 1, 1, 1),
        "input_features": one["input_features"].repeat(2, 1, 1),
        "feature_attention_mask": one["feature_attention_mask"].repeat(2, 1),
    }
    model(**batch)  # consistent batch works

    # Sample 1 loses one image token (as if truncation cut into its placeholder run).
    broken = dict(batch, input_ids=batch["input_ids"].clone())
    position = (broken["input_ids"][1] == model.config.image_token_id).nonzero()[-1]
    broken["input_ids"][1, position] = 0
    n = model.config.num_image_tokens
    with pytest.raises(
        ValueError,
        match=rf"image features and image tokens do not match.*{2 * n - 1} image tokens.*"
        rf"per sample: \[{n}, {n - 1}\].*{2 * n} features.*sample 1",
    ):
        model(**broken)

    # One audio clip too many for the placeholders.
    extra = dict(
        batch,
        input_features=batch["input_features"][:1].repeat(3, 1, 1),
        feature_attention_mask=batch["feature_attention_mask"][:1].repeat(3, 1),
    )
    with pytest.raises(ValueError, match=r"audio features and audio tokens do not match.*sample 1"):
        model(**extra)


def test_placeholders_without_media_are_text(tok):
    # As in transformers' VLMs: an assistant model in assisted decoding, or a text-only call, gets no media.
    model, processor = build(tok=tok)
    inputs = make_inputs(processor)
    ids = inputs["input_ids"]
    with torch.no_grad():
        as_text = model.language_model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, as_text)
        # Only audio given: the image placeholders stay text, the audio ones get the clip.
        audio_only = model(
            input_ids=ids,
            input_features=inputs["input_features"],
            feature_attention_mask=inputs["feature_attention_mask"],
        )
        assert audio_only.image_outputs is None and audio_only.audio_outputs is not None
        image_only = model(input_ids=ids, pixel_values=inputs["pixel_values"])
        assert image_only.audio_outputs is None and image_only.image_hidden_states.shape[0] == 1


def test_media_without_modality(tok):
    model, processor = build(tok=tok)
    inputs = make_inputs(processor)
    text_only, text_processor = build(vision=None, audio=None, tok=tok)
    assert text_only.vision_tower is None and text_only.audio_tower is None
    with pytest.raises(ValueError, match=r"built without the image modality"):
        text_only(input_ids=inputs["input_ids"][:, :4], pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match=r"built without the audio modality"):
        text_only(input_ids=inputs["input_ids"][:, :4], input_features=inputs["input_features"])


def test_inputs_embeds_with_media_match_input_ids(tok):
    model, processor = build(tok=tok)
    inputs = make_inputs(processor)
    with torch.no_grad():
        expected = model(**inputs).logits
        embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
        assert torch.equal(model(inputs_embeds=embeds, **inputs).logits, expected)
        # A placeholder dropped from the embeddings: the count check still names both counts.
        image_token = model.get_input_embeddings().weight[model.config.image_token_id]
        first = (embeds[0] == image_token).all(-1).nonzero()[0]
        embeds[0, first] = 0
        n = model.config.num_image_tokens
        with pytest.raises(ValueError, match=rf"{n - 1} image tokens.*{n} features"):
            model(inputs_embeds=embeds, **inputs)
    ids = make_inputs(processor)["input_ids"]
    by_ids = model.generate(input_ids=ids, **inputs, max_new_tokens=4, do_sample=False)[:, ids.shape[1] :]
    embeds = model.get_input_embeddings()(ids)
    assert torch.equal(model.generate(inputs_embeds=embeds, **inputs, max_new_tokens=4, do_sample=False), by_ids)


def test_feature_methods_follow_the_transformers_contract(tok):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, processor = build(tok=tok, audio_frames_per_token=2)
    content = [{"type": "image"}, {"type": "audio"}, {"type": "audio"}, {"type": "text", "text": "And?"}]
    inputs = make_inputs(processor, audio_seconds=(0.6, 0.3), messages=[{"role": "user", "content": content}])
    image = model.get_image_features(inputs["pixel_values"], output_hidden_states=True)
    assert isinstance(image, BaseModelOutputWithPooling)
    assert image.pooler_output.shape == (1, model.config.num_image_tokens, model.config.text_config.hidden_size)
    assert len(image.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert model.get_image_features(inputs["pixel_values"]).hidden_states is None
    as_tuple = model.get_image_features(inputs["pixel_values"], return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], image.pooler_output)

    # The model's own input names, by keyword.
    audio = model.get_audio_features(
        input_features=inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"]
    )
    assert isinstance(audio, BaseModelOutputWithPooling) and len(audio.pooler_output) == 2
    tokens = [clip.shape[0] for clip in audio.pooler_output]
    assert tokens[0] > tokens[1] and sum(tokens) == int((inputs["input_ids"] == model.config.audio_token_id).sum())
    outputs = model(**inputs)
    assert torch.equal(outputs.audio_hidden_states[1], audio.pooler_output[1])
    assert torch.equal(outputs.image_hidden_states, image.pooler_output)


@pytest.mark.parametrize("audio", ["whisper", "wav2vec2"])
def test_long_audio_is_chunked_not_truncated(audio, tok):
    model, processor = build(vision=None, audio=audio, tok=tok)
    window = processor.max_audio_seconds
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe."}]}]
    short = make_inputs(processor, num_images=0, audio_seconds=(window * 0.9,), messages=messages)
    long = make_inputs(processor, num_images=0, audio_seconds=(window * 2.7,), messages=messages)
    name = "input_features" if audio == "whisper" else "input_values"
    assert short[name].shape[0] == 1 and long[name].shape[0] == 3  # three chunks of one clip
    n_short = int((short["input_ids"] == model.config.audio_token_id).sum())
    n_long = int((long["input_ids"] == model.config.audio_token_id).sum())
    assert n_long > 2.5 * n_short  # every second of the clip got tokens
    mask_name = "feature_attention_mask" if audio == "whisper" else "input_values_mask"
    assert long[mask_name].sum() >= int(window * 2.7 * 16000) // (160 if audio == "whisper" else 1) - 3
    assert torch.isfinite(model(**long).logits).all()


def test_generate_computes_last_position_logits_only(tok):
    model, processor = build(tok=tok)
    inputs = make_inputs(processor)
    shapes = []
    model.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.logits.shape)))
    model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert shapes == [(1, 1, len(tok))] * 3  # prefill included
    # A boolean mask (the trainer's `logits_for_labels_only`) keeps the positions it selects.
    keep = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    keep[0, -4:] = True
    assert model(**inputs, logits_to_keep=keep).logits.shape == (4, len(tok))
    # `past_key_values`, the cache's former name, still works.
    prefill = model(**inputs, use_cache=True)
    step = model(input_ids=inputs["input_ids"][:, -1:], past_key_values=prefill.cache)
    assert step.logits.shape == (1, 1, len(tok))


def test_decode_step_exports_with_static_cache(tok):
    # The decode step holds no data-dependent placeholder count (no host sync, nothing `torch.export` cannot
    # trace), even when the token is a placeholder id: media are merged at prefill only.
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    model, processor = build(tok=tok)
    model.generation_config.cache_implementation = "static"
    exportable = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=32)
    token = torch.tensor([[model.config.image_token_id]])
    program = exportable.export(input_ids=token, cache_position=torch.tensor([0]))
    with torch.no_grad():
        expected = model(input_ids=token).logits
    assert torch.allclose(program.module()(input_ids=token, cache_position=torch.tensor([0])), expected, atol=1e-5)


def test_prefill_with_media_exports(tok):
    # The count check is a hint when traced; clip token counts become symbolic sizes.
    model, processor = build(tok=tok)
    inputs = dict(make_inputs(processor, audio_seconds=(0.6,)), use_cache=False)
    program = torch.export.export(model, args=(), kwargs=inputs, strict=False)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert torch.allclose(program.module()(**inputs).logits, expected, atol=1e-5)


def test_static_cache_generation_matches_dynamic(tok):
    model, processor = build(tok=tok)
    inputs = make_inputs(processor)
    steps = []
    model.register_forward_pre_hook(lambda module, args, kwargs: steps.append(set(kwargs)), with_kwargs=True)
    dynamic = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    static = model.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)
    media = {"pixel_values", "input_features", "feature_attention_mask"}
    assert all(media <= step for step in steps[::5]) and not any(media & step for step in steps[1:5] + steps[6:])


PIPELINE_SCRIPT = HIDE_MMPEFT + textwrap.dedent(
    """
    import importlib.util, json

    from transformers import pipeline

    omni, audio_only, image, clip, out_file = sys.argv[1:6]
    question = {"type": "text", "text": "What is it?"}
    requests = [
        ("image-text-to-text", omni, [{"type": "image", "url": image}, question]),
        ("image-text-to-text", omni, [question]),
        ("any-to-any", audio_only, [{"type": "audio", "path": clip}, question]),
        ("any-to-any", audio_only, [question]),
    ]
    if importlib.util.find_spec("torchvision"):  # the any-to-any pipeline needs it for a model that takes images
        both = [{"type": "image", "url": image}, {"type": "audio", "path": clip}, question]
        requests.append(("any-to-any", omni, both))
    answers = []
    for task, checkpoint, content in requests:
        generate = pipeline(task, model=checkpoint, trust_remote_code=True)
        assert type(generate.model).__module__.startswith("transformers_modules"), type(generate.model).__module__
        result = generate(text=[{"role": "user", "content": content}], max_new_tokens=3, do_sample=False)
        answers.append([task, len(content), result[0]["generated_text"][-1]])
    json.dump(answers, open(out_file, "w"))
    """
)


def test_pipelines_from_a_saved_folder_without_mmpeft(tmp_path, tok):
    import soundfile
    from transformers import AutoModelForMultimodalLM

    folders = {}
    for name, vision in (("omni", "siglip"), ("audio_only", None)):
        model, processor = build("qwen2", vision, "whisper", tok)
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
        processor.save_pretrained(folders[name])
    assert model.input_modalities == ("audio", "text")
    assert isinstance(AutoModelForMultimodalLM.from_pretrained(folders["omni"]), MMPeftForConditionalGeneration)
    images, audio = media(2)
    images[0].save(tmp_path / "image.png")
    soundfile.write(tmp_path / "clip.wav", audio[0], 16000)  # by path: transformers' audio loader (and soxr)

    script = tmp_path / "pipelines.py"
    script.write_text(PIPELINE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    paths = [folders["omni"], folders["audio_only"], tmp_path / "image.png", tmp_path / "clip.wav"]
    result = subprocess.run(
        [sys.executable, str(script), *map(str, paths), str(tmp_path / "answers.json")],
        cwd=tmp_path,  # not the repository root, so `mmpeft/` is not importable from the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert [task for task, _, _ in answers[:4]] == ["image-text-to-text"] * 2 + ["any-to-any"] * 2
    for _, _, message in answers:
        assert message["role"] == "assistant" and isinstance(message["content"], str)


def test_missing_tower_weights_initialise_as_the_towers_own_classes(tmp_path, tok):
    from safetensors.torch import load_file, save_file
    from transformers.models.whisper.modeling_whisper import sinusoids

    model, _ = build("llama", "siglip", "whisper", tok)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {name: value for name, value in weights.items() if not name.startswith(("vision_tower.", "audio_tower."))}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded = MMPeftForConditionalGeneration.from_pretrained(tmp_path)

    # Whisper's positions are fixed sinusoids, set by WhisperPreTrainedModel._init_weights on the encoder.
    positions = reloaded.audio_tower.embed_positions.weight
    assert torch.equal(positions, sinusoids(*positions.shape))
    # SiglipPreTrainedModel._init_weights sets each layer's MLP biases to N(0, 1e-6) on the SiglipMLP module (which
    # has no parameters of its own); skipped, its Linear layers kept the generic init: zero biases.
    # (mmpeft drops SigLIP's attention-pooling `head`, which it does not use.)
    layer = reloaded.vision_tower.encoder.layers[0]
    assert 0 < layer.mlp.fc1.bias.abs().max() < 1e-4
    assert torch.equal(layer.self_attn.q_proj.bias, torch.zeros_like(layer.self_attn.q_proj.bias))
    # The LM's and the projectors' weights were in the checkpoint: loaded, not initialised.
    for name, value in reloaded.state_dict().items():
        if name in kept:
            assert torch.equal(value, kept[name]), name


def test_assisted_decoding_with_an_mmpeft_assistant(tok):
    # The assistant gets the prompt's ids without the media: its placeholders are text.
    model, processor = build(tok=tok)
    assistant, _ = build("qwen2", tok=tok)
    inputs = make_inputs(processor)
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(
        model.generate(**inputs, max_new_tokens=6, do_sample=False, assistant_model=assistant), expected
    )
