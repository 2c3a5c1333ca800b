"""Reading images and audio for training: PIL for images, soundfile for audio (not `datasets`' Audio decoding,
which needs torchcodec and fails with CPU torch).

A media source is one of: a path (already resolved against its data file), an `http(s)://` URL (images),
raw bytes, a `PIL.Image`, a `{"bytes": ..., "path": ...}` dict (what `datasets` stores with `decode=False`) or,
for audio, a `{"array": ..., "sampling_rate": ...}` dict. Every failure raises `MediaError` with the reason.
"""

import io
import os
from math import gcd

import numpy as np
import soundfile
from PIL import Image
from scipy.signal import resample_poly


class MediaError(ValueError):
    """A media file that cannot be used; the message says why."""


def _open_source(source):
    """Bytes buffer or path for a file-like source."""
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return io.BytesIO(source["bytes"])
        source = source.get("path")
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise MediaError(f"file not found: {source}")
        if not os.path.isfile(source):
            raise MediaError(f"not a file: {source}")
        return source
    raise MediaError(f"unsupported media source of type {type(source).__name__}")


def load_image(source) -> Image.Image:
    """An RGB `PIL.Image` from `source` (any mode is converted; the pixels are fully decoded here)."""
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, str) and source.startswith(("http://", "https://")):
            from transformers.image_utils import load_image as load_url

            try:
                return load_url(source).convert("RGB")
            except Exception as error:
                raise MediaError(f"cannot download image {source}: {error}") from error
        try:
            image = Image.open(_open_source(source))
            image.load()
        except MediaError:
            raise
        except Exception as error:  # PIL raises many types for corrupt files
            raise MediaError(f"cannot decode image: {error}") from error
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits, don't clip
        array = np.asarray(image, dtype=np.float64)
        array = 255 * (array - array.min()) / max(array.max() - array.min(), 1)
        image = Image.fromarray(array.astype(np.uint8))
    return image.convert("RGB")


def load_audio(source, sampling_rate: int) -> np.ndarray:
    """A mono float32 waveform at `sampling_rate` from `source` (channels averaged, resampled if needed)."""
    if isinstance(source, dict) and source.get("array") is not None:
        audio, source_rate = np.asarray(source["array"], dtype=np.float32), int(source["sampling_rate"])
        if audio.ndim == 2:  # (channels, samples) as datasets stores it
            audio = audio.T
    else:
        try:
            audio, source_rate = soundfile.read(_open_source(source), dtype="float32", always_2d=True)
        except MediaError:
            raise
        except Exception as error:
            raise MediaError(f"cannot decode audio: {error}") from error
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.size == 0:
        raise MediaError("audio is empty (0 samples)")
    if not np.isfinite(audio).all():
        raise MediaError("audio contains NaN or infinite samples")
    if source_rate != sampling_rate:
        divisor = gcd(source_rate, sampling_rate)
        audio = resample_poly(audio, sampling_rate // divisor, source_rate // divisor).astype(np.float32)
    return audio


__all__ = ["MediaError", "load_audio", "load_image"]
