"""benchmarks/phi4_gpu.py: the smoke run exercises every code path; without CUDA the full run skips cleanly."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "phi4_gpu.py"
LAST_LINE = re.compile(r"decode_tok_s=(\S+) decode_frac=(\S+) prefill_frac=(\S+) step_ratio_32k=(\S+)")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
    )


@pytest.mark.slow  # ~25 s on 2 cores: the real 200K tokenizer and its grammar engine
def test_smoke_prints_four_finite_figures(phi4_reference: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "phi4_gpu.json"
    proc = _run(
        "--smoke",
        "--decode",
        "eager",
        "--json",
        str(out),
        "--config",
        str(phi4_reference / "native-config"),
        "--tokenizer",
        str(phi4_reference / "tokenizer"),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = LAST_LINE.fullmatch(last)
    assert match, last
    assert all(math.isfinite(float(x)) for x in match.groups()), last

    results = json.loads(out.read_text())
    eager = results["modes"]["eager"]
    for key in ("decode_64", "decode_256", "prefill_128", "prefill_256"):
        assert eager[key]["exact"], eager[key]  # every request decoded exactly its max_tokens
    assert eager["decode_64"]["prefill_tokens"] == 1  # the timed decode reused the cached prompt
    assert eager["prefill_256"]["prefill_tokens"] == 256  # a fresh prompt of exactly that length
    agent = eager["agent"]
    assert agent["steps_done"] == 3
    assert agent["all_exact"]
    assert all(n < agent["history_tokens"] for n in agent["step_prefill_tokens"])  # KV reuse engaged
    assert results["headline"]["mode"] == "eager"


def test_without_cuda_and_smoke_it_skips() -> None:
    pytest.importorskip("torch")
    proc = _run(env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("SKIP: no CUDA device"), proc.stdout


@pytest.mark.slow  # ~40 s: the media benchmarks on the full-size model's code path, shrunk to run on the CPU
def test_ingest_and_voice_benchmarks_run_the_random_full_model_path(phi4_reference: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("silero_vad")
    benchmarks = SCRIPT.parent
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    ingest = subprocess.run(
        [sys.executable, str(benchmarks / "ingest.py"), "--model", "random-full", "--smoke", "--seconds", "20",
         "--cuts", "2", "--segments", "200", "--no-vectors"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    assert "ingest (phi4mm-random-full)" in ingest.stdout
    figures = re.fullmatch(r"scene_f1=(\S+) ingest_rtf=(\S+) query_ms=(\S+)", ingest.stdout.strip().splitlines()[-1])
    assert figures and float(figures[1]) == 1.0 and all(math.isfinite(float(x)) for x in figures.groups())
    voice = subprocess.run(
        [sys.executable, str(benchmarks / "voice.py"), "--model", "random-full", "--smoke", "--turns", "2",
         "--speech", "tone"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert voice.returncode == 0, voice.stderr[-2000:]
    assert "model: phi4mm-random-full (hears the turn)" in voice.stdout
    assert re.fullmatch(r"first_audio_ms=[0-9.]+ detect_ms=[0-9.]+", voice.stdout.strip().splitlines()[-1])
