"""The application examples (voice assistant, document bot, web app), driven on the tiny random Phi-4.

Each example's functions run through the real backend with scripted completions (`ScriptedOutputs`): the WAV and
page images go through the real processor and towers, tools run, memory is a real SQLite store. The slow tests run
each example as a script, offline, as a user would.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

import httpx
import soundfile as sf
import torch
from PIL import Image
from rich.console import Console
from scipy.signal import resample_poly
from starlette.testclient import TestClient

from agent import AudioPart, ImagePart, ToolResultPart
from agent.models.resolve import reads_media
from agent.models.tiny import ScriptedOutputs
from agent.models.transformers import TransformersModel
from agent.testing import FunctionModel
from memory import Store
from tools import ModelRetry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


voice = _example("voice_assistant")
document = _example("document_bot")
web = _example("app_embedding")


def _scripted(base: TransformersModel, scripts: list[str]) -> TransformersModel:
    return TransformersModel(base.model, base.processor, logits_processors=[ScriptedOutputs(base.tokenizer, scripts)])


def _call(name: str, **arguments: Any) -> str:
    return f"<|tool_call|>{json.dumps([{'name': name, 'arguments': arguments}])}<|/tool_call|><|end|>"


@pytest.fixture
def media_inputs(tiny_phi4: TransformersModel) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Every (kind, tensor) the tiny Phi-4's image and audio towers receive while the test runs."""
    extend = tiny_phi4.model.model.embed_tokens_extend
    seen: list[tuple[str, torch.Tensor]] = []

    def record(kind: str, key: str) -> Any:
        def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            seen.append((kind, kwargs[key].detach().clone()))

        return hook

    handles = [
        extend.image_embed.register_forward_pre_hook(record("image", "image_pixel_values"), with_kwargs=True),
        extend.audio_embed.register_forward_pre_hook(record("audio", "audio_input_features"), with_kwargs=True),
    ]
    yield seen
    for handle in handles:
        handle.remove()


# ---------------------------------------------------------------- voice assistant


def test_voice_request_is_heard_transcribed_stored_and_answered(
    tiny_phi4: TransformersModel, media_inputs: list[tuple[str, torch.Tensor]], tmp_path: Path
) -> None:
    # The bundled 16 kHz request, resampled to 44.1 kHz: the example must accept any rate.
    original, rate = sf.read(voice.SAMPLE, dtype="float32")
    assert rate == 16_000 and 3.0 < len(original) / rate < 6.0
    clip = tmp_path / "request-44k.wav"
    sf.write(clip, resample_poly(original, 441, 160).astype(np.float32), 44_100, subtype="FLOAT")
    said = "What is the weather in Oslo? And set a timer for five minutes."
    model = _scripted(
        tiny_phi4,
        [
            said + "<|end|>",
            _call("get_weather", city="Oslo"),
            _call("set_timer", minutes=5, label="tea"),
            "It is 3°C with light snow in Oslo, and the tea timer is set.<|end|>",
        ],
    )
    lines: list[str] = []
    db = tmp_path / "voice.db"
    with Store(db) as store:
        outcome = asyncio.run(voice.handle_request(model, store, clip, echo=lines.append))
    assert outcome.transcript == said
    assert outcome.tool_calls == ["get_weather", "set_timer"]
    assert outcome.answer.startswith("It is 3°C with light snow in Oslo")
    assert "heard      : 4.1 s at 44100 Hz (the model gets it at 16 kHz)" in lines
    assert "tool result: Oslo: 3°C, light snow" in lines
    assert any(line.startswith("tool result: Timer 'tea' set for 5 minutes: it rings at") for line in lines)

    # The clip reached the audio encoder as 16 kHz features of that very waveform.
    heard = AudioPart(data=clip.read_bytes()).samples(16_000)
    assert abs(len(heard) - len(original)) <= 2
    assert np.corrcoef(heard[: len(original)], original[: len(heard)])[0, 1] > 0.99  # resampled, not mangled
    extractor = tiny_phi4.processor.audio_processor
    expected = extractor([heard], sampling_rate=16_000, return_tensors="pt")["audio_input_features"]
    audio = [values for kind, values in media_inputs if kind == "audio"]
    assert audio, "the audio tower never ran"
    assert torch.equal(audio[0], expected.to(audio[0].dtype))

    # The transcript is stored, searchable from a fresh store, beside the clip it came from.
    with Store(db) as store:
        hits = store.search("weather Oslo timer", kinds={"text"})
        assert [(h.conversation_id, h.message_index, h.role) for h in hits] == [
            (outcome.conversation_id, 1, "assistant")
        ]
        assert hits[0].text == said
        info = store.conversation(outcome.conversation_id)
        assert info.metadata["transcript"] == said and info.metadata["source"] == "request-44k.wav"
        stored = store.load_conversation(outcome.conversation_id)
        assert isinstance(stored[0].parts[0], AudioPart) and stored[0].parts[0].data == clip.read_bytes()
        roles = [m.role for m in stored]
        assert roles == ["user", "assistant", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    lines.clear()
    with Store(db) as store:
        assert voice.search(store, "oslo", echo=lines.append) == 2  # the transcript and the spoken answer
    assert all(outcome.conversation_id[:12] in line for line in lines)


def test_voice_tools_check_their_arguments() -> None:
    assert voice.convert_units(5, "km", "mi") == "5 km = 3.107 mi"
    assert voice.convert_units(100, "celsius", "fahrenheit") == "100 celsius = 212 fahrenheit"
    with pytest.raises(ModelRetry, match="cannot convert km to kg"):
        voice.convert_units(1, "km", "kg")
    with pytest.raises(ModelRetry, match="unknown city 'Atlantis'"):
        voice.current_time("Atlantis")
    assert voice.get_weather("Paris", unit="fahrenheit") == "Paris: 57°F, cloudy"


def test_models_that_cannot_hear_or_see_are_named_and_replaced_by_the_tiny_phi4(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))  # no Phi-4 weights: auto means SmolLM2
    monkeypatch.delenv("MMAGENT_PHI4_PATH", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    notes: list[str] = []
    model, random_weights = voice.load_model("auto", echo=notes.append)
    assert random_weights and isinstance(model, TransformersModel) and reads_media(model)
    _, random_weights = document.load_model("smollm2", echo=notes.append)
    assert random_weights
    assert notes == [
        "note: SmolLM2-135M-Instruct (what 'auto' picks without Phi-4 weights) cannot hear audio; running the tiny "
        "random-weight Phi-4 instead, so its output is noise",
        "note: SmolLM2 cannot see images; running the tiny random-weight Phi-4 instead, so its output is noise",
    ]
    assert not reads_media(FunctionModel(lambda m, i: "x"))


# ---------------------------------------------------------------- document bot


def test_document_bot_zooms_validates_and_stores_the_typed_invoice(
    tiny_phi4: TransformersModel, media_inputs: list[tuple[str, torch.Tensor]], tmp_path: Path
) -> None:
    page = document.sample_invoice()
    good = document.SAMPLE_INVOICE.model_dump(mode="json")
    model = _scripted(
        tiny_phi4,
        [
            _call("zoom", left=0.6, top=0.0, right=1.0, bottom=0.2, scale=2),
            _call("record_invoice", invoice={**good, "total": 100.0}),  # wrong total: rejected
            _call("record_invoice", invoice=good),
            "Recorded invoice INV-2026-0147.<|end|>",
        ],
    )
    out = io.StringIO()
    db = tmp_path / "documents.db"
    console = Console(file=out, width=300, markup=False)
    with Store(db) as store:
        results = asyncio.run(document.extract_documents(model, store, [page], ["invoice.png"], console=console))
    [result] = results
    assert result.invoice == document.SAMPLE_INVOICE
    assert result.calls == ["zoom", "record_invoice", "record_invoice"]
    printed = out.getvalue()
    assert "the line items add up to 108.90, not the total 100.00" in printed  # the validator's retry
    assert "[+1 image]" in printed and "1/1" in printed  # the zoomed region, the progress bar

    # The page, then the zoomed region, reached the vision tower as exactly these pixels.
    processor = tiny_phi4.processor.image_processor
    region = page.crop((510, 0, 850, 220)).resize((680, 440), Image.Resampling.LANCZOS)
    images = [values for kind, values in media_inputs if kind == "image"]
    assert torch.equal(images[0], processor([page], return_tensors="pt")["image_pixel_values"].to(images[0].dtype))
    crop = processor([region], return_tensors="pt")["image_pixel_values"][0]
    # the second request passes 4096 tokens, so it is recomputed whole (longrope): page and region in one batch
    assert any(torch.equal(row[: len(crop)], crop.to(row.dtype)) for batch in images[1:] for row in batch)

    # From a fresh store: the typed result, and the run's calls and results as the store kept them.
    with Store(db) as store:
        assert document.load_invoice(store, result.conversation_id) == document.SAMPLE_INVOICE
        assert document.load_invoices(store) == [(result.conversation_id, document.SAMPLE_INVOICE)]
        messages = store.load_conversation(result.conversation_id)
    assert isinstance(messages[0].parts[0], ImagePart) and messages[0].parts[0].size == (850, 1100)
    zoomed = [p for m in messages for p in m.parts if isinstance(p, ToolResultPart) and p.name == "zoom"]
    assert [c.size for c in zoomed[0].content if isinstance(c, ImagePart)] == [(680, 440)]
    recorded = [c.arguments["invoice"] for m in messages for c in m.tool_calls if c.name == "record_invoice"]
    assert recorded == [{**good, "total": 100.0}, good]


def test_invoice_validation_names_the_bad_field() -> None:
    good = document.SAMPLE_INVOICE.model_dump(mode="json")
    bad_line = {**good, "line_items": [{**good["line_items"][0], "amount": 40.0}, *good["line_items"][1:]]}
    with pytest.raises(ValueError, match=r"line 'A4 paper, 500 sheets': 10 x 4.50 = 45.00, not 40.00"):
        document.Invoice.model_validate(bad_line)
    with pytest.raises(ValueError, match="currency"):
        document.Invoice.model_validate({**good, "currency": "euro"})
    with pytest.raises(ValueError, match="date"):
        document.Invoice.model_validate({**good, "date": "2 Nov"})


# ---------------------------------------------------------------- web app


def _chat(client: TestClient, user: str, message: str) -> dict[str, Any]:
    response = client.post(f"/users/{user}/chat", json={"message": message})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_two_users_get_separate_conversations_that_survive_a_restart(
    tiny_phi4: TransformersModel, tmp_path: Path
) -> None:
    model = _scripted(
        tiny_phi4,
        [
            "Hello Alice.<|end|>",
            _call("calculator", expression="17 * 23"),
            "17 * 23 = 391.<|end|>",
            "Hello again, Alice.<|end|>",
        ],
    )
    db = tmp_path / "app.db"
    with Store(db) as store, TestClient(web.create_app(model, store)) as client:
        first = _chat(client, "alice", "Hi, I am Alice.")
        bob = _chat(client, "bob", "What is 17 * 23?")
        again = _chat(client, "alice", "Hi again.")
        assert client.get("/health").json() == {"status": "ok", "model": model.name}
    assert first == {"reply": "Hello Alice.", "conversation_id": "user-alice", "tool_calls": []}
    assert bob == {"reply": "17 * 23 = 391.", "conversation_id": "user-bob", "tool_calls": ["calculator"]}
    assert again["reply"] == "Hello again, Alice." and again["conversation_id"] == "user-alice"

    with Store(db) as store, TestClient(web.create_app(FunctionModel(lambda m, i: "unused"), store)) as client:
        alice_history = client.get("/users/alice/history").json()
        bob_history = client.get("/users/bob/history").json()
        nobody = client.get("/users/carol/history").json()
    assert [(m["role"], m["text"]) for m in alice_history["messages"]] == [
        ("user", "Hi, I am Alice."),
        ("assistant", "Hello Alice."),
        ("user", "Hi again."),
        ("assistant", "Hello again, Alice."),
    ]
    assert [m["role"] for m in bob_history["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert bob_history["messages"][1]["tool_calls"] == [{"name": "calculator", "arguments": {"expression": "17 * 23"}}]
    assert bob_history["messages"][2] == {"role": "tool", "text": "391", "tool": "calculator"}
    assert nobody == {"user": "carol", "conversation_id": "user-carol", "messages": []}


async def test_concurrent_requests_share_one_model_and_keep_each_users_turns_in_order(
    tiny_phi4: TransformersModel, tmp_path: Path
) -> None:
    model = _scripted(tiny_phi4, ["Noted.<|end|>"] * 4)
    with Store(tmp_path / "app.db") as store:
        app = web.create_app(model, store)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            sent = [("alice", "one"), ("alice", "two"), ("bob", "three"), ("alice", "four")]
            responses = await asyncio.gather(
                *(client.post(f"/users/{user}/chat", json={"message": text}) for user, text in sent)
            )
            assert [r.status_code for r in responses] == [200] * 4
            alice = (await client.get("/users/alice/history")).json()["messages"]
            bob = (await client.get("/users/bob/history")).json()["messages"]
    assert [m["role"] for m in alice] == ["user", "assistant"] * 3  # never two user turns in a row
    assert sorted(m["text"] for m in alice if m["role"] == "user") == ["four", "one", "two"]
    assert [(m["role"], m["text"]) for m in bob] == [("user", "three"), ("assistant", "Noted.")]


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/users/alice/chat", b"not json", 400, "the body must be JSON"),
        ("/users/alice/chat", b'{"message": ""}', 422, "message: String should have at least 1 character"),
        ("/users/alice/chat", b'{"message": 5}', 422, "message: Input should be a valid string"),
        ("/users/alice/chat", b'{"message": "hi", "user": "bob"}', 422, "user: Extra inputs are not permitted"),
        ("/users/alice/chat", b"{}", 422, "message: Field required"),
        ("/users/a%20b/chat", b'{"message": "hi"}', 400, "user ids are 1 to 48 letters"),
        ("/users/alice/chat", b'{"message": "' + b"x" * 70_000 + b'"}', 413, "the body is over 65536 bytes"),
    ],
)
def test_bad_requests_get_a_4xx_with_one_line(path: str, body: bytes, status: int, error: str, tmp_path: Path) -> None:
    model = FunctionModel(lambda m, i: pytest.fail("the model must not run on a bad request"))
    with Store(tmp_path / "app.db") as store, TestClient(web.create_app(model, store)) as client:
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == status
        message = response.json()["error"]
        assert message.startswith(error) and "\n" not in message
        assert client.get("/users/alice/history").json()["messages"] == []


# ---------------------------------------------------------------- the scripts, offline


def _offline_env(tmp_path: Path) -> dict[str, str]:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")}  # no Phi-4: auto=SmolLM2
    for name in ("HOME", "MMAGENT_CACHE_DIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _script(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True, text=True, timeout=600, env=_offline_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip


@pytest.mark.slow
def test_voice_script_runs_offline(tmp_path: Path) -> None:
    out = _script(tmp_path, "voice_assistant.py", "--db", "voice.db")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("note: SmolLM2-135M-Instruct") and "cannot hear audio" in lines[0]
    assert lines[1] == "model      : tiny-phi4"
    assert lines[2] == "heard      : 4.1 s at 16000 Hz (the model gets it at 16 kHz)"
    assert "(random weights: this text is noise)" in lines[3]
    with Store(tmp_path / "voice.db") as store:
        [info] = store.list_conversations()
        assert info.metadata["kind"] == "voice-request" and info.metadata["noise"] is True
    missing = _script(tmp_path, "voice_assistant.py", "missing.wav")
    assert missing.returncode == 1
    assert missing.stderr == "error: cannot read audio file 'missing.wav': No such file or directory\n"


@pytest.mark.slow
def test_document_script_runs_offline(tmp_path: Path) -> None:
    out = _script(tmp_path, "document_bot.py", "--db", "docs.db", "--sample-out", "invoice.png")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cannot see images" in out.stdout and "model: tiny-phi4" in out.stdout
    assert "page(s) gave a valid invoice; every run is stored in docs.db" in out.stdout
    with Image.open(tmp_path / "invoice.png") as drawn:
        assert drawn.size == (850, 1100)
    with Store(tmp_path / "docs.db") as store:
        [info] = store.list_conversations()
        assert info.metadata["kind"] == "invoice" and info.metadata["source"] == "sample invoice (drawn)"
        assert isinstance(store.load_conversation(info.id)[0].parts[0], ImagePart)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_app_script_serves_two_users_offline(tmp_path: Path) -> None:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "app_embedding.py"), "--port", str(port), "--db", "app.db"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_offline_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.monotonic() < deadline, "the app did not start in 300 s"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        assert httpx.get(f"{base}/health").json()["model"] == "SmolLM2-135M-Instruct"
        for user in ("alice", "bob"):
            reply = httpx.post(f"{base}/users/{user}/chat", json={"message": f"My name is {user}."}, timeout=300)
            assert reply.status_code == 200, reply.text
            assert reply.json()["conversation_id"] == f"user-{user}"
        alice = httpx.get(f"{base}/users/alice/history").json()["messages"]
        assert alice[0] == {"role": "user", "text": "My name is alice."}
        assert all("bob" not in m["text"] for m in alice)
        bad = httpx.post(f"{base}/users/alice/chat", content=b"{")
        assert bad.status_code == 400 and bad.json()["error"].startswith("the body must be JSON")
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_media_search_script_runs_offline_and_a_second_run_writes_nothing(tmp_path: Path) -> None:
    out = _script(tmp_path, "media_search.py", "--db", "media.db")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "cannot see images or hear audio" in lines[0] and lines[1].startswith("model: tiny-phi4")
    assert lines[2:4] == [
        "new       talk.mp4: 4 segments, 4 features written",
        "new       budget.pdf: 1 segments, 1 features written",
    ]
    assert "(random weights: this text is noise)" in out.stdout
    with Store(tmp_path / "media.db") as store:
        kinds = sorted(s.kind for source in store.list_sources() for s in store.media_segments(source.id))
        assert kinds == ["audio", "page", "scene", "scene", "scene"]
    again = _script(tmp_path, "media_search.py", "--db", "media.db")
    assert again.returncode == 0, again.stderr
    assert [line.split()[0] for line in again.stdout.splitlines()[2:4]] == ["unchanged", "unchanged"]


@pytest.mark.slow
def test_voice_live_script_barges_in_offline(tmp_path: Path) -> None:
    out = _script(tmp_path, "voice_live.py", "--db", "voice.db", "--barge-in", "--speech", "tone", "--max-tokens", "40")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cannot hear audio" in out.stdout and "model      : tiny-phi4; speech: tone" in out.stdout
    assert out.stdout.count("you        : (4.1 s of speech)") == 2 and "(interrupted)" in out.stdout
    assert "stored     : 2 runs in voice.db (interrupted, completed)" in out.stdout
    spoken, rate = sf.read(tmp_path / "answer.wav")
    assert rate == 16_000 and len(spoken) > 0


def test_voice_live_script_keeps_what_was_heard_when_talked_over(tmp_path: Path) -> None:
    out = _script(tmp_path, "voice_live.py", "--db", "voice.db", "--talk-over", "0.5", "--speech", "tone",
                  "--max-tokens", "40")  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    said = next(line for line in out.stdout.splitlines() if line.startswith("assistant  : "))
    heard = next(line for line in out.stdout.splitlines() if line.startswith("heard      : "))
    assert heard.endswith("(played for 0.5 s)")
    from memory import Store

    whole = ast.literal_eval(said.removeprefix("assistant  : ").rsplit(" (", 1)[0])
    with Store(str(tmp_path / "voice.db")) as store:
        (conversation,) = store.list_conversations()
        first = next(m.text for m in store.load_conversation(conversation.id) if m.role == "assistant")
    assert whole.startswith(first) and len(first) < len(whole)  # cut to what 0.5 s of speech said
    assert heard.removeprefix("heard      : ").startswith(repr(first[:160]))
