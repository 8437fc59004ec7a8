"""Images and audio for the transformers backend: exact token counts without running anything, and
processor inputs for the media of one forward pass.

The counts reproduce `Phi4MultimodalImageProcessor` (dynamic HD: 448-px crops, up to 36 crops chosen by the
closest aspect ratio, padding masked in 14-px patches, 2x2 pooling) and `Phi4MultimodalFeatureExtractor`
(25 ms windows every 10 ms, 8 frames per token), reading their settings from the loaded processor.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.exceptions import MediaError, ModelError
from agent.messages import AudioPart, ImagePart

if TYPE_CHECKING:
    import torch

TARGET_RATE = 16_000


def media_digest(part: ImagePart | AudioPart) -> bytes:
    """A short content hash telling two media apart (KV reuse compares it with the token ids)."""
    return hashlib.blake2b(part.data, digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """What the image processor does with an image, as far as the token count goes."""

    crop: int = 448
    patch: int = 14
    max_crops: int = 36

    @classmethod
    def from_processor(cls, image_processor: Any) -> ImageSettings:
        size = getattr(image_processor, "size", None) or {}
        crop = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
        return cls(
            crop=int(crop or 448),
            patch=int(getattr(image_processor, "patch_size", 14)),
            max_crops=int(getattr(image_processor, "dynamic_hd", 36)),
        )

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(columns, rows) of crops for an image, capped at `max_crops` by the closest aspect ratio."""
        cols, rows = math.ceil(width / self.crop), math.ceil(height / self.crop)
        if cols * rows <= self.max_crops:
            return cols, rows
        ratios = sorted(
            {
                (i, j)
                for i in range(1, self.max_crops + 1)
                for j in range(1, self.max_crops + 1)
                if i * j <= self.max_crops
            },
            key=lambda r: r[0] * r[1],
        )
        aspect = width / height
        best, best_diff = (1, 1), float("inf")
        for ratio in ratios:  # same order and tie rule as the processor
            diff = abs(aspect - ratio[0] / ratio[1])
            if diff < best_diff:
                best, best_diff = ratio, diff
            elif diff == best_diff and width * height > 0.5 * self.crop * self.crop * ratio[0] * ratio[1]:
                best = ratio
        return best

    def tokens(self, width: int, height: int) -> int:
        """Image tokens the processor emits for a `width` x `height` image (padding included)."""
        if width <= 0 or height <= 0:
            raise MediaError(f"image has no pixels ({width}x{height})")
        cols, rows = self.grid(width, height)
        target_w, target_h = self.crop * cols, self.crop * rows
        ratio_w, ratio_h = target_w / width, target_h / height
        if ratio_w < ratio_h:
            new_w, new_h = target_w, int(height * ratio_w)
            pad_w, pad_h = 0, target_h - new_h
        else:
            new_w, new_h = int(width * ratio_h), target_h
            pad_w, pad_h = target_w - new_w, 0
        if min(new_h, target_h) < 10 or min(new_w, target_w) < 10:
            raise MediaError(
                f"image aspect ratio too extreme ({width}x{height}): it would be resized to {new_w}x{new_h}; "
                "crop or pad it first"
            )
        mask = self.crop // self.patch
        valid_rows = mask * rows - (pad_h // self.patch if pad_h >= self.patch else 0)
        valid_cols = mask * cols - (pad_w // self.patch if pad_w >= self.patch else 0)
        pooled_rows = _pooled(valid_rows, mask, rows)
        pooled_cols = _pooled(valid_cols, mask, cols)
        # global view (256 + 16 separators, hard-coded by the processor) + 1 separator + HD grid with row ends
        return 256 + 1 + 16 + pooled_rows * pooled_cols + pooled_rows


def _pooled(valid: int, mask: int, crops: int) -> int:
    """Patch rows (or columns) kept after taking every other patch of each crop, below `valid`."""
    per_crop = mask // 2 + mask % 2
    return sum(1 for crop in range(crops) for k in range(per_crop) if crop * mask + 2 * k < valid)


@dataclass(frozen=True, slots=True)
class AudioSettings:
    """What the audio feature extractor does with a clip, as far as the token count goes."""

    rate: int = TARGET_RATE
    window: int = 400
    hop: int = 160
    stride: int = 1
    compression: int = 8
    downsample: int = 1

    @classmethod
    def from_processor(cls, extractor: Any) -> AudioSettings:
        return cls(
            rate=int(getattr(extractor, "sampling_rate", TARGET_RATE)),
            window=int(getattr(extractor, "win_length", 400)),
            hop=int(getattr(extractor, "hop_length", 160)),
            stride=int(getattr(extractor, "audio_feat_stride", 1)),
            compression=int(getattr(extractor, "audio_compression_rate", 8)),
            downsample=int(getattr(extractor, "audio_downsample_rate", 1)),
        )

    def tokens(self, samples: int) -> int:
        """Audio tokens for a clip of `samples` samples at `rate`."""
        if samples < self.window:
            raise MediaError(
                f"audio clip too short: {samples} samples at {self.rate} Hz; at least {self.window} "
                f"({1000 * self.window // self.rate} ms) are needed"
            )
        frames = ((samples - self.window) // self.hop + 1) * self.stride
        tokens = math.ceil(frames / self.compression)
        return math.ceil(tokens / self.downsample)


def resampled_length(part: AudioPart, rate: int = TARGET_RATE) -> int:
    """Samples the clip has once resampled to `rate` (what `AudioPart.samples()` returns), from its header."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(part.data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise MediaError(f"cannot decode audio ({len(part.data)} bytes): {exc}") from exc
    frames, source = int(info.frames), int(info.samplerate)
    if source == rate:
        return frames
    g = math.gcd(source, rate)
    up, down = rate // g, source // g
    return -(-frames * up // down)  # resample_poly's output length


class MediaCounter:
    """Token counts per image and audio clip, remembered by content hash (counting runs often)."""

    def __init__(self, image: ImageSettings, audio: AudioSettings, capacity: int = 512) -> None:
        self.image = image
        self.audio = audio
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()  # counted from the worker thread and from callers' threads

    def count(self, part: ImagePart | AudioPart, digest: bytes | None = None) -> int:
        key = digest or media_digest(part)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        if isinstance(part, ImagePart):
            width, height = part.size
            value = self.image.tokens(width, height)
        else:
            value = self.audio.tokens(resampled_length(part, self.audio.rate))
        with self._lock:
            self._cache[key] = value
            if len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return value


def process_media(
    processor: Any, images: list[ImagePart], audio: list[AudioPart], image_counts: list[int], audio_counts: list[int]
) -> dict[str, torch.Tensor]:
    """Processor tensors for these media (in prompt order), checked against the expected token counts."""
    out: dict[str, Any] = {}
    if images:
        pil = [part.to_pil() for part in images]
        data = processor.image_processor(pil, return_tensors="pt")
        got = [int(n) for n in data["num_img_tokens"]]
        if got != image_counts:
            raise ModelError(f"image token count mismatch: processor {got}, expected {image_counts} (please report)")
        for key in ("image_pixel_values", "image_sizes", "image_attention_mask"):
            out[key] = data[key]
    if audio:
        extractor = getattr(processor, "audio_processor", None) or processor.feature_extractor
        rate = int(getattr(extractor, "sampling_rate", TARGET_RATE))
        waves = [part.samples(rate) for part in audio]
        data = extractor(waves, sampling_rate=rate, return_tensors="pt")
        got = [int(n) for n in data["audio_embed_sizes"]]
        if got != audio_counts:
            raise ModelError(f"audio token count mismatch: processor {got}, expected {audio_counts} (please report)")
        for key in ("audio_input_features", "audio_embed_sizes", "audio_attention_mask"):
            if key in data:
                out[key] = data[key]
    return out
