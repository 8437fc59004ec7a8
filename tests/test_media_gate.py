"""The media gate: every image or clip from outside is checked from its header before any decoding."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import time
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from agent import Agent, Message
from agent._media import MAX_AUDIO_SECONDS, MAX_PIXELS
from agent.exceptions import MediaError
from agent.messages import AudioPart, ImagePart, ToolCallPart, ToolResultPart, as_audio_part, as_image_part, from_openai
from agent.testing import AgentInfo, FunctionModel, call
from tools import Registry, ToolContext


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG (valid checksums) whose header declares `width` x `height` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 4096)  # far too few rows: only decoding would notice
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _photo(fmt: str = "PNG", size: tuple[int, int] = (32, 24)) -> bytes:
    rng = np.random.default_rng(0)
    return _encode(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)), fmt)


def _wav(seconds: float = 0.1, rate: int = 16_000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * rate), dtype=np.int16), rate, format="WAV")
    return buf.getvalue()


def _data_url(data: bytes, media_type: str = "image/png") -> list[dict[str, Any]]:
    url = f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


@contextmanager
def _decodes() -> Iterator[list[int]]:
    """Record the pixel count of every image Pillow decodes meanwhile."""
    seen: list[int] = []
    original = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> Any:
        seen.append(self.size[0] * self.size[1])
        return original(self)

    with mock.patch.object(ImageFile.ImageFile, "load", load):
        yield seen


# ---------------------------------------------------------------- images: size from the header


def test_a_huge_png_in_a_data_url_is_a_media_error_not_a_decompression_bomb() -> None:
    with _decodes() as seen, pytest.raises(MediaError, match=r"900000000 pixels.*|over the limit of 50 megapixels"):
        from_openai(_data_url(_png_declaring(30_000, 30_000)))
    assert seen == []


@pytest.mark.parametrize("bomb_warnings", ["ignore", "error"])
def test_a_small_file_declaring_13000x13000_is_refused_before_decoding(bomb_warnings: str) -> None:
    data = _png_declaring(13_000, 13_000)
    assert len(data) < 1000
    with warnings.catch_warnings(), _decodes() as seen:
        warnings.simplefilter(bomb_warnings, Image.DecompressionBombWarning)  # type: ignore[arg-type]
        with pytest.raises(MediaError, match=r"13000x13000|over the limit of 50 megapixels"):
            as_image_part(data)
        with pytest.raises(MediaError, match=r"13000x13000|over the limit of 50 megapixels"):
            ImagePart(data=data).to_pil()  # a part built around the gate is still checked before decoding
    assert seen == []


def test_the_pixel_cap_is_documented_and_admits_a_48_megapixel_photo() -> None:
    import agent._media

    assert MAX_PIXELS == 50_000_000
    assert "50 megapixels" in (agent._media.__doc__ or "")
    assert as_image_part(_png_declaring(8000, 6000)).media_type == "image/png"  # header and checksums pass
    with pytest.raises(MediaError, match="8000x6251"):
        as_image_part(_png_declaring(8000, 6251))


def test_from_pil_refuses_an_image_over_the_cap_without_decoding_it() -> None:
    lazy = Image.open(io.BytesIO(_png_declaring(8000, 7000)))  # 56 MP: opened, not decoded
    with _decodes() as seen, pytest.raises(MediaError, match="8000x7000"):
        ImagePart.from_pil(lazy)
    assert seen == []


# ---------------------------------------------------------------- images: the data must verify


def test_fifty_megabytes_of_junk_labelled_as_png_are_refused_at_the_gate() -> None:
    junk = np.random.default_rng(1).integers(0, 256, 50_000_000, dtype=np.uint8).tobytes()
    for data in (junk, b"\x89PNG\r\n\x1a\n" + junk, _photo()[:33] + junk):
        t0 = time.monotonic()
        with pytest.raises(MediaError):
            from_openai(_data_url(data))
        with pytest.raises(MediaError):
            as_image_part(data)
        assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_truncated_or_corrupted_images_are_refused(fmt: str) -> None:
    good = _photo(fmt, (64, 48))
    assert as_image_part(good).to_pil().size == (64, 48)
    for bad in (good[: len(good) // 2], good[:40]):
        with pytest.raises(MediaError):
            as_image_part(bad)


def test_bm_text_is_not_a_bitmap() -> None:
    with pytest.raises(MediaError, match="cannot decode image"):
        as_image_part(b"BMW and Mercedes")


def test_the_label_of_a_data_url_does_not_decide_the_format() -> None:
    (message,) = from_openai(_data_url(_photo("JPEG"), "image/png"))
    part = message.parts[0]
    assert isinstance(part, ImagePart) and part.media_type == "image/jpeg"


# ---------------------------------------------------------------- images: modes PNG cannot hold


def _image_in(mode: str) -> Image.Image:
    base = Image.fromarray(np.random.default_rng(2).integers(0, 255, (6, 8, 3), dtype=np.uint8))
    if mode == "P+transparency":
        image = base.convert("P")
        image.info["transparency"] = 0
        return image
    if mode in ("La", "PA"):
        return base.convert("LA").convert(mode) if mode == "La" else base.convert("RGBA").convert("PA")
    if mode.startswith("I;16"):
        return Image.new(mode, (8, 6), 300)
    return base.convert(mode)


MODES = ["CMYK", "P+transparency", "LA", "La", "PA", "I;16", "I;16B", "I", "F", "RGBa", "RGBX", "YCbCr", "LAB", "HSV"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_tool_image_in_any_mode_becomes_a_png_part(mode: str) -> None:
    def snapshot() -> Image.Image:
        return _image_in(mode)

    out = await Registry([snapshot]).execute(
        ToolCallPart(id="1", name="snapshot"), ToolContext(call_id="1", tool_name="snapshot")
    )
    assert isinstance(out, ToolResultPart) and not out.is_error
    (part,) = out.content
    assert isinstance(part, ImagePart) and part.media_type == "image/png"
    assert part.to_pil().mode == "RGB" and part.size == (8, 6)


async def test_a_cmyk_tool_image_reaches_the_model_and_the_run_goes_on() -> None:
    def scan() -> Image.Image:
        return Image.new("CMYK", (5, 4), (0, 255, 255, 0))

    def respond(messages: list[Message], info: AgentInfo) -> object:
        return [call("scan")] if info.request_index == 0 else "red"

    model = FunctionModel(respond)  # type: ignore[arg-type]
    result = await asyncio.wait_for(Agent(model, tools=[scan]).run("what colour?"), 5)
    assert result.output == "red"
    (tool_result,) = model.requests[1][-1].parts
    assert isinstance(tool_result, ToolResultPart)
    image = tool_result.content[0]
    assert isinstance(image, ImagePart) and image.to_pil().getpixel((0, 0)) == (255, 0, 0)


async def test_image_bytes_returned_by_a_tool_pass_the_gate() -> None:
    def forged() -> bytes:
        return b"\x89PNG\r\n\x1a\n" + b"\x00" * 100

    out = await Registry([forged]).execute(
        ToolCallPart(id="1", name="forged"), ToolContext(call_id="1", tool_name="forged")
    )
    assert isinstance(out, ToolResultPart) and out.is_error and "unusable value: cannot decode image" in out.text


# ---------------------------------------------------------------- audio


def _flac(seconds: float, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * rate), dtype=np.int16), rate, format="FLAC")
    return buf.getvalue()


def test_audio_is_checked_from_its_header() -> None:
    assert as_audio_part(_wav()).media_type == "audio/wav"
    junk = b"RIFF\x24\x00\x00\x00WAVE" + b"\x01" * 1000
    for bad in (junk, _wav()[:20], b"fLaC" + b"\x00" * 100, b"OggS" + b"\x07" * 100, b"ID3" + b"\x00" * 50):
        with pytest.raises(MediaError, match="cannot decode audio"):
            as_audio_part(bad)
    clip = {"type": "input_audio", "input_audio": {"data": base64.b64encode(junk).decode("ascii"), "format": "wav"}}
    with pytest.raises(MediaError, match="cannot decode audio"):
        from_openai([{"role": "user", "content": [clip]}])


def test_a_long_clip_is_refused_before_decoding() -> None:
    bomb = _flac(MAX_AUDIO_SECONDS + 60, 1000)  # silence compresses to almost nothing
    assert len(bomb) < 200_000
    with pytest.raises(MediaError, match="over the limit of 1800 s"):
        as_audio_part(bomb)
    with pytest.raises(MediaError, match="over the limit of 1800 s"):
        AudioPart(data=bomb).samples()
    with pytest.raises(MediaError, match="over the limit of 1800 s"):
        AudioPart.from_samples(np.zeros((MAX_AUDIO_SECONDS + 1) * 100, dtype=np.float32), 100)


# ---------------------------------------------------------------- fuzzing the gate

_SEEDS = [_photo("PNG", (16, 12)), _photo("JPEG", (16, 12)), _photo("GIF", (16, 12)), _wav(0.05)]
_MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP"]
_MAGIC += [b"RIFF\x00\x00\x00\x00WAVE", b"fLaC", b"OggS", b"ID3", b"\xff\xfb"]


@st.composite
def _corrupted(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


_INPUTS = st.one_of(
    st.binary(max_size=256),
    st.builds(lambda magic, tail: magic + tail, st.sampled_from(_MAGIC), st.binary(max_size=256)),
    _corrupted(),
    st.builds(_png_declaring, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
    st.builds(_png_declaring, st.integers(1, 12_000), st.integers(1, 12_000)),
)


@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_INPUTS)
def test_the_gate_gives_a_media_error_or_a_valid_part_never_anything_else(data: bytes) -> None:
    with warnings.catch_warnings(), _decodes() as seen:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = as_image_part(data)
        except MediaError:
            pass
        else:
            width, height = image.size
            assert width * height <= MAX_PIXELS
            try:
                assert image.to_pil().size == (width, height)
            except MediaError:  # a PNG is verified by its checksums, not decoded: its pixels may still be short
                assert image.media_type == "image/png"
        try:
            audio = as_audio_part(data)
        except MediaError:
            pass
        else:
            assert audio.samples(None).ndim == 1
    assert all(pixels <= MAX_PIXELS for pixels in seen)


def test_the_same_samples_always_encode_to_the_same_bytes() -> None:
    """libsndfile stamps float WAVs with the time (the PEAK chunk): two encodings a second apart differed, so
    the store kept the same clip twice and a KV cache missed it (a flaky dedup test on PostgreSQL)."""
    import numpy as np

    from agent._media import samples_to_wav

    wav = samples_to_wav(np.linspace(-0.5, 0.5, 1600, dtype=np.float32), 16_000)
    peak = wav.find(b"PEAK")
    assert peak > 0 and wav[peak + 12 : peak + 16] == b"\x00\x00\x00\x00"  # the timestamp is zeroed
    assert AudioPart.from_samples(np.ones(100, dtype=np.float32), 16_000).samples().shape == (100,)
