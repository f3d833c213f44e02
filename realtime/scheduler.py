"""The cascade scheduler: keyframes ahead of playback, sub-clips as soon as their audio is in.

Sub-clip ``i`` covers frames ``[i*n, (i+1)*n]`` (``n`` = ``subclip_frames``),
between the blueprint keyframes at its two ends. The scheduler only does
bookkeeping on the event loop; engines run on a worker pool:

* keyframes are generated in batches, at least ``keyframe_lead_s`` ahead of
  the render head, from the plan (the director's shots);
* a sub-clip is dispatched once its audio has arrived (microphone), or at once
  when it is known ahead (TTS), or when the clock has passed its end by
  ``grace_s`` (nobody is sending audio: the silence is rendered as idle);
* up to ``workers`` sub-clips render in parallel; finished frames go to the
  playout buffer by pts, so order is kept whatever order they finish in;
* sub-clips whose frames are already due are skipped (falling behind
  degrades, never drifts); an interrupt or re-plan invalidates work from a
  keyframe boundary on, and stale results are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.base import Engine, Keyframe
from engines.storyline import Shot, default_shot
from realtime.clock import Clock, wait_until_or_event
from realtime.playout import Playout
from realtime.timeline import AudioTimeline

log = logging.getLogger(__name__)

AUDIO_CONTEXT_S = 0.3  # audio before a sub-clip that engines may look at
KEYFRAME_RETRY_S = 0.5  # after a failed keyframe batch


@dataclass(slots=True)
class SchedulerConfig:
    subclip_frames: int = 1
    workers: int = 1
    keyframe_lead_s: float = 1.0
    keyframe_batch_s: float = 1.0
    render_ahead_s: float = 2.0
    grace_s: float = 0.02

    def __post_init__(self) -> None:
        if self.subclip_frames < 1:
            raise ValueError(f"subclip_frames must be >= 1, got {self.subclip_frames}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass(slots=True)
class SchedulerStats:
    clips_rendered: int = 0
    clips_skipped: int = 0
    clips_stale: int = 0
    keyframe_batches: int = 0
    keyframe_failures: int = 0
    render_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100))
    margin_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100))  # done vs due
    wait_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100))  # ready -> dispatched

    def render_ms_median(self) -> float:
        return float(np.median(self.render_ms)) if self.render_ms else 0.0


ShotSource = Callable[[float, float], Sequence[Shot]]


class CascadeScheduler:
    def __init__(
        self,
        engine: Engine,
        prepared: Any,
        timeline: AudioTimeline,
        clock: Clock,
        playout: Playout,
        shots: ShotSource,
        executor: Executor | None,
        config: SchedulerConfig | None = None,
        session_id: str = "",
    ) -> None:
        self.engine = engine
        self.prepared = prepared
        self.timeline = timeline
        self.clock = clock
        self.playout = playout
        self.shots = shots
        self.executor = executor
        self.config = config or SchedulerConfig()
        self.session_id = session_id
        self.stats = SchedulerStats()
        self.fps = engine.fps
        # never shorter than the engine renders without waste
        self.n = max(self.config.subclip_frames, engine.min_subclip_frames)
        self.clip_s = self.n / self.fps
        self.next_clip = 0
        self.keyframes: dict[int, Keyframe] = {}  # boundary index -> keyframe
        self._kf_until = 0  # keyframes exist for boundaries < this
        self._kf_job: asyncio.Task[None] | None = None
        self._kf_retry_at = 0.0
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._closed = False

    # --- control ---------------------------------------------------------------
    def notify(self) -> None:
        """Something changed (audio arrived, plan changed): look again."""
        self._wake.set()

    def boundary_at_or_after(self, t: float) -> int:
        return math.ceil(t * self.fps / self.n - 1e-9)

    def invalidate(self, t: float) -> float:
        """Drop planned and rendered work from the first keyframe at or after ``t``.

        The keyframe at that boundary is kept so the new work joins the frames
        already sent seamlessly. Returns the pts from which frames are redone.
        """
        clip = max(self.boundary_at_or_after(t), 0)
        for i in [i for i in self._in_flight if i >= clip]:
            self._in_flight.pop(i).cancel()
            self.stats.clips_stale += 1
        for b in [b for b in self.keyframes if b > clip]:
            del self.keyframes[b]
        if self._kf_job is not None:
            self._kf_job.cancel()
            self._kf_job = None
        self._kf_until = min(self._kf_until, clip + 1)
        self.playout.drop_from(clip * self.n)
        self.next_clip = min(self.next_clip, clip)
        self.notify()
        return clip * self.clip_s

    def implied_latency_s(self) -> float:
        """Latency the settings imply: a sub-clip's audio, then its render."""
        return self.clip_s + self.config.grace_s + self.stats.render_ms_median() / 1000

    # --- the loop ------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while not self._closed:
                self._wake.clear()
                deadline = self._step()
                await wait_until_or_event(self.clock, deadline, self._wake)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        tasks = list(self._in_flight.values())
        if self._kf_job is not None:
            tasks.append(self._kf_job)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()
        self._kf_job = None

    def _step(self) -> float:
        """Dispatch what is ready; return when to look again at the latest."""
        now = self.clock.now()
        self._ensure_keyframes(now)
        while len(self._in_flight) < self.config.workers:
            i = self.next_clip
            t0, t1 = i * self.clip_s, (i + 1) * self.clip_s
            if (i + 1) * self.n <= self.playout.next_index:
                # every frame of this clip is already due: skip it, playout holds
                self.stats.clips_skipped += 1
                self.next_clip += 1
                continue
            if t0 > now + self.config.render_ahead_s:
                return t0 - self.config.render_ahead_s
            if not (self.timeline.known(t0, t1) or now >= t1 + self.config.grace_s):
                return t1 + self.config.grace_s
            if i not in self.keyframes or i + 1 not in self.keyframes:
                return now + self.clip_s  # keyframes are on their way
            self._in_flight[i] = asyncio.ensure_future(self._render(i))
            self.next_clip += 1
        return now + self.clip_s

    def _ensure_keyframes(self, now: float) -> None:
        horizon = max(now, self.next_clip * self.clip_s) + self.config.keyframe_lead_s
        if self._kf_job is not None or self._kf_until * self.clip_s > horizon or now < self._kf_retry_at:
            return
        first = max(self._kf_until, self.next_clip)
        count = max(2, math.ceil(self.config.keyframe_batch_s / self.clip_s))
        boundaries = [b for b in range(first, first + count) if b not in self.keyframes]
        self._kf_job = asyncio.ensure_future(self._make_keyframes(boundaries, first + count))

    async def _make_keyframes(self, boundaries: list[int], until: int) -> None:
        times = [b * self.clip_s for b in boundaries]
        if times:
            shots = list(self.shots(times[0], times[-1] + self.clip_s)) or [
                default_shot(times[0], times[-1] + self.clip_s)]
            loop = asyncio.get_running_loop()
            try:
                kfs = await loop.run_in_executor(
                    self.executor, self.engine.keyframes, self.prepared, shots, times)
            except asyncio.CancelledError:
                raise
            except Exception:  # the next step asks again; playout holds meanwhile
                log.exception("[%s] keyframes at %.2f-%.2fs failed", self.session_id, times[0], times[-1])
                self.stats.keyframe_failures += 1
                self._kf_retry_at = self.clock.now() + KEYFRAME_RETRY_S
                self._kf_job = None
                return
            for b, kf in zip(boundaries, kfs, strict=True):
                self.keyframes.setdefault(b, kf)
            self.stats.keyframe_batches += 1
        self._kf_until = max(self._kf_until, until)
        # forget keyframes well behind playback
        old = self.playout.next_index // self.n - 2
        for b in [b for b in self.keyframes if b < old]:
            del self.keyframes[b]
        self._kf_job = None
        self.notify()

    def _render_blocking(self, i: int, first: Keyframe, last: Keyframe, shot: Shot,
                         audio: Any) -> tuple[list[np.ndarray], float]:
        t = time.perf_counter()
        frames = self.engine.subclip(self.prepared, first, last, [audio], [shot])
        frames = self.engine.upscale(frames)
        return frames, (time.perf_counter() - t) * 1000

    async def _render(self, i: int) -> None:
        me = asyncio.current_task()
        t0, t1 = i * self.clip_s, (i + 1) * self.clip_s
        first, last = self.keyframes[i], self.keyframes[i + 1]
        shots = self.shots(t0, t1)
        shot = next((s for s in shots if s.covers(t0)), None) or default_shot(t0, t1)
        audio = self.timeline.slice(t0 - AUDIO_CONTEXT_S, t1)
        loop = asyncio.get_running_loop()
        try:
            frames, ms = await loop.run_in_executor(
                self.executor, self._render_blocking, i, first, last, shot, audio)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("[%s] sub-clip %d failed; playout holds", self.session_id, i)
            if self._in_flight.get(i) is me:
                del self._in_flight[i]
            self.notify()
            return
        if self._in_flight.get(i) is not me:  # invalidated while rendering
            return
        del self._in_flight[i]
        if len(frames) != self.n + 1:
            log.error("[%s] engine returned %d frames for a %d-frame sub-clip",
                      self.session_id, len(frames), self.n + 1)
        self.stats.margin_ms.append((self.playout.due_time(i * self.n) - self.clock.now()) * 1000)
        for k, frame in enumerate(frames[: self.n]):
            self.playout.put(i * self.n + k, frame)
        self.stats.clips_rendered += 1
        self.stats.render_ms.append(ms)
        self.notify()
