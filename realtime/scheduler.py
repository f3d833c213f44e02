"""The cascade scheduler: keyframes ahead of playback, sub-clips as soon as their audio is in.

Sub-clip ``i`` covers frames ``[i*n, (i+1)*n]`` (``n`` = ``subclip_frames``,
never fewer than the engine's ``min_subclip_frames``), between the blueprint
keyframes at its two ends. The scheduler only does bookkeeping on the event
loop; engines run on a worker pool:

* the plan reaches it as events (``WindowPlanned``, ``PlanChanged``) and it
  keeps its own copy of the storyline; a ``PlanChanged`` drops keyframes and
  sub-clips from its ``from_pts`` on and waits for the new generation's
  windows, but never longer than ``plan_wait_s`` before a frame is due
  (then it renders from what it has: falling behind degrades, never drifts);
* keyframes are generated in batches, at least ``keyframe_lead_s`` ahead of
  the render head;
* a sub-clip is dispatched once its audio has arrived (microphone), or at once
  when it is known ahead (TTS), or when the clock has passed its end by
  ``grace_s`` (nobody is sending audio: the silence is rendered as idle);
* up to ``workers`` sub-clips render in parallel; finished frames go to the
  playout buffer by pts, so order is kept whatever order they finish in;
* sub-clips whose frames are already due are skipped; new speech or an
  interrupt (events too) invalidates work from a keyframe boundary on, and
  stale results are dropped.

Playback position comes from the clock and the playout delay (frame ``k``
leaves at ``k / fps + delay_s``), not from asking playout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.base import AudioSlice, Engine, Keyframe
from engines.storyline import Shot, Storyline, default_shot
from realtime.clock import Clock
from realtime.events import (
    AudioArrived,
    Inbox,
    Interrupted,
    PlanChanged,
    SchedulerEvent,
    SpeechQueued,
    WindowPlanned,
)
from realtime.playout import Playout
from realtime.timeline import AudioTimeline

log = logging.getLogger(__name__)

AUDIO_CONTEXT_S = 0.3  # audio before a sub-clip that engines may look at
KEYFRAME_RETRY_S = 0.5  # after a failed keyframe batch
STORYLINE_HISTORY_S = 10.0  # planned windows kept behind the clock
EASE_CONTEXT_S = 2.0  # shots this far before a keyframe reach the engine (the longest Shot.ease_s)


@dataclass(slots=True)
class SchedulerConfig:
    subclip_frames: int = 1
    workers: int = 1
    keyframe_lead_s: float = 1.0
    keyframe_batch_s: float = 1.0
    render_ahead_s: float = 2.0
    grace_s: float = 0.02
    delay_s: float = 0.13  # the playout delay: frame pts t leaves at t + delay_s
    plan_wait_s: float = 0.06  # a keyframe waits for a pending plan until its frame is this close to due

    def __post_init__(self) -> None:
        if self.subclip_frames < 1:
            raise ValueError(f"subclip_frames must be >= 1, got {self.subclip_frames}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.delay_s <= 0:
            raise ValueError(f"delay_s must be positive, got {self.delay_s}")


@dataclass(slots=True)
class SchedulerStats:
    clips_rendered: int = 0
    clips_skipped: int = 0
    clips_stale: int = 0
    keyframe_batches: int = 0
    keyframe_failures: int = 0
    windows_stale: int = 0  # windows of an older plan generation, dropped
    forced_keyframes: int = 0  # made without the pending plan, to stay on time
    render_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100))
    margin_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100))  # done vs due
    wait_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100))  # ready -> dispatched

    def render_ms_median(self) -> float:
        return float(np.median(self.render_ms)) if self.render_ms else 0.0


class CascadeScheduler:
    def __init__(
        self,
        engine: Engine,
        prepared: Any,
        timeline: AudioTimeline,
        clock: Clock,
        playout: Playout,
        executor: Executor | None,
        config: SchedulerConfig | None = None,
        session_id: str = "",
    ) -> None:
        self.engine = engine
        self.prepared = prepared
        self.timeline = timeline
        self.clock = clock
        self.playout = playout
        self.executor = executor
        self.config = config or SchedulerConfig()
        self.session_id = session_id
        self.inbox: Inbox[SchedulerEvent] = Inbox()
        self.stats = SchedulerStats()
        self.fps = engine.fps
        # never shorter than the engine renders without waste
        self.n = max(self.config.subclip_frames, engine.min_subclip_frames)
        self.clip_s = self.n / self.fps
        self.next_clip = 0
        self.storyline = Storyline()
        self.generation = 0
        self._fresh_until = 0.0  # the current generation's plan covers pts before this
        self.keyframes: dict[int, Keyframe] = {}  # boundary index -> keyframe
        self._kf_until = 0  # keyframes exist for boundaries < this
        self._kf_job: asyncio.Task[None] | None = None
        self._kf_retry_at = 0.0
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._closed = False

    # --- positions ---------------------------------------------------------------
    def boundary_at_or_after(self, t: float) -> int:
        return math.ceil(t * self.fps / self.n - 1e-9)

    def due_time(self, index: int) -> float:
        """Session time at which frame ``index`` leaves."""
        return index / self.fps + self.config.delay_s

    def playing_index(self, now: float) -> int:
        """Frames before this index are due by ``now`` (gone or going out)."""
        return max(0, math.floor((now - self.config.delay_s) * self.fps + 1e-9) + 1)

    def implied_latency_s(self) -> float:
        """Latency the settings imply: a sub-clip's audio, then its render."""
        return self.clip_s + self.config.grace_s + self.stats.render_ms_median() / 1000

    # --- events --------------------------------------------------------------------
    def _apply(self, event: SchedulerEvent) -> None:
        if isinstance(event, AudioArrived):
            return  # nothing to change: the next step looks at the timeline again
        if isinstance(event, (SpeechQueued, Interrupted)):
            t = event.start if isinstance(event, SpeechQueued) else event.from_pts
            # the audio changed from t: the planner answers with a new plan from there, so
            # what follows waits for it (up to plan_wait_s) instead of rendering twice
            self._fresh_until = min(self._fresh_until, t)
            self._invalidate(t)
        elif isinstance(event, PlanChanged):
            if event.generation < self.generation:
                return
            self.generation = event.generation
            self._fresh_until = event.from_pts
            self._invalidate(event.from_pts)
        elif isinstance(event, WindowPlanned):
            if event.generation < self.generation:
                self.stats.windows_stale += 1
                return
            self.storyline = self.storyline.put(
                event.window, forget_before=self.clock.now() - STORYLINE_HISTORY_S)
            if event.window.start <= self._fresh_until + 1e-6:
                self._fresh_until = max(self._fresh_until, event.window.end)

    def _invalidate(self, t: float) -> None:
        """Drop planned and rendered work from the first keyframe at or after ``t``.

        With sub-clips of several frames the keyframe at that boundary is kept: the
        sub-clip before it eased towards it, so the new work joins it seamlessly. A
        one-frame sub-clip shows only its first keyframe, so there is nothing to join
        and that keyframe is redone too (the change shows a frame sooner).
        """
        clip = max(self.boundary_at_or_after(t), 0)
        for i in [i for i in self._in_flight if i >= clip]:
            self._in_flight.pop(i).cancel()
            self.stats.clips_stale += 1
        keep = clip + 1 if self.n > 1 else clip  # keyframes from this boundary on are redone
        for b in [b for b in self.keyframes if b >= keep]:
            del self.keyframes[b]
        if self._kf_job is not None:
            self._kf_job.cancel()
            self._kf_job = None
        self._kf_until = min(self._kf_until, keep)
        self.playout.drop_from(clip * self.n)
        self.next_clip = min(self.next_clip, clip)

    # --- the loop ------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while not self._closed:
                for event in self.inbox.drain():
                    self._apply(event)
                deadline = self._step()
                await self.inbox.wait(self.clock, deadline)
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
        deadline = self._ensure_keyframes(now)
        playing = self.playing_index(now)
        while len(self._in_flight) < self.config.workers:
            i = self.next_clip
            t0, t1 = i * self.clip_s, (i + 1) * self.clip_s
            if (i + 1) * self.n <= playing:
                # every frame of this clip is already due: skip it, playout holds
                self.stats.clips_skipped += 1
                self.next_clip += 1
                continue
            if t0 > now + self.config.render_ahead_s:
                return min(deadline, t0 - self.config.render_ahead_s)
            if not (self.timeline.known(t0, t1) or now >= t1 + self.config.grace_s):
                return min(deadline, t1 + self.config.grace_s)
            if i not in self.keyframes or i + 1 not in self.keyframes:
                return min(deadline, now + self.clip_s)  # keyframes are on their way
            self._in_flight[i] = asyncio.ensure_future(self._render(i))
            self.next_clip += 1
        return min(deadline, now + self.clip_s)

    def _plan_limit(self, now: float) -> float:
        """Keyframes at pts before this may be made now: planned, or due too soon to wait."""
        return max(self._fresh_until, now - self.config.delay_s + self.config.plan_wait_s)

    def _ensure_keyframes(self, now: float) -> float:
        """Start the next keyframe batch if one is due; returns when to look again."""
        later = math.inf
        if self._kf_job is not None:
            return later  # its completion wakes the loop
        if now < self._kf_retry_at:
            return self._kf_retry_at
        lead = self.config.keyframe_lead_s
        horizon = max(now, self.next_clip * self.clip_s) + lead
        if self._kf_until * self.clip_s > horizon:
            return self._kf_until * self.clip_s - lead
        first = max(self._kf_until, self.next_clip)
        count = max(2, math.ceil(self.config.keyframe_batch_s / self.clip_s))
        limit = self._plan_limit(now)
        # boundaries the plan (or the clock) allows: the pts must be strictly inside the plan
        allowed = math.ceil(limit / self.clip_s - 1e-9)  # boundaries < allowed
        if first >= allowed:
            # waiting for the plan: look again when the first boundary cannot wait any longer
            return self.due_time(first * self.n) - self.config.plan_wait_s
        until = min(first + count, allowed)
        if first * self.clip_s >= self._fresh_until:
            self.stats.forced_keyframes += until - first
        boundaries = [b for b in range(first, until) if b not in self.keyframes]
        self._kf_job = asyncio.ensure_future(self._make_keyframes(boundaries, until))
        return later

    async def _make_keyframes(self, boundaries: list[int], until: int) -> None:
        times = [b * self.clip_s for b in boundaries]
        if times:
            # with the shots before them: engines ease from the shot before into a new one
            shots = self.storyline.shots_between(times[0] - EASE_CONTEXT_S, times[-1] + self.clip_s) or [
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
                self.inbox.wake()
                return
            for b, kf in zip(boundaries, kfs, strict=True):
                self.keyframes.setdefault(b, kf)
            self.stats.keyframe_batches += 1
        self._kf_until = max(self._kf_until, until)
        # forget keyframes well behind playback
        old = self.playing_index(self.clock.now()) // self.n - 2
        for b in [b for b in self.keyframes if b < old]:
            del self.keyframes[b]
        self._kf_job = None
        self.inbox.wake()

    def _shots_at(self, t0: float, t1: float) -> list[Shot]:
        """One shot per character for the sub-clip starting at ``t0``."""
        shots = self.storyline.shots_between(t0, t1)
        out = []
        for c in range(self.engine.characters(self.prepared)):
            shot = next((s for s in reversed(shots) if s.character == c and s.covers(t0)), None)
            out.append(shot or default_shot(t0, t1).model_copy(update={"character": c}))
        return out

    def _render_blocking(self, first: Keyframe, last: Keyframe, shots: list[Shot],
                         audios: list[AudioSlice]) -> tuple[list[np.ndarray], float]:
        t = time.perf_counter()
        frames = self.engine.subclip(self.prepared, first, last, audios, shots)
        frames = self.engine.upscale(frames)
        return frames, (time.perf_counter() - t) * 1000

    async def _render(self, i: int) -> None:
        me = asyncio.current_task()
        t0, t1 = i * self.clip_s, (i + 1) * self.clip_s
        first, last = self.keyframes[i], self.keyframes[i + 1]
        shots = self._shots_at(t0, t1)
        # each character's own voice (the timeline may hold fewer: the rest are silent)
        audios = [self.timeline.slice(t0 - AUDIO_CONTEXT_S, t1, c)
                  for c in range(min(len(shots), self.timeline.characters))]
        loop = asyncio.get_running_loop()
        try:
            frames, ms = await loop.run_in_executor(
                self.executor, self._render_blocking, first, last, shots, audios)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("[%s] sub-clip %d failed; playout holds", self.session_id, i)
            if self._in_flight.get(i) is me:
                del self._in_flight[i]
            self.inbox.wake()
            return
        if self._in_flight.get(i) is not me:  # invalidated while rendering
            return
        del self._in_flight[i]
        if len(frames) != self.n + 1:
            log.error("[%s] engine returned %d frames for a %d-frame sub-clip",
                      self.session_id, len(frames), self.n + 1)
        self.stats.margin_ms.append((self.due_time(i * self.n) - self.clock.now()) * 1000)
        for k, frame in enumerate(frames[: self.n]):
            self.playout.put(i * self.n + k, frame)
        self.stats.clips_rendered += 1
        self.stats.render_ms.append(ms)
        self.inbox.wake()
