"""The engine contract: the cascade stages every engine implements.

The scheduler (``realtime.scheduler``) drives any engine through the same
stages, so it never cares which engine runs:

1. ``prepare(avatar)``: analyse the reference image once and cache the result.
2. ``keyframes(prepared, shots, times)``: blueprint keyframes for a window.
3. ``subclip(prepared, first, last, audios, shots)``: frames from one keyframe
   to the next, synced to the audio of that interval; one audio slice and one
   shot per character of the avatar (``characters(prepared)``, usually one). The returned frames are
   at ``first.pts + k / fps`` for ``k = 0 .. n`` where ``last.pts = first.pts
   + n / fps``: both ends included, and frame 0 and frame n must match the
   keyframes, so consecutive sub-clips join exactly.
4. ``upscale(frames)``: optional super-resolution.

Two more things the scheduler needs, declared by every engine:

* ``idle_frame(prepared)``: what is shown before anything was rendered;
* ``min_subclip_frames``: the shortest sub-clip the engine produces without
  waste (a video VAE that codes frames four at a time generates four frames
  whatever it is asked for). The scheduler never asks for fewer.

Chunk engines (``chunked = True``, e.g. ``flashhead``) generate video that
continues from the last frames they generated, not towards a given last
frame: SoulX-FlashHead's chunks start from the previous chunk's final frames
and cannot be made to end on a pre-rendered image. For them the first-last
frame rule reads differently, and nothing else changes:

* keyframes are the plan's conditioning of the sub-clips that reach them
  (for ``flashhead`` the reference image the chunk is generated from), not
  frames the sub-clip must show;
* the join stays exact the other way round: frame ``n`` of sub-clip ``i`` is
  frame 0 of sub-clip ``i + 1`` because the second continues from the first.
  What a sub-clip continues from travels in the keyframe the two share
  (``last.state`` is the next ``first.state``), so it is per stream;
* sub-clips therefore render in order (one worker); one whose predecessor is
  missing (skipped, failed, still running) starts afresh from its keyframe;
* ``min_subclip_frames`` is the chunk's count of new frames, and a sub-clip
  should be a whole number of chunks.

The scheduler drives both kinds the same way (frame pts, playout, skipping).

Frames are RGB ``uint8`` arrays of shape ``(height, width, 3)``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.storyline import Shot

AUDIO_RATE = 16_000
"""Sample rate of the audio handed to engines (mono float32 in [-1, 1])."""

VAD_HOP = 512 / AUDIO_RATE
"""Seconds per voice-activity block (silero's 512-sample window at 16 kHz)."""


@dataclass(slots=True)
class Avatar:
    """A reference portrait as stored by the avatars API."""

    id: str
    image: np.ndarray  # RGB uint8, H x W x 3


@dataclass(slots=True)
class PhonemeEvent:
    """One phoneme with its exact timing (from TTS alignments), session seconds."""

    phoneme: str
    start: float
    end: float


@dataclass(slots=True)
class AudioSlice:
    """The audio an engine needs for one sub-clip.

    ``samples[0]`` is at pts ``start``; the slice covers at least
    ``[first.pts - context, last.pts]`` so engines can use causal windows.
    """

    start: float
    samples: np.ndarray  # float32 mono at AUDIO_RATE
    phonemes: list[PhonemeEvent] = field(default_factory=list)
    vad: np.ndarray | None = None  # voice-activity probability per VAD_HOP block
    vad_start: float = 0.0  # pts of vad[0]

    @property
    def end(self) -> float:
        return self.start + len(self.samples) / AUDIO_RATE

    def voice_prob(self, t0: float, t1: float) -> float | None:
        """Highest voice-activity probability between two pts, or None if unknown."""
        if self.vad is None or len(self.vad) == 0:
            return None
        i0 = max(0, int((t0 - self.vad_start) / VAD_HOP))
        i1 = min(len(self.vad), int((t1 - self.vad_start) / VAD_HOP) + 1)
        if i1 <= i0:
            return 0.0
        return float(self.vad[i0:i1].max())

    def window(self, t0: float, t1: float) -> np.ndarray:
        """Samples between two pts (clipped to the slice; zeros outside)."""
        n = max(0, round((t1 - t0) * AUDIO_RATE))
        out = np.zeros(n, dtype=np.float32)
        i0 = round((t0 - self.start) * AUDIO_RATE)
        lo, hi = max(i0, 0), min(i0 + n, len(self.samples))
        if hi > lo:
            out[lo - i0 : hi - i0] = self.samples[lo:hi]
        return out


@dataclass(slots=True)
class Keyframe:
    """A blueprint keyframe at ``pts``: engine-specific state plus its image."""

    pts: float
    state: Any
    image: np.ndarray | None = None


class Engine(abc.ABC):
    """Base class of all engines (see the module docstring for the contract)."""

    name: str = "engine"
    min_subclip_frames: int = 1
    """The fewest frame intervals between two keyframes this engine renders without waste."""
    chunked: bool = False
    """A chunk engine: sub-clips continue from the one before instead of ending on their last keyframe."""

    def __init__(self, *, fps: int = 25, size: tuple[int, int] = (512, 512)) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self.size = size  # (width, height)

    @abc.abstractmethod
    def prepare(self, avatar: Avatar) -> Any:
        """Analyse the reference image once; raise ``ValueError`` if unusable."""

    @abc.abstractmethod
    def keyframes(self, prepared: Any, shots: Sequence[Shot], times: Sequence[float]) -> list[Keyframe]:
        """Blueprint keyframes at ``times`` following the planned ``shots``."""

    @abc.abstractmethod
    def subclip(
        self, prepared: Any, first: Keyframe, last: Keyframe, audios: Sequence[AudioSlice],
        shots: Sequence[Shot],
    ) -> list[np.ndarray]:
        """Frames from ``first`` to ``last`` inclusive; character ``c`` speaks ``audios[c]``
        and follows ``shots[c]``."""

    def characters(self, prepared: Any) -> int:
        """How many characters the prepared avatar has (each with its own audio and shots)."""
        return 1

    @abc.abstractmethod
    def idle_frame(self, prepared: Any) -> np.ndarray:
        """The frame shown before the first sub-clip is rendered (output size)."""

    def upscale(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Super-resolution; the identity unless an engine has an SR stage."""
        return frames

    def banner(self) -> str | None:
        """Text the stream must show on screen (e.g. random weights), if any."""
        return None

    def frames_between(self, first: Keyframe, last: Keyframe) -> int:
        """How many frame intervals lie between two keyframes (``n`` above)."""
        n = round((last.pts - first.pts) * self.fps)
        if n < 1 or abs(first.pts + n / self.fps - last.pts) > 1e-6:
            raise ValueError(
                f"keyframes at {first.pts} and {last.pts} are not a whole number (>=1) "
                f"of frames apart at {self.fps} fps"
            )
        return n
