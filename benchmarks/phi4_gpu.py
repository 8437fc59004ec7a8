"""Full-size Phi-4-multimodal (random bf16 weights) on CUDA, measured through the project's backend.

Builds `Phi4MultimodalForCausalLM` (transformers' native port) from the full-size config directly on CUDA in
bf16, with the real Phi-4 tokenizer, and measures `agent.models.transformers.TransformersModel.request` at
batch 1, each figure beside the ceiling of the GPU it ran on. Random weights run at the real model's speed.

Decode modes (`--decode`): the backend's `decode=` keyword, `auto` (compiled on CUDA, eager on CPU), `eager`
(DynamicCache), `static` (StaticCache, no compile), `compiled` (StaticCache + torch.compile of the decode step;
CUDA graphs on CUDA). `all` (the default) measures `auto` and then `eager` in one run, each on its own backend
over the same weights; the headline figures come from `auto`. Each mode starts with a warm-up request (the
compiled path compiles and captures there) whose wall time is reported as `first_request_s`.

Definitions (per mode; N = `--decode-tokens`, 128; every request through `await backend.request(...)`):

1. Decode tok/s after a prompt of P tokens (1K and 32K): the cache is brought to the prompt by a request with
   `max_tokens=1`, then the same prompt is requested with `max_tokens=N`. KV reuse makes that second request
   prefill one token and decode N: decode tok/s = `output_tokens / GenerationStats.decode_seconds` (from
   `backend.last_stats`). Its decode lengths (P+1..P+N) were never seen before, as in an agent (see the cuDNN
   note); a warm-up request decodes a few tokens after a slightly shorter prompt first. The headline
   `decode_tok_s` is the figure after the 1K prompt; the one after 32K is printed on its own line.
2. Prefill tok/s of a fresh prompt of 8K and 32K tokens (cache reset, no reuse, `max_tokens=1`), after one
   untimed request of the same length with other text: `prefill_tokens / (prefill_seconds + decode_seconds)`.
   (The backend syncs the GPU before starting its decode clock, so `prefill_seconds` alone is the prefill; with one
   output token the sum adds only that token's sampling, and keeps the figure honest on an older backend.) Both in the
   JSON (`tok_s` and `tok_s_stats_prefill_only`). The headline `prefill_frac` is the 8K figure's.
3. A 20-step agent run at 32K history: system + a `search` tool + a 32K-token user document. One request
   (`max_tokens=32`) prefills and caches the history first (not a step). Then each step appends an assistant
   tool call and a tool result of 100-300 tokens and requests `max_tokens=32` with KV reuse on (the default),
   tools passed (decoding grammar-constrained, as in an agent). Step latency = wall time of the request
   (prompt build and tokenization included). `step_ratio_32k` = latency of step 20 / latency of step 1,
   where step 1 is the first step after the history is cached (target <= 1.2); the JSON also has the median
   of steps 2..20 over step 1.

Every request decodes exactly its `max_tokens` (checked: `exact`): the language model's output rows for the
control ids 199999..200063 are zeroed (random weights: their logits are 0, never the argmax of 200K random
logits), so no stop token ends a turn. That avoids a logits processor, with which the engine copies the whole
id list to the device at every step (~3 ms at 32K on a 2-core CPU), which the real path does not;
`--ban processor` uses one instead (a processor setting those ids' scores to -inf).

Ceilings, computed on the device the run uses:
- decode: measured copy bandwidth (a 4 GiB device-to-device copy, bytes read + written per second) / bytes read
  per token = the text decoder's weights (its 32 layers, the final norm and the lm_head matrix, which is tied to
  the embedding and read whole; not the one embedding row, not the vision/audio encoders) + the KV cache at
  the mean context of the decode (2 x layers x KV heads x head dim x 2 bytes per token). `decode_frac` uses it.
- prefill: a timed 8192^3 bf16 matmul gives achievable FLOP/s (the nominal dense bf16 figure is printed when
  the device name is known, e.g. H100 SXM / H200 ~989 TFLOP/s) / FLOPs per token = 2 x the decoder layers'
  matrix parameters (lm_head runs on the last position only) + causal attention 2 x layers x heads x head dim
  x P (QK^T and AV over P/2 keys on average): ~8.1 GFLOP at 8K, ~12.9 at 32K (DESIGN.md's ~7.6 counts 2 x
  3.8B parameters and no attention).

Pitfall measured on an H100 (torch 2.11, 2026-11-23): SDPA dispatches to cuDNN attention, which spends ~1.4-1.8
ms of CPU per layer call on a sequence length it has not seen (about 1 s when it generates a new kernel).
Eager decode then runs ~90-100 ms/token on fresh lengths and ~36-40 ms/token on lengths seen before, so
whichever run goes first on a length looks slower. The timed prefills follow a request of the same length
for that reason; the timed decodes are on fresh lengths, as an agent's are. `--no-cudnn-sdpa` turns that
backend off.

Usage: `python benchmarks/phi4_gpu.py [--json results.json] [--decode all]`. Without CUDA (and without
`--smoke`) it prints a skip message and exits 0. `--smoke` runs every code path on a tiny random model (CPU
when there is no GPU) with short lengths (64/256-token prompts, 3 agent steps); its fractions are against
the CPU's "ceilings" and mean nothing. Parts are bounded by `--budget-s` (a part that would start later is
skipped), progress lines are flushed, and the JSON is rewritten after every part, so a timeout still leaves
figures. Last line: `decode_tok_s=<float> decode_frac=<float> prefill_frac=<float> step_ratio_32k=<float>`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import math
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTROL_IDS = (199999, 200064)  # <|endoftext|> .. the last added token: a slice of the lm_head rows
NOMINAL_BF16_FLOPS = (  # dense, no sparsity; the first name found in the device name wins
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("B200", 2250e12),
)
_WORDS_TEXT = (
    "agent tool result search query page image audio model token cache memory store context budget answer "
    "city river north south data value error retry call json list object field schema table row column "
    "weather price report summary source link title date year month week day hour minute second number "
    "alpha beta gamma delta first second third last next previous open close read write update delete"
)
SYSTEM = "You are a research agent."
SEARCH_TOOL = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}


@dataclass(frozen=True)
class Plan:
    """Lengths and sizes of one run (full size on the GPU, small for `--smoke`)."""

    decode_prompts: tuple[int, int]  # (short: the headline, long)
    prefill_prompts: tuple[int, int]  # (short: the headline, long)
    decode_tokens: int
    warm_tokens: int
    history: int
    steps: int
    step_tokens: int
    result_tokens: tuple[int, int]
    prefill_reps: int
    reference_tokens: int


FULL = Plan((1024, 32768), (8192, 32768), 128, 16, 32768, 20, 32, (100, 300), 2, 64)
SMOKE = Plan((64, 256), (128, 256), 8, 4, 256, 3, 8, (20, 60), 1, 8)


# ---------------------------------------------------------------------------------------------- setup


def _find(*candidates: Path) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise SystemExit(f"none of these exists: {', '.join(map(str, candidates))}")


def _paths(args: argparse.Namespace) -> tuple[Path, Path]:
    config = args.config or _find(ROOT / ".device/phi4mm/native-config", ROOT.parent / "shared/phi4mm/native-config")
    tokenizer = args.tokenizer or _find(ROOT / ".device/phi4mm/tokenizer", ROOT.parent / "shared/phi4mm/tokenizer")
    return Path(config), Path(tokenizer)


def _tiny_config_dict(full: dict[str, Any]) -> dict[str, Any]:
    """The full config shrunk to a few MB (vocab kept so the real tokenizer works)."""
    cfg = json.loads(json.dumps(full))
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    rot = int(64 // 2 * cfg["partial_rotary_factor"]) // 2
    rope = cfg["rope_parameters"]
    rope["long_factor"], rope["short_factor"] = rope["long_factor"][:rot], rope["short_factor"][:rot]
    cfg["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg["audio_config"].update(
        hidden_size=32,
        intermediate_size=64,
        num_blocks=1,
        num_attention_heads=2,
        ext_pw_out_channel=32,
        depthwise_separable_out_channel=32,
        nemo_conv_channels=32,
    )
    return cfg


def build_model(config_dir: Path, attn: str, device: str, smoke: bool) -> Any:
    """Random-weight Phi-4-multimodal, initialised on `device` (no CPU detour for the full-size model)."""
    import torch
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    raw = json.loads((config_dir / "config.json").read_text())
    if smoke:
        raw = _tiny_config_dict(raw)
    raw.pop("transformers_version", None)
    config = Phi4MultimodalConfig(**raw)
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi4MultimodalForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


def media_backend(device: str = "cuda", *, smoke: bool = False, attn: str = "sdpa") -> Any:
    """A `TransformersModel` on the full-size random-weight Phi-4-mm with the real processor: images and audio
    run through the real towers at full size (`benchmarks/ingest.py` and `voice.py` use it as
    `--model random-full`). `smoke` shrinks it to run on a CPU (the code path, not the figures)."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    from agent.models.transformers import TransformersModel

    config_dir = _find(ROOT / ".device/phi4mm/native-config", ROOT.parent / "shared/phi4mm/native-config")
    tokenizer_dir = _find(ROOT / ".device/phi4mm/tokenizer", ROOT.parent / "shared/phi4mm/tokenizer")
    model = build_model(config_dir, attn, device, smoke)
    silence_control_ids(model)
    processor = transformers.Phi4MultimodalProcessor(
        transformers.Phi4MultimodalImageProcessor(),
        transformers.Phi4MultimodalFeatureExtractor(),
        PreTrainedTokenizerFast.from_pretrained(
            tokenizer_dir, extra_special_tokens={"image_token": "<|endoftext10|>", "audio_token": "<|endoftext11|>"}
        ),
    )
    return TransformersModel(model, processor, kv_reuse=True, name="phi4mm-random-full")


def load_model(spec: str, *, smoke: bool = False) -> Any:
    """`resolve_model(spec)`, or `random-full`: `media_backend` on CUDA (`smoke`: shrunk, on the CPU)."""
    if spec == "random-full":
        return media_backend("cpu" if smoke else "cuda", smoke=smoke)
    from agent.models.resolve import resolve_model

    return resolve_model(spec)


def silence_control_ids(model: Any) -> None:
    """Zero the output rows of the control ids: their logits become 0, never the argmax of random logits."""
    import torch

    with torch.no_grad():
        model.lm_head.weight[CONTROL_IDS[0] : CONTROL_IDS[1]] = 0


def ban_control_ids(input_ids: Any, scores: Any) -> Any:
    """The logits-processor alternative (`--ban processor`)."""
    scores[..., CONTROL_IDS[0] : CONTROL_IDS[1]] = float("-inf")
    return scores


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of `fn()` over `reps`, the device drained around each (CUDA events on a GPU)."""
    import torch

    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Clock:
    """Seconds since start, and whether a part may still start within the budget."""

    def __init__(self, budget_s: float) -> None:
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.now()

    def say(self, text: str) -> None:
        print(f"[{self.now():6.1f} s] {text}", flush=True)


# ------------------------------------------------------------------------------------------ ceilings


def _copy_seconds(n_bytes: int, device: str) -> float:
    """Median seconds of one copy of `n_bytes` within the device."""
    import torch

    x = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    return _timed(lambda: y.copy_(x), 8)


def _matmul_seconds(size: int, dtype: Any, device: str, reps: int = 10) -> float:
    """Seconds of one `size`^3 matmul (median of 3 runs of `reps` back to back)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    return _timed(lambda: [a @ b for _ in range(reps)], 3) / reps


def measure_ceilings(model: Any, device: str, smoke: bool) -> dict[str, Any]:
    """Copy bandwidth and matmul FLOP/s of the device, and the model's bytes and FLOPs per token."""
    import torch

    n_bytes = (256 if smoke or device == "cpu" else 4096) * 2**20
    copy_s = _copy_seconds(n_bytes, device)
    size = 512 if device == "cpu" else 8192
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    mm_s = _matmul_seconds(size, dtype, device)
    if device != "cpu":
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device != "cpu" else "cpu"
    nominal = next((flops for key, flops in NOMINAL_BF16_FLOPS if key in name), None)

    config = model.config
    seen: dict[int, int] = {}
    for module in (model.model.layers, model.model.norm, model.lm_head):
        for p in module.parameters():
            seen[p.data_ptr()] = p.numel() * p.element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return {
        "device": name,
        "copy_bytes": 2 * n_bytes,
        "copy_bandwidth_Bps": 2 * n_bytes / copy_s,
        "matmul": f"{size}^3 {str(dtype).removeprefix('torch.')}",
        "matmul_flops": 2 * size**3 / mm_s,
        "nominal_bf16_flops": nominal,
        "decoder_weight_bytes": sum(seen.values()),
        "kv_bytes_per_token": 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element,
        "layer_matrix_params": sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2),
        "attention_width": config.num_attention_heads * head_dim,
        "layers": config.num_hidden_layers,
    }


def decode_ceiling(c: dict[str, Any], context: float) -> float:
    """Tokens/s if every decoded token read the decoder weights and the KV cache at `context` once."""
    return float(c["copy_bandwidth_Bps"] / (c["decoder_weight_bytes"] + c["kv_bytes_per_token"] * context))


def prefill_flops_per_token(c: dict[str, Any], prompt: int) -> float:
    return float(2 * c["layer_matrix_params"] + 2 * c["layers"] * c["attention_width"] * prompt)


def prefill_ceiling(c: dict[str, Any], prompt: int) -> float:
    return float(c["matmul_flops"] / prefill_flops_per_token(c, prompt))


# ------------------------------------------------------------------------------------------- prompts


class Prompts:
    """Chat histories whose rendered prompt has an exact token count (words that are one token each)."""

    def __init__(self, backend: Any, tok: Any) -> None:
        self.backend = backend
        self.words = [w for w in _WORDS_TEXT.split() if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]

    def text(self, rng: random.Random, n_words: int) -> str:
        return "".join(" " + rng.choice(self.words) for _ in range(n_words))

    def document(self, n_tokens: int, seed: int, tools: Sequence[Any] = ()) -> list[Any]:
        """[system, user(document)] rendering to exactly `n_tokens` (or the nearest count found)."""
        from agent.messages import Message

        pool = self.text(random.Random(seed), n_tokens).split(" ")[1:]

        def messages(k: int) -> list[Any]:
            doc = "".join(" " + w for w in pool[: max(k, 0)])
            return [Message.system(SYSTEM), Message.user("Read this document and answer with tool calls:" + doc)]

        k = n_tokens - self.backend.count_tokens(messages(0), tools)
        for _ in range(6):
            got = self.backend.count_tokens(messages(k), tools)
            if got == n_tokens:
                break
            k += n_tokens - got
        return messages(k)


# --------------------------------------------------------------------------------------------- parts


def make_backend(model: Any, tok: Any, mode: str, ban: str) -> Any:
    """A `TransformersModel` for `mode`, its grammar engine built (not building beside the timed requests)."""
    from agent.models.transformers import TransformersModel

    kwargs: dict[str, Any] = {"kv_reuse": True, "name": "phi4mm-random"}
    if ban == "processor":
        kwargs["logits_processors"] = [ban_control_ids]
    if "decode" in inspect.signature(TransformersModel.__init__).parameters:
        kwargs["decode"] = mode
    elif mode != "eager":
        raise RuntimeError("TransformersModel has no decode= keyword yet: only today's eager path runs")
    backend = TransformersModel(model, tok, **kwargs)
    for thread in threading.enumerate():
        if thread.name == "mmagent-grammar":
            thread.join(timeout=180)
    return backend


async def _request(backend: Any, messages: list[Any], max_tokens: int, tools: Sequence[Any] = ()) -> dict[str, Any]:
    from agent.models import ModelSettings

    t0 = time.perf_counter()
    response = await backend.request(messages, list(tools), ModelSettings(max_tokens=max_tokens))
    _sync()
    wall = time.perf_counter() - t0
    stats = backend.last_stats
    return {
        "wall_s": wall,
        "prefill_s": stats.prefill_seconds,
        "decode_s": stats.decode_seconds,
        "input_tokens": response.usage.input_tokens,
        "prefill_tokens": response.usage.prefill_tokens,
        "output_tokens": response.usage.output_tokens,
        "forward_passes": stats.forward_passes,
        "exact": response.usage.output_tokens == max_tokens,
        "_response": response,
    }


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


async def bench_decode(backend: Any, prompts: Prompts, plan: Plan, length: int, c: dict[str, Any]) -> dict[str, Any]:
    """Decode N tokens after a cached prompt of `length` (see the module docs, 1.)."""
    backend.reset_cache()
    warm_len = length - min(200, length // 4)
    warm = await _request(backend, prompts.document(warm_len, seed=length + 1), plan.warm_tokens)
    messages = prompts.document(length, seed=length + 2)
    backend.reset_cache()
    await _request(backend, messages, 1)
    row = await _request(backend, messages, plan.decode_tokens)
    rate = row["output_tokens"] / row["decode_s"]
    context = row["input_tokens"] + plan.decode_tokens / 2
    ceiling = decode_ceiling(c, context)
    weights_only = c["copy_bandwidth_Bps"] / c["decoder_weight_bytes"]
    return {
        **_public(row),
        "warm_up_wall_s": warm["wall_s"],
        "tok_s": rate,
        "ms_per_token": 1000 / rate,
        "ceiling_tok_s": ceiling,
        "frac": rate / ceiling,
        "frac_weights_only": rate / weights_only,
    }


async def bench_prefill(backend: Any, prompts: Prompts, plan: Plan, length: int, c: dict[str, Any]) -> dict[str, Any]:
    """Prefill of a fresh prompt of `length` (see the module docs, 2.)."""
    backend.reset_cache()
    await _request(backend, prompts.document(length, seed=length + 3), 1)
    rows = []
    for rep in range(plan.prefill_reps):
        backend.reset_cache()
        rows.append(await _request(backend, prompts.document(length, seed=length + 4 + rep), 1))
    row = sorted(rows, key=lambda r: r["prefill_s"] + r["decode_s"])[len(rows) // 2]
    seconds = row["prefill_s"] + row["decode_s"]
    rate = row["prefill_tokens"] / seconds
    ceiling = prefill_ceiling(c, row["prefill_tokens"])
    out = {
        **_public(row),
        "reps": len(rows),
        "tok_s": rate,
        "tok_s_stats_prefill_only": row["prefill_tokens"] / row["prefill_s"],
        "flops_per_token": prefill_flops_per_token(c, row["prefill_tokens"]),
        "ceiling_tok_s": ceiling,
        "frac": rate / ceiling,
    }
    if c["nominal_bf16_flops"]:
        out["frac_nominal"] = rate * out["flops_per_token"] / c["nominal_bf16_flops"]
    return out


async def agent_run(
    backend: Any, prompts: Prompts, plan: Plan, clock: Clock, say: Callable[[str], None]
) -> dict[str, Any]:
    """The 20-step run at 32K history (see the module docs, 3.)."""
    from agent.messages import Message, TextPart, ToolCallPart, ToolDefinition, ToolResultPart

    tools = [ToolDefinition(name="search", description="Search the web", parameters=SEARCH_TOOL)]
    rng = random.Random(7)
    messages = prompts.document(plan.history, seed=11, tools=tools)
    backend.reset_cache()
    first = await _request(backend, messages, plan.step_tokens, tools)
    steps: list[dict[str, Any]] = []
    for i in range(plan.steps):
        if clock.left() < 5:
            say(f"agent run stopped after {i} steps: time budget")
            break
        call = ToolCallPart(id=f"call_{i}", name="search", arguments={"query": prompts.text(rng, 4).strip()})
        n_words = rng.randint(*plan.result_tokens) - 12
        result = json.dumps({"step": i, "results": [prompts.text(rng, n_words // 4).strip() for _ in range(4)]})
        messages.append(Message.assistant(tool_calls=[call]))
        tool_part = ToolResultPart(call_id=call.id, name="search", content=(TextPart(text=result),))
        messages.append(Message(role="tool", parts=(tool_part,)))
        row = _public(await _request(backend, messages, plan.step_tokens, tools))
        row["other_s"] = row["wall_s"] - row["prefill_s"] - row["decode_s"]
        steps.append(row)
    lat = [s["wall_s"] for s in steps]
    out: dict[str, Any] = {
        "history_tokens": first["input_tokens"],
        "history_request": _public(first),
        "steps_done": len(steps),
        "step_latency_s": lat,
        "step_prefill_tokens": [s["prefill_tokens"] for s in steps],
        "all_exact": all(s["exact"] for s in steps),
        "steps": steps,
    }
    if lat:
        out["step_ratio"] = lat[-1] / lat[0]
        out["step_ratio_definition"] = f"latency of step {len(lat)} / latency of step 1"
        out["median_later_over_first"] = statistics.median(lat[1:] or lat) / lat[0]
        out["final_tokens"] = steps[-1]["input_tokens"]
    return out


def reference_generate(model: Any, prompt_len: int, n: int) -> dict[str, Any]:
    """Raw transformers `generate()` (DynamicCache, greedy): n / (T(n+1 tokens) - T(1 token)), for reference."""
    import torch

    ids = torch.arange(1000, 1000 + prompt_len, device=model.device)[None]

    def gen(k: int) -> None:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k)

    gen(2)
    t_one = _timed(lambda: gen(1), 1)
    t_all = _timed(lambda: gen(n + 1), 1)
    return {"prompt": prompt_len, "new_tokens": n, "tok_s": n / (t_all - t_one)}


async def bench_mode(
    model: Any, tok: Any, mode: str, args: argparse.Namespace, plan: Plan, c: dict[str, Any], clock: Clock, save: Any
) -> dict[str, Any]:
    """All backend figures for one decode mode; each part bounded by the clock and saved as it ends."""
    res: dict[str, Any] = {}
    say = lambda text: clock.say(f"{mode}: {text}")  # noqa: E731
    try:
        t0 = time.perf_counter()
        backend = make_backend(model, tok, mode, args.ban)
        prompts = Prompts(backend, tok)
        res["backend_build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        await _request(backend, prompts.document(plan.decode_prompts[0] // 2, seed=1), plan.warm_tokens)
        res["first_request_s"] = time.perf_counter() - t0
        say(f"backend built, first request {res['first_request_s']:.2f} s (compile/capture when compiled)")
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"[:800]
        say(f"cannot run: {res['error']}")
        return res
    short_d, long_d = plan.decode_prompts
    short_p, long_p = plan.prefill_prompts
    parts: list[tuple[str, Any, int]] = [
        (f"decode_{short_d}", bench_decode, short_d),
        (f"prefill_{short_p}", bench_prefill, short_p),
        (f"prefill_{long_p}", bench_prefill, long_p),
        (f"decode_{long_d}", bench_decode, long_d),
    ]
    for key, fn, length in parts:
        if clock.left() < 20:
            res[key] = {"error": "skipped: time budget"}
            say(f"{key} skipped (time budget)")
            continue
        try:
            res[key] = await fn(backend, prompts, plan, length, c)
            r = res[key]
            say(
                f"{key}: {r['tok_s']:10.1f} tok/s  {r['frac']:.3f} of {r['ceiling_tok_s']:.0f} "
                f"(in {r['input_tokens']} prefilled {r['prefill_tokens']} out {r['output_tokens']} exact {r['exact']})"
            )
        except Exception as exc:
            res[key] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
            say(f"{key} failed: {res[key]['error']}")
        save()
    if clock.left() < 30:
        res["agent"] = {"error": "skipped: time budget"}
    else:
        try:
            res["agent"] = await agent_run(backend, prompts, plan, clock, say)
            a = res["agent"]
            lat = ", ".join(f"{x * 1000:.0f}" for x in a["step_latency_s"])
            say(f"agent run from {a['history_tokens']} tokens, step latencies ms: {lat}")
        except Exception as exc:
            res["agent"] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
            say(f"agent run failed: {res['agent']['error']}")
    save()
    backend.reset_cache()
    del backend, prompts
    gc.collect()
    if args.device != "cpu":
        import torch

        torch.cuda.empty_cache()
    return res


# -------------------------------------------------------------------------------------------- report


def _figure(results: dict[str, Any], mode: str, key: str, field: str) -> float:
    value = results["modes"].get(mode, {}).get(key, {}).get(field)
    return float(value) if isinstance(value, int | float) else float("nan")


def report(results: dict[str, Any], plan: Plan) -> tuple[float, float, float, float]:
    env, c = results["env"], results["ceilings"]
    print()
    print(f"== Phi-4-multimodal, random weights, through TransformersModel | {env['gpu']} | {env['date']}")
    print(f"   torch {env['torch']}, transformers {env['transformers']}, smoke: {env['smoke']}")
    nominal = c["nominal_bf16_flops"]
    print(
        f"   ceilings: copy {c['copy_bandwidth_Bps'] / 1e12:.2f} TB/s, {c['matmul']} matmul "
        f"{c['matmul_flops'] / 1e12:.0f} TFLOP/s (nominal {f'{nominal / 1e12:.0f}' if nominal else '?'}), "
        f"decoder {c['decoder_weight_bytes'] / 1e9:.2f} GB/token, KV {c['kv_bytes_per_token'] / 1e3:.0f} KB/token"
    )
    print(f"{'measure':<46}{'value':>16}{'ceiling':>12}{'fraction':>10}")
    for mode, res in results["modes"].items():
        if "error" in res:
            print(f"{mode:<46}  {res['error'][:100]}")
            continue
        print(f"{mode + ' first request (compile/capture)':<46}{res['first_request_s']:>14.2f} s")
        for key, r in res.items():
            if not key.startswith(("decode_", "prefill_")):
                continue
            if "error" in r:
                print(f"{mode + ' ' + key:<46}  {r['error'][:100]}")
                continue
            label = f"{mode} {key.replace('_', ' after ' if key.startswith('decode') else ' ')} tok"
            print(f"{label:<46}{r['tok_s']:>12.1f} t/s{r['ceiling_tok_s']:>12.0f}{r['frac']:>10.3f}")
        a = res.get("agent", {})
        if "step_ratio" in a:
            label = f"{mode} agent {a['steps_done']} steps from {a['history_tokens']}"
            lat = a["step_latency_s"]
            print(
                f"{label:<46}{lat[0] * 1000:>8.0f}->{lat[-1] * 1000:.0f} ms  ratio {a['step_ratio']:.3f} "
                f"(median later/first {a['median_later_over_first']:.3f}, exact {a['all_exact']})"
            )
        elif a:
            print(f"{mode + ' agent':<46}  {a.get('error', '?')[:100]}")
    ref = results.get("reference_generate")
    if ref and "tok_s" in ref:
        label = f"raw generate() {ref['new_tokens']} after {ref['prompt']} (reference)"
        print(f"{label:<46}{ref['tok_s']:>12.1f} t/s")
    modes = [m for m, r in results["modes"].items() if "error" not in r]
    head = "auto" if "auto" in modes else (modes[0] if modes else "")
    short_d, long_d = plan.decode_prompts
    decode = _figure(results, head, f"decode_{short_d}", "tok_s")
    decode_frac = _figure(results, head, f"decode_{short_d}", "frac")
    prefill_frac = _figure(results, head, f"prefill_{plan.prefill_prompts[0]}", "frac")
    ratio = float(results["modes"].get(head, {}).get("agent", {}).get("step_ratio", float("nan")))
    long_rate = _figure(results, head, f"decode_{long_d}", "tok_s")
    long_frac = _figure(results, head, f"decode_{long_d}", "frac")
    results["headline"] = {
        "mode": head,
        "decode_tok_s": decode,
        "decode_frac": decode_frac,
        "prefill_frac": prefill_frac,
        "step_ratio_32k": ratio,
    }
    if env["smoke"]:
        print("SMOKE: tiny model, short lengths; the fractions are against this machine's 'ceilings' and mean nothing")
    print(f"headline mode: {head or '-'}; decode_tok_s is after the {short_d}-token prompt")
    print(f"decode_tok_s_after_{long_d}={long_rate:.2f} decode_frac_after_{long_d}={long_frac:.4f}")
    print(
        f"decode_tok_s={decode:.2f} decode_frac={decode_frac:.4f} "
        f"prefill_frac={prefill_frac:.4f} step_ratio_32k={ratio:.4f}"
    )
    return decode, decode_frac, prefill_frac, ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", help="write all results to this file (rewritten after every part)")
    parser.add_argument("--config", help="folder holding the full-size config.json")
    parser.add_argument("--tokenizer", help="folder holding tokenizer.json")
    parser.add_argument("--smoke", action="store_true", help="tiny model, short lengths, CPU allowed")
    parser.add_argument("--decode", choices=["auto", "eager", "static", "compiled", "all"], default="all")
    parser.add_argument("--ban", choices=["weights", "processor"], default="weights", help="how stops are kept off")
    parser.add_argument("--attn", default="sdpa", help="attention implementation of the model")
    parser.add_argument("--budget-s", type=float, default=450.0, help="no part starts after this many seconds")
    parser.add_argument("--no-reference", action="store_true", help="skip the raw generate() reference line")
    parser.add_argument(
        "--no-cudnn-sdpa", action="store_true", help="disable PyTorch's cuDNN SDPA backend (flash/efficient instead)"
    )
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("SKIP: torch is not installed; the GPU benchmark needs torch with CUDA")
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("SKIP: no CUDA device; run benchmarks/phi4_gpu.py on a GPU machine (or --smoke for a CPU check)")
        return 0
    clock = Clock(args.budget_s)
    plan = SMOKE if args.smoke else FULL
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_grad_enabled(False)
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)

    import transformers
    from transformers import AutoTokenizer

    config_dir, tok_dir = _paths(args)
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "smoke": args.smoke,
        "decode": args.decode,
        "ban": args.ban,
        "attn": args.attn,
        "cudnn_sdpa": not args.no_cudnn_sdpa,
        "plan": plan.__dict__,
    }
    clock.say("env: " + json.dumps(env))
    results: dict[str, Any] = {"env": env, "modes": {}}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    t0 = time.perf_counter()
    model = build_model(config_dir, args.attn, args.device, args.smoke)
    if args.ban == "weights":
        silence_control_ids(model)
    _sync()
    env["build_s"] = time.perf_counter() - t0
    env["params"] = sum(p.numel() for p in model.parameters())
    clock.say(f"built {env['params'] / 1e9:.2f}B params in {env['build_s']:.1f} s")
    results["ceilings"] = c = measure_ceilings(model, args.device, args.smoke)
    clock.say("ceilings: " + json.dumps(c))
    save()

    modes = ["auto", "eager"] if args.decode == "all" else [args.decode]

    async def run_modes() -> None:
        for mode in modes:
            if clock.left() < 40:
                results["modes"][mode] = {"error": "skipped: time budget"}
                continue
            clock.say(f"mode {mode}")
            results["modes"][mode] = await bench_mode(model, tok, mode, args, plan, c, clock, save)
            save()

    asyncio.run(run_modes())
    if not args.no_reference and clock.left() > 60:
        try:
            results["reference_generate"] = reference_generate(model, plan.decode_prompts[0], plan.reference_tokens)
        except Exception as exc:
            results["reference_generate"] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
        clock.say(f"reference generate(): {json.dumps(results['reference_generate'])}")
    figures = report(results, plan)
    save()
    return 0 if all(math.isfinite(x) for x in figures) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
