"""Playout: rendered frames ordered by pts, released on the audio master clock.

Frame ``k`` has pts ``k / fps`` and leaves at session time ``k / fps +
delay_s``; the outgoing audio at pts ``p`` leaves at ``p + delay_s`` too, so
lips and sound leave together. When a frame is not ready in time, playout
holds the previous frame (``held``); frames that arrive after their slot are
dropped (``late``). It never waits for a producer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class PlayoutStats:
    taken: int = 0  # slots released
    held: int = 0  # slots where the frame was not ready: previous frame repeated
    late: int = 0  # frames that arrived after their slot (dropped)
    dropped: int = 0  # frames discarded by an interrupt/re-plan


class Playout:
    def __init__(self, fps: int, delay_s: float, capacity: int = 200) -> None:
        if delay_s <= 0:
            raise ValueError(f"delay_s must be positive, got {delay_s}")
        self.fps = fps
        self.delay_s = delay_s
        self.capacity = capacity
        self.next_index = 0
        self._frames: dict[int, np.ndarray] = {}
        self._last: np.ndarray | None = None
        self.stats = PlayoutStats()

    def due_time(self, index: int) -> float:
        """Session time at which frame ``index`` leaves."""
        return index / self.fps + self.delay_s

    def put(self, index: int, frame: np.ndarray) -> bool:
        """Store a rendered frame; False (and counted late) if its slot has passed."""
        if index < self.next_index:
            self.stats.late += 1
            return False
        if len(self._frames) >= self.capacity and index > max(self._frames):
            self.stats.dropped += 1
            return False
        self._frames[index] = frame
        return True

    def take(self, index: int, idle: np.ndarray) -> tuple[np.ndarray, bool]:
        """The frame for slot ``index`` (or the held one); advances the slot.

        Returns the frame and whether it was fresh. ``idle`` is shown if
        nothing was ever rendered.
        """
        for old in [k for k in self._frames if k < index]:
            del self._frames[old]
            self.stats.late += 1
        frame = self._frames.pop(index, None)
        fresh = frame is not None
        if frame is None:
            self.stats.held += 1
            frame = self._last if self._last is not None else idle
        self._last = frame
        self.next_index = index + 1
        self.stats.taken += 1
        return frame, fresh

    def drop_from(self, index: int) -> int:
        """Discard rendered frames from ``index`` on (interrupt / re-plan)."""
        stale = [k for k in self._frames if k >= index]
        for k in stale:
            del self._frames[k]
        self.stats.dropped += len(stale)
        return len(stale)

    def buffered(self) -> int:
        return len(self._frames)
