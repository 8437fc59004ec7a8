"""The context policy on the tiny Phi-4: its count of the fitted prompt equals what the processor produces."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from agent.context import ContextPolicy
from agent.messages import ImagePart, Message, TextPart, ToolCallPart, ToolDefinition, ToolResultPart
from agent.models.phi4_format import render_prompt


def _png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _processor_length(model: Any, messages: list[Message], tools: list[ToolDefinition]) -> int:
    processor = model.processor
    rendered = render_prompt(messages, tools, image_token=processor.image_token, audio_token=processor.audio_token)
    inputs = processor(
        text=rendered.text,
        images=[p.to_pil() for p in rendered.images] or None,
        audio=[p.samples() for p in rendered.audio] or None,
        sampling_rate=16000,
        return_tensors="pt",
    )
    return int(inputs["input_ids"].shape[1])


def test_fitted_prompt_count_equals_the_processor(tiny_phi4: Any) -> None:
    tools = [ToolDefinition(name="zoom", description="Zoom into the page.")]
    history = [Message.system("You read documents.")]
    rng = np.random.default_rng(0)
    for i in range(6):
        clip = (rng.uniform(-0.1, 0.1, 16_000 * (1 + i % 3)).astype(np.float32), 16_000)
        history.append(
            Message.user(f"page {i} " + "lorem ipsum " * 20, images=[_png(300 + 90 * i, 500, i)], audio=[clip])
        )
        call = ToolCallPart(id=f"c{i}", name="zoom", arguments={"page": i, "box": [0, 0, 100, 100]})
        history.append(Message.assistant("", [call]))
        result = ToolResultPart(
            call_id=call.id, name="zoom", content=(TextPart(text="zoomed"), ImagePart(data=_png(200, 120, 50 + i)))
        )
        history.append(Message(role="tool", parts=(result,)))
    history.append(Message.user("Summarise every page."))
    full = tiny_phi4.count_tokens(history, tools)
    for fraction in (1.1, 0.6, 0.3):
        policy = ContextPolicy(context_length=int(full * fraction), reserve_output_tokens=0, low_water=0.8)
        fitted = policy.fit(history, tools, tiny_phi4)
        counted = _processor_length(tiny_phi4, fitted, tools)
        assert counted == policy.stats.last_prompt_tokens == tiny_phi4.count_tokens(fitted, tools)
        assert counted <= int(full * fraction)
        if fraction < 1:
            assert len(fitted) < len(history)


def test_long_run_benchmark_prints_its_line_last() -> None:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "long_run.py"
    out = subprocess.run(
        [sys.executable, str(script), "--steps", "25", "--budget", "1500"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    ratio, resets = last.split()
    assert ratio.startswith("prefill_ratio=") and 0 < float(ratio.split("=")[1]) < 3
    assert resets.startswith("cache_resets=") and int(resets.split("=")[1]) >= 1
