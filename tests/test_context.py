"""Context policy: exact budgets, eviction that keeps the conversation valid, stable prefixes for KV reuse."""

from __future__ import annotations

import io
import itertools
import math
import re
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from agent import Agent
from agent.context import ContextPolicy
from agent.exceptions import ContextOverflowError
from agent.messages import AudioPart, ImagePart, Message, TextPart, ToolCallPart, ToolDefinition, ToolResultPart
from agent.models.phi4_format import render_prompt
from agent.testing import AgentInfo, FunctionModel, call

_CONTROL = re.compile(r"<\|[a-z_/]+\|>")
_WORD = re.compile(r"\w+|[^\w\s]")


def phi4_like_count(messages: Sequence[Message], tools: Sequence[ToolDefinition]) -> int:
    """Deterministic stand-in for Phi-4's count: control tokens, words, and the real image/audio formulas."""
    rendered = render_prompt(messages, tools, image_token="<|image|>", audio_token="<|audio|>")
    text = _CONTROL.sub(" ", rendered.text)
    total = rendered.control_tokens + len(_WORD.findall(text))
    for image in rendered.images:
        w, h = image.size
        wc, hc = math.ceil(w / 448), math.ceil(h / 448)
        total += 273 + 256 * wc * hc + 16 * hc
    for clip in rendered.audio:
        frames = (len(clip.samples()) - 400) // 160 + 1
        total += math.ceil(max(frames, 1) / 8)
    return total


def _model(context_length: int, respond: object = "ok") -> FunctionModel:
    return FunctionModel(
        (lambda m, i: respond) if not callable(respond) else respond,  # type: ignore[arg-type]
        token_counter=phi4_like_count,
        context_length=context_length,
    )


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (w % 255, h % 255, 7)).save(buf, format="PNG")
    return buf.getvalue()


@st.composite
def conversations(draw: st.DrawFn) -> list[Message]:
    words = st.lists(st.sampled_from(["alpha", "beta", "gamma", "delta", "<|end|>", "!"]), min_size=1, max_size=40)
    msgs = [Message.system("You are a careful assistant.")]
    ids = iter(range(10_000))
    for _ in range(draw(st.integers(0, 6))):
        images = [_png(draw(st.integers(1, 1400)), draw(st.integers(1, 1400))) for _ in range(draw(st.integers(0, 1)))]
        audio = [(np.zeros(draw(st.integers(400, 48_000)), np.float32), 16_000) for _ in range(draw(st.integers(0, 1)))]
        msgs.append(Message.user(" ".join(draw(words)), images=images, audio=audio))
        for _ in range(draw(st.integers(0, 3))):
            calls = [ToolCallPart(id=f"c{next(ids)}", name="look", arguments={"q": draw(words)})]
            msgs.append(Message.assistant(" ".join(draw(words)) if draw(st.booleans()) else "", calls))
            content: list[TextPart | ImagePart] = [TextPart(text=" ".join(draw(words)))]
            if draw(st.booleans()):
                content.append(ImagePart(data=_png(draw(st.integers(1, 900)), draw(st.integers(1, 900)))))
            msgs.append(
                Message(
                    role="tool",
                    parts=tuple(ToolResultPart(call_id=c.id, name=c.name, content=tuple(content)) for c in calls),
                )
            )
        if draw(st.booleans()):
            msgs.append(Message.assistant(" ".join(draw(words))))
    msgs.append(Message.user("latest question " + " ".join(draw(words))))
    for _ in range(draw(st.integers(0, 3))):  # steps of the current run
        c = ToolCallPart(id=f"c{next(ids)}", name="look", arguments={})
        msgs.append(Message.assistant("", [c]))
        msgs.append(
            Message(role="tool", parts=(ToolResultPart(call_id=c.id, name="look", content=(TextPart(text="r"),)),))
        )
    return msgs


def _assert_valid(fitted: list[Message], original: list[Message]) -> None:
    assert fitted[0] == original[0], "system prompt must stay first and intact"
    latest = max(i for i, m in enumerate(original) if m.role == "user" and m.text.startswith("latest question"))
    assert original[latest] in fitted, "the latest user turn must stay intact"
    for i, m in enumerate(fitted):
        if m.role == "assistant" and m.tool_calls:
            answered = {p.call_id for p in fitted[i + 1].parts if isinstance(p, ToolResultPart)}
            assert fitted[i + 1].role == "tool" and {c.id for c in m.tool_calls} <= answered, "call without result"
        if m.role == "tool":
            prev = fitted[i - 1]
            assert prev.role == "assistant", "tool result without its call"
            assert {p.call_id for p in m.parts if isinstance(p, ToolResultPart)} <= {c.id for c in prev.tool_calls}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(history=conversations(), fraction=st.floats(0.05, 1.2), low_water=st.floats(0.5, 1.0))
def test_fitted_prompt_is_within_budget_and_valid(history: list[Message], fraction: float, low_water: float) -> None:
    tools = [ToolDefinition(name="look", description="Look something up.")]
    full = phi4_like_count(history, tools)
    context = max(64, int(full * fraction)) + 16
    model = _model(context)
    policy = ContextPolicy(reserve_output_tokens=16, low_water=low_water, max_tool_result_tokens=None)
    try:
        fitted = policy.fit(history, tools, model)
    except ContextOverflowError:
        # only allowed when the pinned part alone cannot fit
        latest = max(i for i, m in enumerate(history) if m.role == "user" and m.text.startswith("latest question"))
        pinned = [history[0], *history[latest:]]
        assert phi4_like_count(pinned, tools) > context - 16 or len(history) - latest > 3
        return
    assert phi4_like_count(fitted, tools) <= context - 16
    assert policy.stats.last_prompt_tokens == phi4_like_count(fitted, tools)
    _assert_valid(fitted, history)


def test_nothing_changes_while_the_prompt_fits() -> None:
    history = [Message.system("s"), Message.user("hello there"), Message.assistant("hi"), Message.user("again")]
    policy = ContextPolicy(reserve_output_tokens=0)
    assert policy.fit(history, [], _model(10_000)) == history
    assert policy.stats.prefix_resets == 0


def test_media_goes_before_text_and_stubs_name_the_artifact() -> None:
    big = _png(1300, 1300)
    history = [
        Message.system("s"),
        Message.user("old photo", images=[big]),
        Message.assistant("a cat"),
        Message.user("and now?"),
    ]
    full = phi4_like_count(history, [])
    policy = ContextPolicy(reserve_output_tokens=0, low_water=1.0)
    fitted = policy.fit(history, [], _model(full - 100))
    assert [m.role for m in fitted] == ["system", "user", "assistant", "user"]
    stub = fitted[1].parts[0]
    assert isinstance(stub, TextPart) and "sha256:" in stub.text and "recall" in stub.text
    assert fitted[1].parts[1] == TextPart(text="old photo")


def test_eviction_keeps_pairs_and_cuts_with_hysteresis() -> None:
    """A long run: the prefix changes only at cuts, and every cut goes down to low water."""
    steps = 60

    def respond(messages: list[Message], info: AgentInfo) -> object:
        return "done" if info.request_index >= steps else [call("fetch", n=info.request_index)]

    def fetch(n: int) -> str:
        return " ".join(["word"] * 40) + f" {n}"

    seen: list[list[Message]] = []
    model = FunctionModel(respond, token_counter=phi4_like_count, context_length=1200)
    policy = ContextPolicy(reserve_output_tokens=100, low_water=0.6)
    original_fit = policy.fit

    def recording_fit(messages, tools, m):  # type: ignore[no-untyped-def]
        out = original_fit(messages, tools, m)
        seen.append(out)
        return out

    policy.fit = recording_fit  # type: ignore[method-assign]
    result = Agent(model, tools=[fetch], system_prompt="sys", context=policy, max_steps=steps + 1).run_sync("go")
    assert result.output == "done"
    assert policy.stats.prefix_resets >= 3
    assert policy.stats.prefix_resets < steps / 4, "cuts must be rare thanks to hysteresis"
    changes = sum(1 for a, b in itertools.pairwise(seen) if b[: len(a) - 2] != a[: len(a) - 2])
    assert changes == policy.stats.prefix_resets
    for fitted in seen:
        assert phi4_like_count(fitted, model_tools(result)) <= 1100
        _assert_valid_run(fitted)


def model_tools(_: object) -> list[ToolDefinition]:
    from tools import Registry

    def fetch(n: int) -> str:
        return ""

    return Registry([fetch]).definitions()


def _assert_valid_run(fitted: list[Message]) -> None:
    assert fitted[0].role == "system" and fitted[1].text == "go"
    for i, m in enumerate(fitted):
        if m.role == "tool":
            assert fitted[i - 1].role == "assistant" and fitted[i - 1].tool_calls


def test_oversized_tool_result_is_truncated_with_a_note() -> None:
    long = " ".join(f"w{i}" for i in range(5000))
    c = ToolCallPart(id="1", name="read", arguments={})
    history = [
        Message.user("read it"),
        Message.assistant("", [c]),
        Message(role="tool", parts=(ToolResultPart(call_id="1", name="read", content=(TextPart(text=long),)),)),
    ]
    policy = ContextPolicy(max_tool_result_tokens=300, reserve_output_tokens=0)
    fitted = policy.fit(history, [], _model(100_000))
    result = fitted[2].parts[0]
    assert isinstance(result, ToolResultPart)
    assert "truncated" in result.text and result.text.startswith("w0 w1")
    assert (
        phi4_like_count([Message.user(result.text)], []) - phi4_like_count([Message(role="user", parts=())], []) <= 300
    )
    assert policy.stats.truncated_results == 1


def test_oversized_image_is_downscaled_not_dropped_and_long_audio_refused() -> None:
    history = [Message.user("what is this?", images=[_png(3000, 2000)])]
    policy = ContextPolicy(max_image_tokens=1200, reserve_output_tokens=0)
    fitted = policy.fit(history, [], _model(100_000))
    image = fitted[0].parts[0]
    assert isinstance(image, ImagePart)
    w, h = image.size
    assert 273 + 256 * math.ceil(w / 448) * math.ceil(h / 448) + 16 * math.ceil(h / 448) <= 1200
    assert abs(w / h - 1.5) < 0.05, "aspect ratio kept"
    minute = AudioPart.from_samples(np.zeros(16_000 * 60, np.float32))
    with pytest.raises(ContextOverflowError, match="split it into shorter clips"):
        ContextPolicy(max_audio_tokens=375).fit([Message.user("hi", audio=[minute])], [], _model(100_000))


def test_latest_turn_that_cannot_fit_is_a_clear_error() -> None:
    with pytest.raises(ContextOverflowError, match="latest turn need"):
        ContextPolicy(reserve_output_tokens=10).fit([Message.user("word " * 500)], [], _model(200))


def test_summarizer_replaces_evicted_turns() -> None:
    history = [Message.system("s")]
    for i in range(20):
        history += [Message.user(f"question {i} " + "x " * 30), Message.assistant(f"answer {i}")]
    history.append(Message.user("final"))
    seen: list[int] = []

    def summarize(evicted: Sequence[Message]) -> str:
        seen.append(len(evicted))
        return "the user asked many questions"

    policy = ContextPolicy(reserve_output_tokens=0, summarizer=summarize, summary_tokens=64)
    fitted = policy.fit(history, [], _model(400))
    assert fitted[1].text.startswith("[Summary of earlier conversation] the user asked")
    assert seen and phi4_like_count(fitted, []) <= 400
