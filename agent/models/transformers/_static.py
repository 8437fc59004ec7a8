"""The static decode path: a preallocated KV cache sized in buckets, and a one-token step that can be compiled.

An eager decode step on a `DynamicCache` costs a Python walk through every layer plus one kernel launch per op:
on an H100 that held the full-size Phi-4 to ~27 tokens/s, a fifteenth of what its memory bandwidth allows. A
static cache keeps every tensor at a fixed address and shape, so the step can be compiled
(`torch.compile`) and, on CUDA, replayed as one CUDA graph (`mode="reduce-overhead"`).

`StaticKV` owns the cache: its capacity is the smallest bucket (a power of two, at least 1024 tokens) that
holds the request; a longer request grows it to the next bucket, copying the tokens it can keep, so KV reuse
survives growth. Cropping is exact (the tokens past the new length are masked out and overwritten). Every
bucket is a new shape, so the compiled step compiles once per bucket (logged, since it takes a while).

`DecodeStep` runs one token through the model on that cache: the token's embedding (a decode step never holds
media), its position, the cache. Prefill, forced multi-token steps and media run the model's ordinary forward
on the same cache.

Transformers internals used: `StaticCache` layers keep their length in `cumulative_length` (a tensor) and,
for sliding-window layers, `cumulative_length_int`; `StaticKV.check` refuses a transformers whose layers lack
them, so a change there is a clear error at load time, not wrong tokens.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Literal

from agent.exceptions import ModelLoadError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("agent.models.transformers")

DecodeMode = Literal["eager", "static", "compiled"]
"""`eager`: a growing `DynamicCache`, the model's forward per token. `static`: a preallocated cache and the
one-token step, uncompiled. `compiled`: the same step through `torch.compile` (CUDA graphs on CUDA)."""

MIN_BUCKET = 1024
PREFILL_CHUNK = 2048  # tokens per prefill forward on a static cache: bounds the [chunk, capacity] attention mask


def resolve_decode(decode: str, device: torch.device) -> DecodeMode:
    """`auto` -> `compiled` on CUDA, `eager` elsewhere; a named mode is checked and kept."""
    if decode == "auto":
        return "compiled" if device.type == "cuda" else "eager"
    if decode not in ("eager", "static", "compiled"):
        raise ModelLoadError(f"decode must be 'auto', 'eager', 'static' or 'compiled', not {decode!r}")
    return decode  # type: ignore[return-value]


def bucket(needed: int, limit: int | None, smallest: int = MIN_BUCKET) -> int:
    """The smallest power of two >= `needed` (at least `smallest`), capped at `limit` (the model's positions)."""
    size = smallest
    while size < needed:
        size *= 2
    if limit is not None and size > limit:
        size = max(limit, needed)
    return size


class StaticKV:
    """A `StaticCache` that grows in buckets, with an exact length the engine sets (crop) and reads."""

    def __init__(self, config: Any, limit: int | None) -> None:
        self.config = config
        self.limit = limit
        self.min_bucket = MIN_BUCKET
        self.cache: Any = None
        self.capacity = 0
        self.length = 0

    @staticmethod
    def check(config: Any) -> None:
        """Refuse a transformers whose static cache layers do not keep their length where we set it."""
        from transformers import StaticCache

        layer = StaticCache(config=config, max_cache_len=8).layers[0]
        if not hasattr(layer, "cumulative_length"):
            raise ModelLoadError(
                "decode='static'/'compiled' needs transformers' StaticCache layers with `cumulative_length` "
                "(transformers 5.x); use decode='eager' with this version"
            )

    def reserve(self, needed: int, keep: int) -> None:
        """Make room for `needed` tokens, keeping the first `keep` cached ones (copied when the cache grows)."""
        keep = max(0, min(keep, self.length)) if self.cache is not None else 0
        if self.cache is not None and needed <= self.capacity:
            self.truncate(keep)
            return
        from transformers import StaticCache

        size = bucket(needed, self.limit, self.min_bucket)
        fresh: Any = StaticCache(config=self.config, max_cache_len=size)
        if keep:
            for old, new in zip(self.cache.layers, fresh.layers, strict=True):
                if not getattr(old, "is_initialized", False):
                    continue
                new.lazy_initialization(old.keys[:, :, :1], old.values[:, :, :1])
                new.keys[:, :, :keep].copy_(old.keys[:, :, :keep])
                new.values[:, :, :keep].copy_(old.values[:, :, :keep])
        if self.cache is not None:
            log.info("static KV cache: %d -> %d tokens", self.capacity, size)
        self.cache, self.capacity = fresh, size
        self.length = -1  # force truncate to write the lengths
        self.truncate(keep)

    def truncate(self, n: int) -> None:
        """Hold exactly the first `n` tokens (later positions are masked out, then overwritten)."""
        if n == self.length:
            return
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(n)
            if hasattr(layer, "cumulative_length_int"):
                layer.cumulative_length_int = n
        self.length = n

    def advanced(self, n: int) -> None:
        """The model wrote `n` more tokens (its layers moved their own lengths)."""
        self.length += n

    def drop(self) -> None:
        self.cache, self.capacity, self.length = None, 0, 0


class DecodeStep:
    """One token through the model on a `StaticKV`: compiled once per bucket in `compiled` mode."""

    def __init__(self, model: Any, compiled: bool) -> None:
        self.model = model
        self.compiled = compiled
        self._fn: Any = None
        self._shapes: set[int] = set()  # buckets the compiled step has run at

    def _build(self) -> Any:
        import torch

        model = self.model
        embed = model.get_input_embeddings()

        def step(input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
            out = model(
                inputs_embeds=embed(input_ids),
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1]  # type: ignore[no-any-return]

        if not self.compiled:
            return step
        device = next(model.parameters()).device
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs where there is CUDA
        return torch.compile(step, mode=mode, fullgraph=False, dynamic=False)

    def __call__(self, token: int, position: int, kv: StaticKV) -> torch.Tensor:
        import torch

        if self._fn is None:
            self._fn = self._build()
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([[token]], dtype=torch.long, device=device)
        position_ids = torch.tensor([[position]], dtype=torch.long, device=device)
        first = self.compiled and kv.capacity not in self._shapes
        started = time.perf_counter()
        logits = self._fn(input_ids, position_ids, kv.cache)[0].clone()  # a CUDA graph's output is overwritten
        if first:
            self._shapes.add(kv.capacity)
            seconds = time.perf_counter() - started
            log.info("compiled the decode step for %d cached tokens in %.1f s", kv.capacity, seconds)
        kv.advanced(1)
        return logits  # type: ignore[no-any-return]


class RopeRegime:
    """Pins a longrope model's rotary frequencies to one regime for a forward pass.

    Longrope picks short or long frequencies from the largest position *in the forward pass*. A prompt longer
    than the switch, prefilled in chunks, would otherwise compute its first chunks under the short regime and
    the rest under the long one; the whole sequence must use the regime of its full length.
    """

    def __init__(self, model: Any) -> None:
        self.rotaries = [m for m in model.modules() if getattr(m, "rope_type", None) == "longrope"]

    def pin(self, long: bool, switch: int) -> None:
        import inspect
        import types

        import torch

        self.unpin()
        for rotary in self.rotaries:
            decorated = type(rotary).forward
            probe = torch.tensor([[switch if long else 0]], device=rotary.inv_freq.device)
            decorated(rotary, rotary.inv_freq[None, None], probe)  # the decorator sets `inv_freq` for the regime
            # the bare forward (under `dynamic_rope_update` and `no_grad`) rotates with `inv_freq` as it is
            rotary.forward = types.MethodType(inspect.unwrap(decorated), rotary)

    def unpin(self) -> None:
        for rotary in self.rotaries:
            rotary.__dict__.pop("forward", None)
