"""Reading images and audio for training: PIL for images, soundfile for audio (not `datasets`' Audio decoding,
which needs torchcodec and fails with CPU torch).

A media source is one of: a path (already resolved and checked by `mmpeft.data.sources`, which also fetches
remote media into bytes), raw bytes, a `PIL.Image`, a `{"bytes": ...}` dict (as `datasets` stores media with
`decode=False`) or, for audio, a `{"array": ..., "sampling_rate": ...}` dict. Every failure raises `MediaError`
with the reason.

Hostile files are refused before they cost memory: an image's size is checked from its header before its
pixels are decoded (`MAX_IMAGE_PIXELS`), an audio clip's length can be read from its header alone
(`audio_length`), and audio is decoded block by block, so that a long multi-channel recording never sits
in memory whole -- only the mono output at the model's sampling rate does.
"""

import io
import math
import os
import warnings
from typing import Iterable, Iterator

import numpy as np
import soundfile
from PIL import Image, UnidentifiedImageError
from scipy.signal import resample_poly


# Largest image accepted, in pixels (width x height), checked from the header before decoding: a small PNG or
# JPEG can declare a huge canvas (a decompression bomb). 8192 x 8192 RGB decodes to 192 MiB. To accept larger
# images set `mmpeft.data.media.MAX_IMAGE_PIXELS` (and Pillow's own `PIL.Image.MAX_IMAGE_PIXELS`, above twice
# which Pillow refuses to open a file at all).
MAX_IMAGE_PIXELS = 8192 * 8192

# Audio is decoded this many samples (all channels together) at a time: 4 MiB of float32 per block.
AUDIO_BLOCK_SAMPLES = 1 << 20

# Resampling from rate a to rate b filters at up / down = b / a in lowest terms; real recording rates give terms
# of at most a few hundred (44.1 kHz -> 16 kHz is 160 / 441). A header rate like 44101 Hz would need a filter of
# nearly a million taps: refused instead.
MAX_RESAMPLING_TERM = 1000


class MediaError(ValueError):
    """A media file that cannot be used; the message says why."""


def _open_source(source):
    """Bytes buffer or path for a file-like source."""
    if isinstance(source, dict):  # {"bytes": ...}: a path beside them is only a name (`mmpeft.data.sources`)
        source = source.get("bytes")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise MediaError("media bytes are empty (0 bytes)")
        return io.BytesIO(source)
    if isinstance(source, str) and "://" in source:
        raise MediaError(f"{source:.200} is a URL: media are read from files or bytes here (see mmpeft.data.sources)")
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise MediaError(f"file not found: {source}")
        if not os.path.isfile(source):
            raise MediaError(f"not a file: {source}")
        if os.path.getsize(source) == 0:
            raise MediaError(f"file is empty (0 bytes): {source}")
        return source
    raise MediaError(f"unsupported media source of type {type(source).__name__}")


def load_image(source) -> Image.Image:
    """An RGB `PIL.Image` from `source` (any mode is converted; the pixels are fully decoded here).

    Raises `MediaError` for unreadable or truncated files and for images over `MAX_IMAGE_PIXELS`, which are
    refused from their header, before their pixels are decoded.
    """
    if isinstance(source, Image.Image):  # already decoded by its producer: nothing left to guard
        return _to_rgb(source)
    image = _open_image(source)
    try:
        image.load()
    except Exception as error:  # PIL raises many types for corrupt or truncated files
        raise MediaError(f"cannot decode image: {_image_error(error)}") from error
    return _to_rgb(image)


def check_image(source) -> tuple[int, int]:
    """`(width, height)` of an image, from its header only: the format is known, the file is there, not empty and
    not over `MAX_IMAGE_PIXELS`. A file that breaks off after its header passes (`load_image` finds it)."""
    if isinstance(source, Image.Image):
        return source.size  # decoded by its producer: no header to read
    with _open_image(source) as image:
        return image.size


def _open_image(source) -> Image.Image:
    """The image, opened (its header read and its size checked), pixels not decoded."""
    opened = _open_source(source)
    try:
        with warnings.catch_warnings():  # Pillow warns from 1x its limit; MAX_IMAGE_PIXELS decides below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(opened)  # reads the header only
    except Image.DecompressionBombError as error:  # Pillow refuses from 2 x PIL.Image.MAX_IMAGE_PIXELS
        limit = min(MAX_IMAGE_PIXELS, 2 * Image.MAX_IMAGE_PIXELS)
        raise MediaError(
            f"image is over the limit of {limit} pixels, refused before decoding (Pillow: {error})"
        ) from error
    except UnidentifiedImageError as error:
        raise MediaError("cannot decode image: not a known image format") from error
    except Exception as error:
        raise MediaError(f"cannot decode image: {_image_error(error)}") from error
    try:
        _check_image_size(image)
    except MediaError:
        image.close()
        raise
    return image


def _image_error(error: Exception) -> str:
    # Pillow words a cut-off file differently depending on where it stops ("Truncated File Read", "image file
    # is truncated (150 bytes not processed)"): one reason, so that such samples are counted together.
    return "the file is truncated" if "truncated" in str(error).lower() else str(error)


def _check_image_size(image: Image.Image):
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(
            f"image of {width}x{height} pixels ({width * height}) is over the limit of {MAX_IMAGE_PIXELS} pixels, "
            "refused before decoding (a possible decompression bomb; mmpeft.data.media.MAX_IMAGE_PIXELS)"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16"):  # 16-bit greyscale: scale the 0-65535 range to 0-255 (convert would clip)
        image = Image.fromarray((np.asarray(image, dtype=np.float64) * (255 / 65535)).round().astype(np.uint8))
    elif image.mode in ("I", "F"):  # 32-bit int / float: no nominal range, so stretch min..max to 0-255
        array = np.asarray(image, dtype=np.float64)
        array = 255 * (array - array.min()) / max(array.max() - array.min(), 1e-12)
        image = Image.fromarray(array.round().astype(np.uint8))
    if image.has_transparency_data:  # RGBA, LA, PA, or P / L / RGB with a transparent colour
        # Composite on white rather than drop the alpha channel: dropping it exposes the colour stored under
        # transparent pixels, which most tools leave black, so a dark logo or text on a transparent background
        # would turn into a black square. White is how viewers and documents show such images.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")  # CMYK, palette, greyscale, YCbCr, ... -> RGB


def _resampling_ratio(source_rate: int, sampling_rate: int) -> tuple[int, int]:
    """`(up, down)`, the resampling ratio in lowest terms, or `MediaError` for an unusable rate."""
    if source_rate <= 0:
        raise MediaError(f"invalid sampling rate {source_rate} Hz")
    divisor = math.gcd(source_rate, sampling_rate)
    up, down = sampling_rate // divisor, source_rate // divisor
    if max(up, down) > MAX_RESAMPLING_TERM:
        raise MediaError(
            f"cannot resample {source_rate} Hz to {sampling_rate} Hz: the ratio {up}/{down} needs a filter of "
            f"{20 * max(up, down) + 1} taps (resample the file first)"
        )
    return up, down


def _resampled_length(num_samples: int, up: int, down: int) -> int:
    return -(-num_samples * up // down)  # ceil, as scipy's resample_poly


def _array_source(source: dict) -> tuple[np.ndarray, int]:
    """Mono float32 waveform and rate of a `{"array", "sampling_rate"}` source."""
    try:
        audio = np.asarray(source["array"], dtype=np.float32)
        source_rate = int(source.get("sampling_rate"))
    except (TypeError, ValueError) as error:
        raise MediaError(f"audio array needs numbers and an integer 'sampling_rate': {error}") from error
    if audio.ndim == 2:  # (channels, samples), as datasets stores it
        audio = audio.mean(axis=0)
    if audio.ndim != 1:
        raise MediaError(f"audio array must be (samples,) or (channels, samples), got shape {audio.shape}")
    return audio, source_rate


def _open_audio(source) -> soundfile.SoundFile:
    """The file, opened (its header read)."""
    opened = _open_source(source)
    try:
        return soundfile.SoundFile(opened)
    except Exception as error:
        raise MediaError(f"cannot decode audio: {_audio_error(error)}") from error


def _audio_error(error: Exception) -> str:
    # libsndfile's own words, without the "Error opening <file object at 0x...>" prefix that makes every
    # message (and so every skip reason) unique.
    return error.error_string if isinstance(error, soundfile.LibsndfileError) else str(error)


def audio_length(source, sampling_rate: int) -> int:
    """Samples that `load_audio(source, sampling_rate)` returns, read from the file header without decoding.

    Raises `MediaError` for an unreadable header, an empty clip or an unusable sampling rate.
    """
    if isinstance(source, dict) and source.get("array") is not None:
        audio, source_rate = _array_source(source)
        num_samples = audio.shape[0]
    else:
        with _open_audio(source) as file:
            num_samples, source_rate = file.frames, file.samplerate
    if num_samples == 0:
        raise MediaError("audio is empty (0 samples)")
    return _resampled_length(num_samples, *_resampling_ratio(source_rate, sampling_rate))


def load_audio(source, sampling_rate: int) -> np.ndarray:
    """A mono float32 waveform at `sampling_rate` from `source` (channels averaged, resampled if needed).

    Files are decoded `AUDIO_BLOCK_SAMPLES` at a time, each block mixed down and resampled before the next is
    read, so memory holds the output plus one block, never the whole multi-channel recording. The output is
    the same as resampling the whole clip at once. Raises `MediaError` for unreadable, empty or non-finite
    (NaN / infinite) audio; silence is valid audio.
    """
    if isinstance(source, dict) and source.get("array") is not None:
        audio, source_rate = _array_source(source)
        up, down = _resampling_ratio(source_rate, sampling_rate)
        return _collect([_finite(audio)], audio.shape[0], up, down)
    with _open_audio(source) as file:
        up, down = _resampling_ratio(file.samplerate, sampling_rate)
        blocks = file.blocks(max(1, AUDIO_BLOCK_SAMPLES // file.channels), dtype="float32", always_2d=True)

        def mono_blocks():
            try:
                for block in blocks:
                    yield _finite(block).mean(axis=1)
            except MediaError:
                raise
            except Exception as error:  # a stream that breaks off mid-file
                raise MediaError(f"cannot decode audio: {_audio_error(error)}") from error

        return _collect(mono_blocks(), file.frames, up, down)


def _finite(block: np.ndarray) -> np.ndarray:
    if not np.isfinite(block).all():
        raise MediaError("audio contains NaN or infinite samples")
    return block


def _collect(blocks: Iterable[np.ndarray], num_samples: int, up: int, down: int) -> np.ndarray:
    """The resampled concatenation of `blocks` (`num_samples` in all, per the header), written into one array
    allocated up front."""
    if num_samples == 0:
        raise MediaError("audio is empty (0 samples)")
    output = np.empty(_resampled_length(num_samples, up, down), dtype=np.float32)
    filled = 0
    for piece in _resample_blocks(blocks, up, down):
        if filled + piece.shape[0] > output.shape[0]:
            raise MediaError(f"audio holds more samples than its header says ({num_samples})")
        output[filled : filled + piece.shape[0]] = piece
        filled += piece.shape[0]
    if filled != output.shape[0]:
        raise MediaError(f"audio holds fewer samples than its header says ({num_samples})")
    return output


def _resample_blocks(blocks: Iterable[np.ndarray], up: int, down: int) -> Iterator[np.ndarray]:
    """`resample_poly(concatenation of blocks, up, down)`, computed block by block.

    Each span is resampled together with `margin` input samples on both sides -- more than the filter reaches
    -- and only its own outputs are kept, so the result equals one `resample_poly` call on the whole signal
    (zero-padded at its two ends, as `resample_poly` pads). Spans start at multiples of `down`, where an
    input sample falls exactly on an output sample, so the pieces line up.
    """
    if up == down == 1:
        yield from blocks
        return
    half_len = 10 * max(up, down)  # resample_poly's filter half length, in upsampled samples
    margin = down * math.ceil((half_len // up + 2) / down)  # in input samples, a multiple of `down`
    buffer, buffer_start = np.zeros(0, dtype=np.float32), 0  # input kept from global index buffer_start
    done = total = 0  # input [0, done) has been resampled; `total` input samples read so far

    def span(end: int, last: bool) -> np.ndarray:
        low = max(done - margin, 0)
        segment = buffer[low - buffer_start : min(end + margin, total) - buffer_start]
        resampled = resample_poly(segment, up, down)
        first = (done - low) * up // down
        count = (_resampled_length(end, up, down) if last else end * up // down) - done * up // down
        return resampled[first : first + count].astype(np.float32, copy=False)

    for block in blocks:
        buffer = np.concatenate([buffer, block])
        total += block.shape[0]
        end = (total - margin) // down * down  # keep `margin` of look-ahead for the next span
        if end > done:
            yield span(end, last=False)
            done = end
            keep = max(done - margin, 0)
            buffer, buffer_start = buffer[keep - buffer_start :], keep
    if total > done:
        yield span(total, last=True)


__all__ = [
    "AUDIO_BLOCK_SAMPLES",
    "MAX_IMAGE_PIXELS",
    "MediaError",
    "audio_length",
    "check_image",
    "load_audio",
    "load_image",
]
