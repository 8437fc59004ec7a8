"""Shared fixtures. Expensive ones (the tiny Phi-4 build, the real tokenizer) are built once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REFERENCE = Path(os.environ.get("PHI4MM_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "phi4mm"))


@pytest.fixture(scope="session")
def phi4_reference() -> Path:
    """The folder with Phi-4-multimodal's real tokenizer, original tokenizer config and full-size config."""
    if not (REFERENCE / "tokenizer" / "tokenizer.json").is_file():
        pytest.skip(f"Phi-4 reference files not found in {REFERENCE} (set PHI4MM_REFERENCE_DIR)")
    return REFERENCE


@pytest.fixture(scope="session")
def phi4_tokenizer(phi4_reference: Path) -> Any:
    """Phi-4-multimodal's real tokenizer (o200k + the added control/tool tokens)."""
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(phi4_reference / "tokenizer")


@pytest.fixture(scope="session")
def tiny_phi4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Phi-4-multimodal checkpoint folder (with vision/speech LoRA adapters), built once."""
    pytest.importorskip("torchvision")
    from agent.models.tiny import build_tiny_phi4

    return build_tiny_phi4(tmp_path_factory.mktemp("tiny-phi4"), adapters=True)


@pytest.fixture(scope="session")
def tiny_phi4_loaded(tiny_phi4_dir: Path) -> tuple[Any, Any]:
    """(model, processor) of the tiny checkpoint, loaded once through `TransformersModel.from_pretrained`."""
    from agent.models.transformers import TransformersModel

    loaded = TransformersModel.from_pretrained(tiny_phi4_dir, progress=False)
    return loaded.model, loaded.processor


@pytest.fixture
def tiny_phi4(tiny_phi4_loaded: tuple[Any, Any]) -> Iterator[Any]:
    """A fresh `TransformersModel` on the shared tiny weights: empty KV cache, adapters off (base weights)."""
    from agent.models.transformers import TransformersModel

    model, processor = tiny_phi4_loaded
    model.disable_adapters()
    yield TransformersModel(model, processor, adapters=())
    model.disable_adapters()


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A `TransformersModel` on a tiny random Llama with a ChatML template (a plain text chat model)."""
    pytest.importorskip("torch")
    from agent.models.tiny import build_tiny_chat
    from agent.models.transformers import TransformersModel

    return TransformersModel.from_pretrained(build_tiny_chat(tmp_path_factory.mktemp("tiny-chat")), progress=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`@pytest.mark.slow_with("smollm2")`: the test is slow only for that parameter (a fixture's or its own)."""
    for item in items:
        marker = item.get_closest_marker("slow_with")
        callspec = getattr(item, "callspec", None)
        if marker is not None and callspec is not None and set(marker.args) & set(map(str, callspec.params.values())):
            item.add_marker(pytest.mark.slow)
