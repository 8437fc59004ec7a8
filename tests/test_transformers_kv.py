"""KV reuse across agent steps on the tiny Phi-4: prefill only new tokens, same logits, same tokens past 4096."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

import torch
from PIL import Image

from agent import Agent, Message
from agent.messages import ImagePart, ToolCallPart, ToolDefinition, ToolResultPart
from agent.models import ModelSettings
from agent.models.tiny import ScriptedOutputs
from agent.models.transformers import TransformersModel

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """A logits processor keeping the raw scores of every step (it forces nothing)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, torch.Tensor]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append((int(input_ids.shape[1]), scores[0].clone()))
        return scores


class NoStop:
    """Bans the given ids so a random model generates exactly max_tokens tokens; records the greedy choices."""

    def __init__(self, banned: set[int]) -> None:
        self.banned = sorted(banned)
        self.chosen: list[int] = []
        self.scores: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[..., self.banned] = float("-inf")
        self.chosen.append(int(scores[0].argmax()))
        self.scores.append(scores[0].clone())
        return scores


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _full_forward_logits(
    model: TransformersModel, messages: list[Message], tools: list[ToolDefinition]
) -> torch.Tensor:
    """The reference: the whole prompt through transformers' own processor and one forward, no cache."""
    from agent.models.phi4_format import render_prompt

    processor = model.processor
    rendered = render_prompt(messages, tools, image_token=processor.image_token, audio_token=processor.audio_token)
    inputs = processor(
        text=rendered.text,
        images=[p.to_pil() for p in rendered.images] or None,
        audio=[p.samples() for p in rendered.audio] or None,
        sampling_rate=16000,
        return_tensors="pt",
    )
    assert inputs["input_ids"].shape[1] == model.count_tokens(messages, tools)
    with torch.inference_mode():
        return model.model(**inputs).logits[0, -1].float()


def _max_diff(recorded: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest difference over the ids the backend may sample (it bans the media placeholder ids)."""
    allowed = torch.isfinite(recorded)
    assert int((~allowed).sum()) == 2  # exactly the image and audio placeholder ids
    return float((recorded[allowed] - reference[allowed]).abs().max())


# ---------------------------------------------------------------- the 10-step acceptance run


def _ten_step_run(model_base: TransformersModel) -> tuple[TransformersModel, Recorder, Any]:
    steps = 10
    scripts = [
        f'Step {i}: looking.<|tool_call|>[{{"name": "lookup", "arguments": {{"key": "k{i}", "page": {i}}}}}]'
        "<|/tool_call|><|end|>"
        for i in range(steps - 1)
    ] + ["All done.<|end|>"]
    recorder = Recorder()
    model = TransformersModel(
        model_base.model,
        model_base.processor,
        adapters=(),
        logits_processors=[recorder, ScriptedOutputs(model_base.tokenizer, scripts)],
    )

    def lookup(key: str, page: int) -> Any:
        """Look a key up."""
        if page % 3 == 1:  # some results are images: multimodal prefixes must compare by content
            return [f"page {page} of {key}", _image(120 + 10 * page, 90, seed=page)]
        return f"value of {key} on page {page}: " + "lorem ipsum " * (page + 1)

    agent = Agent(model, tools=[lookup], max_steps=steps + 1, system_prompt="Use the tools.")
    user = Message.user(
        "Look up ten keys.",
        images=[_image(500, 300, seed=99)],
        audio=[((np.random.default_rng(1).standard_normal(12000) * 0.1).astype(np.float32), 16000)],
    )
    result = agent.run_sync(user)
    return model, recorder, result


def test_ten_step_run_prefills_only_new_tokens_and_keeps_the_logits(tiny_phi4: TransformersModel) -> None:
    model, recorder, result = _ten_step_run(tiny_phi4)
    assert result.output == "All done."
    assert result.usage.requests == 10
    final_context = model.count_tokens(result.messages[:-1], model_tools(result))
    prefill = result.usage.prefill_tokens
    assert prefill <= 1.1 * final_context, (prefill, final_context)
    assert prefill < result.usage.input_tokens / 3  # without reuse it would be the sum of all inputs
    # the last request's first scores (its prefill) equal one fresh forward over the whole prompt
    last_prompt = [s for s in recorder.steps if s[0] == final_context][-1][1]
    reference = _full_forward_logits(model, result.messages[:-1], model_tools(result))
    assert _max_diff(last_prompt, reference) < 1e-4


def model_tools(result: Any) -> list[ToolDefinition]:
    return [ToolDefinition(name="lookup", description="Look a key up.", parameters=_lookup_schema())]


def _lookup_schema() -> dict[str, Any]:
    from tools import Registry

    def lookup(key: str, page: int) -> str:
        """Look a key up."""
        return key

    return Registry([lookup]).definitions()[0].parameters


def test_benchmark_prints_the_ratio_last(tiny_phi4_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("kv_reuse_bench", ROOT / "benchmarks" / "kv_reuse.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--folder", str(tiny_phi4_dir), "--steps", "4"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("prefill_ratio=")
    assert 0 < float(last.removeprefix("prefill_ratio=")) <= 1.1


# ---------------------------------------------------------------- divergence, media identity, switches


async def test_an_edited_history_crops_the_cache_and_matches_a_fresh_forward(tiny_phi4: TransformersModel) -> None:
    recorder = Recorder()
    model = TransformersModel(tiny_phi4.model, tiny_phi4.processor, adapters=(), logits_processors=[recorder])
    settings = ModelSettings(max_tokens=1)
    first = [Message.system("sys"), Message.user("alpha beta gamma " * 20), Message.user("tail one")]
    await model.request(first, [], settings)
    edited = [Message.system("sys"), Message.user("alpha beta gamma " * 20), Message.user("tail two, longer")]
    response = await model.request(edited, [], settings)
    common = model.count_tokens(edited[:2], []) - 1  # the generation prompt token is not shared
    assert response.usage.prefill_tokens <= response.usage.input_tokens - common + 2
    assert response.usage.prefill_tokens < response.usage.input_tokens / 2
    reference = _full_forward_logits(model, edited, [])
    assert _max_diff(recorder.steps[-1][1], reference) < 1e-4


async def test_a_different_image_of_the_same_size_is_not_reused(tiny_phi4: TransformersModel) -> None:
    recorder = Recorder()
    model = TransformersModel(tiny_phi4.model, tiny_phi4.processor, adapters=(), logits_processors=[recorder])
    settings = ModelSettings(max_tokens=1)
    head = [Message.system("sys " * 50)]
    await model.request([*head, Message.user("what is it?", images=[_image(200, 100, 1)])], [], settings)
    second = [*head, Message.user("what is it?", images=[_image(200, 100, 2)])]  # same token ids, other pixels
    response = await model.request(second, [], settings)
    image_tokens = 273 + 8 * 15  # 200x100: one crop with 8 valid pooled rows and 14 columns
    assert response.usage.prefill_tokens >= image_tokens
    assert response.usage.prefill_tokens < response.usage.input_tokens  # the system prefix was reused
    reference = _full_forward_logits(model, second, [])
    assert _max_diff(recorder.steps[-1][1], reference) < 1e-4
    same = await model.request(second, [], settings)  # identical prompt: only the last token is recomputed
    assert same.usage.prefill_tokens == 1


async def test_audio_prefix_recomputed_when_an_image_switches_the_projection(tiny_phi4: TransformersModel) -> None:
    recorder = Recorder()
    model = TransformersModel(tiny_phi4.model, tiny_phi4.processor, adapters=(), logits_processors=[recorder])
    settings = ModelSettings(max_tokens=1)
    clip = ((np.random.default_rng(3).standard_normal(8000) * 0.1).astype(np.float32), 16000)
    history = [Message.user("listen", audio=[clip])]
    await model.request(history, [], settings)
    result = ToolResultPart(call_id="c", name="look", content=(ImagePart.from_pil(_image(60, 60, 4)),))
    grown = [
        *history,
        Message.assistant(tool_calls=[ToolCallPart(id="c", name="look")]),
        Message(role="tool", parts=(result,)),
    ]
    response = await model.request(grown, [], settings)
    assert response.usage.prefill_tokens == response.usage.input_tokens  # audio now uses the vision projection
    reference = _full_forward_logits(model, grown, [])
    assert _max_diff(recorder.steps[-1][1], reference) < 1e-4


async def test_kv_reuse_off_prefills_everything(tiny_phi4: TransformersModel) -> None:
    model = TransformersModel(tiny_phi4.model, tiny_phi4.processor, adapters=(), kv_reuse=False)
    settings = ModelSettings(max_tokens=1)
    for _ in range(2):
        response = await model.request([Message.user("same prompt")], [], settings)
        assert response.usage.prefill_tokens == response.usage.input_tokens


# ---------------------------------------------------------------- the longrope switch


def _with_switch(model: TransformersModel, switch: int) -> Any:
    """The same weights with the longrope switch moved to `switch` tokens (the real one is 4096)."""
    config = copy.deepcopy(model.model.config)
    config.original_max_position_embeddings = switch
    config.rope_parameters["original_max_position_embeddings"] = switch
    clone = type(model.model)(config).eval()
    clone.load_state_dict(model.model.state_dict(), strict=False)
    return clone


def _no_cache_tokens(hf_model: Any, ids: list[int], count: int, banned: set[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens (and their logits) with a full forward per step and no cache: the ground truth."""
    out: list[int] = []
    scores: list[torch.Tensor] = []
    ids = list(ids)
    with torch.inference_mode():
        for _ in range(count):
            logits = hf_model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()
            logits[sorted(banned)] = float("-inf")
            token = int(logits.argmax())
            out.append(token)
            scores.append(logits)
            ids.append(token)
    return out, torch.stack(scores)


async def _crossing_run(
    base: TransformersModel, hf_model: Any, switch: int, fix: bool
) -> list[tuple[list[int], list[int], float]]:
    """Three requests (decode crosses the switch, prompt above it, prompt back below it) vs no-cache runs:
    (tokens, reference tokens, largest logit difference) per request."""
    probe = TransformersModel(hf_model, base.processor, adapters=())
    banned = set(probe._format.stop_ids) | set(probe._format.banned_ids)
    chooser = NoStop(banned)
    model = TransformersModel(hf_model, base.processor, adapters=(), logits_processors=[chooser])
    if not fix:
        model._engine.rope_switch = None  # what transformers alone does: keep the stale cache
    settings = ModelSettings(max_tokens=12)
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit"] * 1000

    def history_of(n: int) -> list[Message]:
        return [Message.user(" ".join(words[:n])), Message.assistant("ok")]

    low, high = 1, len(words)  # the longest history whose prompt ends just below the switch
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if model.count_tokens(history_of(mid), []) <= switch - 4 else (low, mid - 1)
    history = history_of(low)
    runs = []
    for step in range(3):
        prompt_ids = model._format.build(history, [], settings).ids
        chooser.chosen.clear()
        chooser.scores.clear()
        response = await model.request(history, [], settings)
        generated = list(chooser.chosen)
        assert response.usage.output_tokens == len(generated) == 12
        reference, reference_scores = _no_cache_tokens(hf_model, prompt_ids, len(generated), banned)
        allowed = torch.isfinite(reference_scores)
        diff = float((torch.stack(chooser.scores)[allowed] - reference_scores[allowed]).abs().max())
        runs.append((generated, reference, diff))
        if step == 0:  # decode crossed the switch; now grow the prompt past it
            history = [*history, response.message, Message.user("more " * 8)]
        else:  # and shrink back below it: the long-regime cache must not be reused
            history = [*history[:2], Message.user("short")]
    return runs


async def test_crossing_the_rope_switch_gives_the_no_cache_tokens(tiny_phi4: TransformersModel) -> None:
    hf_model = _with_switch(tiny_phi4, 256)
    runs = await _crossing_run(tiny_phi4, hf_model, 256, fix=True)
    for cached, reference, diff in runs:
        assert cached == reference
        assert diff < 1e-4
    broken = await _crossing_run(tiny_phi4, hf_model, 256, fix=False)
    # without the recompute the outputs change (what transformers does alone): the test can tell
    assert any(cached != reference for cached, reference, _ in broken)
    assert all(diff > 1e-2 for _, _, diff in broken)


@pytest.mark.slow
async def test_crossing_4096_gives_the_no_cache_tokens(tiny_phi4: TransformersModel) -> None:
    runs = await _crossing_run(tiny_phi4, tiny_phi4.model, 4096, fix=True)
    for cached, reference, diff in runs:
        assert cached == reference
        assert diff < 1e-4


async def test_a_sliding_window_beyond_the_context_still_crops(tiny_phi4: TransformersModel) -> None:
    """Phi-4-mm's real config declares sliding_window=262144 (> its 131072 positions): reuse must still work."""
    config = tiny_phi4.model.config
    saved = getattr(config, "sliding_window", None)
    config.sliding_window = 262144
    try:
        recorder = Recorder()
        model = TransformersModel(tiny_phi4.model, tiny_phi4.processor, adapters=(), logits_processors=[recorder])
        settings = ModelSettings(max_tokens=1)
        await model.request(
            [Message.system("sys"), Message.user("alpha beta " * 30), Message.user("one")], [], settings
        )
        edited = [Message.system("sys"), Message.user("alpha beta " * 30), Message.user("two, longer")]
        response = await model.request(edited, [], settings)
        assert response.usage.prefill_tokens < response.usage.input_tokens / 2
        assert _max_diff(recorder.steps[-1][1], _full_forward_logits(model, edited, [])) < 1e-4
    finally:
        config.sliding_window = saved
