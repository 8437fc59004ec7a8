"""Decoding and sniffing of images and audio. Heavy imports (PIL, soundfile, scipy) happen on first use."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from agent.exceptions import MediaError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from PIL import Image

TARGET_SAMPLE_RATE = 16_000

_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)

_AUDIO_FORMATS = {
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/flac": "flac",
    "audio/ogg": "ogg",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
}


def sniff_media_type(data: bytes) -> str | None:
    """Media type of encoded image or audio bytes from their magic number, or None when unknown."""
    for magic, media_type in _IMAGE_MAGIC:
        if data.startswith(magic):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio/wav"
    if data.startswith(b"fLaC"):
        return "audio/flac"
    if data.startswith(b"OggS"):
        return "audio/ogg"
    if data.startswith(b"ID3") or data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio/mpeg"
    return None


def audio_format_name(media_type: str) -> str:
    """Short format name used by the OpenAI `input_audio` part ("wav", "mp3", ...)."""
    return _AUDIO_FORMATS.get(media_type.split(";")[0].strip().lower(), media_type.rsplit("/", 1)[-1])


def pil_to_bytes(image: Image.Image, fmt: str = "PNG") -> tuple[bytes, str]:
    """Encode a PIL image losslessly (PNG by default)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue(), f"image/{fmt.lower()}"


def open_image(data: bytes) -> Image.Image:
    """Decode image bytes into an RGB PIL image, raising MediaError on bad data."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MediaError(f"cannot decode image ({len(data)} bytes): {exc}") from exc
    return image.convert("RGB") if image.mode != "RGB" else image


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes, reading only the header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MediaError(f"cannot decode image ({len(data)} bytes): {exc}") from exc


def samples_to_wav(samples: Any, sample_rate: int) -> bytes:
    """Encode mono float samples as 32-bit float WAV: the samples come back bit for bit."""
    import numpy as np
    import soundfile as sf

    array = np.asarray(samples, dtype=np.float32)
    if array.ndim != 1:
        raise MediaError(f"audio samples must be mono (1-D), got shape {array.shape}")
    if sample_rate <= 0:
        raise MediaError(f"sample rate must be positive, got {sample_rate}")
    buf = io.BytesIO()
    sf.write(buf, array, sample_rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def decode_audio(data: bytes) -> tuple[npt.NDArray[np.float32], int]:
    """Decode audio bytes to mono float32 samples and their sample rate."""
    import numpy as np
    import soundfile as sf

    try:
        array, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise MediaError(f"cannot decode audio ({len(data)} bytes): {exc}") from exc
    mono = array.mean(axis=1) if array.shape[1] > 1 else array[:, 0]
    return np.ascontiguousarray(mono, dtype=np.float32), int(rate)


def resample(samples: npt.NDArray[np.float32], rate: int, target: int) -> npt.NDArray[np.float32]:
    """Polyphase resampling (scipy) from `rate` to `target` Hz."""
    if rate == target:
        return samples
    from math import gcd

    import numpy as np
    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return np.asarray(resample_poly(samples, target // g, rate // g), dtype=np.float32)
