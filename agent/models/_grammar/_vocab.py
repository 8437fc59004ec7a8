"""Per-tokenizer token tables for constrained decoding: packed bitmasks and the helpers that combine them.

A bitmask is an int32 array of `ceil(vocab / 32)` words; token `i` is bit `i % 32` of word `i // 32` (the
layout llguidance fills). Everything here is numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Bits = npt.NDArray[np.int32]
Bools = npt.NDArray[np.bool_]

# Closing (the token budget is nearly spent): prefer tokens made only of these bytes, in this order, so that
# strings, numbers, arrays and objects end quickly. Inside a JSON string, tokens that start with the closing
# quote come first; outside, a comma comes only right after a closer (`},`) until the last class, since a
# token that completes an item and then adds a comma would open another one. Tokens outside every class
# stay allowed when the grammar allows nothing else (keys and enum values it forces, say).
_IN_STRING_CLASSES = (b'"}]', b'"}],: ')
_OUTSIDE_CLASSES = (b"}]", b"}],", b'}]: "[{', b'}]: "[{0123456789-.', b'}],: "[{0123456789-.')


def words_for(vocab_size: int) -> int:
    """Number of int32 words in a bitmask over `vocab_size` tokens."""
    return (vocab_size + 31) // 32


def pack(mask: Bools) -> Bits:
    """Pack a bool array into a bitmask."""
    padded = np.zeros(words_for(len(mask)) * 32, dtype=np.bool_)
    padded[: len(mask)] = mask
    return np.packbits(padded, bitorder="little").view(np.int32).copy()


def unpack(bits: Bits, vocab_size: int) -> Bools:
    """Unpack a bitmask into a bool array of `vocab_size`."""
    return np.unpackbits(bits.view(np.uint8), count=vocab_size, bitorder="little").view(np.bool_)


def set_ids(bits: Bits, vocab_size: int) -> npt.NDArray[np.int64]:
    """Ids of the set bits (below `vocab_size`); works word by word, so sparse masks are cheap."""
    words = np.flatnonzero(bits)
    if len(words) * 2 > len(bits):  # dense: unpacking everything is as cheap
        return np.flatnonzero(unpack(bits, vocab_size))
    expanded = np.unpackbits(bits[words].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    rows, cols = np.nonzero(expanded)
    ids = words[rows] * 32 + cols
    return ids[ids < vocab_size]


def count(bits: Bits) -> int:
    """Number of set bits."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return int(np.bitwise_count(bits.view(np.uint32)).sum())
    return int(np.unpackbits(bits.view(np.uint8)).sum())


def ids_to_bits(ids: Iterable[int], vocab_size: int) -> Bits:
    """A bitmask with exactly `ids` set (ids outside the vocabulary are ignored)."""
    mask = np.zeros(vocab_size, dtype=np.bool_)
    for i in ids:
        if 0 <= i < vocab_size:
            mask[i] = True
    return pack(mask)


def has_bit(bits: Bits, token_id: int) -> bool:
    """Whether `token_id` is set in `bits`."""
    return bool((int(bits[token_id >> 5]) >> (token_id & 31)) & 1)


@dataclass(slots=True)
class TokenTables:
    """What the matcher needs to know about each token, computed once per tokenizer.

    `no_lt_pipe` clears tokens whose bytes contain `<|`; `no_pipe_start` clears tokens starting with `|`
    (applied right after a token that ends with `<`). Only ordinary tokens are cleared (added tokens are
    the grammar's business). Together they keep ordinary tokens from spelling `<|...|>` in the output,
    where `parse_completion` or the next prompt would read a control token.
    """

    vocab_size: int
    token_bytes: list[bytes]
    special: Bools
    token_lengths: npt.NDArray[np.int32]
    no_lt_pipe: Bits
    no_pipe_start: Bits
    any_lt_pipe: bool
    _closing: dict[bool, list[npt.NDArray[np.int64]]] = field(default_factory=dict)

    @classmethod
    def build(cls, token_bytes: Sequence[bytes], special: Sequence[bool]) -> TokenTables:
        """Tables from each token's bytes and whether it is a special (added) token."""
        n = len(token_bytes)
        is_special = np.asarray(special, dtype=np.bool_)
        lt_pipe = np.zeros(n, dtype=np.bool_)
        pipe_start = np.zeros(n, dtype=np.bool_)
        for i, b in enumerate(token_bytes):
            if is_special[i] or not b:
                continue
            lt_pipe[i] = b"<|" in b
            pipe_start[i] = b[:1] == b"|"
        return cls(
            vocab_size=n,
            token_bytes=list(token_bytes),
            special=is_special,
            token_lengths=np.array([len(b) for b in token_bytes], dtype=np.int32),
            no_lt_pipe=pack(~lt_pipe),
            no_pipe_start=pack(~pipe_start),
            any_lt_pipe=bool(lt_pipe.any()),
        )

    def closing_classes(self, *, in_string: bool) -> list[npt.NDArray[np.int64]]:
        """Token ids of each closing class, best class first, longest token first within a class.

        Args:
            in_string: the output is inside a JSON string; its classes come first and hold only tokens
                that start with the closing quote and hold no other quote.
        """
        cached = self._closing.get(in_string)
        if cached is not None:
            return cached
        flat, starts, lengths = self._flat()
        ordinary = ~self.special & (lengths > 0)
        first_quote = np.zeros(self.vocab_size, dtype=np.bool_)
        first_quote[ordinary] = flat[starts[ordinary]] == ord('"')
        quotes = _count_per_token(flat == ord('"'), starts, lengths)
        classes = []
        specs = [(c, True) for c in _IN_STRING_CLASSES] if in_string else []
        specs += [(c, False) for c in _OUTSIDE_CLASSES]
        for chars, quote_first in specs:
            table = np.zeros(256, dtype=np.bool_)
            table[list(chars)] = True
            mask = ordinary & (_count_per_token(~table[flat], starts, lengths) == 0)
            if quote_first:
                mask &= first_quote & (quotes == 1)
            ids = np.flatnonzero(mask)
            classes.append(ids[np.argsort(-self.token_lengths[ids], kind="stable")])
        self._closing[in_string] = classes
        return classes

    def _flat(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """All token bytes concatenated, each token's start offset, and its length."""
        flat = np.frombuffer(b"".join(self.token_bytes), dtype=np.uint8)
        lengths = self.token_lengths.astype(np.int64)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        return flat, starts, lengths


def _count_per_token(
    hits: npt.NDArray[np.bool_], starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """How many of each token's bytes are set in `hits` (a per-byte flag over the concatenated bytes)."""
    cumulative = np.concatenate(([0], np.cumsum(hits, dtype=np.int64)))
    counts: npt.NDArray[np.int64] = cumulative[starts + lengths] - cumulative[starts]
    return counts
