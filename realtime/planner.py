"""Rolling-window planning: the director plans the next windows while one plays.

Windows are ``window_s`` long and planned at least one window ahead of the
render head. A new instruction re-plans from a cut point on; Say text plans
the whole utterance as soon as its audio is known. If the director fails or
times out, the window gets the default plan and the session goes on.
"""

from __future__ import annotations

import asyncio
import logging
import math

import numpy as np

from engines.director.base import Director, PlanRequest
from engines.storyline import Shot, Storyline, Window, default_shot
from realtime.clock import Clock, wait_until_or_event
from realtime.timeline import AudioTimeline

log = logging.getLogger(__name__)

MAX_INSTRUCTIONS = 20
RECENT_AUDIO_S = 3.0  # live audio the director hears when it plans ahead of it


class RollingPlanner:
    def __init__(self, director: Director, clock: Clock, timeline: AudioTimeline, *,
                 session_id: str = "", window_s: float = 2.0, timeout_s: float = 1.5,
                 avatar_image: np.ndarray | None = None, avatar_id: str = "") -> None:
        self.director = director
        self.clock = clock
        self.timeline = timeline
        self.session_id = session_id
        self.window_s = window_s
        self.timeout_s = timeout_s
        self.avatar_image = avatar_image
        self.avatar_id = avatar_id
        self.storyline = Storyline()
        self.instructions: list[str] = []
        self.failures = 0
        self._planned_until = 0.0
        self._texts: list[tuple[float, float, str]] = []  # Say text and where it plays
        self._wake = asyncio.Event()
        self.on_replan: list[object] = []

    # --- reading the plan -------------------------------------------------------
    def shots_between(self, t0: float, t1: float) -> list[Shot]:
        """Shots overlapping ``[t0, t1]``, latest plan winning, in time order."""
        out: list[Shot] = []
        for w in self.storyline.windows:
            for s in w.shots:
                if s.start < t1 and s.end > t0:
                    out.append(s)
        out.sort(key=lambda s: s.start)
        return out

    def current_shot(self, t: float) -> Shot | None:
        return self.storyline.shot_at(t)

    # --- planning ------------------------------------------------------------------
    async def _plan(self, start: float, end: float) -> Window:
        utterances = [(a, b, tx) for a, b, tx in self._texts if a < end and b > start]
        text = " ".join(tx for _, _, tx in utterances) or None
        recent = np.zeros(0, np.float32)
        recent_start = 0.0
        if self.timeline.known(start, end):
            audio = self.timeline.slice(start, end).samples
        else:
            audio = np.zeros(0, np.float32)
            # planned ahead of live audio: the latest audio that has arrived
            head = min(self.timeline.mic_head, start)
            recent_start = max(0.0, head - RECENT_AUDIO_S)
            if head > recent_start:
                recent = self.timeline.slice(recent_start, head).samples
        req = PlanRequest(
            session_id=self.session_id, start=start, end=end, audio=audio, text=text,
            utterances=utterances, recent_audio=recent, recent_start=recent_start,
            instructions=list(self.instructions), history=self.storyline.windows[-4:],
            avatar_image=self.avatar_image, avatar_id=self.avatar_id,
        )
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
            # lands as the plan completes, and the session could then never close
            async with asyncio.timeout(self.timeout_s):
                window = await self.director.plan_window(req)
            if not window.shots:
                raise ValueError("the director planned no shots")
            return window
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any director failure: default plan, session goes on
            self.failures += 1
            log.warning("[%s] director failed for %.1f-%.1fs (%s: %s); using the default plan",
                        self.session_id, start, end, type(exc).__name__, exc)
            return Window(start=start, end=end, shots=[default_shot(start, end)])

    def _put(self, window: Window) -> None:
        """Add a window; it replaces whatever was planned from its start on."""
        kept: list[Window] = []
        for w in self.storyline.windows:
            if w.start >= window.start:
                continue
            if w.end > window.start:
                shots = [s.model_copy(update={"end": min(s.end, window.start)})
                         for s in w.shots if s.start < window.start]
                w = Window(start=w.start, end=window.start, shots=shots)
            kept.append(w)
        kept.append(window)
        horizon = self.clock.now() - 30.0
        self.storyline = Storyline(windows=[w for w in kept if w.end > horizon])

    async def plan_ahead(self, until: float) -> None:
        while self._planned_until < until:
            start = self._planned_until
            end = start + self.window_s
            self._put(await self._plan(start, end))
            self._planned_until = end

    async def replan_from(self, cut: float) -> None:
        """Re-plan from ``cut`` (a new instruction): the next windows change."""
        end = max(self._planned_until, cut + self.window_s)
        self._planned_until = cut
        await self.plan_ahead(end)

    def add_instruction(self, text: str) -> None:
        self.instructions.append(text)
        del self.instructions[:-MAX_INSTRUCTIONS]

    async def plan_utterance(self, start: float, end: float, text: str,
                             spans: list[tuple[float, float, str]] | None = None) -> None:
        """Speech known in full (Say text, uploads): plan the windows it plays in now.

        ``spans`` place the words more precisely (an upload's transcript segments).
        """
        self._texts += spans if spans else [(start, end, text)]
        self._texts = self._texts[-20:]
        self._planned_until = min(self._planned_until, start)
        n = max(1, math.ceil((end - start) / self.window_s))
        await self.plan_ahead(start + n * self.window_s)

    def notify(self) -> None:
        self._wake.set()

    async def run(self, lead_s: float) -> None:
        """Keep windows planned ``lead_s`` ahead of the clock."""
        while True:
            self._wake.clear()
            await self.plan_ahead(self.clock.now() + lead_s + self.window_s)
            nxt = self._planned_until - lead_s - self.window_s
            await wait_until_or_event(self.clock, nxt, self._wake)
