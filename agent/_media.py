"""Decoding and sniffing of images and audio, and the gate that untrusted media passes to become a part.

Heavy imports (PIL, soundfile, scipy) happen on first use.

The gate: every place that turns outside bytes or objects into an `ImagePart`/`AudioPart` (`as_image_part`,
`as_audio_part`, `ImagePart.from_pil`, the OpenAI reader, a tool's return value) calls `check_image`,
`check_audio` or `pil_to_bytes`, which either pass the media or raise `MediaError`; no other exception
leaves them. The checks are cheap and come in this order:

1. The format comes from the magic number and must be one Phi-4's processor reads (PNG, JPEG, GIF, BMP,
   WEBP; WAV, FLAC, OGG, MP3); PIL only tries that format's parser.
2. The size comes from the header, before any pixel or sample is decoded: at most `MAX_PIXELS` pixels,
   `MAX_AUDIO_SECONDS` seconds and `MAX_AUDIO_SAMPLES` samples.
3. The data is verified without decoding it in full: PNG chunks against their checksums and WEBP's
   container (`Image.verify`); JPEG decoded at 1/8 scale; GIF and BMP (whose `verify` reads nothing past
   the header) decoded, which the pixel cap bounds; an audio clip's first block decoded.

`MAX_PIXELS` is 50 megapixels. Phi-4 never looks at more than 36 crops of 448x448 pixels (about 7.2
megapixels) and scales larger images down, so the cap is not about what the model sees: it admits a
full-resolution 48-megapixel phone photo (8000x6000) while bounding what decoding one image can cost (about
200 MB as RGBA), and it sits below Pillow's own decompression-bomb warning (89 megapixels), so that check
never fires first. A 164 KB PNG may declare 13000x13000 pixels; it is refused from its header.

`MAX_AUDIO_SECONDS` is 30 minutes (a long meeting; Phi-4 is not used on longer clips) and `MAX_AUDIO_SAMPLES`
is that much 48 kHz stereo (0.7 GB as float32): a FLAC file of an hour's silence is 700 KB and would
decode into 1.4 GB.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from agent.exceptions import MediaError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from PIL import Image

TARGET_SAMPLE_RATE = 16_000
MAX_PIXELS = 50_000_000
MAX_AUDIO_SECONDS = 30 * 60
MAX_AUDIO_SAMPLES = MAX_AUDIO_SECONDS * 48_000 * 2

_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)
_PIL_FORMAT = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/bmp": "BMP", "image/webp": "WEBP"}
_DECODED = frozenset({"JPEG", "MPO", "GIF", "BMP"})  # formats whose `verify` checks nothing past the header
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA"})  # kept as they are; others become RGB(A)
_CONVERT_VIA = {"La": "LA"}  # Pillow converts premultiplied La to RGBA only through LA

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


# ---------------------------------------------------------------- images


def check_image(data: bytes) -> str:
    """The gate for encoded image bytes: their media type when they pass, else MediaError.

    Reads the header (format and size, refused past `MAX_PIXELS`) and verifies the data cheaply; see the
    module docstring for what is checked per format.
    """
    media_type = sniff_media_type(data)
    if media_type is None or not media_type.startswith("image/"):
        raise MediaError(f"bytes ({len(data)}) are not a known image format (PNG, JPEG, GIF, WEBP, BMP)")
    with _image_errors(data):
        with _open_image(data, media_type) as image:
            fmt = image.format
            image.verify()
        if fmt in _DECODED:
            with _open_image(data, media_type) as image:
                image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))  # JPEG only: 1/8 scale
                image.load()
    return media_type


def open_image(data: bytes) -> Image.Image:
    """Decode image bytes into an RGB PIL image, raising MediaError on bad data or an image over `MAX_PIXELS`."""
    with _image_errors(data):
        image = _open_image(data, sniff_media_type(data))
        image.load()
        return image.convert("RGB") if image.mode != "RGB" else image


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes, reading only the header."""
    from PIL import Image

    with _image_errors(data), Image.open(io.BytesIO(data), formats=_formats(sniff_media_type(data))) as image:
        return image.size


def pil_to_bytes(image: Image.Image) -> tuple[bytes, str]:
    """The gate for PIL images: PNG bytes, refusing images over `MAX_PIXELS`.

    Modes PNG cannot hold (CMYK, I, F, YCbCr, premultiplied alpha, ...) become RGB, or RGBA when the image
    has an alpha channel or transparency.
    """
    try:
        width, height = image.size
        _check_pixels(width, height)
        mode = image.mode
        if mode not in _PNG_MODES:
            alpha = "A" in mode or "a" in mode or "transparency" in image.info
            image = image.convert(_CONVERT_VIA.get(mode, mode)).convert("RGBA" if alpha else "RGB")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot encode {type(image).__name__} as PNG: {_reason(exc)}") from exc
    return buf.getvalue(), "image/png"


def _formats(media_type: str | None) -> list[str]:
    fmt = _PIL_FORMAT.get(media_type or "")
    if fmt is None:
        raise MediaError("not a known image format (PNG, JPEG, GIF, WEBP, BMP)")
    return [fmt]


def _open_image(data: bytes, media_type: str | None) -> Image.Image:
    from PIL import Image

    image = Image.open(io.BytesIO(data), formats=_formats(media_type))
    try:
        _check_pixels(*image.size)
    except MediaError:
        image.close()
        raise
    return image


def _check_pixels(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise MediaError(f"image is {width}x{height} pixels: nothing to see")
    if width * height > MAX_PIXELS:
        raise MediaError(
            f"image is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels), "
            f"over the limit of {MAX_PIXELS / 1e6:g} megapixels"
        )


@contextlib.contextmanager
def _image_errors(data: bytes) -> Iterator[None]:
    """Any failure of Pillow's (decompression bombs included) as a MediaError."""
    from PIL import Image

    try:
        yield
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(
            f"image is over the limit of {MAX_PIXELS / 1e6:g} megapixels ({len(data)} bytes): {_reason(exc)}"
        ) from exc
    except Exception as exc:
        raise MediaError(f"cannot decode image ({len(data)} bytes): {_reason(exc)}") from exc


# ---------------------------------------------------------------- audio


def check_audio(data: bytes) -> str:
    """The gate for encoded audio bytes: their media type when they pass, else MediaError.

    Reads the header (format, and the length: refused past `MAX_AUDIO_SECONDS` or `MAX_AUDIO_SAMPLES`) and
    decodes the first block.
    """
    import soundfile as sf

    media_type = sniff_media_type(data)
    if media_type is None or not media_type.startswith("audio/"):
        raise MediaError(f"bytes ({len(data)}) are not a known audio format (WAV, FLAC, OGG, MP3)")
    with _audio_errors(data), sf.SoundFile(io.BytesIO(data)) as clip:
        _check_length(clip.frames, clip.samplerate, clip.channels)
        clip.read(1024, dtype="float32")
    return media_type


def samples_to_wav(samples: Any, sample_rate: int) -> bytes:
    """Encode mono float samples as 32-bit float WAV: the samples come back bit for bit."""
    import numpy as np
    import soundfile as sf

    array = np.asarray(samples, dtype=np.float32)
    if array.ndim != 1:
        raise MediaError(f"audio samples must be mono (1-D), got shape {array.shape}")
    if sample_rate <= 0:
        raise MediaError(f"sample rate must be positive, got {sample_rate}")
    _check_length(len(array), sample_rate, 1)
    buf = io.BytesIO()
    sf.write(buf, array, sample_rate, format="WAV", subtype="FLOAT")
    return _without_peak_time(buf.getvalue())


def _without_peak_time(wav: bytes) -> bytes:
    """Zero the timestamp libsndfile writes into a float WAV's PEAK chunk (seconds since 1970), so the same
    samples always encode to the same bytes: artifacts are stored and KV caches matched by content hash, and
    two encodings a second apart used to differ (a flaky dedup test, twice the storage)."""
    at = wav.find(b"PEAK", 12, 256)
    if at < 0 or at + 16 > len(wav):
        return wav
    return wav[: at + 12] + b"\x00\x00\x00\x00" + wav[at + 16 :]  # id, size, version, then the timestamp


def decode_audio(data: bytes) -> tuple[npt.NDArray[np.float32], int]:
    """Decode audio bytes to mono float32 samples and their sample rate, within the length limits."""
    import numpy as np
    import soundfile as sf

    with _audio_errors(data), sf.SoundFile(io.BytesIO(data)) as clip:
        _check_length(clip.frames, clip.samplerate, clip.channels)
        array = clip.read(dtype="float32", always_2d=True)
        rate = clip.samplerate
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


def _check_length(frames: int, sample_rate: int, channels: int) -> None:
    if sample_rate <= 0 or channels <= 0:
        raise MediaError(f"audio declares {channels} channels at {sample_rate} Hz")
    seconds = frames / sample_rate
    if seconds > MAX_AUDIO_SECONDS or frames * channels > MAX_AUDIO_SAMPLES:
        raise MediaError(
            f"audio clip is {seconds:.0f} s ({frames} frames x {channels} channels at {sample_rate} Hz), over the "
            f"limit of {MAX_AUDIO_SECONDS} s or {MAX_AUDIO_SAMPLES} samples"
        )


@contextlib.contextmanager
def _audio_errors(data: bytes) -> Iterator[None]:
    """Any failure of libsndfile's as a MediaError."""
    try:
        yield
    except MediaError:
        raise
    except Exception as exc:
        reason = getattr(exc, "error_string", None) or _reason(exc)  # LibsndfileError's text names no object
        raise MediaError(f"cannot decode audio ({len(data)} bytes): {reason}") from exc


def _reason(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = ""
    return text or type(exc).__name__
