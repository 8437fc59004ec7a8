"""The transformers backend on the tiny random Phi-4-multimodal, through the real transformers code paths."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

import torch
from PIL import Image

from agent import Agent, ImagePart, Message, TextDeltaEvent, ToolDefinition
from agent.exceptions import ContextOverflowError, ModelError, ModelLoadError, UserError
from agent.models import ModelSettings, TextDelta
from agent.models.tiny import ScriptedOutputs
from agent.models.transformers import TransformersModel

SETTINGS = ModelSettings(max_tokens=64)


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _audio(seconds: float, seed: int, rate: int = 16_000) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * rate)) * 0.1).astype(np.float32), rate


def _scripted(base: TransformersModel, scripts: list[str], **kwargs: Any) -> TransformersModel:
    return TransformersModel(
        base.model, base.processor, logits_processors=[ScriptedOutputs(base.tokenizer, scripts)], **kwargs
    )


# ---------------------------------------------------------------- acceptance: media from tool results


def test_a_tool_result_image_reaches_the_next_forward_pass(tiny_phi4: TransformersModel) -> None:
    """User turn with text + image + audio; the scripted call runs a tool returning an image; the next forward
    pass receives exactly that image's pixel values."""
    made = _image(300, 200, seed=7)

    def make_image(size: int) -> Image.Image:
        """Draw a picture."""
        assert size == 300
        return made

    model = _scripted(
        tiny_phi4,
        ['<|tool_call|>[{"name": "make_image", "arguments": {"size": 300}}]<|/tool_call|><|end|>', "Done.<|end|>"],
    )
    seen: list[dict[str, Any]] = []
    image_embed = model.model.model.embed_tokens_extend.image_embed
    audio_embed = model.model.model.embed_tokens_extend.audio_embed

    def record(kind: str) -> Any:
        def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            values = kwargs.get("image_pixel_values" if kind == "image" else "audio_input_features")
            ids = args[0] if args else kwargs["input_ids"]
            seen.append({"kind": kind, "values": values.detach().clone(), "ids": ids.clone()})

        return hook

    handles = [
        image_embed.register_forward_pre_hook(record("image"), with_kwargs=True),
        audio_embed.register_forward_pre_hook(record("audio"), with_kwargs=True),
    ]
    try:
        agent = Agent(model, tools=[make_image])
        result = agent.run_sync("Describe both, then draw.", images=[_image(640, 480, 1)], audio=[_audio(1.5, 2)])
    finally:
        for handle in handles:
            handle.remove()
    assert result.output == "Done."
    assert [e["kind"] for e in seen] == ["image", "audio", "image"]  # step 1: image + audio; step 2: tool image
    expected = model.processor.image_processor([ImagePart.from_pil(made).to_pil()], return_tensors="pt")
    assert torch.equal(seen[2]["values"], expected["image_pixel_values"].to(seen[2]["values"].dtype))
    first_user = model.processor.image_processor([_image(640, 480, 1)], return_tensors="pt")
    assert torch.equal(seen[0]["values"], first_user["image_pixel_values"])
    image_id = model.processor.tokenizer.image_token_id
    assert int((seen[2]["ids"] == image_id).sum()) == int(expected["num_img_tokens"][0])
    tool_messages = [m for m in result.messages if m.role == "tool"]
    assert isinstance(tool_messages[0].parts[0].content[0], ImagePart)  # type: ignore[union-attr]


# ---------------------------------------------------------------- requests, streaming, usage


async def test_request_parses_a_scripted_call_and_reports_usage(tiny_phi4: TransformersModel) -> None:
    # a lenient form (no list, no closing tag) that the parser accepts: only unconstrained decoding writes it
    model = _scripted(
        tiny_phi4,
        ['Checking.<|tool_call|>{"name": "f", "arguments": {"x": [1, {"y": 2}]}}<|end|>'],
        constrained=False,
    )
    tools = [ToolDefinition(name="f", description="f", parameters={"type": "object"})]
    messages = [Message.user("hi")]
    response = await model.request(messages, tools, SETTINGS)
    assert response.message.text == "Checking."
    assert [(c.name, c.arguments) for c in response.message.tool_calls] == [("f", {"x": [1, {"y": 2}]})]
    assert response.finish_reason == "stop"
    assert response.usage.input_tokens == model.count_tokens(messages, tools)
    assert response.usage.prefill_tokens == response.usage.input_tokens  # first request: everything
    assert response.usage.output_tokens == len(model.tokenizer(response.raw_text + "<|end|>")["input_ids"])
    assert response.parse_errors == ()


async def test_stream_yields_text_deltas_then_the_response_and_hides_the_call(tiny_phi4: TransformersModel) -> None:
    script = 'Let me look that up for you.<|tool_call|>[{"name": "f", "arguments": {}}]<|/tool_call|><|end|>'
    model = _scripted(tiny_phi4, [script])
    items = [item async for item in model.request_stream([Message.user("hi")], [], SETTINGS)]
    deltas = [i.text for i in items if isinstance(i, TextDelta)]
    assert len(deltas) > 3  # token by token, not one piece at the end
    assert "".join(deltas) == "Let me look that up for you."
    assert not any("tool_call" in d or "name" in d for d in deltas)
    assert items[-1].message.tool_calls[0].name == "f"  # type: ignore[union-attr]


async def test_an_abandoned_stream_stops_generating_and_frees_the_model(tiny_phi4: TransformersModel) -> None:
    model = _scripted(tiny_phi4, ["word " * 200 + "<|end|>", "next<|end|>"])
    scripted = model._engine.logits_processors[0]
    assert isinstance(scripted, ScriptedOutputs)
    stream = model.request_stream([Message.user("talk")], [], ModelSettings(max_tokens=300))
    async for item in stream:
        assert isinstance(item, TextDelta)
        break
    await stream.aclose()
    response = await asyncio.wait_for(model.request([Message.user("talk")], [], SETTINGS), timeout=60)
    assert response.usage.output_tokens == SETTINGS.max_tokens  # the lock was released
    assert scripted.script == 0  # the abandoned generation stopped before the end of its 201-token script


async def test_agent_stream_events_carry_the_deltas(tiny_phi4: TransformersModel) -> None:
    model = _scripted(tiny_phi4, ["The answer is 42.<|end|>"])
    events = [e async for e in Agent(model).run_stream("question")]
    text = "".join(e.text for e in events if isinstance(e, TextDeltaEvent))
    assert text == "The answer is 42."


async def test_stop_strings_and_max_tokens(tiny_phi4: TransformersModel) -> None:
    model = _scripted(tiny_phi4, ["one two three four<|end|>", "one two three four<|end|>"])
    response = await model.request([Message.user("count")], [], ModelSettings(stop=("three",)))
    assert response.message.text == "one two"
    assert response.finish_reason == "stop"
    response = await model.request([Message.user("count")], [], ModelSettings(max_tokens=2))
    assert response.usage.output_tokens == 2
    assert response.finish_reason == "length"


async def test_sampling_is_reproducible_with_a_seed(tiny_phi4: TransformersModel) -> None:
    settings = ModelSettings(max_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    tiny_phi4._engine.fmt.stop_ids = frozenset()  # type: ignore[misc]  # random weights: let it run
    first = await tiny_phi4.request([Message.user("hi")], [], settings)
    tiny_phi4.reset_cache()
    second = await tiny_phi4.request([Message.user("hi")], [], settings)
    assert first.raw_text == second.raw_text
    assert first.usage.output_tokens == 12


async def test_tool_choice_forces_a_call_prefix(tiny_phi4: TransformersModel) -> None:
    tools = [ToolDefinition(name="f", description="f", parameters={"type": "object"})]
    model = _scripted(tiny_phi4, ['{"x": 1}}]<|/tool_call|><|end|>'])
    response = await model.request([Message.user("hi")], tools, ModelSettings(tool_choice="f"))
    assert [(c.name, c.arguments) for c in response.message.tool_calls] == [("f", {"x": 1})]
    with pytest.raises(UserError, match="not among the tools"):
        await model.request([Message.user("hi")], tools, ModelSettings(tool_choice="nope"))


async def test_context_overflow_is_a_clear_error(tiny_phi4: TransformersModel) -> None:
    tiny_phi4.context_length = 20
    with pytest.raises(ContextOverflowError, match="reads at most 20"):
        await tiny_phi4.request([Message.user("hello " * 30)], [], SETTINGS)


async def test_out_of_memory_is_mapped_at_the_seam(
    tiny_phi4: TransformersModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(tiny_phi4._engine, "_forward", boom)
    with pytest.raises(ModelError, match=r"ran out of memory on a \d+-token prompt") as info:
        await tiny_phi4.request([Message.user("hi")], [], SETTINGS)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert tiny_phi4._engine.state.cache is None  # the half-written cache was dropped


async def test_concurrent_requests_are_serialised(tiny_phi4: TransformersModel) -> None:
    model = _scripted(tiny_phi4, ["a<|end|>", "b<|end|>", "c<|end|>"])
    results = await asyncio.gather(*(model.request([Message.user(str(i))], [], SETTINGS) for i in range(3)))
    assert sorted(r.message.text for r in results) == ["a", "b", "c"]


def test_media_without_a_processor_is_refused(tiny_phi4: TransformersModel) -> None:
    text_only = TransformersModel(tiny_phi4.model, tiny_phi4.tokenizer)
    assert text_only.is_phi4
    from agent.exceptions import MediaError

    with pytest.raises(MediaError, match="cannot read images or audio"):
        text_only.count_tokens([Message.user("x", images=[_image(20, 20, 0)])], [])


# ---------------------------------------------------------------- adapters


async def test_adapters_are_routed_per_request(tiny_phi4_dir: Path, tiny_phi4: TransformersModel) -> None:
    base = tiny_phi4.model
    routed = TransformersModel(base, tiny_phi4.processor)
    assert routed._engine.adapters == {"vision", "speech"}
    seen: list[list[str] | None] = []
    hook = base.register_forward_pre_hook(
        lambda module, args: seen.append(None if not _adapters_enabled(base) else list(base.active_adapters()))
    )
    try:
        settings = ModelSettings(max_tokens=1)
        await routed.request([Message.user("text only")], [], settings)
        await routed.request([Message.user("listen", audio=[_audio(0.5, 1)])], [], settings)
        await routed.request([Message.user("look", images=[_image(50, 50, 1)], audio=[_audio(0.5, 1)])], [], settings)
        await routed.request([Message.user("text only")], [], settings)
    finally:
        hook.remove()
        base.disable_adapters()
    assert seen == [None, ["speech"], ["vision"], None]


def _adapters_enabled(model: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return bool(layers) and not layers[0].disable_adapters


# ---------------------------------------------------------------- loading


def test_from_pretrained_loads_the_folder_with_auto_attention(tiny_phi4_dir: Path) -> None:
    model = TransformersModel.from_pretrained(tiny_phi4_dir, progress=False, adapters=False)
    assert model.is_phi4
    assert model.attn_implementation == "sdpa"  # CPU: no flash attention
    assert model.name == tiny_phi4_dir.name
    assert model.context_length == 131072
    assert model.processor is not None
    assert model.processor.chat_template  # restored after the reload loses it
    eager = TransformersModel.from_pretrained(
        tiny_phi4_dir, progress=False, attn_implementation="eager", adapters=False
    )
    assert eager.model.config._attn_implementation == "eager"


def test_missing_weights_offline_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError) as info:
        TransformersModel.from_pretrained(progress=False)
    message = str(info.value)
    assert "microsoft/Phi-4-multimodal-instruct" in message
    assert "refs/pr/70" in message
    assert "HF_HUB_OFFLINE" in message
    assert "Pass a local folder" in message


def test_bad_folders_and_options_are_clear_errors(tmp_path: Path, tiny_phi4_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        TransformersModel.from_pretrained(tmp_path / "nope" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot read the model config"):
        TransformersModel.from_pretrained(tmp_path / "empty", progress=False)
    with pytest.raises(UserError, match="attn_implementation"):
        TransformersModel.from_pretrained(tiny_phi4_dir, attn_implementation="fast", progress=False)
    with pytest.raises(UserError, match="unknown dtype"):
        TransformersModel.from_pretrained(tiny_phi4_dir, dtype="float7", progress=False)


def test_import_agent_does_not_import_torch() -> None:
    code = (
        "import sys, agent, agent.models, agent.models.phi4_format, agent.models.transformers, agent.models.tiny\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
