"""GPU benchmark of the full-size Phi-4-multimodal architecture with random bf16 weights.

Builds `Phi4MultimodalForCausalLM` (transformers' native port) from the full-size config directly on
CUDA, then measures, at batch 1:

a. prefill tokens/s at several prompt lengths;
b. decode tokens/s through `generate()` (DynamicCache; StaticCache without compile; StaticCache with
   transformers' automatic torch.compile, in a bounded subprocess; flash_attention_2 when installed);
c. a 20-step agent-like run at 8K and 32K history, each step appending a ~100-300-token tool result and
   decoding 32 tokens, with and without KV reuse (raw transformers; and through
   `agent.models.transformers.TransformersModel` when that module imports).

Random weights run at the real model's speed. Figures are compared with the ceilings in DESIGN.md
(~390 tok/s decode, ~100K tok/s prefill on an H100). The last line reads
`decode_tok_s=<best decode variant> prefill_tok_s=<prefill at 8K> kv_reuse_speedup_8k=<raw run, wall time>`.

Measured pitfall (H100, torch 2.11, 2026-11-23): SDPA dispatches to cuDNN attention, which spends ~1.4-1.8 ms
of CPU per layer call on a sequence length it has not seen (about 1 s when it generates a new kernel). Eager
decode then runs ~90-100 ms/token on fresh lengths and ~36-40 ms/token on lengths seen before, so whichever
agent run goes first looks ~2x slower (`--order` swaps them). `--no-cudnn-sdpa` turns that backend off.

Usage: `python benchmarks/phi4_gpu.py [--json results.json]`. Without CUDA it prints a skip message and
exits 0. `--smoke` runs every code path on a tiny random model on the CPU (for checking the script).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DECODE_CEILING = 390.0  # tok/s, batch 1, H100 (DESIGN.md "Physical limits")
PREFILL_CEILING = 100_000.0  # tok/s, H100
LONGROPE_SWITCH = 4096  # original_max_position_embeddings: a cache must not cross it
COMPILE_TIMEOUT_S = 240
_WORDS_TEXT = (
    "agent tool result search query page image audio model token cache memory store context budget answer "
    "city river north south data value error retry call json list object field schema table row column "
    "weather price report summary source link title date year month week day hour minute second number "
    "alpha beta gamma delta first second third last next previous open close read write update delete"
)
WORDS = _WORDS_TEXT.split()


def _find(*candidates: Path) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise SystemExit(f"none of these exists: {', '.join(map(str, candidates))}")


def _default_paths() -> tuple[Path, Path]:
    config = _find(ROOT / ".device/phi4mm/native-config", ROOT.parent / "shared/phi4mm/native-config")
    tokenizer = _find(ROOT / ".device/phi4mm/tokenizer", ROOT.parent / "shared/phi4mm/tokenizer")
    return config, tokenizer


# ---------------------------------------------------------------------------------------------- setup


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


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds for `fn()` with the device drained before and after (CUDA events when on a GPU)."""
    import torch

    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0


def median_time(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(reps))


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(
        rng.choice(WORDS) + (str(rng.randint(0, 999)) if rng.random() < 0.1 else "") for _ in range(n_words)
    )


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def make_history(tok: Any, n_tokens: int, rng: random.Random) -> list[int]:
    """A Phi-4 chat prompt (system + tools + one long user document) of exactly `n_tokens` tokens."""
    head = _ids(tok, '<|system|>You are a research agent.<|tool|>[{"name": "search", "description": "Search the web"}]')
    head += _ids(tok, "<|/tool|><|end|><|user|>Read this document and answer with tool calls: ")
    tail = _ids(tok, "<|end|><|assistant|>")
    body: list[int] = []
    need = n_tokens - len(head) - len(tail)
    while len(body) < need:
        body += _ids(tok, _text(rng, 2000) + " ")
    return head + body[:need] + tail


def make_tool_results(tok: Any, steps: int, rng: random.Random) -> list[list[int]]:
    """Per step: end of the assistant turn, a JSON tool result of 100-300 tokens in all, a new assistant turn."""
    out = []
    for i in range(steps):
        target = rng.randint(100, 300)
        pre = _ids(tok, "<|end|><|tool_response|>")
        post = _ids(tok, "<|end|><|assistant|>")
        body = _ids(tok, json.dumps({"step": i, "results": [_text(rng, 40) for _ in range(8)]}))
        out.append(pre + body[: target - len(pre) - len(post)] + post)
    return out


# ------------------------------------------------------------------------------------------ measures


def bench_prefill(model: Any, tok_ids: list[int], lengths: list[int], reps: int) -> list[dict[str, Any]]:
    import torch
    from transformers import DynamicCache

    rows = []
    for n in lengths:
        ids = torch.tensor([tok_ids[:n]], device=model.device)

        def run(ids: Any = ids) -> None:
            model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)

        t = median_time(run, reps)
        rows.append({"tokens": n, "seconds": t, "tok_s": n / t, "frac_ceiling": n / t / PREFILL_CEILING})
        print(f"  prefill {n:>6} tokens: {t * 1000:8.1f} ms  {n / t:9.0f} tok/s", flush=True)
        del ids
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def bench_decode(model: Any, prompt: list[int], n_new: int, reps: int, **gen_kwargs: Any) -> dict[str, Any]:
    """Decode rate = n_new / (T(generate n_new+1) - T(generate 1)): the prefill cancels out."""
    import torch

    ids = torch.tensor([prompt], device=model.device)
    mask = torch.ones_like(ids)

    def gen(n: int) -> Any:
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, **gen_kwargs
        )

    t0 = time.perf_counter()
    out = gen(n_new + 1)  # warm-up (and compilation, when on)
    _sync()
    first_call_s = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + n_new + 1, out.shape
    t_one = median_time(lambda: gen(1), reps)
    t_all = median_time(lambda: gen(n_new + 1), reps, warmup=0)
    rate = n_new / (t_all - t_one)
    return {
        "prompt": len(prompt),
        "new_tokens": n_new,
        "first_call_s": first_call_s,
        "generate_s": t_all,
        "prefill_plus_one_s": t_one,
        "tok_s": rate,
        "ms_per_token": 1000 / rate,
        "frac_ceiling": rate / DECODE_CEILING,
    }


def agent_run_raw(
    model: Any, history: list[int], results: list[list[int]], decode_n: int, reuse: bool
) -> dict[str, Any]:
    """Steps of (append tool result, decode `decode_n` greedy tokens); prefill all or only the new tokens."""
    import torch
    from transformers import DynamicCache

    assert len(history) > LONGROPE_SWITCH, "history must start above the longrope switch (DESIGN.md pitfall 1)"
    dev = model.device
    ids = list(history)
    cache: Any = None
    pending: list[int] = []  # tokens of `ids` that the cache does not hold yet
    prefill_tokens = prefill_s = 0.0
    generated: list[list[int]] = []
    step_prefill_ms: list[float] = []
    step_decode_ms: list[float] = []
    retries0 = _alloc_retries()
    _sync()
    t_start = time.perf_counter()
    for result in results:
        ids.extend(result)
        if reuse and cache is not None:
            chunk = pending + result
        else:
            cache, chunk = DynamicCache(config=model.config), ids
        if reuse:
            assert cache.get_seq_length() + len(chunk) == len(ids)
        t0 = time.perf_counter()
        out = model(
            input_ids=torch.tensor([chunk], device=dev), past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        nxt = out.logits[:, -1].argmax(-1)
        _sync()
        t1 = time.perf_counter()
        prefill_s += t1 - t0
        step_prefill_ms.append(round((t1 - t0) * 1000, 1))
        prefill_tokens += len(chunk)
        toks = [nxt]
        for _ in range(decode_n - 1):
            out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1)
            toks.append(nxt)
        new = torch.cat(toks).tolist()
        step_decode_ms.append(round((time.perf_counter() - t1) * 1000, 1))
        generated.append(new)
        ids.extend(new)
        pending = [new[-1]]
    _sync()
    wall = time.perf_counter() - t_start
    return {
        "steps": len(results),
        "start_tokens": len(history),
        "final_tokens": len(ids),
        "prefill_tokens": int(prefill_tokens),
        "wall_s": wall,
        "prefill_s": prefill_s,
        "decode_s": wall - prefill_s,
        "step_prefill_ms": step_prefill_ms,
        "step_decode_ms": step_decode_ms,
        "alloc_retries": _alloc_retries() - retries0,
        "_generated": generated,
    }


def _alloc_retries() -> int:
    import torch

    return int(torch.cuda.memory_stats().get("num_alloc_retries", 0)) if torch.cuda.is_available() else 0


def reuse_logit_check(model: Any, history: list[int], result: list[int]) -> dict[str, Any]:
    """Last-position logits of history+result: cached history + prefill of `result` vs one full prefill."""
    import torch
    from transformers import DynamicCache

    dev = model.device
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([history], device=dev), past_key_values=cache, use_cache=True, logits_to_keep=1)
    a = model(input_ids=torch.tensor([result], device=dev), past_key_values=cache, use_cache=True, logits_to_keep=1)
    full = torch.tensor([history + result], device=dev)
    b = model(input_ids=full, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    la, lb = a.logits[0, -1].double(), b.logits[0, -1].double()
    top_a, top_b = la.topk(5).indices.tolist(), lb.topk(5).indices.tolist()
    return {
        "rel_l2": float((la - lb).norm() / lb.norm()),
        "max_abs": float((la - lb).abs().max()),
        "logit_std": float(lb.std()),
        "top1_equal": top_a[0] == top_b[0],
        "top5_overlap": len(set(top_a) & set(top_b)),
    }


def profile_decode(model: Any, history: list[int], result: list[int], n: int = 8) -> None:
    """Print where time goes: `n` decode steps after a full prefill vs after cached history + chunk."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    dev = model.device
    for label in ("after full prefill", "after cached history + chunk prefill"):
        cache = DynamicCache(config=model.config)
        if label.startswith("after full"):
            out = model(input_ids=torch.tensor([history + result], device=dev), past_key_values=cache, use_cache=True)
        else:
            model(input_ids=torch.tensor([history], device=dev), past_key_values=cache, use_cache=True)
            out = model(input_ids=torch.tensor([result], device=dev), past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
        del out
        _sync()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                nxt = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
            _sync()
        ms = (time.perf_counter() - t0) * 1000 / n
        print(f"--- profile: {n} decode steps {label}: {ms:.1f} ms/step (profiled)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=60))
        # chunk prefill on the cache just built
        chunk = torch.tensor([result[:200]], device=dev)
        _sync()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1)
            _sync()
        print(f"--- profile: one 200-token chunk prefill {label}: {(time.perf_counter() - t0) * 1000:.1f} ms")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))
        del cache


def agent_run_backend(
    model: Any, tok: Any, history_tokens: int, steps: int, kv_reuse: bool, force_crop: bool = False
) -> dict[str, Any]:
    """The same kind of run through the project's `TransformersModel` (messages in, `ModelResponse` out)."""
    from agent.messages import Message, TextPart, ToolCallPart, ToolDefinition, ToolResultPart
    from agent.models import ModelSettings
    from agent.models.transformers import TransformersModel

    rng = random.Random(7)

    def no_stop(input_ids: Any, scores: Any) -> Any:
        scores[..., 199999:200064] = float("-inf")  # control/tool ids: decode exactly max_tokens, as the raw run
        return scores

    backend = TransformersModel(model, tok, kv_reuse=kv_reuse, logits_processors=[no_stop])
    if force_crop:  # diagnostic: let the engine crop its sliding-window cache (window 262144 > any length here)
        backend._engine.crop_limit = None
    tools = [ToolDefinition(name="search", description="Search the web", parameters={"type": "object"})]
    doc = _text(rng, int(history_tokens * 0.9))
    doc_ids = _ids(tok, doc)[: history_tokens - 60]
    messages = [Message.system("You are a research agent."), Message.user(tok.decode(doc_ids))]
    settings = ModelSettings(max_tokens=32)

    async def go() -> dict[str, Any]:
        prefill = inputs = outputs = 0
        per_step = []
        _sync()
        t0 = time.perf_counter()
        for i in range(steps):
            response = await backend.request(messages, tools, settings)
            prefill += response.usage.prefill_tokens
            inputs += response.usage.input_tokens
            per_step.append(response.usage.prefill_tokens)
            outputs += response.usage.output_tokens
            if i == 0:
                assert response.usage.input_tokens > LONGROPE_SWITCH, response.usage
            call = ToolCallPart(id=f"call_{i}", name="search", arguments={"query": _text(rng, 4)})
            result = json.dumps({"results": [_text(rng, 6) for _ in range(rng.randint(4, 14))]})
            messages.append(Message.assistant(tool_calls=[call]))
            messages.append(
                Message(
                    role="tool",
                    parts=(ToolResultPart(call_id=call.id, name="search", content=(TextPart(text=result),)),),
                )
            )
        _sync()
        return {
            "steps": steps,
            "kv_reuse": kv_reuse,
            "wall_s": time.perf_counter() - t0,
            "prefill_tokens": prefill,
            "input_tokens": inputs,
            "output_tokens": outputs,
            "prefill_per_step": per_step,
        }

    return asyncio.run(go())


# --------------------------------------------------------------------------------------------- parts


def part_compile(args: argparse.Namespace) -> dict[str, Any]:
    """StaticCache + transformers' automatic torch.compile in generate() (run in its own process)."""
    config_dir, _ = _paths(args)
    model = build_model(config_dir, "sdpa", args.device, args.smoke)
    prompt = list(range(1000, 1000 + args.decode_prompt))
    res = bench_decode(model, prompt, args.decode_new, args.reps, cache_implementation="static")
    res["variant"] = "sdpa static + torch.compile (generate auto-compile, reduce-overhead)"
    return res


def _paths(args: argparse.Namespace) -> tuple[Path, Path]:
    config, tok = _default_paths()
    return Path(args.config) if args.config else config, Path(args.tokenizer) if args.tokenizer else tok


def _run_compile_subprocess(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "compile", "--device", args.device]
    cmd += ["--decode-prompt", str(args.decode_prompt), "--decode-new", str(args.decode_new), "--reps", str(args.reps)]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--no-cudnn-sdpa"] if args.no_cudnn_sdpa else []
    if args.config:
        cmd += ["--config", args.config]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.compile_timeout} s (build + compile + timing)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("COMPILE_RESULT "):
            res: dict[str, Any] = json.loads(line[len("COMPILE_RESULT ") :])
            res["subprocess_s"] = time.perf_counter() - t0
            return res
    return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}


def _flash_attn_status() -> str:
    try:
        import flash_attn

        return f"installed {getattr(flash_attn, '__version__', '?')}"
    except Exception as exc:  # ImportError, or a broken build
        return f"not installed ({type(exc).__name__})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write all results to this file")
    parser.add_argument("--config", help="folder holding the full-size config.json")
    parser.add_argument("--tokenizer", help="folder holding tokenizer.json")
    parser.add_argument("--smoke", action="store_true", help="tiny model, short lengths, CPU allowed")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--part", choices=["all", "compile"], default="all")
    parser.add_argument("--prefill", default="1024,8192,32768", help="comma-separated prefill lengths")
    parser.add_argument("--decode-prompt", type=int, default=1024)
    parser.add_argument("--decode-new", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--histories", default="8192,32768")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile-timeout", type=int, default=COMPILE_TIMEOUT_S)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--order", default="without,with", help="order of the agent runs")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables for decode steps")
    parser.add_argument(
        "--no-cudnn-sdpa", action="store_true", help="disable PyTorch's cuDNN SDPA backend (flash/efficient instead)"
    )
    parser.add_argument("--sections", default="prefill,decode,agent,backend", help="which of these to run")
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("SKIP: torch is not installed; the GPU benchmark needs torch with CUDA")
        return 0
    if args.smoke:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        args.prefill, args.decode_prompt, args.decode_new, args.reps = "64,256", 32, 8, 2
        args.histories, args.steps = "4200", 3
    elif not torch.cuda.is_available():
        print("SKIP: no CUDA device; run benchmarks/phi4_gpu.py on a GPU machine (or --smoke for a CPU check)")
        return 0
    torch.set_grad_enabled(False)
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.part == "compile":
        print("COMPILE_RESULT " + json.dumps(part_compile(args)), flush=True)
        return 0

    import transformers
    from transformers import AutoTokenizer

    config_dir, tok_dir = _paths(args)
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "flash_attn": _flash_attn_status(),
        "smoke": args.smoke,
        "cudnn_sdpa": not args.no_cudnn_sdpa,
    }
    print("env:", json.dumps(env), flush=True)
    results: dict[str, Any] = {"env": env}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))

    # Compilation first, in its own bounded process, while this one holds no GPU memory yet.
    sections = set(args.sections.split(","))
    if args.skip_compile or "decode" not in sections:
        compiled: dict[str, Any] = {"error": "skipped (--skip-compile)"}
    else:
        print(f"b'. decode with StaticCache + torch.compile (subprocess, {args.compile_timeout} s limit)", flush=True)
        compiled = _run_compile_subprocess(args)
        print(f"  {json.dumps(compiled)[:600]}", flush=True)
    results["decode_compiled"] = compiled
    save()

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    t0 = time.perf_counter()
    model = build_model(config_dir, "sdpa", args.device, args.smoke)
    _sync()
    n_params = sum(p.numel() for p in model.parameters())
    lm_params = sum(p.numel() for p in model.model.layers.parameters()) + model.model.embed_tokens.weight.numel()
    env.update(build_s=time.perf_counter() - t0, params=n_params, lm_params=lm_params)
    print(f"built {n_params / 1e9:.2f}B params ({lm_params / 1e9:.2f}B language model) in {env['build_s']:.1f} s")
    rng = random.Random(0)
    lengths = [int(x) for x in args.prefill.split(",")]
    histories = [int(x) for x in args.histories.split(",")]
    corpus = make_history(tok, max([*lengths, *histories, args.decode_prompt]), rng)

    if "prefill" in sections:
        print("a. prefill (sdpa, batch 1, DynamicCache, logits of the last position only)", flush=True)
        results["prefill"] = {"sdpa": bench_prefill(model, corpus, lengths, args.reps)}
        save()
    if "decode" in sections:
        results["decode"] = _decode_section(model, corpus[: args.decode_prompt], corpus, lengths, args, env, results)
        results["decode"]["sdpa static + torch.compile"] = compiled
        save()
    if "agent" in sections:
        results["agent_raw"] = {}
        _agent_section(model, tok, corpus, histories, args, results["agent_raw"], save)
    if "backend" in sections:
        results["agent_backend"] = _backend_section(model, tok, histories, args)
    save()
    _report(results, histories)
    save()
    return 0


def _decode_section(
    model: Any, prompt: list[int], corpus: list[int], lengths: list[int], args: Any, env: Any, results: Any
) -> dict[str, Any]:
    print("b. decode (generate, batch 1, greedy)", flush=True)
    decode: dict[str, Any] = {}
    for name, kw in [
        ("sdpa dynamic", {}),
        ("sdpa static, no compile", {"cache_implementation": "static", "disable_compile": True}),
    ]:
        try:
            decode[name] = bench_decode(model, prompt, args.decode_new, args.reps, **kw)
        except Exception as exc:
            decode[name] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
        print(f"  {name}: {json.dumps(decode[name], default=str)[:300]}", flush=True)
    if env["flash_attn"].startswith("installed"):
        try:
            model.set_attn_implementation("flash_attention_2")
            decode["flash_attention_2 dynamic"] = bench_decode(model, prompt, args.decode_new, args.reps)
            results["prefill"]["flash_attention_2"] = bench_prefill(model, corpus, lengths, args.reps)
        except Exception as exc:
            decode["flash_attention_2 dynamic"] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
        finally:
            model.set_attn_implementation("sdpa")
    else:
        decode["flash_attention_2"] = {"error": env["flash_attn"]}
    return decode


def _agent_section(
    model: Any, tok: Any, corpus: list[int], histories: list[int], args: Any, agent: dict[str, Any], save: Any
) -> None:
    import torch

    rng = random.Random(1)
    print(f"c. agent run, raw transformers ({args.steps} steps: +100-300 tool tokens, 32 decoded tokens)", flush=True)
    for h in histories:
        hist = corpus[:h] if h <= len(corpus) else make_history(tok, h, rng)
        hist = hist[: h - 2] + _ids(tok, "<|end|><|assistant|>")
        tool_results = make_tool_results(tok, args.steps, random.Random(h))
        agent_run_raw(model, hist[: LONGROPE_SWITCH + 100], tool_results[:1], 4, True)  # warm-up
        runs: dict[str, Any] = {"logit_check": reuse_logit_check(model, hist, tool_results[0])}
        if args.profile and h == histories[0]:
            profile_decode(model, hist, tool_results[0])
        for key in args.order.split(","):
            runs[key] = agent_run_raw(model, hist, tool_results, 32, key == "with")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        gen_a, gen_b = runs["without"].pop("_generated"), runs["with"].pop("_generated")
        same = sum(x == y for a, b in zip(gen_a, gen_b, strict=True) for x, y in zip(a, b, strict=True))
        runs["token_agreement"] = same / sum(len(a) for a in gen_a)
        runs["speedup_wall"] = runs["without"]["wall_s"] / runs["with"]["wall_s"]
        runs["speedup_prefill"] = runs["without"]["prefill_s"] / runs["with"]["prefill_s"]
        runs["prefill_token_ratio"] = runs["without"]["prefill_tokens"] / runs["with"]["prefill_tokens"]
        agent[str(h)] = runs
        print(f"  {h}: {json.dumps(runs)}", flush=True)
        save()


def _backend_section(model: Any, tok: Any, histories: list[int], args: Any) -> dict[str, Any]:
    print("c'. agent run through agent.models.transformers.TransformersModel", flush=True)
    backend: dict[str, Any] = {}
    sys.path.insert(0, str(ROOT))
    try:
        importlib.import_module("agent.models.transformers")
    except Exception as exc:
        backend["error"] = f"not available: {type(exc).__name__}: {exc}"[:600]
    else:
        for key in ("with", "without", "with_crop_forced"):
            reuse = key != "without"
            try:
                backend[key] = agent_run_backend(model, tok, histories[0], args.steps, reuse, key == "with_crop_forced")
            except Exception as exc:
                backend[key] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
            print(f"  {key}: {json.dumps(backend[key])[:400]}", flush=True)
        if "wall_s" in backend.get("with", {}) and "wall_s" in backend.get("without", {}):
            backend["speedup_wall"] = backend["without"]["wall_s"] / backend["with"]["wall_s"]
    print(f"  {json.dumps(backend)[:300]}", flush=True)
    return backend


def _report(results: dict[str, Any], histories: list[int]) -> None:
    env = results["env"]
    print()
    print(f"== Phi-4-multimodal full-size, random bf16 weights | {env['gpu']} | {env['date']}")
    print(f"   torch {env['torch']}, transformers {env['transformers']}, flash_attn: {env['flash_attn']}")
    print(f"{'measure':<52}{'value':>14}{'ceiling frac':>14}")
    for attn, rows in results.get("prefill", {}).items():
        for r in rows:
            label = f"prefill {r['tokens']} tok ({attn})"
            print(f"{label:<52}{r['tok_s']:>10.0f} t/s{r['frac_ceiling']:>14.3f}")
    best = 0.0
    for name, r in results.get("decode", {}).items():
        if "tok_s" in r:
            best = max(best, r["tok_s"])
            label = f"decode {r['new_tokens']} after {r['prompt']} ({name})"
            print(f"{label:<52}{r['tok_s']:>10.1f} t/s{r['frac_ceiling']:>14.3f}")
        else:
            print(f"{'decode (' + name + ')':<52}  {r.get('error', '?')[:90]}")
    for h, runs in results.get("agent_raw", {}).items():
        for key in ("without", "with"):
            r = runs[key]
            label = f"agent raw {h} {key} reuse: wall s / prefill tok"
            print(f"{label:<52}{r['wall_s']:>12.2f} s{r['prefill_tokens']:>14}")
        label = f"agent raw {h} speedup wall / prefill-time"
        print(f"{label:<52}{runs['speedup_wall']:>12.2f} x{runs['speedup_prefill']:>12.2f} x")
    backend = results.get("agent_backend", {})
    if "error" in backend:
        print(f"{'agent TransformersModel':<52}  {backend['error'][:90]}")
    for key in ("without", "with", "with_crop_forced"):
        r = backend.get(key)
        if r is None:
            continue
        if "wall_s" in r:
            label = f"agent TransformersModel {histories[0]} {key} reuse"
            print(f"{label:<52}{r['wall_s']:>12.2f} s{r['prefill_tokens']:>14}")
        else:
            print(f"{'agent TransformersModel ' + key:<52}  {r.get('error', '?')[:90]}")
    rows = results.get("prefill", {}).get("sdpa", [])
    prefill_8k = next((r["tok_s"] for r in rows if r["tokens"] == 8192), rows[-1]["tok_s"] if rows else float("nan"))
    speedup = results.get("agent_raw", {}).get(str(histories[0]), {}).get("speedup_wall", float("nan"))
    best = best or float("nan")
    print(f"decode_tok_s={best:.1f} prefill_tok_s={prefill_8k:.0f} kv_reuse_speedup_8k={speedup:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
