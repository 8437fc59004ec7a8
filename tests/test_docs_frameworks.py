"""Every ```python block of docs/frameworks/*.md runs as written against a served tiny Phi-4 (named `phi4`, as the
pages start it), with only the server's address changed."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("llguidance")

from serve_support import TurnScript, running

from agent.models.transformers import TransformersModel
from agent.server import create_app

PAGES = sorted((Path(__file__).resolve().parents[1] / "docs" / "frameworks").glob("*.md"))
DOCUMENTED_URL = "http://127.0.0.1:8000/v1"


def _blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def base_url(tiny_phi4_loaded: tuple[Any, Any]) -> Iterator[str]:
    model, processor = tiny_phi4_loaded
    model.disable_adapters()
    policy = TurnScript(processor.tokenizer, chatml=False)  # random weights: a call, then an answer
    backend = TransformersModel(model, processor, adapters=(), logits_processors=[policy], name="tiny-phi4")
    with running(create_app(backend, model_name="tiny-phi4", aliases=["phi4"])) as served:
        yield served.base_url


def test_every_framework_has_a_page() -> None:
    assert {p.stem for p in PAGES} >= {"openai", "pydantic-ai", "openai-agents", "langchain", "smolagents"}
    assert all(_blocks(p) for p in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_page_code_runs_against_the_server(page: Path, base_url: str, tmp_path: Path) -> None:
    for index, code in enumerate(_blocks(page)):
        assert DOCUMENTED_URL in code, "the page's code must name the server it documents"
        script = tmp_path / f"{page.stem.replace('-', '_')}_{index}.py"  # a file: smolagents reads tools' source
        script.write_text(code.replace(DOCUMENTED_URL, base_url))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(script), run_name="__main__")
        assert out.getvalue().strip(), "the example prints its result"
