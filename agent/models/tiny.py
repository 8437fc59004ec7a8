"""A tiny random-weight Phi-4-multimodal for tests, benchmarks and examples, built offline in seconds.

`build_tiny_phi4(folder)` writes a complete checkpoint folder (model, tokenizer, processor, optionally vision
and speech LoRA adapters) that loads through `TransformersModel.from_pretrained(folder)` exactly like the real
weights. It keeps what the real model's code paths depend on:

* the real Phi-4 control tokens (same strings, flags and relative order: `<|endoftext|>` ... `<|tool_response|>`,
  placeholders included), so rendering and escaping are identical, with ids inside a ~1K vocabulary;
* the named image/audio tokens of the converted checkpoint (`<|endoftext10|>`, `<|endoftext11|>`), wired into
  the vision and audio configs so both towers really run;
* the real image processor (448-px crops, 14-px patches, up to 36 crops) and audio feature extractor settings,
  so token counts equal the real model's;
* longrope with `original_max_position_embeddings=4096`, so the rope switch happens where it does for real.

`build_tiny_chat(folder)` writes a tiny random Llama with a ChatML template (like SmolLM2) for the backend's
path for plain chat models. `build_tiny_clip(folder)` writes a tiny random CLIP (text and image towers) for the
embedder (`agent.embedding`).

`ScriptedOutputs` is a logits processor that forces given completions token by token: a random model emits
noise, so tests and benchmarks script its turns while still running every forward pass for real.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "PHI4_ADDED_TOKENS",
    "ScriptedOutputs",
    "build_tiny_chat",
    "build_tiny_clip",
    "build_tiny_phi4",
    "phi4_control_strings",
]

# The 66 added tokens of Phi-4-multimodal (ids 199998..200063): (offset from 199998, content, special, rstrip).
# Placeholder ids hold `<|dummy_N|>` as in the reference tokenizer.
_NAMED: dict[int, tuple[str, bool, bool]] = {
    199999: ("<|endoftext|>", True, False),
    200010: ("<|endoftext10|>", True, False),
    200011: ("<|endoftext11|>", True, False),
    200018: ("<|endofprompt|>", True, False),
    200019: ("<|assistant|>", True, True),
    200020: ("<|end|>", True, True),
    200021: ("<|user|>", True, True),
    200022: ("<|system|>", True, True),
    200023: ("<|tool|>", False, True),
    200024: ("<|/tool|>", False, True),
    200025: ("<|tool_call|>", False, True),
    200026: ("<|/tool_call|>", False, True),
    200027: ("<|tool_response|>", False, True),
    200028: ("<|tag|>", True, True),
}
_FIRST_ADDED, _LAST_ADDED = 199998, 200063


def _added_tokens() -> list[tuple[str, bool, bool]]:
    out: list[tuple[str, bool, bool]] = []
    for real_id in range(_FIRST_ADDED, _LAST_ADDED + 1):
        out.append(_NAMED.get(real_id, (f"<|dummy_{real_id - _FIRST_ADDED}|>", True, False)))
    return out


PHI4_ADDED_TOKENS: tuple[tuple[str, bool, bool], ...] = tuple(_added_tokens())
"""(content, special, rstrip) of Phi-4's added tokens in id order (199998..200063)."""

_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# A fixed corpus for the tiny BPE: English, JSON tool calls, numbers, code-ish text. Deterministic.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the weather in Paris today?",
    "You are a helpful assistant with access to tools. Call a tool when it helps to answer.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    '[{"name": "search", "arguments": {"query": "phi-4 multimodal", "limit": 5}}]',
    '{"type": "object", "properties": {"path": {"type": "string"}, "size": {"type": "integer"}}}',
    "Describe the image and transcribe the audio. The result of the tool is shown below.",
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 1000 3.14 -7 2026-11-22 12:30",
    "Error: the file was not found. Try again with another path, or answer in text.",
    "hello world, how are you? I am fine, thank you. Let me check that for you.",
]
_BASE_VOCAB = 1024


def _bpe(added: Sequence[tuple[str, bool, bool]]) -> Any:
    """A small byte-level BPE trained on the fixed corpus, with `added` (content, special, rstrip) tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BASE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    for content, special, rstrip in added:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=rstrip, normalized=False, special=special)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    return tok


def _build_tokenizer() -> Any:
    transformers = _transformers()
    eot = "<|endoftext|>"
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_bpe(PHI4_ADDED_TOKENS),
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
        unk_token=eot,
        extra_special_tokens={"image_token": "<|endoftext10|>", "audio_token": "<|endoftext11|>"},
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def _transformers() -> Any:
    return importlib.import_module("transformers")


def _long_factors(n: int) -> list[float]:
    # Geometric ramp from 1 to ~48 like the real long factors (values only need to differ from the short ones).
    return [round(48.0 ** (i / max(n - 1, 1)), 6) for i in range(n)]


def build_tiny_phi4(folder: str | Path, *, adapters: bool = False, seed: int = 0) -> Path:
    """Write a tiny random Phi-4-multimodal checkpoint to `folder` and return its path.

    Args:
        folder: where to write (created if missing; existing files are overwritten).
        adapters: also write small random `vision-lora/` and `speech-lora/` PEFT adapters, as the real
            checkpoint has, so adapter routing can be tested.
        seed: torch seed for the random weights.

    Returns:
        The folder, ready for `TransformersModel.from_pretrained(folder)`.
    """
    import torch

    transformers = _transformers()

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    processor = transformers.Phi4MultimodalProcessor(
        transformers.Phi4MultimodalImageProcessor(),
        transformers.Phi4MultimodalFeatureExtractor(),
        tokenizer,
        chat_template=_CHAT_TEMPLATE,
    )
    vocab = len(tokenizer)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    hidden, heads = 64, 4
    rotary_pairs = int(hidden // heads * 0.75) // 2
    config = transformers.Phi4MultimodalConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        bos_token_id=eot,
        pad_token_id=eot,
        eos_token_id=[eot, end],
        tie_word_embeddings=True,
        initializer_range=0.1,  # sharper than the default: outputs depend visibly on positions and context
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 4096,
            "factor": 32.0,
            "short_factor": [1.0] * rotary_pairs,
            "long_factor": _long_factors(rotary_pairs),
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_token_id": tokenizer.image_token_id,
        },
        audio_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_blocks": 2,
            "num_attention_heads": 2,
            "ext_pw_out_channel": 32,
            "depthwise_separable_out_channel": 32,
            "nemo_conv_channels": 32,
            "bias_max_distance": 500,
            "audio_token_id": tokenizer.audio_token_id,
        },
    )
    torch.manual_seed(seed)
    model = transformers.Phi4MultimodalForCausalLM(config).eval()
    # The real checkpoint's image feature extensors are trained; zeros would hide ordering bugs.
    with torch.no_grad():
        embed = model.model.embed_tokens_extend.image_embed
        embed.global_img_feature_extensor.normal_(0, 0.02)
        embed.sub_img_feature_extensor.normal_(0, 0.02)
    model.generation_config.eos_token_id = [eot, end]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if adapters:
        _write_adapters(model, out, seed)
    return out


def _write_adapters(model: Any, out: Path, seed: int) -> None:
    import warnings

    import torch

    peft: Any = importlib.import_module("peft")

    target = r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))"
    for name, rank in (("vision", 8), ("speech", 4)):
        torch.manual_seed(seed + rank)
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target, init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = peft.get_peft_model(model, config)
        with torch.no_grad():  # visible but moderate effect on the logits
            for pname, param in peft_model.named_parameters():
                if "lora_" in pname:
                    param.mul_(0.5)
        peft_model.save_pretrained(out / f"{name}-lora")
        model = peft_model.unload()


_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_chat(folder: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random Llama chat model (ChatML template, like SmolLM2's) to `folder` and return its path.

    It exercises the backend's path for plain chat models (their own template, `<tool_call>` tags) offline.
    """
    import torch

    transformers = _transformers()

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    added = [("<|endoftext|>", True, False), ("<|im_start|>", True, False), ("<|im_end|>", True, False)]
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_bpe(added),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = _CHATML_TEMPLATE
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=eos,
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class ScriptedOutputs:
    """A logits processor forcing scripted completions, one per generation, for random-weight models.

    Each script is a completion text ending in an end-of-turn token (e.g. `'<|tool_call|>[...]<|/tool_call|><|end|>'`);
    it is tokenized once and forced token by token. After the last script, generation runs free.
    Use with `TransformersModel(..., logits_processors=[ScriptedOutputs(tokenizer, scripts)])`.
    """

    def __init__(self, tokenizer: Any, scripts: Iterable[str]) -> None:
        self.scripts: list[list[int]] = [
            list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in scripts
        ]
        self.script = 0
        self.position = 0

    @property
    def done(self) -> bool:
        """True once every script was forced."""
        return self.script >= len(self.scripts)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.done:
            return scores
        tokens = self.scripts[self.script]
        token = tokens[self.position]
        forced = scores.new_full(scores.shape, float("-inf"))
        forced[..., token] = 0.0
        self.position += 1
        if self.position >= len(tokens):
            self.script += 1
            self.position = 0
        return forced


def phi4_control_strings() -> Sequence[str]:
    """The content of every Phi-4 added token (control, tool, media and placeholder tokens)."""
    return [content for content, _, _ in PHI4_ADDED_TOKENS]


# CLIP's pre-tokenizer: words, single digits, punctuation runs and contractions, then byte-level.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _clip_tokenizer() -> Any:
    """A `CLIPTokenizer` whose vocabulary is every byte (alone and word-final) plus merges learnt on the corpus."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    transformers = _transformers()
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=768,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    learnt = json.loads(tok.to_str())["model"]["merges"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(a + "</w>" for a in alphabet), *("".join(pair) for pair in learnt)]:
        vocab.setdefault(token, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(pair) for pair in learnt], model_max_length=77)


def build_tiny_clip(folder: str | Path, *, seed: int = 0, dim: int = 32) -> Path:
    """Write a tiny random CLIP checkpoint (model, tokenizer, image processor) to `folder` and return its path.

    Text and vision towers of 2 layers (width 32; 32-px images in 8-px patches; 77 text positions) project
    into `dim` dimensions. The folder loads offline with `CLIPModel`/`CLIPProcessor`/`AutoTokenizer`
    `.from_pretrained(folder)` and through `TransformersEmbedder.from_pretrained(folder)`, as text and images.

    Args:
        folder: where to write (created if missing; existing files are overwritten).
        seed: torch seed for the random weights.
        dim: projection dimension (the embedding size).
    """
    import torch

    transformers = _transformers()

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _clip_tokenizer()
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = transformers.CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "projection_dim": dim,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8, "projection_dim": dim},
        projection_dim=dim,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
