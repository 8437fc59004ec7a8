"""The `mmagent` command, run through its installed entry point in a subprocess."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_support import stub_model_server

from agent import Agent
from agent.testing import FunctionModel, call
from memory import Store
from tools import tool

EXE = shutil.which("mmagent", path=str(Path(sys.executable).parent)) or "mmagent"


def mmagent(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def vllm_like() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in OpenAI-compatible model server: asks for the calculator, then answers with its result."""
    with stub_model_server(lambda text: ("calculator", {"expression": "17 * 23"}), lambda r: f"17 * 23 = {r}") as out:
        yield out


def test_help_lists_the_commands() -> None:
    out = mmagent("--help")
    assert out.returncode == 0
    for command in ("run", "chat", "serve", "history"):
        assert command in out.stdout


def test_run_against_a_server_url_calls_a_real_tool(
    vllm_like: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    url, seen = vllm_like
    db = tmp_path / "m.db"
    out = mmagent("run", "What is 17 * 23?", "--model", url, "--server-model", "phi", "--db", str(db), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["output"] == "17 * 23 = 391"
    assert "model: phi via" in out.stderr and "-> calculator" in out.stderr
    assert seen[-1]["messages"][-1] == {"role": "tool", "tool_call_id": "c1", "name": "calculator", "content": "391"}
    # the run was stored: history commands read it back
    listing = mmagent("history", "list", "--db", str(db))
    assert listing.returncode == 0 and result["conversation_id"] in listing.stdout
    shown = mmagent("history", "show", result["conversation_id"], "--db", str(db))
    assert "17 * 23 = 391" in shown.stdout
    exported = json.loads(mmagent("history", "export", result["conversation_id"], "--db", str(db)).stdout)
    assert exported["messages"][0]["content"] == "What is 17 * 23?"
    found = mmagent("history", "search", "391", "--db", str(db))
    assert result["conversation_id"] in found.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "hi", "--image", "missing.png"], "cannot read image file 'missing.png'"),
        (["run", "hi", "--audio", "README.md"], "not a known audio format"),
        (["run", "hi", "--model", "http://127.0.0.1:9/v1"], "127.0.0.1:9"),
        (["run", "hi", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["run", "hi", "--tools", "nope.py"], "tools file 'nope.py' does not exist"),
        (["history", "list", "--db", "missing.db"], "no memory store at 'missing.db'"),
    ],
)
def test_errors_are_one_clear_line(args: list[str], message: str) -> None:
    out = mmagent(*args, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 1
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_tools_module_is_loaded(vllm_like: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    url, seen = vllm_like
    module = tmp_path / "mytools.py"
    module.write_text(
        "from tools import tool\n\n@tool\ndef shout(text: str) -> str:\n    '''Shout.'''\n    return text.upper()\n"
    )
    out = mmagent("run", "hi", "--model", url, "--tools", str(module))
    assert out.returncode == 0, out.stderr
    assert {t["function"]["name"] for t in seen[-1]["tools"]} == {"calculator", "shout"}


def test_history_of_a_store_written_by_an_app(tmp_path: Path) -> None:
    @tool
    def noop() -> str:
        """Do nothing."""
        return "nothing"

    db = tmp_path / "app.db"
    with Store(db) as store:
        model = FunctionModel(lambda m, i: [call("noop")] if i.request_index == 0 else "all quiet")
        result = Agent(model, tools=[noop], memory=store).run_sync("status report please")
    out = mmagent("history", "show", str(result.conversation_id), "--db", str(db))
    assert out.returncode == 0
    assert "status report please" in out.stdout and "all quiet" in out.stdout


# ---------------------------------------------------------------- careless input: one line, exit 1


def _one_line_error(done: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert any(fragment in line for line in lines), done.stderr
    assert lines[-1].startswith("error:"), done.stderr


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("def broken(:\n    pass\n", "SyntaxError"),
        ("import module_that_does_not_exist_anywhere\n", "ModuleNotFoundError"),
        ("raise RuntimeError('tools exploded at import')\n", "tools exploded at import"),
        ("import sys\nsys.exit(3)\n", "SystemExit"),
    ],
)
def test_tools_files_that_fail_to_load_are_one_line(tmp_path: Path, source: str, fragment: str) -> None:
    (tmp_path / "bad_tools.py").write_text(source)
    done = mmagent("run", "hi", "--model", "http://127.0.0.1:9/v1", "--tools", str(tmp_path / "bad_tools.py"))
    _one_line_error(done, fragment)


def test_a_prompt_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [EXE.encode(), b"run", b"caf\xe9 \xff", b"--model", b"http://127.0.0.1:9/v1"], capture_output=True, timeout=60
    )
    result = subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode("utf-8", "replace")
    )
    _one_line_error(result, "lone surrogate")


def test_history_export_to_a_missing_folder_or_a_directory_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    with Store(db) as store:
        cid = store.create_conversation([Agent(FunctionModel(lambda m, i: "x")).run_sync("hi").messages[0]])
    _one_line_error(
        mmagent("history", "export", cid, "--db", str(db), "--output", str(tmp_path / "no" / "x.json")), "cannot write"
    )
    _one_line_error(mmagent("history", "export", cid, "--db", str(db), "--output", str(tmp_path)), "cannot write")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--port", "99999"], "--port must be between 1 and 65535"),
        (["--api-key", ""], "--api-key cannot be empty"),
        (["--mode", "both"], "--mode must be auto, agent or model"),
    ],
)
def test_serve_refuses_bad_options_in_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    _one_line_error(mmagent("serve", "--model", "http://127.0.0.1:9/v1", *args, cwd=tmp_path), fragment)


def test_serve_on_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = mmagent("serve", "--model", "http://127.0.0.1:9/v1", "--port", str(port), cwd=tmp_path, timeout=60)
    _one_line_error(done, f"127.0.0.1:{port}")
