"""Word error rate of a model's transcriptions over a folder of clips, through the model seam (jiwer scores).

A folder holds either `manifest.jsonl` (one `{"audio": "relative/path.wav", "text": "the reference"}` a line)
or pairs `NAME.wav` + `NAME.txt` (any of .wav .flac .ogg .mp3; the .txt holds the reference transcript).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.exceptions import UserError
from agent.messages import Message, as_audio_part
from agent.models import Model, ModelSettings

__all__ = ["AUDIO_SUFFIXES", "TRANSCRIBE_PROMPT", "AsrClip", "AsrResult", "AsrRun", "load_asr_folder", "run_asr"]

TRANSCRIBE_PROMPT = "Transcribe the audio clip into text."
"""Phi-4-multimodal's own speech-recognition instruction."""

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
MANIFEST = "manifest.jsonl"


@dataclass(frozen=True, slots=True)
class AsrClip:
    """One clip and its reference transcript."""

    name: str
    audio: Path
    reference: str


def load_asr_folder(folder: str | Path) -> list[AsrClip]:
    """The clips of a folder (`manifest.jsonl`, else `NAME.wav` + `NAME.txt` pairs), sorted by name.

    Raises:
        UserError: no such folder, no clips, a clip without a transcript, an empty transcript, or a manifest
            line that is not `{"audio": ..., "text": ...}` (the message names the file and line).
    """
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"no folder {str(root)!r}")
    manifest = root / MANIFEST
    clips = _from_manifest(manifest) if manifest.is_file() else _from_pairs(root)
    if not clips:
        raise UserError(
            f"no audio clips in {str(root)!r}: put NAME.wav + NAME.txt pairs there, or a {MANIFEST} "
            'with {"audio": "NAME.wav", "text": "..."} lines'
        )
    for clip in clips:
        if not clip.reference.strip():
            raise UserError(f"the reference transcript of {clip.name!r} is empty")
    return clips


def _from_manifest(manifest: Path) -> list[AsrClip]:
    clips = []
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {str(manifest)!r}: {getattr(exc, 'strerror', None) or exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"malformed {MANIFEST} line {number}: {exc.msg}") from exc
        if not (isinstance(entry, dict) and isinstance(entry.get("audio"), str) and isinstance(entry.get("text"), str)):
            raise UserError(f'malformed {MANIFEST} line {number}: expected {{"audio": PATH, "text": REFERENCE}}')
        audio = manifest.parent / entry["audio"]
        clips.append(AsrClip(str(entry.get("id") or entry["audio"]), audio, entry["text"]))
    return clips


def _from_pairs(root: Path) -> list[AsrClip]:
    clips = []
    for audio in sorted(p for p in root.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
        transcript = audio.with_suffix(".txt")
        if not transcript.is_file():
            raise UserError(f"no transcript for {audio.name!r}: expected {transcript.name!r} beside it")
        try:
            reference = transcript.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {transcript.name!r}: {getattr(exc, 'strerror', None) or exc}") from exc
        clips.append(AsrClip(audio.stem, audio, reference))
    return clips


@dataclass(frozen=True, slots=True)
class AsrResult:
    """One clip's transcription and its word error rate (after normalisation, when asked)."""

    name: str
    reference: str
    hypothesis: str
    wer: float
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reference": self.reference,
            "hypothesis": self.hypothesis,
            "wer": self.wer,
            "seconds": round(self.seconds, 3),
        }


@dataclass(slots=True)
class AsrRun:
    """A pass over the clips.

    Attributes:
        model: the model's name.
        results: per clip.
        wer: the corpus WER: errors over all clips / reference words over all clips.
        substitutions, deletions, insertions, hits: jiwer's counts over all clips.
        normalized: whether texts were lower-cased and stripped of punctuation before scoring.
        seconds: the whole pass's wall time.
    """

    model: str
    results: list[AsrResult] = field(default_factory=list)
    wer: float = 0.0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    hits: int = 0
    normalized: bool = True
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "wer": self.wer,
            "substitutions": self.substitutions,
            "deletions": self.deletions,
            "insertions": self.insertions,
            "hits": self.hits,
            "normalized": self.normalized,
            "prompt": TRANSCRIBE_PROMPT,
            "seconds": round(self.seconds, 1),
            "clips": [r.to_json() for r in self.results],
        }


def _jiwer() -> Any:
    try:
        import jiwer
    except ImportError as exc:
        raise UserError("WER needs jiwer: pip install mmagent[eval]") from exc
    return jiwer


def _transform(normalize: bool) -> Any:
    jiwer = _jiwer()
    steps: list[Any] = [jiwer.ToLowerCase(), jiwer.RemovePunctuation()] if normalize else []
    steps += [jiwer.RemoveMultipleSpaces(), jiwer.Strip(), jiwer.ReduceToListOfListOfWords()]
    return jiwer.Compose(steps)


def _words(references: Sequence[str], hypotheses: Sequence[str], normalize: bool) -> Any:
    jiwer = _jiwer()
    transform = _transform(normalize)
    return jiwer.process_words(
        list(references), list(hypotheses), reference_transform=transform, hypothesis_transform=transform
    )


async def run_asr(
    model: Model,
    clips: Sequence[AsrClip],
    *,
    normalize: bool = True,
    settings: ModelSettings | None = None,
    progress: Callable[[AsrResult], None] | None = None,
) -> AsrRun:
    """Transcribe each clip (a user turn: the audio, then `TRANSCRIBE_PROMPT`) and score it with jiwer.

    Args:
        model: a backend that reads audio (check `agent.models.resolve.reads_media` first).
        clips: from `load_asr_folder`.
        normalize: lower-case and strip punctuation before scoring (both sides).
        settings: generation settings; by default greedy, 512 tokens, no tools.
        progress: called with each result as it comes.

    Raises:
        MediaError: a clip cannot be read (the media gate's message).
        UserError: jiwer is not installed (`pip install mmagent[eval]`).
    """
    _jiwer()  # fail before the first request, not after it
    settings = settings or ModelSettings(max_tokens=512, tool_choice="none")
    run = AsrRun(model=model.name, normalized=normalize)
    started = time.perf_counter()
    for clip in clips:
        message = Message.user(TRANSCRIBE_PROMPT, audio=[as_audio_part(clip.audio)])
        begun = time.perf_counter()
        response = await model.request([message], [], settings)
        hypothesis = response.message.text.strip()
        wer = float(_words([clip.reference], [hypothesis], normalize).wer)
        run.results.append(AsrResult(clip.name, clip.reference, hypothesis, wer, time.perf_counter() - begun))
        if progress is not None:
            progress(run.results[-1])
    run.seconds = time.perf_counter() - started
    if run.results:
        total = _words([r.reference for r in run.results], [r.hypothesis for r in run.results], normalize)
        run.wer = float(total.wer)
        run.substitutions, run.deletions = int(total.substitutions), int(total.deletions)
        run.insertions, run.hits = int(total.insertions), int(total.hits)
    return run
