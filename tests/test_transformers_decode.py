"""The decode modes (eager, static cache, compiled step) give the same greedy tokens over an agent run.

The run covers what the backend does beside decoding: a grammar-constrained call (forced tokens fed several at
a time), images in a user turn and in a tool result, KV reuse across steps, an edited history (crop), a decode
that crosses the longrope switch (moved to 256 tokens on the tiny model) and a prompt above it. The static
cache is made to grow in small buckets and to prefill in small chunks, so growth with reuse and chunked,
regime-pinned prefill both run. CUDA graphs need CUDA: on the CPU `compiled` runs `torch.compile` without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

import torch
from PIL import Image

from agent.messages import ImagePart, Message, TextPart, ToolCallPart, ToolDefinition, ToolResultPart
from agent.models import ModelResponse, ModelSettings
from agent.models.transformers import TransformersModel
from agent.models.transformers._static import StaticKV, bucket

SWITCH = 256
TOOLS = [
    ToolDefinition(
        name="lookup",
        description="Look a key up",
        parameters={"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
    )
]
Step = tuple[str, list[tuple[str, Any]], int, int, int, str | None]


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def switched(tiny_phi4_dir: Path) -> Any:
    """The tiny checkpoint loaded afresh (no adapters, its own processor: nothing other tests change) with the
    longrope switch at 256 tokens (the real one is 4096)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_phi4_dir)
    config.original_max_position_embeddings = SWITCH
    config.rope_parameters["original_max_position_embeddings"] = SWITCH
    model = AutoModelForCausalLM.from_pretrained(tiny_phi4_dir, config=config).eval()
    return model, AutoProcessor.from_pretrained(tiny_phi4_dir)


class NoStop:
    """Bans the stop ids so a step decodes exactly max_tokens tokens (switched on for chosen steps only)."""

    def __init__(self, banned: list[int]) -> None:
        self.banned = banned

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[..., self.banned] = float("-inf")
        return scores


def _summary(response: ModelResponse) -> Step:
    calls = [(c.name, c.arguments) for c in response.message.tool_calls]
    usage = response.usage
    return (
        response.raw_text or "",
        calls,
        usage.output_tokens,
        usage.input_tokens,
        usage.prefill_tokens,
        response.finish_reason,
    )


async def _agent_run(model: TransformersModel) -> list[Step]:
    engine = model._engine
    banned = sorted(set(model._format.stop_ids) | set(model._format.banned_ids))
    steps: list[Step] = []
    history = [Message.system("Use the tools."), Message.user("Find the key.", images=[_image(200, 120, 1)])]

    response = await model.request(history, TOOLS, ModelSettings(max_tokens=40, tool_choice="required"))
    steps.append(_summary(response))
    calls = response.message.tool_calls or (ToolCallPart(id="c1", name="lookup", arguments={"key": "k"}),)
    result = (TextPart(text="the key is on this page"), ImagePart.from_pil(_image(160, 90, 2)))
    history += [
        Message.assistant(tool_calls=list(calls)),
        Message(role="tool", parts=(ToolResultPart(call_id=calls[0].id, name=calls[0].name, content=result),)),
    ]
    response = await model.request(history, TOOLS, ModelSettings(max_tokens=12))
    steps.append(_summary(response))
    history.append(Message.assistant(response.message.text or "ok"))

    engine.logits_processors[:] = [NoStop(banned)]  # from here every step decodes exactly max_tokens tokens
    words = ["alpha", "beta", "gamma", "delta"] * 200
    low, high = 1, len(words)  # a user turn that leaves the prompt just below the switch: decode crosses it
    while low < high:
        mid = (low + high + 1) // 2
        fits = model.count_tokens([*history, Message.user(" ".join(words[:mid]))], TOOLS) <= SWITCH - 4
        low, high = (mid, high) if fits else (low, mid - 1)
    history.append(Message.user(" ".join(words[:low])))
    response = await model.request(history, TOOLS, ModelSettings(max_tokens=12, tool_choice="none"))
    steps.append(_summary(response))

    history += [Message.assistant(response.message.text or "ok"), Message.user("more " * 30)]
    response = await model.request(history, TOOLS, ModelSettings(max_tokens=8, tool_choice="none"))
    steps.append(_summary(response))  # a prompt above the switch, reusing the long-regime cache

    history[-1] = Message.user("less " * 20)  # an edited last turn: the cache is cut back, not rebuilt
    response = await model.request(history, TOOLS, ModelSettings(max_tokens=8, tool_choice="none"))
    steps.append(_summary(response))
    engine.logits_processors.clear()
    return steps


def _model(switched: Any, decode: str) -> TransformersModel:
    hf_model, processor = switched
    return TransformersModel(hf_model, processor, adapters=(), decode=decode, warmup=False)


async def test_static_cache_gives_the_eager_tokens_over_an_agent_run(switched: Any) -> None:
    eager = await _agent_run(_model(switched, "eager"))
    model = _model(switched, "static")
    kv = model._engine._kv
    assert kv is not None
    kv.min_bucket = 64  # grow several times during the run (each growth copies what the cache keeps)
    model._engine.prefill_chunk = 48  # prefill in chunks, media runs never split
    static = await _agent_run(model)
    assert static == eager
    assert eager[0][1], "the constrained step must call the tool"
    assert all(step[4] < step[3] / 2 for step in eager[3:]), "the later steps reuse the cache"
    assert eager[2][3] > SWITCH - 12 and eager[3][3] > SWITCH, "decode crossed the switch, then the prompt did"
    assert kv.capacity >= 512  # it grew from 64 past the switch


async def test_unpinned_chunks_would_mix_rope_regimes(switched: Any) -> None:
    """The checks here can fail: chunks prefilled in their own regime write other keys than one forward."""
    eager, static = _model(switched, "eager"), _model(switched, "static")
    static._engine.prefill_chunk = 48
    static._engine._rope = None  # no pinning: the chunks below the switch use the short frequencies
    prompt = eager._format.build([Message.user("alpha beta " * 150)], (), ModelSettings(max_tokens=1))
    with torch.inference_mode():
        eager._engine._prefill(prompt, 4)
        static._engine._prefill(prompt, 4)
    first = eager._engine.state.cache.layers[0].keys[0], static._engine.state.cache.layers[0].keys[0]
    assert float((first[0][:, 1:SWITCH] - first[1][:, 1:SWITCH]).abs().max()) > 1e-2


async def test_compiled_step_gives_the_eager_tokens_and_compiles_once(switched: Any) -> None:
    eager = await _agent_run(_model(switched, "eager"))
    model = _model(switched, "compiled")
    model._engine.prefill_chunk = 48
    compiled = await _agent_run(model)
    assert compiled == eager
    step = model._engine._step
    assert step is not None and step.compiled
    assert len(step._shapes) == 1  # one bucket (1024 tokens) held the whole run: one compile


def test_decode_modes_resolve_and_refuse_unknown_names(tiny_phi4: TransformersModel) -> None:
    from agent.exceptions import ModelLoadError

    assert tiny_phi4.decode == "eager"  # "auto" on the CPU
    assert TransformersModel(tiny_phi4.model, tiny_phi4.processor, adapters=(), decode="static").decode == "static"
    with pytest.raises(ModelLoadError, match="decode must be"):
        TransformersModel(tiny_phi4.model, tiny_phi4.processor, decode="graphs")


def test_buckets_are_powers_of_two_within_the_model() -> None:
    assert [bucket(n, 131072) for n in (1, 1024, 1025, 5000, 40000)] == [1024, 1024, 2048, 8192, 65536]
    assert bucket(130000, 131072) == 131072
    assert bucket(9, None, smallest=8) == 16


def test_growth_keeps_the_cached_tokens(tiny_phi4: TransformersModel) -> None:
    config = tiny_phi4.model.config
    kv = StaticKV(config, None)
    kv.min_bucket = 16
    kv.reserve(10, keep=0)
    ids = torch.arange(1, 11)[None]
    with torch.inference_mode():
        tiny_phi4.model(input_ids=ids, past_key_values=kv.cache, use_cache=True, position_ids=torch.arange(10)[None])
    kv.advanced(10)
    before = [layer.keys[:, :, :10].clone() for layer in kv.cache.layers]
    kv.reserve(40, keep=7)
    assert (kv.capacity, kv.length) == (64, 7)
    for layer, old in zip(kv.cache.layers, before, strict=True):
        assert torch.equal(layer.keys[:, :, :7], old[:, :, :7])
        assert int(layer.cumulative_length) == 7


async def test_chunked_prefill_above_the_switch_writes_the_one_forward_cache(switched: Any) -> None:
    """A fresh 1,200-token prompt (switch at 256) in 48-token chunks: every cached key equals one forward's."""
    eager, static = _model(switched, "eager"), _model(switched, "static")
    static._engine.prefill_chunk = 48
    settings = ModelSettings(max_tokens=1)
    first = [Message.user("alpha beta " * 150)]
    for history in (first, [*first, Message.assistant("ok"), Message.user("more " * 30)]):  # fresh, then reused
        prompt = eager._format.build(history, (), settings)
        assert len(prompt.ids) > 4 * SWITCH
        with torch.inference_mode():
            eager_logits, eager_new = eager._engine._prefill(prompt, 4)
            static_logits, static_new = static._engine._prefill(prompt, 4)
        assert eager_new == static_new
        n = len(prompt.ids)
        for a, b in zip(eager._engine.state.cache.layers, static._engine.state.cache.layers, strict=True):
            assert float((a.keys[0] - b.keys[0, :, :n]).abs().max()) < 1e-4
        assert float((eager_logits - static_logits).abs().max()) < 1e-4


async def test_a_plain_chat_model_decodes_the_same_on_a_static_cache(tiny_chat_model: TransformersModel) -> None:
    """A Llama with a chat template (no longrope, no media): a constrained call, then text after its result."""
    runs = []
    for decode in ("eager", "static"):
        model = TransformersModel(tiny_chat_model.model, tiny_chat_model.tokenizer, decode=decode, warmup=False)
        history = [Message.system("Use the tools."), Message.user("Find the key.")]
        first = await model.request(history, TOOLS, ModelSettings(max_tokens=30, tool_choice="required"))
        call = first.message.tool_calls[0]
        result = ToolResultPart(call_id=call.id, name=call.name, content=(TextPart(text="k is 42"),))
        history += [Message.assistant(tool_calls=[call]), Message(role="tool", parts=(result,))]
        second = await model.request(history, TOOLS, ModelSettings(max_tokens=10, tool_choice="none"))
        runs.append([_summary(first), _summary(second)])
    assert runs[0] == runs[1]
    assert runs[0][1][4] < runs[0][1][3], "the second request reuses the cache"
