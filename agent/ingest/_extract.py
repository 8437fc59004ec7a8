"""Extractors: named, versioned steps that turn a segment's media into text with the model.

Every prompt lives here. An extractor's `version` names its prompt and output shape: change either and bump
it, and the next ingest re-runs that extractor (only it) over stored segments. Outputs are typed Pydantic
values; their main text is what search indexes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

from agent.messages import AudioPart, ImagePart, Message, TextPart
from agent.models import Model, ModelSettings, Usage

SegmentKind = Literal["scene", "audio", "image", "page"]


class SceneCaption(BaseModel):
    """What a scene shows (and what is heard in it)."""

    caption: str = Field(description="one or two sentences on what the scene shows and what is said or heard")


class Transcript(BaseModel):
    """The words spoken in an audio segment."""

    text: str = Field(description="the words spoken, verbatim")


class PageText(BaseModel):
    """The text on a document page, in reading order."""

    text: str = Field(description="the page's text in reading order")


@dataclass(frozen=True, slots=True)
class Extractor:
    """One extraction step.

    Attributes:
        name: the stored feature's name (`scene_caption`, `transcript`, `page_text`, or your own).
        version: bumped whenever `prompt`, `output` or how the media are chosen changes.
        kinds: the segment kinds it runs on.
        prompt: the instruction that follows the segment's media in one user turn.
        output: the Pydantic type of its result; its first field holds the text that is indexed.
        max_tokens: the most tokens generated per segment.
        audio: whether the segment's audio goes in the request with its images (video scenes with sound).
    """

    name: str
    version: str
    kinds: frozenset[SegmentKind]
    prompt: str
    output: type[BaseModel]
    max_tokens: int = 256
    audio: bool = False
    system: str | None = field(default=None)

    def parse(self, text: str) -> BaseModel:
        """The model's answer as `output` (its text in the first field, stripped)."""
        first = next(iter(self.output.model_fields))
        return self.output.model_validate({first: text.strip()})

    async def run(self, model: Model, images: Sequence[ImagePart], audio: AudioPart | None) -> tuple[BaseModel, Usage]:
        """Ask `model` about one segment's media; the answer (typed) and what it cost."""
        parts: list[ImagePart | AudioPart | TextPart] = list(images)
        if audio is not None and self.audio:
            parts.append(audio)
        parts.append(TextPart(text=self.prompt))
        messages = [Message(role="user", parts=tuple(parts))]
        if self.system:
            messages.insert(0, Message.system(self.system))
        response = await model.request(messages, [], ModelSettings(max_tokens=self.max_tokens, tool_choice="none"))
        return self.parse(response.message.text), response.usage


def main_text(value: BaseModel) -> str:
    """The indexed text of an extractor's output: its first field."""
    first = next(iter(type(value).model_fields))
    return str(getattr(value, first))


SCENE_CAPTION = Extractor(
    name="scene_caption",
    version="1",
    kinds=frozenset({"scene", "image"}),
    prompt=(
        "Describe this scene in one or two sentences: the setting, people, objects, colours and any text on "
        "screen. If there is speech or sound, say what is said or heard."
    ),
    output=SceneCaption,
    max_tokens=120,
    audio=True,
)

TRANSCRIPT = Extractor(
    name="transcript",
    version="1",
    kinds=frozenset({"audio"}),
    prompt="Transcribe the audio clip into text.",  # Phi-4-multimodal's own speech recognition instruction
    output=Transcript,
    max_tokens=512,
)

PAGE_TEXT = Extractor(
    name="page_text",
    version="1",
    kinds=frozenset({"page"}),
    prompt="Read this page and write out all of its text in reading order, as plain text.",
    output=PageText,
    max_tokens=1024,
)

DEFAULT_EXTRACTORS: tuple[Extractor, ...] = (SCENE_CAPTION, TRANSCRIPT, PAGE_TEXT)
