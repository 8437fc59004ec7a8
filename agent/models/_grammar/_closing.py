"""Output tracking, the `<|` overlay and budget planning for constrained decoding (numpy + an llguidance matcher).

Budget planning keeps `max_tokens` from cutting a call in half. The matcher simulates, on a copy of the
grammar state, the shortest way it knows to finish the output (forced tokens in one go, otherwise the
longest allowed token of the best closing class: closing quotes first inside a string, then `}`/`]`, then
separators, then openers): a plan of `L` tokens. `G` bounds how much one token can add to `L` (the longest
plan for a fresh call, computed once per constraint). With `R` tokens left, the slack is `R - L - G - 4`:

- while the slack is positive, decoding is free; each step spends at most 1 of it, and a token that may
  open something (`{`, `[`, `,` outside strings, or the call block itself) at most `G` more, so the plan is
  refreshed only when the worst case has eaten half the slack;
- when the slack is gone, the plan itself is emitted (forced mode), which ends the output in the budget.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.models._grammar._vocab import Bits, TokenTables, has_bit, set_ids

PLAN_LIMIT = 512  # simulated tokens at most; a longer plan means "close now"
_OPENERS = frozenset(b"{[,")


@dataclass(slots=True)
class OutputState:
    """What the matcher tracks about the bytes produced so far.

    Attributes:
        in_call: the call block has started.
        in_string: inside a JSON string of the call block.
        escape: the previous byte in that string was a backslash.
        after_lt: the last token ended with `<` (so the next may not start with `|`).
        tail: the last bytes before the call starts (to spot a textual open tag).
        answer: the output is a JSON answer or a call block (`response_format`): JSON is tracked from the
            first token that does not start the block, as if it were a call.
    """

    in_call: bool = False
    in_string: bool = False
    escape: bool = False
    after_lt: bool = False
    tail: bytes = b""
    answer: bool = False

    def copy(self) -> OutputState:
        return OutputState(self.in_call, self.in_string, self.escape, self.after_lt, self.tail, self.answer)

    def feed(self, token_id: int, data: bytes, *, open_token_id: int | None, opener: bytes) -> bool:
        """Update after `token_id` (whose bytes are `data`); True when it may have opened something new."""
        self.after_lt = data[-1:] == b"<"
        if self.in_call:
            return self._scan_json(data)
        if self.answer and data and token_id != open_token_id and not opener.startswith(data[:1]):
            self.in_call = True  # the JSON answer starts
            self._scan_json(data)
            return True
        if open_token_id is not None:
            self.in_call = token_id == open_token_id
        else:
            self.tail = (self.tail + data)[-(len(opener) + len(data)) :]
            self.in_call = opener in self.tail
        return self.in_call

    def _scan_json(self, data: bytes) -> bool:
        in_string, escape, opened = self.in_string, self.escape, False
        for byte in data:
            if not in_string:
                in_string = byte == 0x22  # '"'
                opened = opened or byte in _OPENERS
            elif escape:
                escape = False
            elif byte == 0x5C:  # backslash
                escape = True
            elif byte == 0x22:
                in_string = False
        self.in_string, self.escape = in_string, escape
        return opened


@dataclass(slots=True)
class MaskBuffers:
    """Scratch bitmasks reused across steps (no allocation per token)."""

    raw: Bits
    work: Bits
    tmp: Bits

    @classmethod
    def for_words(cls, words: int) -> MaskBuffers:
        return cls(*(np.zeros(words, dtype=np.int32) for _ in range(3)))


def grammar_mask(inner: Any, tables: TokenTables, state: OutputState, buffers: MaskBuffers) -> Bits:
    """The grammar's mask minus tokens that would spell `<|` (lifted when nothing else is allowed)."""
    raw, work = buffers.raw, buffers.work
    if not tables.any_lt_pipe and not state.after_lt:  # nothing to take out (o200k has no `<|` token)
        inner.unsafe_compute_mask_ptr(work.ctypes.data, work.nbytes)
        return work
    inner.unsafe_compute_mask_ptr(raw.ctypes.data, raw.nbytes)
    np.bitwise_and(raw, tables.no_lt_pipe, out=work)
    if state.after_lt:
        np.bitwise_and(work, tables.no_pipe_start, out=work)
    if not work.any():  # only `<|` continues the grammar (a schema literal holds it): allow it
        work[:] = raw
    return work


def best_closer(
    bits: Bits,
    tables: TokenTables,
    state: OutputState,
    eos: Sequence[int],
    close_ids: Sequence[int],
    rng: random.Random | None = None,
) -> int | None:
    """The token that best closes the output: an allowed end-of-turn or close-marker id, else the longest
    allowed token of the best closing class (a random one of that class with `rng`), else the longest allowed
    token; None when nothing is allowed."""
    for token in (*eos, *close_ids):
        if has_bit(bits, token):
            return token
    for ids in tables.closing_classes(in_string=state.in_string and state.in_call):
        if len(ids):
            found = np.flatnonzero((bits[ids >> 5] >> (ids & 31).astype(np.int32)) & 1)
            if len(found):
                return int(ids[found[rng.randrange(len(found))] if rng is not None else found[0]])
    allowed = set_ids(bits, tables.vocab_size)
    if not len(allowed):
        return None
    return int(allowed[int(np.argmax(tables.token_lengths[allowed]))])


def plan_closing(
    inner: Any,
    tables: TokenTables,
    state: OutputState,
    eos: Sequence[int],
    close_ids: Sequence[int],
    buffers: MaskBuffers,
    *,
    open_token_id: int | None,
    opener: bytes,
) -> list[int]:
    """Tokens that finish the output from the current state (the last one an end-of-turn id); runs on a copy.

    The greedy choice can loop where a schema needs a particular digit (`-0.000...` under an exclusive
    minimum, say): a run of one repeated token ends that attempt, and a few randomized attempts follow.
    `PLAN_LIMIT` tokens mean no way to finish was found.
    """
    failed = [0] * PLAN_LIMIT

    def attempt(rng: random.Random | None) -> list[int]:
        sim = inner.deep_copy()
        sim_state = state.copy()
        path: list[int] = []
        while len(path) < PLAN_LIMIT:
            if sim.is_error():
                return failed
            if sim.is_accepting() or sim.is_stopped():
                path.append(eos[0] if eos else 0)
                return path
            if len(path) >= _REPEAT and len(set(path[-_REPEAT:])) == 1:
                return failed  # looping on one token
            forced = sim.compute_ff_tokens()
            if forced:
                chosen = list(forced)
            else:
                bits = grammar_mask(sim, tables, sim_state, buffers)
                best = best_closer(bits, tables, sim_state, eos, close_ids, rng)
                if best is None:
                    return failed
                chosen = [best]
            for token in chosen:
                if not sim.consume_token(token):
                    return failed
                sim_state.feed(token, tables.token_bytes[token], open_token_id=open_token_id, opener=opener)
                path.append(token)
        return path

    for index in range(_ATTEMPTS):
        path = attempt(random.Random(index) if index else None)
        if len(path) < PLAN_LIMIT:
            return path
    return failed


_ATTEMPTS = 4
_REPEAT = 16  # one token this many times in a row: the attempt is looping


def growth_bound(
    template: Any,
    prefixes: Sequence[Sequence[int]],
    tables: TokenTables,
    eos: Sequence[int],
    close_ids: Sequence[int],
    *,
    open_token_id: int | None,
    opener: bytes,
    answer: bool = False,
) -> int:
    """`G`: the longest `prefix + plan` over the given call prefixes (one per tool), from a fresh state."""
    buffers = MaskBuffers.for_words(len(tables.no_lt_pipe))
    bound = 2
    for prefix in prefixes:
        sim = template.deep_copy()
        state = OutputState(answer=answer)
        if not sim.consume_tokens(list(prefix)):
            continue
        for token in prefix:
            state.feed(token, tables.token_bytes[token], open_token_id=open_token_id, opener=opener)
        plan = plan_closing(sim, tables, state, eos, close_ids, buffers, open_token_id=open_token_id, opener=opener)
        bound = max(bound, len(prefix) + len(plan))
    return bound
