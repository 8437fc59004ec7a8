"""Streaming sentence splitting for speech: text deltas in, speakable sentences out, as soon as each is complete.

A sentence ends after `.`, `!`, `?` or `…` (with any closing quotes or brackets) followed by whitespace, and at
every newline. A full stop does not end a sentence inside a number (`3.14`), after an initial (`J.`), after
dotted abbreviations (`e.g.`, `U.S.`) or after a title (`Dr.`). A long run without such an end is cut at a comma
or a space so speech can start. The decision at each character depends only on the text up to the next character,
so text streamed one character at a time splits exactly as the same text fed at once.

Markup a speaker should not read is removed from each sentence: `**`, `__`, `*`, backticks, code fences, heading
`#`s, list bullets, link targets (`[text](url)` reads `text`) and URLs, which read as their host.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["SentenceSplitter"]

_ENDERS = frozenset(".!?…")
_CLOSERS = frozenset("\"')]}”’»*_`")
_TITLES = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "cf", "approx", "fig", "gen", "gov", "sen",
     "rep", "lt", "col", "capt", "sgt", "vol", "ch", "pp"}
)  # fmt: skip
_DOTTED = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]$|^[A-HJ-Z]$")  # e.g, U.S (the last dot not included), an initial
_LIST_NUMBER = re.compile(r"^\s*\d{1,3}$")  # "1." opening a numbered item
_LONG = 200  # past this many characters, cut at a comma ...
_LONGER = 300  # ... or, past this many, at any space
_HARD = 600  # a run with no space at all is cut here

_FENCE = re.compile(r"```[\w+-]*")
_IMAGE_OR_LINK = re.compile(r"!?\[([^\]]*)\]\((?:[^()\s]|\([^()\s]*\))*\)")
_URL = re.compile(r"\b(?:https?|ftp)://[^\s<>\"')\]]+|\bwww\.[^\s<>\"')\]]+", re.IGNORECASE)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+")
_BULLET = re.compile(r"^\s*[-*+•]\s+")  # a numbered item keeps its number: it is read
_EMPHASIS = re.compile(r"\*\*|__|(?<!\w)[*_](?=\S)|(?<=\S)[*_](?!\w)|`")
_TABLE = re.compile(r"\|")
_SPACES = re.compile(r"\s+")
_SPEAKABLE = re.compile(r"\w")


class SentenceSplitter:
    """Splits streamed text into sentences a speaker can say one by one.

    ```python
    splitter = SentenceSplitter()
    for delta in ["The answer is 3.", "14. See **https://example.com/docs", "**!\\nDone"]:
        print(splitter.feed(delta))  # [], ['The answer is 3.14.'], ['See example.com!']
    print(splitter.flush())  # ['Done']
    ```
    """

    def __init__(self) -> None:
        self._text = ""  # text not yet emitted
        self._scan = 0  # characters of _text already examined
        self._base = 0  # where _text starts in all the text fed
        #: For each sentence returned so far, where its source ends in all the text fed (its offset just past
        #: the sentence's last character, markup included): what was said up to a sentence is `fed[:ends[i]]`.
        self.ends: list[int] = []

    def feed(self, delta: str) -> list[str]:
        """Add the next piece of text; returns the sentences it completes, cleaned of markup."""
        self._text += delta
        return self._split(final=False)

    def flush(self) -> list[str]:
        """End of text: returns what is left, as sentences. The splitter is then empty and can be reused."""
        sentences = self._split(final=True)
        rest = _clean(self._text)
        self._base += len(self._text)
        if rest:
            self.ends.append(self._base)
        self._text, self._scan = "", 0
        return [*sentences, rest] if rest else sentences

    def _split(self, *, final: bool) -> list[str]:
        out: list[str] = []
        text = self._text
        cut_from = 0  # start of the sentence being scanned
        i = self._scan
        while i < len(text):
            cut = self._boundary(text, cut_from, i, final)
            if cut is None:  # undecided until more text arrives
                break
            if cut > 0:
                sentence = _clean(text[cut_from:cut])
                if sentence:
                    out.append(sentence)
                    self.ends.append(self._base + cut)
                cut_from = cut
                i = cut
            else:
                i += 1
        self._base += cut_from
        self._text = text[cut_from:]
        self._scan = max(i - cut_from, 0)
        return out

    def _boundary(self, text: str, begin: int, i: int, final: bool) -> int | None:
        """Where a sentence ends if it ends at character i: an index > 0, 0 for no end here, None for undecided."""
        char = text[i]
        if char == "\n":
            return i + 1
        length = i - begin
        if char in _ENDERS:
            j = i + 1
            while j < len(text) and (text[j] in _ENDERS or text[j] in _CLOSERS):
                j += 1
            if j == len(text):
                return j if final else None
            if not text[j].isspace():
                return 0
            if char == "." and j == i + 1 and (_abbreviation(text[begin:i]) or _LIST_NUMBER.match(text[begin:i])):
                return 0
            return j
        if char.isspace() and length >= _LONG and (text[i - 1] in ",;:" or length >= _LONGER):
            return i + 1
        if length >= _HARD:
            return i
        return 0


def _abbreviation(before: str) -> bool:
    """Whether the word ending `before` (a full stop follows it) is an abbreviation, not a sentence's end."""
    word = before.rsplit(None, 1)[-1] if before.strip() else ""
    word = word.lstrip("\"'([{“‘*_`")
    if not word:
        return False
    return word.lower() in _TITLES or bool(_DOTTED.match(word))


def _clean(sentence: str) -> str:
    """The sentence as it should be read: markup removed, URLs shortened to their host, spaces collapsed."""
    text = _FENCE.sub(" ", sentence)
    text = _IMAGE_OR_LINK.sub(lambda m: m.group(1), text)
    text = _URL.sub(_host, text)
    text = _HEADING.sub("", text)
    text = _BULLET.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _TABLE.sub(" ", text)
    text = _SPACES.sub(" ", text).strip()
    return text if _SPEAKABLE.search(text) else ""


def _host(match: re.Match[str]) -> str:
    url = match.group(0)
    trailing = ""
    while url and url[-1] in ".,;:!?":  # punctuation after a URL belongs to the sentence
        trailing = url[-1] + trailing
        url = url[:-1]
    try:
        host = urlsplit(url if "://" in url else f"http://{url}").hostname or ""
    except ValueError:
        host = ""
    host = host.removeprefix("www.")
    return (host or "a link") + trailing
