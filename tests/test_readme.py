"""Every ```python block in README.md runs as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int) -> None:
    code = BLOCKS[index]
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, f"README.md block {index}", "exec"), {"__name__": f"readme_{index}"})
