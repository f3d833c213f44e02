"""The avatar's voices on the session clock, one per character.

One timeline per session holds what each character says: the host's
microphone audio as it arrives (routed to one character at a time), and TTS
audio for Say text (known ahead; it takes that character's floor while it
plays). Each character has its own analysis copy (16 kHz), voice activity
and phoneme timings, which drive that character's lips; what is sent back is
the mix of every character's voice (48 kHz). Positions are session-clock
seconds. Only the event loop touches it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from engines.base import AUDIO_RATE, VAD_HOP, AudioSlice, PhonemeEvent

OUT_RATE = 48_000
VAD_BLOCK = round(VAD_HOP * AUDIO_RATE)  # 512 samples at 16 kHz


class _Ring:
    """A circular buffer addressed by absolute sample index.

    It reads as silence wherever nothing was written on the current lap: past
    the furthest sample written, and in any stretch a write jumped over. So a
    slot never gives back what it held one capacity earlier (a session that
    stays silent for longer than the horizon reads zeros, not old speech).
    """

    def __init__(self, capacity: int, dtype: type) -> None:
        self.data: np.ndarray = np.zeros(capacity, dtype)
        self.capacity = capacity
        self.end = 0  # one past the furthest absolute index written

    def _put(self, index: int, x: np.ndarray) -> None:
        i = index % self.capacity
        first = min(len(x), self.capacity - i)
        self.data[i : i + first] = x[:first]
        self.data[: len(x) - first] = x[first:]

    def write(self, index: int, x: np.ndarray) -> None:
        if len(x) > self.capacity:
            raise ValueError(f"write of {len(x)} samples exceeds the buffer ({self.capacity})")
        if index > self.end:  # the slots jumped over still hold the previous lap: silence them
            gap = min(index - self.end, self.capacity)
            self._put(index - gap, np.zeros(gap, self.data.dtype))
        self._put(index, x)
        self.end = max(self.end, index + len(x))

    def read(self, index: int, n: int) -> np.ndarray:
        out = np.empty(n, self.data.dtype)
        i = index % self.capacity
        first = min(n, self.capacity - i)
        out[:first] = self.data[i : i + first]
        out[first:] = self.data[: n - first]
        if index + n > self.end:  # not written yet on this lap
            out[max(self.end - index, 0):] = 0
        return out

    def clear(self, index: int, n: int) -> None:
        self.write(index, np.zeros(n, self.data.dtype))


@dataclass(slots=True)
class _Arrival:
    start: float
    end: float
    arrived: float  # session-clock time the chunk arrived


class _Voice:
    """One character's voice: what drives its lips, and its share of the outgoing mix."""

    def __init__(self, horizon_s: float) -> None:
        self.ana = _Ring(int(horizon_s * AUDIO_RATE), np.float32)
        self.out = _Ring(int(horizon_s * OUT_RATE), np.int16)
        self.vad = _Ring(int(horizon_s / VAD_HOP) + 1, np.float32)
        self.tts: list[tuple[float, float]] = []  # TTS-owned intervals, ordered
        self.phonemes: deque[PhonemeEvent] = deque()

    def owned(self, t0: float, t1: float) -> list[tuple[float, float]]:
        return [(max(a, t0), min(b, t1)) for a, b in self.tts if a < t1 and b > t0]

    def clear(self, start: float, end: float) -> None:
        self.ana.clear(round(start * AUDIO_RATE), round((end - start) * AUDIO_RATE))
        self.out.clear(round(start * OUT_RATE), round((end - start) * OUT_RATE))
        self.vad.clear(round(start / VAD_HOP), int(np.ceil((end - start) / VAD_HOP)))


class AudioTimeline:
    def __init__(self, horizon_s: float = 90.0, characters: int = 1) -> None:
        if characters < 1:
            raise ValueError(f"a timeline needs at least one character, got {characters}")
        self.horizon_s = horizon_s
        self._voices = [_Voice(horizon_s) for _ in range(characters)]
        self.mic_head = 0.0  # mic audio is known up to here
        self.mic_character = 0  # whom the microphone speaks for now (ingest routes it)
        self._arrivals: deque[_Arrival] = deque(maxlen=2000)

    @property
    def characters(self) -> int:
        return len(self._voices)

    def _voice(self, character: int) -> _Voice:
        if not 0 <= character < len(self._voices):
            raise ValueError(f"character {character} is not on this timeline "
                             f"(characters 0..{len(self._voices) - 1})")
        return self._voices[character]

    # --- writing --------------------------------------------------------------
    def _check_range(self, t0: float, t1: float, now: float) -> None:
        if t1 - now > self.horizon_s * 0.9 or now - t0 > self.horizon_s * 0.9:
            raise ValueError(
                f"audio at {t0:.2f}-{t1:.2f}s is too far from now ({now:.2f}s) for the "
                f"{self.horizon_s:.0f}s timeline"
            )

    def write_mic(self, t0: float, ana: np.ndarray, out: np.ndarray, voice: float,
                  arrived: float, character: int = 0) -> None:
        """Microphone audio starting at ``t0`` with its voice-activity probability, spoken
        by ``character``.

        Intervals where that character's TTS plays keep the TTS audio: the mic does
        not talk over it. Other characters' voices are left as they are (the mix has both).
        """
        v = self._voice(character)
        t1 = t0 + len(ana) / AUDIO_RATE
        self._check_range(t0, t1, arrived)
        cursor = t0
        for a, b in v.owned(t0, t1) + [(t1, t1)]:
            if a > cursor:
                ia, ib = round((cursor - t0) * AUDIO_RATE), round((a - t0) * AUDIO_RATE)
                oa, ob = round((cursor - t0) * OUT_RATE), round((a - t0) * OUT_RATE)
                v.ana.write(round(cursor * AUDIO_RATE), ana[ia:ib])
                v.out.write(round(cursor * OUT_RATE), out[oa:ob])
                b0, b1 = int(cursor / VAD_HOP), int(np.ceil(a / VAD_HOP))
                v.vad.write(b0, np.full(max(b1 - b0, 0), voice, np.float32))
            cursor = max(cursor, b)
        self.mic_head = max(self.mic_head, t1)
        self._arrivals.append(_Arrival(t0, t1, arrived))

    def write_tts(self, t0: float, ana: np.ndarray, out: np.ndarray,
                  phonemes: list[PhonemeEvent], now: float, character: int = 0) -> float:
        """TTS audio from ``t0``, spoken by ``character``; it owns that interval of that
        character's voice. Returns its end pts."""
        v = self._voice(character)
        t1 = t0 + len(ana) / AUDIO_RATE
        self._check_range(t0, t1, now)
        v.ana.write(round(t0 * AUDIO_RATE), ana.astype(np.float32))
        v.out.write(round(t0 * OUT_RATE), out)
        nb = int(np.ceil((t1 - t0) / VAD_HOP))
        v.vad.write(round(t0 / VAD_HOP), np.ones(nb, np.float32))
        if v.tts and abs(v.tts[-1][1] - t0) < 1e-3:
            v.tts[-1] = (v.tts[-1][0], t1)
        else:
            v.tts.append((t0, t1))
        v.phonemes.extend(phonemes)
        return t1

    def cut_tts(self, t: float) -> bool:
        """Silence every character's TTS from ``t`` on (interrupt). True if anything was cut."""
        cut = False
        for v in self._voices:
            kept: list[tuple[float, float]] = []
            for a, b in v.tts:
                if b <= t:
                    kept.append((a, b))
                    continue
                cut = True
                v.clear(max(a, t), b)
                if a < t:
                    kept.append((a, t))
            v.tts = kept
            v.phonemes = deque(p for p in v.phonemes if p.start < t)
        return cut

    def trim(self, before: float) -> None:
        """Forget bookkeeping older than ``before`` (sample data is a ring)."""
        for v in self._voices:
            v.tts = [(a, b) for a, b in v.tts if b > before]
            while v.phonemes and v.phonemes[0].end < before:
                v.phonemes.popleft()

    # --- reading ----------------------------------------------------------------
    @property
    def tts_until(self) -> float:
        """Where the TTS queued for any character ends (new speech is placed after it)."""
        return max((v.tts[-1][1] for v in self._voices if v.tts), default=0.0)

    def tts_spans(self, character: int = 0) -> list[tuple[float, float]]:
        """The intervals a character's TTS owns, in order."""
        return list(self._voice(character).tts)

    def speaking_tts(self, t: float, character: int | None = None) -> bool:
        """Whether TTS plays at ``t`` (for ``character``, or for anyone)."""
        voices = self._voices if character is None else [self._voice(character)]
        return any(a <= t < b for v in voices for a, b in v.tts)

    def known(self, t0: float, t1: float) -> bool:
        """Is all audio of ``[t0, t1]`` here, for every character?

        Only the microphone's character can still receive audio there: the others
        speak TTS or are silent, both known. So ``[t0, t1]`` is known once the mic
        has reached ``t1`` or that character's TTS covers what the mic has not.
        """
        if t1 <= self.mic_head + 1e-9:
            return True
        gap_start = max(t0, self.mic_head)
        covered = gap_start
        for a, b in self._voice(self.mic_character).tts:
            if a <= covered + 1e-6 and b > covered:
                covered = b
        return covered >= t1 - 1e-6

    def slice(self, t0: float, t1: float, character: int = 0) -> AudioSlice:
        """One character's engine input for ``[t0, t1]`` (what is not here yet reads as silence)."""
        v = self._voice(character)
        i0 = round(t0 * AUDIO_RATE)
        n = max(0, round(t1 * AUDIO_RATE) - i0)
        samples = v.ana.read(i0, n) if i0 >= 0 else np.zeros(n, np.float32)
        b0 = int(np.floor(t0 / VAD_HOP))
        nb = int(np.ceil(t1 / VAD_HOP)) - b0 + 1
        vad = v.vad.read(max(b0, 0), nb)
        phon = [p for p in v.phonemes if p.end > t0 - 0.2 and p.start < t1 + 0.2]
        return AudioSlice(start=i0 / AUDIO_RATE, samples=samples, phonemes=phon, vad=vad,
                          vad_start=max(b0, 0) * VAD_HOP)

    def read_out(self, t0: float, n: int) -> np.ndarray:
        """``n`` samples of the outgoing voice at 48 kHz from ``t0`` (int16): every
        character's voice, mixed."""
        i = round(t0 * OUT_RATE)
        if len(self._voices) == 1:
            return self._voices[0].out.read(i, n)
        mix = np.zeros(n, np.int32)
        for v in self._voices:
            mix += v.out.read(i, n)
        return np.clip(mix, -32768, 32767).astype(np.int16)

    def arrival_of(self, t: float) -> float | None:
        """When the microphone audio at ``t`` arrived, if it came from the mic."""
        for a in reversed(self._arrivals):
            if a.start <= t < a.end:
                return a.arrived
            if a.end <= t:
                return None
        return None
