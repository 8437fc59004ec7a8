"""BFCL v4 AST accuracy of SmolLM2-135M-Instruct in process, grammar-constrained against free decoding.

The real path of `mmagent eval bfcl`: the cases come from the installed `bfcl-eval` package (`agent.evals.
load_bfcl`: a fixed sample of N per category, seed 0), the function docs become `ToolDefinition`s, each case is
one `TransformersModel.request` with `ModelSettings(tool_choice="auto")`, and the calls are judged by
`agent.evals.check_calls` (BFCL's AST rules). The same model object runs constrained (the default), then with
its grammar switched off (`with_constraint`); same cases, greedy decoding, same token budget.

N: 8 per category by default. Under `auto` SmolLM2 writes text to the 256-token budget on most of these
prompts; on 2 cores shared with other jobs (load average 2-4) a case took 16-25 s (one torch thread: two
threads on a busy 2-core machine ran ~8x slower), so 4 categories x 2 modes x 8 cases is ~17-27 minutes
(200 a category would take ~7-9 hours). 256 tokens holds the 95th percentile of BFCL's parallel answers written
as a `<tool_call>` block in SmolLM2's tokens (192; median 112), so the budget does not cut a right answer short.

    python benchmarks/bfcl.py [--n 8] [--categories simple,multiple,parallel,irrelevance] [--max-tokens 256]
                              [--tool-choice auto] [--threads 1] [--report bfcl_bench.json]
                              [--modes constrained,unconstrained] [--journal DIR [--shard K/N] [--summary]]

Long runs: `--journal DIR` keeps each mode's results in `DIR/bfcl_<mode>.jsonl` as they are judged (see
`run_bfcl`), so a run stopped at any point goes on from there, and the two modes can run as two processes at
once (`--modes constrained` in one, `--modes unconstrained` in the other, one torch thread each); a last
call with both modes and the same journal prints the table from the journals. The cases go round the
categories in turn, so a run cut short still covers each category alike. `--summary` asks nothing: it prints the
table of the cases judged so far in every mode (the same cases for each, so the modes compare side by side).
`--shard K/N` splits one mode over N processes: each takes every Nth of the cases no journal of the mode holds
yet and keeps its own journal (`bfcl_<mode>.jsonl` for K=0, `bfcl_<mode>.<K>.jsonl` for others).

The unconstrained pass asks only the cases whose constrained answer the grammar steered (`run_bfcl(reuse=...)`,
read from the constrained journals): where it steered no token, greedy decoding without it writes the same tokens,
so that result stands for both modes (marked `reused`). Cases judged before the constrained pass recorded
`steered` are asked in both modes.

Last line: `bfcl_constrained=<float> bfcl_unconstrained=<float>` (overall AST accuracy over all cases run).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from agent.evals import BfclCase, BfclResult, BfclRun, bfcl_version, load_bfcl, run_bfcl, with_constraint
from agent.models import ModelSettings
from agent.models.transformers import TransformersModel


def show(result: BfclResult) -> None:
    calls = json.dumps(result.calls)[:100]
    text = result.text[:60].replace("\n", " ")
    mark = "ok " if result.ok else "bad"
    line = f"  {mark} {result.id:24s} {result.seconds:5.1f}s  {calls or '-'}  {text!r}  {result.reason[:80]}"
    print(line, flush=True)


def table(categories: list[str], runs: list[BfclRun]) -> None:
    print(f"\n{'category':20s} {'cases':>5s} " + " ".join(f"{r.mode:>14s}" for r in runs))
    counts = [r.counts() for r in runs]
    for name in categories:
        row = " ".join(f"{c[name][0]:>4d}/{c[name][1]:<3d} {c[name][0] / c[name][1]:5.3f}" for c in counts)
        print(f"{name:20s} {counts[0][name][1]:5d} {row}")
    print(f"{'overall':20s} {len(runs[0].results):5d} " + " ".join(f"{r.overall:14.3f}" for r in runs))
    for run in runs:
        failures = Counter(x.kind for x in run.results if not x.ok)
        calls = sum(bool(x.calls) for x in run.results)
        asked = [x for x in run.results if not x.reused]
        seconds = sum(x.seconds for x in asked) / max(1, len(asked))
        steered = [x.steered for x in run.results if x.steered is not None]
        notes = (
            [f"{len(run.results) - len(asked)} reused from the constrained pass"]
            if len(asked) < len(run.results)
            else []
        )
        if steered:
            notes.append(f"the grammar steered {sum(n > 0 for n in steered)} of {len(steered)} answers")
        print(f"{run.mode}: {calls} of {len(run.results)} answers held a call; {seconds:.1f} s a case asked; "
              f"failures {dict(sorted(failures.items()))}" + "".join(f"; {n}" for n in notes))  # fmt: skip


def journals(folder: Path, mode: str) -> list[Path]:
    """A mode's journals: shard 0's, then the others'."""
    return [p for p in [folder / f"bfcl_{mode}.jsonl", *sorted(folder.glob(f"bfcl_{mode}.*.jsonl"))] if p.exists()]


def read_journal(path: Path) -> dict[str, BfclResult]:
    """The results one journal holds, by case id (none when it does not exist yet)."""
    lines = path.read_text().split("\n")[1:-1] if path.exists() else []  # the header; a cut last line
    return {r.id: r for r in (BfclResult.from_json(json.loads(line)["result"]) for line in lines)}


def judged(folder: Path, mode: str) -> dict[str, BfclResult]:
    """Every result a mode's journals hold, by case id."""
    return {i: r for path in journals(folder, mode) for i, r in read_journal(path).items()}


def summary(folder: Path, categories: list[str], modes: list[str], cases: list[BfclCase]) -> None:
    """The table over the cases every mode's journal has judged (a run still going, or one cut short)."""
    judged_in = {mode: judged(folder, mode) for mode in modes}
    both = [c.id for c in cases if all(c.id in judged_in[mode] for mode in modes)]
    runs = [BfclRun(mode, "SmolLM2-135M-Instruct", [judged_in[mode][i] for i in both]) for mode in modes]
    for run in runs:
        run.seconds = sum(r.seconds for r in run.results)
    present = [name for name in categories if any(r.category == name for r in runs[0].results)]
    print(f"judged in every mode: {len(both)} of {len(cases)} cases "
          f"({', '.join(f'{m} {len(judged_in[m])}' for m in modes)} in the journals)")  # fmt: skip
    if both:
        table(present, runs)
    print(" ".join(f"bfcl_{r.mode}={r.overall:.4f}" for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="cases per category (a fixed sample, seed 0)")
    parser.add_argument("--categories", default="simple,multiple,parallel,irrelevance")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--tool-choice", default="auto", help="auto (BFCL's setting) or required")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, default=None, help="also write the JSON report here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared 2-core box)")
    parser.add_argument("--modes", default="constrained,unconstrained", help="which modes to run, in order")
    parser.add_argument("--journal", type=Path, default=None, help="a folder of per-mode journals to resume from")
    parser.add_argument("--summary", action="store_true", help="print what the journals hold so far; ask nothing")
    parser.add_argument("--shard", default="0/1", help="K/N: this process takes every Nth case not yet judged")
    args = parser.parse_args()
    try:
        shard, shards = (int(x) for x in args.shard.split("/"))
        assert 0 <= shard < shards
    except (ValueError, AssertionError):
        parser.error(f"--shard takes K/N with 0 <= K < N, got {args.shard!r}")
    if shards > 1 and args.journal is None:
        parser.error("--shard splits the work through the journals: give --journal DIR")
    torch.set_num_threads(args.threads)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"constrained", "unconstrained"}:
        parser.error(f"--modes takes constrained and/or unconstrained, got {args.modes!r}")
    by_category = [load_bfcl([name], limit=args.n, seed=args.seed) for name in categories]
    cases = [c for group in itertools.zip_longest(*by_category) for c in group if c is not None]
    if args.summary:
        if args.journal is None:
            parser.error("--summary reads the journals: give --journal DIR")
        summary(args.journal, categories, modes, cases)
        return
    if args.journal is not None:
        args.journal.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = TransformersModel.smollm2(progress=False)
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - started:.1f} s; bfcl-eval {bfcl_version()}; "
          f"{len(cases)} cases ({args.n} a category, seed {args.seed}); tool_choice={args.tool_choice}, "
          f"max_tokens={args.max_tokens}; {args.threads} torch thread(s)", flush=True)  # fmt: skip
    settings = ModelSettings(tool_choice=args.tool_choice, max_tokens=args.max_tokens)
    runs: list[BfclRun] = []
    for name in modes:
        with with_constraint(model, name == "constrained") as mode:
            print(f"\n{mode}", flush=True)
            journal, mine, reuse = None, cases, None
            if mode == "unconstrained":  # from this run's constrained pass, or the journals of one
                constrained = [r for r in runs if r.mode == "constrained"]
                reuse = {r.id: r for r in constrained[0].results} if constrained else None
                if reuse is None and args.journal is not None:
                    reuse = judged(args.journal, "constrained")
            if args.journal is not None:
                journal = args.journal / (f"bfcl_{mode}.jsonl" if shard == 0 else f"bfcl_{mode}.{shard}.jsonl")
                if shards > 1:  # this shard's share of what no journal of the mode holds yet
                    own = read_journal(journal)
                    elsewhere = {i for p in journals(args.journal, mode) if p != journal for i in read_journal(p)}
                    todo = [c for c in cases if c.id not in elsewhere and c.id not in own]
                    mine = [c for c in cases if c.id in own] + todo[shard::shards]
                    print(f"shard {shard}/{shards}: {len(mine) - len(own)} cases to ask", flush=True)
            run = run_bfcl(model, mine, mode=mode, settings=settings, progress=show, journal=journal, reuse=reuse)
            runs.append(asyncio.run(run))
    table([name for name in categories if any(r.category == name for r in runs[0].results)], runs)
    if args.report is not None:
        args.report.write_text(json.dumps({"runs": [r.to_json() for r in runs]}, indent=1) + "\n")
    print(" ".join(f"bfcl_{r.mode}={r.overall:.4f}" for r in runs))


if __name__ == "__main__":
    main()
