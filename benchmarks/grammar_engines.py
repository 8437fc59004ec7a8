"""Grammar engines for JSON-schema constrained decoding, compared on Phi-4's 200,064-token vocabulary (CPU only).

Candidates: llguidance (the engine `agent/models/_grammar/` uses), xgrammar, outlines-core and
lm-format-enforcer, each through its own JSON-schema API:

- llguidance: `llguidance.hf.from_tokenizer`, `LLMatcher.grammar_from_json_schema` + `LLMatcher` (one pristine
  matcher per schema, `deep_copy` per generation), `llguidance.numpy.fill_next_token_bitmask`, `consume_token`;
- xgrammar: `TokenizerInfo.from_huggingface`, `GrammarCompiler.compile_json_schema` (cache off, 1 thread),
  `GrammarMatcher.fill_next_token_bitmask`, `accept_token`;
- outlines-core: `Vocabulary` from the token bytes, `json_schema.build_regex_from_schema` + `Index` (the
  regex's token index over the whole vocabulary), `Guide.write_mask_into`, `Guide.advance`;
- lm-format-enforcer: `TokenEnforcerTokenizerData` (the prefix tree over the whole vocabulary) built from the
  token strings, `JsonSchemaParser` + `TokenEnforcer.get_allowed_tokens` (default list mode). Its transformers
  integration does not import under transformers 5 (`transformers.tokenization_utils` is gone), so the
  tokenizer data is built here the way that integration describes it (every id but EOS a regular token).

Two more rows run llguidance and xgrammar on the schema as the project prepares it
(`agent.models._grammar._build.prepare_schema`: calendar-exact date patterns instead of `format: date`,
`additionalProperties: false` on open objects; llguidance also gets the project's `with_options` layout).

Every engine gets the same EOS (<|endoftext|>, 199999) and compact JSON (no free whitespace: llguidance
`whitespace_flexible: false`, xgrammar `any_whitespace=False`, outlines-core `whitespace_pattern=""`,
lm-format-enforcer `LMFE_MAX_CONSECUTIVE_WHITESPACES=0`). Each engine runs in its own child process (clean
peak RSS, no shared caches) with 1 thread.

Per engine:
1. setup: the per-tokenizer work (vocabulary index / token tables), once per tokenizer;
2. compile each of `--schemas` tool parameter schemas from `agent.models._grammar._schemas.random_tools` (the
   schemas Pydantic emits: $defs/$ref, enums, const, anyOf null, nested and recursive models, arrays, tuples,
   maps, numeric bounds incl. exclusive, string lengths, patterns, date/uuid formats), cold, one at a time;
3. `--samples` generations per compiled schema: each step takes the engine's allowed-token bitmask, picks a
   token uniformly among the allowed ones (rejection sampling over the vocabulary, then the full list), and
   advances the engine. After `--soft-cap` tokens the pick prefers EOS and allowed tokens such as `"`, `}`,
   `"]` (made of `"}],` only: they close strings, arrays and objects), then ones starting with `,` (ends a
   number), so random text ends; `--hard-cap` ends it for good (counted as unfinished).
   The picks depend only on the allowed set and a seed per (schema, sample), so engines that allow the same
   tokens write the same outputs;
4. each output that ended with EOS is decoded (strict UTF-8, strict JSON) and validated with jsonschema
   (Draft 2020-12, FormatChecker). Outputs holding an added token other than EOS (<|tool_call|>, <|end|>,
   ...) are counted apart: they validate as text, but such a token inside a JSON string breaks a chat format.

Mask time per token = computing the allowed-token mask for one step + advancing by the picked token (for
lm-format-enforcer one `get_allowed_tokens` call does both); the pick itself is not timed.

outlines-core (compile takes seconds per schema) and lm-format-enforcer (tens of ms to seconds per token)
run reduced by default: every other schema, fewer samples, and a per-generation deadline; the output says so.
`--full` gives them the same settings as the others. `--budget` caps each engine's generation time.

Setup (other engines beside the project venv, which has llguidance)::

    .venv/bin/pip install --no-deps --target /tmp/enginecmp xgrammar==0.2.8 outlines-core==0.2.14 \\
        lm-format-enforcer==0.11.3 apache-tvm-ffi interegular
    PYTHONPATH=/tmp/enginecmp nice -n 10 .venv/bin/python benchmarks/grammar_engines.py [--machine LABEL]

A missing engine prints `skipped: <reason>`. Last line: `best=<engine> mask_ms_median=<float>`, the engine
with full coverage (all schemas compiled, every finished output valid, no engine error, no added token) and
the lowest median mask time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENIZER = ROOT.parent / "shared" / "phi4mm" / "tokenizer"
EOS = 199999  # <|endoftext|>
# engine -> (module, distribution)
PACKAGES = {
    "llguidance": ("llguidance", "llguidance"),
    "llguidance+prep": ("llguidance", "llguidance"),
    "xgrammar": ("xgrammar", "xgrammar"),
    "xgrammar+prep": ("xgrammar", "xgrammar"),
    "outlines-core": ("outlines_core", "outlines-core"),
    "lm-format-enforcer": ("lmformatenforcer", "lm-format-enforcer"),
}
ENGINES = tuple(PACKAGES)
# Reduced runs for the slow engines: (every n-th schema, samples per schema, seconds per generation).
REDUCED = {"outlines-core": (2, 5, 10.0), "lm-format-enforcer": (2, 1, 2.0)}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# ------------------------------------------------------------------ shared inputs


def tool_schemas(count: int, seed: int) -> list[dict[str, Any]]:
    """`count` tool parameter schemas from the project's random registries (deterministic in `seed`)."""
    from agent.models._grammar._schemas import random_tools

    rng = random.Random(seed)
    schemas: list[dict[str, Any]] = []
    while len(schemas) < count:
        schemas.extend(tool.parameters for tool in random_tools(rng))
    return schemas[:count]


def byte_level_table() -> dict[str, int]:
    """The byte-level BPE alphabet: the printable character standing for each byte value."""
    direct = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in direct}
    shifted = 0
    for b in range(256):
        if b not in direct:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def token_bytes(tokenizer: Any) -> list[bytes]:
    """The bytes each id stands for (added tokens: their text)."""
    table = byte_level_table()
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [added[i].encode() if i in added else bytes(table[ch] for ch in piece) for i, piece in enumerate(pieces)]


FEATURES = {
    "$ref": '"$ref"',
    "anyOf": '"anyOf"',
    "enum": '"enum"',
    "const": '"const"',
    "map": '"additionalProperties": {',
    "tuple": '"prefixItems"',
    "exclusive bounds": '"exclusiveM',
    "string length": 'Length"',
    "pattern": '"pattern"',
    "format": '"format"',
    "recursive": '"#/$defs/Tree"',
}


def feature_counts(schemas: Sequence[dict[str, Any]]) -> str:
    """How many schemas use each feature (a substring test on the schema text)."""
    texts = [json.dumps(schema) for schema in schemas]
    return ", ".join(f"{name} {sum(key in text for text in texts)}" for name, key in FEATURES.items())


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ engines (child process)


class Engine:
    """One engine's natural JSON-schema API: constructor (setup) once, `compile` per schema, `start` per run."""

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.words = (vocab + 31) // 32

    def compile(self, schema: dict[str, Any]) -> Any:
        raise NotImplementedError

    def start(self, compiled: Any) -> Session:
        raise NotImplementedError


class Session:
    """One generation: `mask()` computes the allowed tokens (timed), `words(mask)` turns them into int32 bitmask
    words (not timed), `advance(token)` consumes one token (timed)."""

    def mask(self) -> Any:
        raise NotImplementedError

    def words(self, mask: Any) -> Any:
        return mask

    def advance(self, token: int) -> bool:
        raise NotImplementedError

    def error(self) -> str | None:
        return None


class LLGuidance(Engine):
    def __init__(self, tokenizer: Any, vocab: int) -> None:
        super().__init__(tokenizer, vocab)
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        self.llg = llguidance
        self.fill = llguidance.numpy.fill_next_token_bitmask
        self.alloc = llguidance.numpy.allocate_token_bitmask
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=EOS)

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = self.llg.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def start(self, compiled: Any) -> Session:
        return LLGuidanceSession(self, compiled.deep_copy())


class LLGuidanceSession(Session):
    def __init__(self, engine: LLGuidance, matcher: Any) -> None:
        self.engine = engine
        self.matcher = matcher
        self.bitmask = engine.alloc(1, engine.vocab)

    def mask(self) -> Any:
        self.engine.fill(self.matcher, self.bitmask, 0)
        return self.bitmask[0]

    def advance(self, token: int) -> bool:
        return bool(self.matcher.consume_token(token))

    def error(self) -> str | None:
        return str(self.matcher.get_error()) if self.matcher.is_error() else None


class LLGuidancePrepared(LLGuidance):
    """llguidance as the project runs it: `agent.models._grammar._build.prepare_schema` (calendar-exact date/date-time
    patterns instead of the engine's format, `additionalProperties: false` on open objects) and `with_options`
    (no free whitespace, `", "` and `": "` separators)."""

    def compile(self, schema: dict[str, Any]) -> Any:
        from agent.models._grammar._build import prepare_schema, with_options

        prepared, problems = prepare_schema(schema)
        if problems:
            raise ValueError("; ".join(problems))
        return super().compile(with_options(prepared))


class XGrammar(Engine):
    def __init__(self, tokenizer: Any, vocab: int) -> None:
        super().__init__(tokenizer, vocab)
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[EOS])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.special_tokens = len(info.special_token_ids)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(schema, any_whitespace=False)

    def start(self, compiled: Any) -> Session:
        return XGrammarSession(self, self.xgr.GrammarMatcher(compiled))


class XGrammarSession(Session):
    def __init__(self, engine: XGrammar, matcher: Any) -> None:
        self.matcher = matcher
        self.bitmask = engine.xgr.allocate_token_bitmask(1, engine.vocab)
        self.view = self.bitmask.numpy()[0]

    def mask(self) -> Any:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        return self.view

    def advance(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))


class XGrammarPrepared(XGrammar):
    """xgrammar on the same prepared schema as `LLGuidancePrepared` (the engine-neutral part: no `x-guidance`)."""

    def compile(self, schema: dict[str, Any]) -> Any:
        from agent.models._grammar._build import prepare_schema

        prepared, problems = prepare_schema(schema)
        if problems:
            raise ValueError("; ".join(problems))
        return super().compile(prepared)


class OutlinesCore(Engine):
    def __init__(self, tokenizer: Any, vocab: int) -> None:
        super().__init__(tokenizer, vocab)
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.oc = outlines_core
        self.build_regex = build_regex_from_schema
        ids: dict[bytes, list[int]] = {}
        for i, piece in enumerate(token_bytes(tokenizer)):
            if i != EOS:
                ids.setdefault(piece, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(EOS, ids)

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.build_regex(json.dumps(schema), whitespace_pattern="")
        return self.oc.Index(regex, self.vocabulary)

    def start(self, compiled: Any) -> Session:
        return OutlinesSession(self, self.oc.Guide(compiled))


class OutlinesSession(Session):
    def __init__(self, engine: OutlinesCore, guide: Any) -> None:
        import numpy as np

        self.guide = guide
        self.bitmask = np.zeros(engine.words, dtype=np.int32)

    def mask(self) -> Any:
        self.guide.write_mask_into(self.bitmask.ctypes.data, self.bitmask.size, 4)
        return self.bitmask

    def advance(self, token: int) -> bool:
        self.guide.advance(token, return_tokens=False)
        return True


class FormatEnforcer(Engine):
    def __init__(self, tokenizer: Any, vocab: int) -> None:
        super().__init__(tokenizer, vocab)
        os.environ["LMFE_MAX_CONSECUTIVE_WHITESPACES"] = "0"
        import lmformatenforcer

        self.lmfe = lmformatenforcer
        pieces = token_bytes(tokenizer)
        regular = [(i, piece.decode("utf-8", errors="replace"), False) for i, piece in enumerate(pieces) if i != EOS]

        def decode(ids: list[int]) -> str:
            return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace").rstrip("\ufffd")

        self.data = lmformatenforcer.TokenEnforcerTokenizerData(regular, decode, EOS, False, vocab)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.lmfe.JsonSchemaParser(schema)

    def start(self, compiled: Any) -> Session:
        return FormatEnforcerSession(self, self.lmfe.TokenEnforcer(self.data, compiled))


class FormatEnforcerSession(Session):
    """`get_allowed_tokens(prefix)` applies the last token and computes the list: all the work is in `mask`."""

    def __init__(self, engine: FormatEnforcer, enforcer: Any) -> None:
        import numpy as np

        self.np = np
        self.enforcer = enforcer
        self.prefix: list[int] = []
        self.flags = np.zeros(engine.words * 32, dtype=bool)

    def mask(self) -> Any:
        return self.enforcer.get_allowed_tokens(self.prefix).allowed_tokens

    def words(self, allowed: Any) -> Any:
        self.flags[:] = False
        self.flags[self.np.fromiter(allowed, dtype=self.np.int64, count=len(allowed))] = True
        return self.np.packbits(self.flags, bitorder="little").view(self.np.uint32)

    def advance(self, token: int) -> bool:
        self.prefix.append(token)
        return True


ADAPTERS: dict[str, Callable[[Any, int], Engine]] = {
    "llguidance": LLGuidance,
    "llguidance+prep": LLGuidancePrepared,
    "xgrammar": XGrammar,
    "xgrammar+prep": XGrammarPrepared,
    "outlines-core": OutlinesCore,
    "lm-format-enforcer": FormatEnforcer,
}


# ------------------------------------------------------------------ sampling and checking


class Picker:
    """Uniform choice among the allowed tokens of a bitmask; after the soft cap, closing tokens first.

    Closing tiers: EOS and tokens made of `"}],` only that start with `}`, `]` or `"` (`"`, `"}`, `]]`, ...:
    they end a string, array or object, or are a short piece of string content), else tokens starting with `,`
    (end a number whose object still needs keys), else any allowed token.
    """

    def __init__(self, pieces: list[bytes], vocab: int) -> None:
        import numpy as np

        self.np = np
        self.vocab = vocab
        closers = set(b'"}],')
        first = [i for i, p in enumerate(pieces) if p[:1] in (b"}", b"]", b'"') and set(p) <= closers and i != EOS]
        then = [i for i, p in enumerate(pieces) if p[:1] == b","]
        self.tiers = []
        for ids in ([*first, EOS], then):
            tier = np.array(ids, dtype=np.int64)
            self.tiers.append((tier, tier >> 5, (tier & 31).astype(np.uint32)))

    def allowed(self, words: Any) -> Any:
        np = self.np
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.vocab]
        return np.flatnonzero(bits)

    def pick(self, words: Any, rng: random.Random, closing: bool) -> int | None:
        np = self.np
        for ids, word, bit in self.tiers if closing else ():
            candidates = ids[((words.view(np.uint32)[word] >> bit) & 1).astype(bool)]
            if len(candidates):
                return int(candidates[rng.randrange(len(candidates))])
        view = words.view(np.uint32)
        for _ in range(48):
            token = rng.randrange(self.vocab)
            if (int(view[token >> 5]) >> (token & 31)) & 1:
                return token
        ids = self.allowed(words)
        return int(ids[rng.randrange(len(ids))]) if len(ids) else None


def violation(text: bytes, validator: Any) -> str | None:
    """None when `text` is valid JSON meeting the validator's schema, else the failed keyword (`format:uuid`)."""
    import jsonschema

    try:
        value = json.loads(text.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        return "not UTF-8"
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg})"
    except ValueError:
        return "not JSON"
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    keyword = str(error.validator)
    return f"format:{error.validator_value}" if keyword == "format" else keyword


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def generate(
    session: Session,
    picker: Picker,
    rng: random.Random,
    args: argparse.Namespace,
    deadline: float,
) -> tuple[str, list[int], list[float], str | None]:
    """(outcome, tokens, step seconds, error). Outcome: done, unfinished (hard cap), stuck, error, timeout."""
    tokens: list[int] = []
    steps: list[float] = []
    advance_seconds = 0.0
    end = time.perf_counter() + deadline
    for step in range(args.hard_cap):
        t0 = time.perf_counter()
        mask = session.mask()
        steps.append(time.perf_counter() - t0 + advance_seconds)
        token = picker.pick(session.words(mask), rng, closing=step >= args.soft_cap)
        if token is None:
            return "stuck", tokens, steps, session.error() or "no allowed token"
        if token == EOS:
            return "done", tokens, steps, None
        tokens.append(token)
        t0 = time.perf_counter()
        try:
            accepted = session.advance(token)
        except Exception as exc:
            return "error", tokens, steps, f"{type(exc).__name__}: {exc}"
        advance_seconds = time.perf_counter() - t0
        if not accepted:
            return "error", tokens, steps, session.error() or "token not accepted"
        if time.perf_counter() > end:
            return "timeout", tokens, steps, None
    return "unfinished", tokens, steps, None


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run one engine; the result as a JSON-able dict."""
    import logging

    name = args.child
    try:
        __import__(PACKAGES[name][0])
    except Exception as exc:
        return {"engine": name, "skipped": f"{type(exc).__name__}: {exc}"}

    from transformers import PreTrainedTokenizerFast

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    import jsonschema

    engine_errors: list[str] = []

    class Count(logging.Handler):  # lm-format-enforcer logs its internal failures and forces EOS
        def emit(self, record: logging.LogRecord) -> None:
            engine_errors.append(record.getMessage().splitlines()[0][:160])

    logging.getLogger().addHandler(Count(level=logging.ERROR))

    tokenizer = PreTrainedTokenizerFast.from_pretrained(TOKENIZER)
    vocab = len(tokenizer)
    pieces = token_bytes(tokenizer)
    added = {i for i in tokenizer.added_tokens_decoder if i != EOS}
    schemas = tool_schemas(args.schemas, args.seed)
    stride, samples, deadline = (1, args.samples, args.deadline)
    if name in REDUCED and not args.full:
        stride, samples, deadline = REDUCED[name]
    chosen = list(range(0, len(schemas), stride))
    picker = Picker(pieces, vocab)
    checker = jsonschema.FormatChecker()
    baseline = peak_rss_mib()

    t0 = time.perf_counter()
    try:
        engine = ADAPTERS[name](tokenizer, vocab)
    except Exception as exc:
        return {"engine": name, "skipped": f"setup failed: {type(exc).__name__}: {str(exc)[:200]}"}
    setup_s = time.perf_counter() - t0
    setup_rss = peak_rss_mib()

    compile_ms: list[float] = []
    compiled: dict[int, Any] = {}
    compile_failures: Counter[str] = Counter()
    for index in chosen:
        t0 = time.perf_counter()
        try:
            compiled[index] = engine.compile(schemas[index])
        except Exception as exc:
            compile_failures[f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:140]}"] += 1
            continue
        compile_ms.append((time.perf_counter() - t0) * 1e3)

    outcomes: Counter[str] = Counter()
    invalid: Counter[str] = Counter()
    examples: dict[str, str] = {}
    errors: Counter[str] = Counter()
    step_ms: list[float] = []
    tokens_out = with_added = not_run = 0
    budget_end = time.perf_counter() + args.budget
    for index, grammar in compiled.items():
        for sample in range(samples):
            if time.perf_counter() > budget_end:
                not_run += 1
                continue
            session = engine.start(grammar)
            rng = random.Random(f"{args.seed}:{index}:{sample}")
            before = len(engine_errors)
            outcome, tokens, steps, error = generate(session, picker, rng, args, deadline)
            step_ms.extend(s * 1e3 for s in steps[1:])  # the first mask of a fresh matcher is a start cost
            tokens_out += len(tokens)
            with_added += any(t in added for t in tokens)
            if len(engine_errors) > before:
                outcome, error = "error", engine_errors[before]
            if error:
                errors[error[:160]] += 1
            if outcome == "done":
                validator = jsonschema.Draft202012Validator(schemas[index], format_checker=checker)
                found = violation(b"".join(pieces[t] for t in tokens), validator)
                if found is None:
                    outcome = "valid"
                else:
                    outcome = "invalid"
                    invalid[found] += 1
                    text = b"".join(pieces[t] for t in tokens).decode("utf-8", errors="replace")
                    examples.setdefault(found, text if len(text) <= 160 else text[:157] + "...")
            outcomes[outcome] += 1

    generations = sum(outcomes.values())
    return {
        "engine": name,
        "version": metadata.version(PACKAGES[name][1]),
        "setup_s": setup_s,
        "attempted": len(chosen),
        "of_schemas": len(schemas),
        "compiled": len(compiled),
        "compile_failures": dict(compile_failures),
        "samples": samples,
        "deadline_s": deadline,
        "reduced": name in REDUCED and not args.full,
        "generations": generations,
        "not_run": not_run,
        "outcomes": dict(outcomes),
        "invalid": dict(invalid),
        "examples": examples,
        "errors": dict(errors.most_common(5)),
        "with_added": with_added,
        "tokens_per_generation": tokens_out / max(1, generations),
        "compile_ms": [percentile(compile_ms, 50), percentile(compile_ms, 90)],
        "compile_total_s": sum(compile_ms) / 1e3,
        "mask_ms": [percentile(step_ms, 50), percentile(step_ms, 90)],
        "mask_steps": len(step_ms),
        "rss_mib": [baseline, setup_rss, peak_rss_mib()],
        "special_tokens": getattr(engine, "special_tokens", None),
    }


# ------------------------------------------------------------------ driver (parent process)


def run_child(name: str, args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **dict.fromkeys(THREAD_VARS, "1"))
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"engine": name, "skipped": f"timed out after {args.child_timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"engine": name, "skipped": f"child failed (rc {done.returncode}): {tail[:200]}"}
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    stderr = [line for line in dict.fromkeys(done.stderr.splitlines()) if line.strip()]
    result["stderr"] = stderr[:3]
    return result


def full_coverage(r: dict[str, Any]) -> bool:
    out = r["outcomes"]
    return (
        r["compiled"] == r["attempted"] == r["of_schemas"]
        and r["generations"] > 0
        and r["not_run"] == 0
        and not out.get("invalid")
        and not out.get("stuck")
        and not out.get("error")
        and not r["with_added"]
    )


def versions_line() -> str:
    names = [
        "torch",
        "transformers",
        "tokenizers",
        "jsonschema",
        "pydantic",
        *dict.fromkeys(d for _, d in PACKAGES.values()),
    ]
    found = []
    for package in names:
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} -")
    return ", ".join(found)


def report(results: list[dict[str, Any]], args: argparse.Namespace, wall: float) -> None:
    header = (
        f"{'engine':<19} {'version':<9} {'setup s':>7} {'compiled':>9} {'valid/total':>11} {'invalid':>7} "
        f"{'unfin/stuck/err/tmo':>19} {'added':>5} {'compile ms med/p90':>18} {'mask ms med/p90':>16} {'RSS MiB':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if "skipped" in r:
            print(f"{r['engine']:<19} skipped: {r['skipped']}")
            continue
        out = r["outcomes"]
        incomplete = "/".join(str(out.get(k, 0)) for k in ("unfinished", "stuck", "error", "timeout"))
        compiled = f"{r['compiled']}/{r['attempted']}" + ("*" if r["attempted"] < r["of_schemas"] else "")
        cms, mms = r["compile_ms"], r["mask_ms"]
        print(
            f"{r['engine']:<19} {r['version']:<9} {r['setup_s']:7.2f} {compiled:>9} "
            f"{out.get('valid', 0):>5}/{r['generations']:<5} {out.get('invalid', 0):>7} {incomplete:>19} "
            f"{r['with_added']:>5} {cms[0]:8.2f}/{cms[1]:<9.2f} {mms[0]:7.3f}/{mms[1]:<8.3f} {r['rss_mib'][2]:8.0f}"
        )
    print()
    print(
        "setup = per-tokenizer work (vocabulary index/tables), once per tokenizer. compiled: * = reduced schema "
        "subset. unfin = hit the token cap, stuck = no allowed token, err = engine error, tmo = per-generation "
        "deadline. added = outputs holding an added token (<|tool_call|>, <|end|>, ...) other than EOS. "
        "mask = mask + advance per token. RSS = peak of the engine's own process (tokenizer loaded: see notes)."
    )
    print()
    for r in results:
        if "skipped" in r:
            continue
        notes = [
            f"{r['samples']} samples/schema over {r['attempted']} of {r['of_schemas']} schemas"
            + (f", {r['deadline_s']:.0f} s per generation (reduced: slow engine)" if r["reduced"] else ""),
            f"{r['tokens_per_generation']:.1f} tokens/generation, {r['mask_steps']} timed steps, compile total "
            f"{r['compile_total_s']:.1f} s",
            "RSS MiB: {:.0f} with tokenizer, {:.0f} after setup, {:.0f} peak".format(*r["rss_mib"]),
        ]
        if r["not_run"]:
            notes.append(f"{r['not_run']} generations not run (--budget {args.budget} s spent)")
        if r["special_tokens"] is not None:
            notes.append(f"special tokens detected by the engine: {r['special_tokens']}")
        notes += [f"compile failure x{n}: {msg}" for msg, n in r["compile_failures"].items()]
        notes += [f"invalid x{n}: {kw}, e.g. {r['examples'][kw]!r}" for kw, n in r["invalid"].items()]
        notes += [f"engine error x{n}: {msg}" for msg, n in r["errors"].items()]
        notes += [f"stderr: {line[:160]}" for line in r.get("stderr", [])]
        print(f"{r['engine']}:")
        for note in notes:
            print(f"  - {note}")
    eligible = [r for r in results if "skipped" not in r and full_coverage(r)]
    print()
    print(f"total wall {wall:.0f} s")
    if eligible:
        best = min(eligible, key=lambda r: r["mask_ms"][0])
        print(f"best={best['engine']} mask_ms_median={best['mask_ms'][0]:.4f}")
    else:
        print("best=none mask_ms_median=nan")


CHILD_OPTIONS = ("schemas", "samples", "seed", "soft_cap", "hard_cap", "deadline", "budget")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--schemas", type=int, default=100, help="tool parameter schemas (default 100)")
    parser.add_argument("--samples", type=int, default=20, help="generations per schema (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--soft-cap", type=int, default=40, help="tokens before closing tokens are preferred")
    parser.add_argument("--hard-cap", type=int, default=160, help="tokens before a generation is cut")
    parser.add_argument("--deadline", type=float, default=10.0, help="seconds per generation")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds of generation per engine")
    parser.add_argument("--full", action="store_true", help="no reduced settings for the slow engines")
    parser.add_argument("--machine", default=None, help="machine label for the header")
    parser.add_argument("--child-timeout", type=int, default=900, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=ENGINES, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    load = os.getloadavg()[0]
    machine = args.machine or f"{os.cpu_count()}-core {platform.machine()}"
    print(
        f"# benchmarks/grammar_engines.py, {datetime.date.today().isoformat()}, {machine}, "
        f"load avg {load:.1f}, Python {platform.python_version()}, 1 thread per engine"
    )
    print(f"# {versions_line()}")
    print(
        f"# tokenizer {TOKENIZER.relative_to(ROOT.parent)} (200,064 ids), {args.schemas} schemas (seed {args.seed}), "
        f"{args.samples} samples/schema, soft cap {args.soft_cap}, hard cap {args.hard_cap} tokens"
    )
    print(f"# schemas using: {feature_counts(tool_schemas(args.schemas, args.seed))}")
    print(flush=True)
    child_argv = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in CHILD_OPTIONS]
    child_argv += ["--full"] if args.full else []
    start = time.perf_counter()
    results = []
    for name in args.engines:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append(run_child(name, args, child_argv))
    report(results, args, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
