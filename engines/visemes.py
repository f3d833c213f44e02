"""Mouth controls from audio: jaw opening, lip rounding, closure, speech nods.

Two sources, one output: exact phoneme timings (from TTS alignments) when
the audio came from text, else features of the signal itself (loudness,
spectral balance, voice activity). Every value at time ``t`` depends only on
the audio up to ``t`` (and on phonemes, which are known ahead), so two
sub-clips that share a keyframe compute the same mouth there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from engines.base import AUDIO_RATE, AudioSlice, PhonemeEvent

WINDOW_S = 0.064  # analysis window ending at the frame time
FLOOR_DB = -48.0  # below this, silence
RANGE_DB = 28.0  # from FLOOR_DB to full opening

# phoneme -> (jaw, round, press); IPA as espeak-ng writes it for Piper
_VOWELS: dict[str, tuple[float, float, float]] = {
    "a": (0.85, 0.0, 0.0), "ɑ": (0.9, 0.1, 0.0), "æ": (0.8, 0.0, 0.0), "ʌ": (0.6, 0.0, 0.0),
    "ɐ": (0.6, 0.0, 0.0), "ə": (0.45, 0.0, 0.0), "ɚ": (0.4, 0.3, 0.0), "ɜ": (0.5, 0.2, 0.0),
    "ɛ": (0.6, 0.0, 0.0), "e": (0.5, 0.0, 0.0), "ɪ": (0.35, 0.0, 0.0), "i": (0.3, 0.0, 0.0),
    "ᵻ": (0.35, 0.0, 0.0), "ɔ": (0.65, 0.7, 0.0), "o": (0.5, 0.8, 0.0), "ɒ": (0.7, 0.5, 0.0),
    "ʊ": (0.35, 0.8, 0.0), "u": (0.3, 0.95, 0.0), "ɾ": (0.3, 0.0, 0.0),
}
_CONSONANTS: dict[str, tuple[float, float, float]] = {
    "p": (0.0, 0.0, 1.0), "b": (0.0, 0.0, 1.0), "m": (0.0, 0.0, 1.0),
    "f": (0.1, 0.0, 0.4), "v": (0.1, 0.0, 0.4), "θ": (0.2, 0.0, 0.0), "ð": (0.2, 0.0, 0.0),
    "s": (0.12, 0.0, 0.0), "z": (0.12, 0.0, 0.0), "ʃ": (0.15, 0.5, 0.0), "ʒ": (0.15, 0.5, 0.0),
    "t": (0.2, 0.0, 0.0), "d": (0.22, 0.0, 0.0), "n": (0.2, 0.0, 0.0), "l": (0.3, 0.0, 0.0),
    "k": (0.3, 0.0, 0.0), "ɡ": (0.3, 0.0, 0.0), "g": (0.3, 0.0, 0.0), "ŋ": (0.25, 0.0, 0.0),
    "w": (0.15, 0.85, 0.0), "ɹ": (0.25, 0.45, 0.0), "r": (0.25, 0.3, 0.0), "j": (0.2, 0.0, 0.0),
    "h": (0.4, 0.0, 0.0), "ʔ": (0.1, 0.0, 0.0),
}


def phoneme_target(phoneme: str) -> tuple[float, float, float] | None:
    """Viseme target of one phoneme; None for stress marks, pauses and unknowns."""
    return _VOWELS.get(phoneme) or _CONSONANTS.get(phoneme)


def _from_phonemes(events: Sequence[PhonemeEvent], t: float) -> np.ndarray | None:
    """Coarticulated (jaw, round, press) at t from timed phonemes; None if none near."""
    acc = np.zeros(3)
    total = 0.0
    near = False
    for ev in events:
        if ev.end < t - 0.15 or ev.start > t + 0.15:
            continue
        near = True
        target = phoneme_target(ev.phoneme)
        if target is None:
            continue
        centre = (ev.start + ev.end) / 2
        sigma = max(0.035, 0.35 * (ev.end - ev.start))
        wgt = math.exp(-0.5 * ((t - centre) / sigma) ** 2)
        if target[2] > 0.5:  # closures must be reached: weigh them up
            wgt *= 2.5
        acc += wgt * np.asarray(target)
        total += wgt
    if not near:
        return None
    if total < 1e-3:  # pause between words
        return np.zeros(3)
    # far from any phoneme centre the mouth relaxes towards closed
    return acc / (total + 0.15)


def _from_signal(x: np.ndarray, voice: float | None) -> np.ndarray:
    """(jaw, round, press, loudness) from one analysis window of samples."""
    if len(x) == 0:
        return np.zeros(4)
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-9)
    db = 20 * math.log10(rms)
    loud = min(max((db - FLOOR_DB) / RANGE_DB, 0.0), 1.0)
    if voice is not None:  # voice activity gates noise out of the mouth
        loud *= min(max((voice - 0.25) / 0.35, 0.0), 1.0)
    if loud <= 0.0:
        return np.zeros(4)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1.0 / AUDIO_RATE)
    low = float(spec[(freqs >= 200) & (freqs < 900)].sum()) + 1e-9
    mid = float(spec[(freqs >= 900) & (freqs < 2800)].sum()) + 1e-9
    high = float(spec[(freqs >= 3500) & (freqs < 7500)].sum()) + 1e-9
    rounding = 1 / (1 + math.exp(-3.0 * (math.log(low / mid) - 1.0)))
    sibilance = 1 / (1 + math.exp(-3.0 * (math.log(high / (low + mid)) + 0.5)))
    jaw = loud ** 0.8 * (1.0 - 0.6 * sibilance)
    return np.array([jaw, rounding * loud, 0.0, loud])


AUDIO_CONTROLS = ("jaw", "round", "press", "nod", "level")
"""Columns of ``audio_controls``."""


def audio_controls(audio: AudioSlice, times: Sequence[float]) -> np.ndarray:
    """(jaw, round, press, nod, level) per frame time.

    ``nod`` is a small pitch in radians; ``level`` is the loudness of the last
    300 ms in [0, 1] (how much this voice is speaking now; a listener turns
    towards it).
    """
    out = np.zeros((len(times), len(AUDIO_CONTROLS)), np.float32)
    n = round(WINDOW_S * AUDIO_RATE)
    for k, t in enumerate(times):
        x = audio.window(t - WINDOW_S, t)
        sig = _from_signal(x, audio.voice_prob(t - WINDOW_S, t))
        ph = _from_phonemes(audio.phonemes, t) if audio.phonemes else None
        if ph is not None:
            # timings are exact; loudness still scales (a whisper opens less)
            gain = 0.35 + 0.65 * min(sig[3] * 1.6, 1.0) if sig[3] > 0 else 0.0
            out[k, :3] = ph * gain
        else:
            out[k, :3] = sig[:3]
        # speech nods: slow loudness over the last 300 ms, causal
        slow = audio.window(t - 0.3, t)
        if len(slow) >= n:
            frames = slow[: len(slow) // n * n].reshape(-1, n)
            e = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)) + 1e-9
            level = np.clip((20 * np.log10(e) - FLOOR_DB) / RANGE_DB, 0, 1)
            if audio.vad is not None:  # noise is not speech
                level = level * min(max((audio.voice_prob(t - 0.3, t) or 0.0) - 0.25, 0.0) / 0.35, 1.0)
            out[k, 3] = 0.02 * float(level.mean())
            out[k, 4] = float(level.mean())
    return out
