"""Evaluations through the model seam: BFCL v4 tool calling (AST-checked) and speech recognition (WER).

```python
import asyncio
from agent.evals import load_bfcl, run_bfcl, with_constraint
from agent.models.transformers import TransformersModel

model = TransformersModel.smollm2()
cases = load_bfcl(["simple", "irrelevance"], limit=20)        # from the installed bfcl-eval package
for constrained in (True, False):
    with with_constraint(model, constrained) as mode:
        run = asyncio.run(run_bfcl(model, cases, mode=mode))
        print(mode, run.accuracy(), run.overall)
```

The command line: `mmagent eval bfcl` and `mmagent eval asr FOLDER` (see `docs/evals.md`). The BFCL data come
from `bfcl-eval`, jiwer scores WER: both are in the `eval` extra. Nothing here imports torch.

Layout: `_ast_check` (BFCL's AST rules, written anew), `_bfcl` (data, schema conversion, runs), `_asr` (clips,
transcription, WER).
"""

from __future__ import annotations

from agent.evals._asr import (
    AUDIO_SUFFIXES,
    TRANSCRIBE_PROMPT,
    AsrClip,
    AsrResult,
    AsrRun,
    load_asr_folder,
    run_asr,
)
from agent.evals._ast_check import Call, Verdict, check_call, check_calls, standardize
from agent.evals._bfcl import (
    BFCL_CATEGORIES,
    BfclCase,
    BfclResult,
    BfclRun,
    bfcl_data_dir,
    bfcl_version,
    load_bfcl,
    run_bfcl,
    to_json_schema,
    to_tool_definition,
    with_constraint,
)

__all__ = [
    "AUDIO_SUFFIXES",
    "BFCL_CATEGORIES",
    "TRANSCRIBE_PROMPT",
    "AsrClip",
    "AsrResult",
    "AsrRun",
    "BfclCase",
    "BfclResult",
    "BfclRun",
    "Call",
    "Verdict",
    "bfcl_data_dir",
    "bfcl_version",
    "check_call",
    "check_calls",
    "load_asr_folder",
    "load_bfcl",
    "run_asr",
    "run_bfcl",
    "standardize",
    "to_json_schema",
    "to_tool_definition",
    "with_constraint",
]
