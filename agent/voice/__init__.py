"""Real-time voice: a spoken conversation with an agent, and its parts.

`VoiceSession(agent, speaker=...)` takes audio frames in (any rate), finds the user's turns, hands each to the
agent as audio (Phi-4-multimodal hears it directly: no separate speech recognition), speaks the answer sentence by
sentence as it streams, and stops generating and speaking the moment the user talks over it (barge-in). Its
transports: `mmagent voice` (microphone and speaker) and `mmagent serve`'s `/v1/realtime` WebSocket (a subset of
the OpenAI Realtime protocol, `agent.voice._realtime`).

| part | does |
|---|---|
| `VoiceSession` | the loop: `feed(samples, rate)`, `commit()`, `say(text)`, `interrupt()`, `truncate()`, `events()` |
| `TurnDetector` | cuts a live audio stream (any rate or chunking) into `Turn`s, `SpeechStarted`, `SpeechStopped` |
| `SileroVAD` | the default voice-activity model (silero-vad's packaged TorchScript model, CPU, no download) |
| `SentenceSplitter` | cuts streamed model text into speakable sentences as they complete |
| `Speaker` | the speech seam: `speak(text)` yields audio chunks; `KokoroSpeaker`, `EspeakSpeaker`, `ToneSpeaker` |
| `choose_speaker()` | the best speaker available here, with a line saying which |
| `frames()` | re-chunks audio into 20 ms frames, so playback can stop within one frame |

```python
import soundfile as sf
from agent.voice import SentenceSplitter, ToneSpeaker, Turn, TurnDetector, frames

detector = TurnDetector()  # SileroVAD: pip install 'mmagent[voice]'
audio, rate = sf.read("examples/data/request.wav", dtype="int16")
for start in range(0, len(audio), rate // 50):  # 20 ms chunks, as from a microphone
    for event in detector.feed(audio[start : start + rate // 50], rate):
        print(event)  # SpeechStarted(at=0.032), then SpeechStopped and Turn after a pause
turns = [e for e in detector.flush() if isinstance(e, Turn)]  # the clip ends mid-turn: flush() ends it

async def say(text_deltas):
    splitter, speaker = SentenceSplitter(), ToneSpeaker()  # or choose_speaker()[0]

    async def speak(sentences):
        for sentence in sentences:
            async for frame in frames(speaker.speak(sentence), speaker.rate):
                ...  # play the 20 ms frame; stop here on barge-in

    for delta in text_deltas:
        await speak(splitter.feed(delta))  # each sentence as soon as it is complete
    await speak(splitter.flush())
```

torch (with silero-vad's model file) is loaded only by `SileroVAD()`, PyAV only when audio arrives at a rate
other than 16 kHz, and kokoro only by `KokoroSpeaker`: `import agent.voice` needs none of them.
"""

from __future__ import annotations

from agent.voice._sentences import SentenceSplitter
from agent.voice._session import (
    INTERRUPTED,
    ResponseAudio,
    ResponseDone,
    ResponseStarted,
    ResponseText,
    ResponseTool,
    TurnHeard,
    TurnTranscript,
    VoiceEvent,
    VoiceSession,
)
from agent.voice._speaker import EspeakSpeaker, KokoroSpeaker, Speaker, ToneSpeaker, choose_speaker, frames
from agent.voice._turns import (
    TARGET_RATE,
    SileroVAD,
    SpeechStarted,
    SpeechStopped,
    Turn,
    TurnDetector,
    TurnEvent,
    VoiceActivity,
)

__all__ = [
    "INTERRUPTED",
    "TARGET_RATE",
    "EspeakSpeaker",
    "KokoroSpeaker",
    "ResponseAudio",
    "ResponseDone",
    "ResponseStarted",
    "ResponseText",
    "ResponseTool",
    "SentenceSplitter",
    "SileroVAD",
    "Speaker",
    "SpeechStarted",
    "SpeechStopped",
    "ToneSpeaker",
    "Turn",
    "TurnDetector",
    "TurnEvent",
    "TurnHeard",
    "TurnTranscript",
    "VoiceActivity",
    "VoiceEvent",
    "VoiceSession",
    "choose_speaker",
    "frames",
]
