"""Approvals that wait: a run pauses before calls needing approval, and continues from any process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_support import stub_model_server

from agent import Agent, Message
from agent.exceptions import ApprovalRequired
from agent.messages import ToolResultPart
from agent.testing import AgentInfo, FunctionModel, call
from memory import Store
from tools import Deny, tool

HERE = Path(__file__).resolve().parent / "approvals"
EXE = shutil.which("mmagent", path=str(Path(sys.executable).parent)) or "mmagent"


@pytest.fixture
def pay_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "payments.log"
    log.touch()
    monkeypatch.setenv("PAY_LOG", str(log))
    return log


def _pay_tools() -> Any:
    sys.path.insert(0, str(HERE))
    try:
        import pay_tools
    finally:
        sys.path.remove(str(HERE))
    return pay_tools


def _model(seen: list[list[Message]] | None = None) -> FunctionModel:
    def answer(messages: list[Message], info: AgentInfo) -> Any:
        if seen is not None:
            seen.append(list(messages))
        last = messages[-1]
        if last.role == "user":
            return [call("pay", amount=5), call("note", text="invoice 7")]
        return " / ".join(p.content[0].text for p in last.parts if isinstance(p, ToolResultPart))  # type: ignore[union-attr]

    return FunctionModel(answer)


@tool
def note(text: str) -> str:
    """Write a note."""
    return f"noted {text}"


def test_a_run_pauses_before_any_call_of_the_step_and_an_approval_finishes_it(pay_log: Path, tmp_path: Path) -> None:
    pay = _pay_tools().pay
    with Store(tmp_path / "runs.db") as store:
        agent = Agent(_model(), tools=[pay, note], memory=store)
        with pytest.raises(ApprovalRequired) as paused:
            agent.run_sync("Pay the invoice")
        assert [c.name for c in paused.value.calls] == ["pay"]  # `note` needs no approval, and did not run either
        assert pay_log.read_text() == ""
        [info] = store.list_runs(status="paused")
        assert info.id == paused.value.run_id and info.finished_at is None

        result = asyncio.run(agent.resume(paused.value.run_id, approvals={paused.value.calls[0].id: True}))
        assert result.output == "paid 5 EUR / noted invoice 7"
        assert pay_log.read_text() == "5\n"
        assert store.list_runs(status="completed")[0].id == paused.value.run_id


def test_a_denial_reaches_the_model_with_its_reason(pay_log: Path, tmp_path: Path) -> None:
    pay = _pay_tools().pay
    seen: list[list[Message]] = []
    with Store(tmp_path / "runs.db") as store:
        agent = Agent(_model(seen), tools=[pay, note], memory=store)
        with pytest.raises(ApprovalRequired) as paused:
            agent.run_sync("Pay the invoice")
        decision = {paused.value.calls[0].id: Deny("over budget")}
        result = asyncio.run(agent.resume(paused.value.run_id, approvals=decision))
    assert pay_log.read_text() == ""
    assert result.output == "Call denied: over budget / noted invoice 7"
    denied = seen[-1][-1].parts[0]
    assert isinstance(denied, ToolResultPart) and denied.is_error


def test_resuming_without_a_decision_pauses_again(pay_log: Path, tmp_path: Path) -> None:
    pay = _pay_tools().pay
    with Store(tmp_path / "runs.db") as store:
        agent = Agent(_model(), tools=[pay, note], memory=store)
        with pytest.raises(ApprovalRequired) as first:
            agent.run_sync("Pay the invoice")
        with pytest.raises(ApprovalRequired) as again:
            asyncio.run(agent.resume(first.value.run_id))
        assert again.value.run_id == first.value.run_id and pay_log.read_text() == ""


def test_without_a_store_the_call_is_refused_as_before(pay_log: Path) -> None:
    pay = _pay_tools().pay
    result = Agent(_model(), tools=[pay, note]).run_sync("Pay the invoice")
    assert result.output.startswith("Call denied: no approval callback")
    assert pay_log.read_text() == ""


def test_pause_in_one_process_approve_in_another(pay_log: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "runs.db")
    env = {**os.environ, "PAY_LOG": str(pay_log)}
    script = str(HERE / "agent_process.py")
    started = subprocess.run([sys.executable, script, "start", db], capture_output=True, text=True, env=env, timeout=60)
    assert started.returncode == 0, started.stderr
    paused = json.loads(started.stdout)
    assert pay_log.read_text() == ""
    decided = subprocess.run(
        [sys.executable, script, "decide", db, paused["run_id"], paused["calls"][0], "yes"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert decided.returncode == 0, decided.stderr
    assert json.loads(decided.stdout) == {"output": "done: paid 5 EUR"}
    assert pay_log.read_text() == "5\n"  # once, in the second process


@pytest.fixture
def payer() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    with stub_model_server(lambda text: ("pay", {"amount": 12}), lambda result: f"ok: {result}") as out:
        yield out


def test_the_cli_pauses_lists_and_approves(
    payer: tuple[str, list[dict[str, Any]]], pay_log: Path, tmp_path: Path
) -> None:
    url, _ = payer
    db = str(tmp_path / "cli.db")
    common = ["--db", db, "--model", url, "--tools", str(HERE / "pay_tools.py")]
    env = {**os.environ, "PAY_LOG": str(pay_log)}

    def mmagent(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=120)

    ran = mmagent("run", "Pay 12 euros", *common)
    assert ran.returncode == 3, ran.stderr
    assert "wait(s) for approval" in ran.stderr and "mmagent approve" in ran.stderr
    with Store(db) as store:
        [info] = store.list_runs(status="paused")
    listed = mmagent("approve", info.id, "--db", db)
    assert listed.returncode == 0 and listed.stdout.split()[1] == "pay" and '"amount": 12' in listed.stdout
    wrong = mmagent("approve", info.id, "--db", db, "--yes", "nope")
    assert wrong.returncode == 1 and "no waiting call 'nope'" in wrong.stderr
    assert pay_log.read_text() == ""
    approved = mmagent("approve", info.id, *common, "--all")
    assert approved.returncode == 0, approved.stderr
    assert "ok: paid 12 EUR" in approved.stdout
    assert pay_log.read_text() == "12\n"
    done = mmagent("approve", info.id, "--db", db)
    assert done.returncode == 1 and "is completed" in done.stderr


def test_the_server_answers_a_paused_run_with_409_and_continues_it_on_approval(pay_log: Path, tmp_path: Path) -> None:
    import httpx
    from serve_support import running

    from agent.server import create_app

    pay = _pay_tools().pay
    with Store(tmp_path / "served.db") as store:
        app = create_app(Agent(_model(), tools=[pay, note], memory=store), mode="agent")
        with running(app) as served, httpx.Client(base_url=served.base_url, timeout=30) as client:
            chat = {"messages": [{"role": "user", "content": "Pay the invoice"}]}
            paused = client.post("/chat/completions", json=chat)
            assert paused.status_code == 409
            error = paused.json()["error"]
            assert error["code"] == "approval_required" and [c["name"] for c in error["calls"]] == ["pay"]
            assert error["calls"][0]["arguments"] == {"amount": 5}
            url = f"/runs/{error['run_id']}/approvals"
            for bad in ({}, {"approvals": {"x": "yes"}}, {"approvals": {"x": {"deny": 3}}}):
                assert client.post(url, json=bad).status_code == 400
            assert pay_log.read_text() == ""
            done = client.post(url, json={"approvals": {error["calls"][0]["id"]: True}})
            assert done.status_code == 200, done.text
            assert done.json()["choices"][0]["message"]["content"] == "paid 5 EUR / noted invoice 7"
            assert pay_log.read_text() == "5\n"
            again = client.post(url, json={"approvals": {error["calls"][0]["id"]: True}})
            assert again.status_code == 400 and "completed" in again.json()["error"]["message"]
