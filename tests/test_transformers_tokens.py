"""Exact token accounting without running the model: `count_tokens` equals what the real processor produces."""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

from PIL import Image

from agent.exceptions import MediaError
from agent.messages import AudioPart, ImagePart, Message, TextPart, ToolCallPart, ToolDefinition, ToolResultPart
from agent.models import ModelSettings
from agent.models.phi4_format import render_prompt
from agent.models.transformers import TransformersModel
from agent.models.transformers._media import AudioSettings, ImageSettings, resampled_length

TOOLS = [ToolDefinition(name="see", description="Look at something", parameters={"type": "object"})]


def _processor_ids(model: TransformersModel, messages: list[Message], tools: list[ToolDefinition]) -> list[int]:
    processor = model.processor
    rendered = render_prompt(messages, tools, image_token=processor.image_token, audio_token=processor.audio_token)
    inputs = processor(
        text=rendered.text,
        images=[p.to_pil() for p in rendered.images] or None,
        audio=[p.samples() for p in rendered.audio] or None,
        sampling_rate=16000,
    )
    return list(inputs["input_ids"][0])


def _wav(samples: int, rate: int, seed: int) -> AudioPart:
    import soundfile as sf

    data = (np.random.default_rng(seed).standard_normal(samples) * 0.1).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, data, rate, format="WAV", subtype="PCM_16")
    return AudioPart(data=buffer.getvalue(), media_type="audio/wav")


def _check_images(model: TransformersModel, sizes: list[tuple[int, int]]) -> None:
    for width, height in sizes:
        image = ImagePart.from_pil(Image.new("RGB", (width, height), (width % 256, height % 256, 7)))
        messages = [Message.user("what is this?", images=[image])]
        assert model.count_tokens(messages, []) == len(_processor_ids(model, messages, [])), (width, height)


def _check_audio(model: TransformersModel, clips: list[tuple[int, int]]) -> None:
    for index, (samples, rate) in enumerate(clips):
        clip = _wav(samples, rate, index)
        messages = [Message.user("transcribe", audio=[clip])]
        assert model.count_tokens(messages, []) == len(_processor_ids(model, messages, [])), (samples, rate)
        assert resampled_length(clip) == len(clip.samples())


def test_count_tokens_equals_the_processor_for_random_image_sizes(tiny_phi4: TransformersModel) -> None:
    rng = random.Random(11)
    sizes = [(448, 448), (640, 480), (1024, 1024), (12, 12), (449, 449), (4000, 60), (3000, 2500)]  # last: capped
    sizes += [(rng.randint(10, 800), rng.randint(10, 800)) for _ in range(45)]
    assert len(sizes) >= 50
    _check_images(tiny_phi4, sizes)


def test_count_tokens_equals_the_processor_for_random_audio_lengths(tiny_phi4: TransformersModel) -> None:
    rng = random.Random(12)
    clips = [(400, 16000), (401, 16000), (16000, 16000), (10 * 16000, 16000), (4000, 8000), (44100, 44100)]
    clips += [(rng.randint(1600, 3 * 16000), rng.choice([8000, 16000, 22050, 44100, 48000])) for _ in range(44)]
    _check_audio(tiny_phi4, clips)


@pytest.mark.slow
def test_count_tokens_equals_the_processor_for_large_images_and_long_audio(tiny_phi4: TransformersModel) -> None:
    rng = random.Random(13)
    _check_images(tiny_phi4, [(rng.randint(1000, 5000), rng.randint(1000, 4000)) for _ in range(40)])
    _check_audio(tiny_phi4, [(rng.randint(16000, 90 * 16000), rng.choice([16000, 44100])) for _ in range(20)])


def test_prompt_ids_equal_the_processor_for_a_mixed_conversation(tiny_phi4: TransformersModel) -> None:
    def image(w: int, h: int) -> ImagePart:
        return ImagePart.from_pil(Image.new("RGB", (w, h), (w % 256, 3, h % 256)))

    call = ToolCallPart(id="c1", name="see", arguments={"what": "both"})
    result = ToolResultPart(
        call_id="c1", name="see", content=(TextPart(text="here:"), image(300, 500), _wav(9000, 22050, 1))
    )
    messages = [
        Message.system("Look <|carefully|>."),
        Message.user("first", images=[image(640, 480), image(100, 900)], audio=[_wav(20000, 16000, 2)]),
        Message.assistant("Looking.", [call]),
        Message(role="tool", parts=(result,)),
        Message.user("and the last one", images=[image(1000, 200)]),
    ]
    built = tiny_phi4._format.build(messages, TOOLS, ModelSettings())
    assert built.ids == _processor_ids(tiny_phi4, messages, TOOLS)
    assert [s.kind for s in built.spans] == ["image", "image", "audio", "image", "audio", "image"]
    assert tiny_phi4.count_tokens(messages, TOOLS) == len(built.ids)


def test_the_formulas_match_the_documented_values() -> None:
    image = ImageSettings()
    assert image.tokens(448, 448) == 545
    assert image.tokens(1024, 1024) == 2625
    assert image.tokens(640, 480) == 1065
    audio = AudioSettings()
    assert audio.tokens(30 * 16000) == 375
    assert audio.tokens(400) == 1
    with pytest.raises(MediaError, match="too short"):
        audio.tokens(399)
    with pytest.raises(MediaError, match="aspect ratio"):
        image.tokens(5000, 3)


def test_counting_needs_no_model_run(tiny_phi4: TransformersModel, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("count_tokens ran the model or the processor")

    monkeypatch.setattr(tiny_phi4.model, "forward", forbidden)
    monkeypatch.setattr(tiny_phi4.processor, "image_processor", forbidden)
    image = ImagePart.from_pil(Image.new("RGB", (900, 700)))
    assert tiny_phi4.count_tokens([Message.user("x", images=[image], audio=[_wav(16000, 16000, 0)])], TOOLS) > 1400
