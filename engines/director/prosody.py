"""Prosody measured from the signal: pitch, loudness, speaking rate, pauses, emphasis.

Plain signal processing on 16 kHz mono float32, a few milliseconds for a
window of a few seconds:

* loudness: RMS per 10 ms hop, in dBFS;
* pitch: normalised autocorrelation per 40 ms frame (70-400 Hz), voiced where
  the correlation peak is strong and the frame is loud enough;
* speaking rate: syllable nuclei (prominent loudness peaks in voiced
  stretches) per second of speech;
* pauses: silent stretches of at least ``MIN_PAUSE_S`` inside the speech;
* emphasis: syllables much louder or higher than the window's median.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.signal import find_peaks

from engines.base import AUDIO_RATE

HOP_S = 0.010
FRAME_S = 0.040
FMIN, FMAX = 70.0, 400.0
SILENCE_DB = -45.0  # RMS below this is silence
VOICING = 0.45  # normalised autocorrelation peak that counts as voiced
MIN_PAUSE_S = 0.2


@dataclass(slots=True)
class Prosody:
    """What a stretch of audio sounds like (times relative to its first sample)."""

    duration_s: float = 0.0
    speech_s: float = 0.0  # time above the silence floor
    loudness_db: float = -120.0  # median RMS of the speech, dBFS
    loudness_range_db: float = 0.0  # 10th to 90th percentile of the speech
    pitch_hz: float | None = None  # median f0 of voiced frames
    pitch_range_st: float = 0.0  # 10th to 90th percentile, semitones
    rate_syl_s: float = 0.0  # syllable nuclei per second of speech
    pauses: list[tuple[float, float]] = field(default_factory=list)
    emphasis: list[float] = field(default_factory=list)  # times of emphasised syllables
    speech_spans: list[tuple[float, float]] = field(default_factory=list)

    @property
    def has_speech(self) -> bool:
        return self.speech_s >= 0.15

    @property
    def arousal(self) -> float:
        """0 (flat, quiet, slow) to 1 (loud, lively pitch, fast); 0 without speech."""
        if not self.has_speech:
            return 0.0
        loud = np.clip((self.loudness_db + 38.0) / 20.0, 0.0, 1.0)
        lively = np.clip((self.pitch_range_st - 2.0) / 8.0, 0.0, 1.0)
        fast = np.clip((self.rate_syl_s - 2.5) / 3.5, 0.0, 1.0)
        return float(0.4 * loud + 0.4 * lively + 0.2 * fast)

    def summary(self) -> dict[str, object]:
        return {
            "speech_s": round(self.speech_s, 2),
            "loudness_db": round(self.loudness_db, 1),
            "pitch_hz": None if self.pitch_hz is None else round(self.pitch_hz, 1),
            "pitch_range_st": round(self.pitch_range_st, 1),
            "rate_syl_s": round(self.rate_syl_s, 2),
            "pauses": len(self.pauses),
            "emphasis": [round(t, 2) for t in self.emphasis],
            "arousal": round(self.arousal, 2),
        }


def _frames(x: np.ndarray, size: int, hop: int) -> np.ndarray:
    n = 1 + max(0, (len(x) - size) // hop)
    idx = np.arange(size)[None, :] + hop * np.arange(n)[:, None]
    return x[idx]


def _spans(mask: np.ndarray, hop_s: float) -> list[tuple[float, float]]:
    """(start, end) seconds of the runs of True in a per-hop mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return [(s * hop_s, e * hop_s) for s, e in zip(starts, ends, strict=True)]


def pitch_track(x: np.ndarray, rate: int = AUDIO_RATE) -> tuple[np.ndarray, np.ndarray]:
    """(f0 in Hz, voiced mask) per ``HOP_S`` hop; f0 is 0 where unvoiced."""
    size, hop = round(FRAME_S * rate), round(HOP_S * rate)
    if len(x) < size:
        return np.zeros(0), np.zeros(0, bool)
    fr = _frames(x.astype(np.float64), size, hop)
    fr = fr - fr.mean(axis=1, keepdims=True)
    energy = (fr**2).sum(axis=1)
    spec = np.fft.rfft(fr, 2 * size, axis=1)
    ac = np.fft.irfft(np.abs(spec) ** 2, axis=1)[:, :size]
    lo, hi = int(rate / FMAX), int(rate / FMIN)
    norm = ac / np.maximum(ac[:, :1], 1e-12)
    lag = lo + np.argmax(norm[:, lo:hi], axis=1)
    peak = norm[np.arange(len(fr)), lag]
    # parabolic interpolation of the peak for sub-sample lags
    left = norm[np.arange(len(fr)), np.clip(lag - 1, 0, size - 1)]
    right = norm[np.arange(len(fr)), np.clip(lag + 1, 0, size - 1)]
    denom = left - 2 * peak + right
    shift = np.where(np.abs(denom) > 1e-9, 0.5 * (left - right) / np.where(denom == 0, 1, denom), 0)
    f0 = rate / (lag + np.clip(shift, -0.5, 0.5))
    rms_db = 10 * np.log10(energy / size + 1e-12)
    voiced = (peak > VOICING) & (rms_db > SILENCE_DB)
    return np.where(voiced, f0, 0.0), voiced


def measure(x: np.ndarray, rate: int = AUDIO_RATE) -> Prosody:
    """Prosody of mono float32 audio (any length; empty gives a silent Prosody)."""
    x = np.asarray(x, dtype=np.float32).ravel()
    dur = len(x) / rate
    hop = round(HOP_S * rate)
    if len(x) < round(FRAME_S * rate) or not np.all(np.isfinite(x)):
        return Prosody(duration_s=dur)
    n = len(x) // hop
    rms = np.sqrt((x[: n * hop].astype(np.float64).reshape(n, hop) ** 2).mean(axis=1))
    db = 20 * np.log10(rms + 1e-9)
    loud = db > SILENCE_DB
    # close gaps shorter than a pause, drop blips shorter than 60 ms
    spans = [(a, b) for a, b in _spans(loud, HOP_S)]
    merged: list[tuple[float, float]] = []
    for a, b in spans:
        if merged and a - merged[-1][1] < MIN_PAUSE_S:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    speech = [(a, b) for a, b in merged if b - a >= 0.06]
    speech_s = float(loud.sum() * HOP_S)
    out = Prosody(duration_s=dur, speech_s=speech_s, speech_spans=speech)
    if not out.has_speech:
        return out
    sp_db = db[loud]
    out.loudness_db = float(np.median(sp_db))
    out.loudness_range_db = float(np.percentile(sp_db, 90) - np.percentile(sp_db, 10))
    f0, voiced = pitch_track(x, rate)
    if voiced.sum() >= 5:
        semis = 12 * np.log2(f0[voiced] / 100.0)
        out.pitch_hz = float(100.0 * 2 ** (np.median(semis) / 12))
        out.pitch_range_st = float(np.percentile(semis, 90) - np.percentile(semis, 10))
    # syllable nuclei: prominent peaks of the smoothed loudness inside speech
    smooth = np.convolve(db, np.ones(5) / 5, mode="same")
    peaks, _ = find_peaks(np.where(loud, smooth, SILENCE_DB - 20), prominence=2.5,
                          distance=max(1, round(0.1 / HOP_S)))
    out.rate_syl_s = float(len(peaks) / max(speech_s, 0.2))
    for (_, b), (c, _) in zip(speech, speech[1:], strict=False):
        out.pauses.append((b, c))
    if len(peaks) >= 3:
        score = (smooth[peaks] - np.median(smooth[peaks])) / 3.0
        if voiced.any():
            f0_at = np.array([f0[min(p, len(f0) - 1)] for p in peaks])
            med = np.median(f0[voiced])
            score += np.where(f0_at > 0, 12 * np.log2(np.maximum(f0_at, 1) / med) / 3.0, 0)
        strong = peaks[score > 1.2]
        out.emphasis = [float(p * HOP_S) for p in strong[:6]]
    return out
