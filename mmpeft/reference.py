"""The tiny reference checkpoint: a complete omni model (image + audio + text) built offline, deterministically.

It is the embedded default of `recipes/finetune.py` and the model of the README examples. Nothing is
downloaded: the configs are written here, the weights are random (seeded) and the tokenizer is a byte-level
BPE trained in-process, so any UTF-8 text encodes without unknown tokens.

`hub/build_reference.py` is the command-line front of `build_reference_checkpoint`.
"""

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
)
from transformers.models.siglip import SiglipImageProcessorPil

from .models import MMPeftConfig, MMPeftForConditionalGeneration, MMPeftProcessor
from .models.processing_mmpeft import CHAT_SPECIAL_TOKENS


PAD_TOKEN = "<|endoftext|>"
IMAGE_TOKEN, AUDIO_TOKEN = "<image>", "<audio>"
SPECIAL_TOKENS = [PAD_TOKEN, *CHAT_SPECIAL_TOKENS, IMAGE_TOKEN, AUDIO_TOKEN]

# What the tokenizer's merges are learnt from. Byte-level BPE encodes any text; this only decides which
# words get short encodings. Plain English of the kind instructions and answers are written in.
REFERENCE_CORPUS = """\
You are a helpful assistant that can see images and hear audio. Answer the question in one word or a short phrase.
What colour is the shape in the image? What shape is in the picture? How many beeps do you hear in the audio?
Is the tone high or low? Is the sound loud or quiet? Does the colour of the shape match the pitch of the tone?
Describe the image. Transcribe the audio. What is said in this recording? What is written in the picture?
The answer is yes. The answer is no. red green blue yellow purple orange black white grey brown pink cyan
circle square triangle star cross ring bar dot line stripe
zero one two three four five six seven eight nine ten eleven twelve first second third left right top bottom
high low loud quiet fast slow short long big small large tiny many few more less same different before after
a an the this that these those it is are was were be been has have had do does did can could will would should
what which who where when why how yes no and or not with without of in on at to from by for about as than then
image picture photo audio sound tone beep speech voice music noise word words number numbers colour color shape
0 1 2 3 4 5 6 7 8 9 10 100 1000 . , ! ? : ; ' " ( ) - + = / %
"""

# Shapes of the reference composite. The LM is Llama 128 x 2 (MLP 384); the towers are SigLIP- and Whisper-like 64 x 2.
IMAGE_SIZE, PATCH_SIZE = 32, 4  # 8 x 8 patches, pixel-shuffled 2 x 2 -> 16 tokens per image
SAMPLING_RATE, AUDIO_WINDOW_SECONDS, MEL_BINS = 16000, 4, 32  # 400 mel frames -> 200 encoder frames
AUDIO_FRAMES_PER_TOKEN = 8  # -> 25 tokens per 4 s (6.25 tokens/s)


def train_byte_level_tokenizer(
    corpus: str, vocab_size: int = 512, special_tokens: list[str] = SPECIAL_TOKENS
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on `corpus`, in-process and deterministically.

    Every byte has a token, so any UTF-8 text encodes without unknown tokens. The first special token is
    the padding token; `<|im_end|>` is the end-of-sequence token when present.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines(), trainer=trainer)
    eos = "<|im_end|>" if "<|im_end|>" in special_tokens else special_tokens[0]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=special_tokens[0],
        eos_token=eos,
        additional_special_tokens=special_tokens[1:],
    )


def build_reference_model(seed: int = 0) -> tuple[MMPeftForConditionalGeneration, MMPeftProcessor]:
    """The reference composite (SigLIP-like + Whisper-like + Llama), randomly initialised from `seed`."""
    tokenizer = train_byte_level_tokenizer(REFERENCE_CORPUS)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,  # a multiple of 64: bitsandbytes 4-bit blocks on CPU
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=ids[PAD_TOKEN],
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=False,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    audio_config = WhisperConfig(
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=128,
        num_mel_bins=MEL_BINS,
        max_source_positions=AUDIO_WINDOW_SECONDS * 50,
        vocab_size=len(tokenizer),
        pad_token_id=ids[PAD_TOKEN],
        bos_token_id=ids[PAD_TOKEN],
        eos_token_id=ids[PAD_TOKEN],
        decoder_start_token_id=ids[PAD_TOKEN],
    )
    config = MMPeftConfig(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=audio_config,
        image_token_id=ids[IMAGE_TOKEN],
        audio_token_id=ids[AUDIO_TOKEN],
        vision_token_reduction="pixel_shuffle",
        vision_reduction_factor=2,
        audio_frames_per_token=AUDIO_FRAMES_PER_TOKEN,
    )
    # Seeded here without moving the caller's random state (a recipe's run stays the same whether or not it had
    # to build this model first).
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MMPeftForConditionalGeneration(config)
        # A random Whisper encoder hears little: with its std-0.02 init the convolutions' output is several times
        # weaker than the fixed sinusoidal positions, and what reaches the projector is mostly "which frame is
        # this" -- a frozen tower then loses the pitch of a tone. PyTorch's default conv init and positions
        # scaled to a tenth keep the spectrum audible (tests/test_reference.py checks it). A pretrained encoder
        # needs none of this; the reference model is random either way.
        tower = model.audio_tower
        for conv in (tower.conv1, tower.conv2):
            conv.reset_parameters()
    with torch.no_grad():
        tower.embed_positions.weight.mul_(0.1)
    processor = MMPeftProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=MEL_BINS, sampling_rate=SAMPLING_RATE, chunk_length=AUDIO_WINDOW_SECONDS
        ),
        tokenizer=tokenizer,
        image_seq_length=config.num_image_tokens,
        audio_downsampling=config.audio_downsampling,
        audio_frames_per_token=config.audio_frames_per_token,
    )
    return model, processor


def build_reference_checkpoint(output_dir: str | os.PathLike, seed: int = 0) -> str:
    """Write the reference checkpoint (model + processor + remote code) to `output_dir` and return its path."""
    model, processor = build_reference_model(seed)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return str(output_dir)


__all__ = ["build_reference_checkpoint", "build_reference_model", "train_byte_level_tokenizer", "REFERENCE_CORPUS"]
