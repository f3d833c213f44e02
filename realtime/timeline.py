"""The avatar's voice on the session clock.

One timeline per session holds what the avatar says: the host's microphone
audio as it arrives, and TTS audio for Say text (which is known ahead and
takes the floor while it plays). It is what drives the lips (16 kHz analysis
copy, voice activity, phoneme timings) and what is sent back (48 kHz copy).
Positions are session-clock seconds. Only the event loop touches it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from engines.base import AUDIO_RATE, VAD_HOP, AudioSlice, PhonemeEvent

OUT_RATE = 48_000
VAD_BLOCK = round(VAD_HOP * AUDIO_RATE)  # 512 samples at 16 kHz


class _Ring:
    """A circular buffer addressed by absolute sample index."""

    def __init__(self, capacity: int, dtype: type) -> None:
        self.data: np.ndarray = np.zeros(capacity, dtype)
        self.capacity = capacity

    def write(self, index: int, x: np.ndarray) -> None:
        if len(x) > self.capacity:
            raise ValueError(f"write of {len(x)} samples exceeds the buffer ({self.capacity})")
        i = index % self.capacity
        first = min(len(x), self.capacity - i)
        self.data[i : i + first] = x[:first]
        self.data[: len(x) - first] = x[first:]

    def read(self, index: int, n: int) -> np.ndarray:
        out = np.empty(n, self.data.dtype)
        i = index % self.capacity
        first = min(n, self.capacity - i)
        out[:first] = self.data[i : i + first]
        out[first:] = self.data[: n - first]
        return out

    def clear(self, index: int, n: int) -> None:
        self.write(index, np.zeros(n, self.data.dtype))


@dataclass(slots=True)
class _Arrival:
    start: float
    end: float
    arrived: float  # session-clock time the chunk arrived


class AudioTimeline:
    def __init__(self, horizon_s: float = 90.0) -> None:
        self.horizon_s = horizon_s
        self._ana = _Ring(int(horizon_s * AUDIO_RATE), np.float32)
        self._out = _Ring(int(horizon_s * OUT_RATE), np.int16)
        self._vad = _Ring(int(horizon_s / VAD_HOP) + 1, np.float32)
        self.mic_head = 0.0  # mic audio is known up to here
        self._tts: list[tuple[float, float]] = []  # TTS-owned intervals, ordered
        self._phonemes: deque[PhonemeEvent] = deque()
        self._arrivals: deque[_Arrival] = deque(maxlen=2000)

    # --- writing --------------------------------------------------------------
    def _check_range(self, t0: float, t1: float, now: float) -> None:
        if t1 - now > self.horizon_s * 0.9 or now - t0 > self.horizon_s * 0.9:
            raise ValueError(
                f"audio at {t0:.2f}-{t1:.2f}s is too far from now ({now:.2f}s) for the "
                f"{self.horizon_s:.0f}s timeline"
            )

    def write_mic(self, t0: float, ana: np.ndarray, out: np.ndarray, voice: float,
                  arrived: float) -> None:
        """Microphone audio starting at ``t0`` with its voice-activity probability.

        Intervals that TTS owns keep the TTS audio: the mic does not talk over it.
        """
        t1 = t0 + len(ana) / AUDIO_RATE
        self._check_range(t0, t1, arrived)
        cursor = t0
        for a, b in self._owned(t0, t1) + [(t1, t1)]:
            if a > cursor:
                ia, ib = round((cursor - t0) * AUDIO_RATE), round((a - t0) * AUDIO_RATE)
                oa, ob = round((cursor - t0) * OUT_RATE), round((a - t0) * OUT_RATE)
                self._ana.write(round(cursor * AUDIO_RATE), ana[ia:ib])
                self._out.write(round(cursor * OUT_RATE), out[oa:ob])
                b0, b1 = int(cursor / VAD_HOP), int(np.ceil(a / VAD_HOP))
                self._vad.write(b0, np.full(max(b1 - b0, 0), voice, np.float32))
            cursor = max(cursor, b)
        self.mic_head = max(self.mic_head, t1)
        self._arrivals.append(_Arrival(t0, t1, arrived))

    def write_tts(self, t0: float, ana: np.ndarray, out: np.ndarray,
                  phonemes: list[PhonemeEvent], now: float) -> float:
        """TTS audio from ``t0``; it owns that interval. Returns its end pts."""
        t1 = t0 + len(ana) / AUDIO_RATE
        self._check_range(t0, t1, now)
        self._ana.write(round(t0 * AUDIO_RATE), ana.astype(np.float32))
        self._out.write(round(t0 * OUT_RATE), out)
        nb = int(np.ceil((t1 - t0) / VAD_HOP))
        self._vad.write(round(t0 / VAD_HOP), np.ones(nb, np.float32))
        if self._tts and abs(self._tts[-1][1] - t0) < 1e-3:
            self._tts[-1] = (self._tts[-1][0], t1)
        else:
            self._tts.append((t0, t1))
        self._phonemes.extend(phonemes)
        return t1

    def cut_tts(self, t: float) -> bool:
        """Silence every TTS sample from ``t`` on (interrupt). True if anything was cut."""
        cut = False
        kept: list[tuple[float, float]] = []
        for a, b in self._tts:
            if b <= t:
                kept.append((a, b))
                continue
            cut = True
            start = max(a, t)
            self._ana.clear(round(start * AUDIO_RATE), round((b - start) * AUDIO_RATE))
            self._out.clear(round(start * OUT_RATE), round((b - start) * OUT_RATE))
            nb = int(np.ceil((b - start) / VAD_HOP))
            self._vad.clear(round(start / VAD_HOP), nb)
            if a < t:
                kept.append((a, t))
        self._tts = kept
        self._phonemes = deque(p for p in self._phonemes if p.start < t)
        return cut

    def trim(self, before: float) -> None:
        """Forget bookkeeping older than ``before`` (sample data is a ring)."""
        self._tts = [(a, b) for a, b in self._tts if b > before]
        while self._phonemes and self._phonemes[0].end < before:
            self._phonemes.popleft()

    # --- reading ----------------------------------------------------------------
    def _owned(self, t0: float, t1: float) -> list[tuple[float, float]]:
        return [(max(a, t0), min(b, t1)) for a, b in self._tts if a < t1 and b > t0]

    @property
    def tts_until(self) -> float:
        return self._tts[-1][1] if self._tts else 0.0

    def speaking_tts(self, t: float) -> bool:
        return any(a <= t < b for a, b in self._tts)

    def known(self, t0: float, t1: float) -> bool:
        """Is all audio of ``[t0, t1]`` here (from the mic or from TTS)?"""
        if t1 <= self.mic_head + 1e-9:
            return True
        gap_start = max(t0, self.mic_head)
        covered = gap_start
        for a, b in self._tts:
            if a <= covered + 1e-6 and b > covered:
                covered = b
        return covered >= t1 - 1e-6

    def slice(self, t0: float, t1: float) -> AudioSlice:
        """Engine input for ``[t0, t1]`` (what is not here yet reads as silence)."""
        i0 = round(t0 * AUDIO_RATE)
        n = max(0, round(t1 * AUDIO_RATE) - i0)
        samples = self._ana.read(i0, n) if i0 >= 0 else np.zeros(n, np.float32)
        b0 = int(np.floor(t0 / VAD_HOP))
        nb = int(np.ceil(t1 / VAD_HOP)) - b0 + 1
        vad = self._vad.read(max(b0, 0), nb)
        phon = [p for p in self._phonemes if p.end > t0 - 0.2 and p.start < t1 + 0.2]
        return AudioSlice(start=i0 / AUDIO_RATE, samples=samples, phonemes=phon, vad=vad,
                          vad_start=max(b0, 0) * VAD_HOP)

    def read_out(self, t0: float, n: int) -> np.ndarray:
        """``n`` samples of the outgoing voice at 48 kHz from ``t0`` (int16)."""
        return self._out.read(round(t0 * OUT_RATE), n)

    def arrival_of(self, t: float) -> float | None:
        """When the microphone audio at ``t`` arrived, if it came from the mic."""
        for a in reversed(self._arrivals):
            if a.start <= t < a.end:
                return a.arrived
            if a.end <= t:
                return None
        return None
