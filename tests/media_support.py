"""Generated media for the ingestion tests: videos of solid-colour scenes with a tone per scene, and a model
double that describes what it really receives (the colour of the pixels, the pitch of the audio)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agent.messages import AudioPart, ImagePart, Message
from agent.testing import AgentInfo, FunctionModel

FPS = 25
CUTS = (0, 50, 95, 160, 200, 255, 300)  # first frame of each scene, then the frame count: 12 s
COLOURS = ((200, 30, 30), (30, 40, 200), (230, 220, 40), (20, 90, 30), (235, 235, 235), (120, 30, 140))
TONES = (300.0, 500.0, 700.0, 900.0, 1100.0, 1300.0)


def make_video(
    path: Path,
    *,
    cuts: tuple[int, ...] = CUTS,
    size: tuple[int, int] = (160, 120),
    audio: bool = True,
    rate: int = 44_100,
    container: str | None = None,
    x264: str = "",
) -> Path:
    """H.264 video of solid-colour scenes (RGB `COLOURS`) with a moving white square, cut at `cuts`; with a
    stereo AAC track whose tone changes with the scene (`TONES`)."""
    import av

    width, height = size
    out = av.open(str(path), "w", format=container)
    options = {"preset": "ultrafast", **({"x264-params": x264} if x264 else {})}
    video = out.add_stream("libx264", rate=FPS, options=options)
    video.width, video.height, video.pix_fmt = width, height, "yuv420p"
    sound = out.add_stream("aac", rate=rate, layout="stereo") if audio else None
    for scene in range(len(cuts) - 1):
        for i in range(cuts[scene], cuts[scene + 1]):
            image = np.empty((height, width, 3), np.uint8)
            image[:] = COLOURS[scene % len(COLOURS)]
            x = (i * 3) % (width - 16)
            image[10:26, x : x + 16] = 255
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
    for packet in video.encode(None):
        out.mux(packet)
    if sound is not None:
        tones = []
        for scene in range(len(cuts) - 1):
            t = np.arange(round(cuts[scene] / FPS * rate), round(cuts[scene + 1] / FPS * rate)) / rate
            tones.append(0.3 * np.sin(2 * np.pi * TONES[scene % len(TONES)] * t))
        signal = np.concatenate(tones).astype(np.float32)
        for k in range(0, len(signal), 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(np.stack([signal[k : k + 1024]] * 2)), format="fltp", layout="stereo"
            )
            frame.sample_rate, frame.pts = rate, k
            for packet in sound.encode(frame):
                out.mux(packet)
        for packet in sound.encode(None):
            out.mux(packet)
    out.close()
    return path


NAMES = ("red", "blue", "yellow", "green", "white", "purple")


def colour_name(image: ImagePart) -> str:
    """The `NAMES` entry nearest the image's median colour."""
    pixels = np.asarray(image.to_pil().convert("RGB"), dtype=np.float64).reshape(-1, 3)
    median = np.median(pixels, axis=0)
    distances = [float(np.sum((median - np.array(c)) ** 2)) for c in COLOURS]
    return NAMES[int(np.argmin(distances))]


def pitch(audio: AudioPart) -> int:
    """The dominant frequency of a clip, rounded to 100 Hz."""
    samples = audio.samples(16_000)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return round(float(np.argmax(spectrum) * 16_000 / len(samples)) / 100) * 100


def describe(messages: Sequence[Message], info: AgentInfo) -> str:
    """What a perfect captioner would say about the generated media: colours seen and tones heard."""
    parts = messages[-1].parts
    words = [f"a {colour_name(p)} scene" for p in parts if isinstance(p, ImagePart)]
    words += [f"a tone of {pitch(p)} hertz" for p in parts if isinstance(p, AudioPart)]
    return " with ".join(words) or "nothing"


def describer(delay: float = 0.0) -> FunctionModel:
    """A `FunctionModel` answering every extractor request with `describe` (after `delay` seconds)."""

    async def answer(messages: Sequence[Message], info: AgentInfo) -> str:
        if delay:
            import asyncio

            await asyncio.sleep(delay)
        return describe(messages, info)

    return FunctionModel(answer, name="describer")


def requests_with(model: FunctionModel, kind: str) -> int:
    """How many requests a `FunctionModel` got whose last message held a part of `kind`."""
    return sum(any(p.kind == kind for p in r[-1].parts) for r in model.requests)


def text_pdf(path: Path, lines: Sequence[str]) -> Path:
    """A one-page PDF whose text layer holds `lines` (Helvetica, written by hand: no PDF writer needed)."""
    content = b"BT /F1 18 Tf 20 150 Td " + b" ".join(b"(" + t.encode() + b") Tj 0 -24 Td" for t in lines) + b" ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 200] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path
