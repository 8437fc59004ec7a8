"""Regenerate `request.wav` (the voice example's spoken request) with eSpeak NG, offline.

eSpeak NG comes from the PyPI package `espeakng-loader` (the shared library and its voice data, no system
install). It is needed only to regenerate the clip, never to run the examples:

    pip install --target /tmp/espeak espeakng-loader==0.2.4
    PYTHONPATH=/tmp/espeak python examples/data/make_request_wav.py

The synthesiser speaks 22,050 Hz 16-bit mono; the clip is resampled to 16 kHz (what Phi-4 hears) and
written as 16-bit PCM WAV next to this file.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Any

TEXT = "What is the weather in Oslo? And set a timer for five minutes."
VOICE = b"en-us"
WORDS_PER_MINUTE = 150
OUT = Path(__file__).resolve().parent / "request.wav"

_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: AUDIO_OUTPUT_SYNCHRONOUS
_RATE = 1  # espeak_PARAMETER: espeakRATE
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def synthesize(text: str) -> tuple[Any, int]:
    """Speak `text` with eSpeak NG; return (int16 samples, sample rate)."""
    import espeakng_loader  # type: ignore[import-not-found]
    import numpy as np

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.restype = ctypes.c_int
    rate = lib.espeak_Initialize(_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
    if rate <= 0:
        raise RuntimeError("eSpeak NG failed to initialise")
    chunks: list[Any] = []

    def collect(wav: Any, count: int, events: Any) -> int:
        if count > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    callback = _CALLBACK(collect)  # kept referenced until synthesis ends
    lib.espeak_SetSynthCallback(callback)
    lib.espeak_SetVoiceByName(VOICE)
    lib.espeak_SetParameter(_RATE, WORDS_PER_MINUTE, 0)
    data = text.encode("utf-8") + b"\0"
    if lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None) != 0:
        raise RuntimeError("eSpeak NG failed to synthesise the text")
    lib.espeak_Synchronize()
    lib.espeak_Terminate()
    return np.concatenate(chunks), rate


def main() -> int:
    try:
        import espeakng_loader  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        print("error: espeakng-loader is not installed (see this script's docstring)", file=sys.stderr)
        return 1
    from math import gcd

    import numpy as np
    import soundfile as sf
    from scipy.signal import resample_poly

    samples, rate = synthesize(TEXT)
    g = gcd(rate, 16_000)
    audio = resample_poly(samples.astype(np.float32) / 32768.0, 16_000 // g, rate // g)
    peak = float(np.max(np.abs(audio))) or 1.0
    audio = np.clip(audio / peak * 0.9, -1.0, 1.0)
    sf.write(OUT, audio, 16_000, subtype="PCM_16")
    print(f"wrote {OUT.name}: {len(audio) / 16_000:.2f} s at 16 kHz, {OUT.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
