"""Rolling-window planning: one task per session plans the storyline in order, ahead of playback.

The planner is the session's only planning owner. Its task plans windows
``window_s`` long, in order, keeping the plan ``lead_s + window_s`` ahead of
the clock, and publishes each window downstream as a
:class:`~realtime.events.WindowPlanned` event. Control reaches it as events
in its inbox:

* an instruction (``Instructed``), known speech (``SpeechQueued``: Say text
  or an upload, planned whole as soon as its audio is known), an interrupt
  (``Interrupted``) or the microphone routed to another character
  (``MicRouted``: who speaks live changes) starts a new **generation**: the planner announces
  ``PlanChanged(from_pts, generation)`` at once (so the scheduler drops stale
  work) and re-plans from there;
* a window whose planning began under an older generation is dropped when it
  comes back, never published: a plan made before an instruction can never
  overwrite one made after it.

The director runs one window at a time per session. If it fails or times
out, the window gets the default plan and the session goes on. An avatar
with two faces gets one request per window with each character's own speech
(``PlanRequest.cast``), and the director plans shots for each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import numpy as np

from engines.director.base import CharacterSpeech, Director, PlanRequest
from engines.storyline import Shot, Storyline, Window, default_shot
from realtime.clock import Clock
from realtime.events import (
    Inbox,
    Instructed,
    Interrupted,
    MicRouted,
    PlanChanged,
    PlannerEvent,
    SchedulerEvent,
    SpeechQueued,
    WindowPlanned,
)
from realtime.timeline import AudioTimeline

log = logging.getLogger(__name__)

MAX_INSTRUCTIONS = 20
RECENT_AUDIO_S = 3.0  # live audio the director hears when it plans ahead of it
HISTORY_S = 30.0  # planned windows and spoken texts kept behind the clock
EAGER_SPACING_S = 0.04  # windows beyond the lead (known speech) are planned at most one per frame
INSTRUCTED_EASE_S = 0.25  # the host asked for it: the face changes this quickly into the first new shot


def _ease_in(window: Window, ease_s: float) -> Window:
    """The window with its first shot (per character) eased in over ``ease_s`` at most."""
    first: dict[int, int] = {}
    for i, shot in enumerate(window.shots):
        if shot.character not in first or shot.start < window.shots[first[shot.character]].start:
            first[shot.character] = i
    shots = [s.model_copy(update={"ease_s": min(s.ease_s, ease_s)}) if i in first.values() else s
             for i, s in enumerate(window.shots)]
    return window.model_copy(update={"shots": shots})


class RollingPlanner:
    def __init__(self, director: Director, clock: Clock, timeline: AudioTimeline,
                 out: Inbox[SchedulerEvent], *, session_id: str = "", window_s: float = 2.0,
                 lead_s: float = 2.0, timeout_s: float = 1.5, avatar_image: np.ndarray | None = None,
                 avatar_id: str = "") -> None:
        if window_s <= 0 or lead_s < 0:
            raise ValueError(f"window_s must be positive and lead_s >= 0, got {window_s}, {lead_s}")
        self.director = director
        self.clock = clock
        self.timeline = timeline
        self.out = out
        self.session_id = session_id
        self.window_s = window_s
        self.lead_s = lead_s
        self.timeout_s = timeout_s
        self.avatar_image = avatar_image
        self.avatar_id = avatar_id
        self.inbox: Inbox[PlannerEvent] = Inbox()
        self.storyline = Storyline()
        self.instructions: list[str] = []
        self.generation = 0
        self.failures = 0  # windows the director failed (default plan used)
        self.stale = 0  # windows dropped: a newer generation began while they were planned
        self.windows_planned = 0
        self.busy = False  # the director is planning a window (an offline render waits for it)
        self.plan_ms: deque[float] = deque(maxlen=50)  # the director's time per window
        self._planned_until = 0.0  # the current generation's plan reaches this pts
        self._replan_until = 0.0  # a re-plan redoes the plan at least up to here
        # known speech, where it plays and who says it: (start, end, text, character)
        self._texts: list[tuple[float, float, str, int]] = []
        self._instructed_at: float | None = None  # the pts an instruction applies from, until planned
        self._mic_character = 0  # whom live audio comes from (MicRouted)

    # --- reading the plan (stats) --------------------------------------------------
    def current_shot(self, t: float, character: int = 0) -> Shot | None:
        return self.storyline.shot_at(t, character)

    @property
    def planned_until(self) -> float:
        return self._planned_until

    # --- events --------------------------------------------------------------------
    def _apply(self, event: PlannerEvent) -> None:
        if isinstance(event, Instructed):
            self.instructions.append(event.text)
            del self.instructions[:-MAX_INSTRUCTIONS]
            self._restart(event.from_pts)
            self._instructed_at = self._planned_until
        elif isinstance(event, SpeechQueued):
            self._texts += [(a, b, tx, event.character) for a, b, tx in event.spans]
            self._restart(event.start)
            # known speech is planned whole, however far ahead it reaches
            self._replan_until = max(self._replan_until, event.end)
        elif isinstance(event, Interrupted):
            t = event.from_pts
            self._texts = [(a, min(b, t), tx, c) for a, b, tx, c in self._texts if a < t]
            self._restart(t)
        elif isinstance(event, MicRouted):
            self._mic_character = event.character
            self._restart(event.from_pts)  # planned ahead of live audio: the speaker changed

    def _restart(self, from_pts: float) -> None:
        """A new generation: the plan from ``from_pts`` on is redone."""
        self.generation += 1
        self._replan_until = max(self._replan_until, self._planned_until)
        self._planned_until = min(self._planned_until, max(from_pts, 0.0))
        self.out.post(PlanChanged(self._planned_until, self.generation))

    # --- planning ------------------------------------------------------------------
    def _speech(self, start: float, end: float, character: int, known: bool) -> CharacterSpeech:
        """What ``character`` says in ``[start, end)``, as far as it is known.

        Only the microphone's character can still get audio live: every other
        character's audio (its Say text, or silence) is known ahead.
        """
        known = known or character != self._mic_character
        utterances = [(a, b, tx) for a, b, tx, c in self._texts
                      if c == character and a < end and b > start]
        text = " ".join(tx for _, _, tx in utterances) or None
        recent = np.zeros(0, np.float32)
        recent_start = 0.0
        if known:
            audio = self.timeline.slice(start, end, character).samples
        else:
            audio = np.zeros(0, np.float32)
            # planned ahead of live audio: the latest audio that has arrived
            head = min(self.timeline.mic_head, start)
            recent_start = max(0.0, head - RECENT_AUDIO_S)
            if head > recent_start:
                recent = self.timeline.slice(recent_start, head, character).samples
        return CharacterSpeech(audio, text, utterances, recent, recent_start)

    def _request(self, start: float, end: float) -> PlanRequest:
        known = self.timeline.known(start, end)
        cast = [self._speech(start, end, c, known) for c in range(self.timeline.characters)]
        own = cast[0]
        return PlanRequest(
            session_id=self.session_id, start=start, end=end, audio=own.audio, text=own.text,
            utterances=own.utterances, recent_audio=own.recent_audio, recent_start=own.recent_start,
            instructions=list(self.instructions), history=self.storyline.windows[-4:],
            avatar_image=self.avatar_image, avatar_id=self.avatar_id,
            characters=len(cast), cast=cast if len(cast) > 1 else [],
        )

    async def _plan(self, start: float, end: float) -> Window:
        req = self._request(start, end)
        began = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
            # lands as the plan completes, and the session could then never close
            async with asyncio.timeout(self.timeout_s):
                window = await self.director.plan_window(req)
            if not window.shots:
                raise ValueError("the director planned no shots")
            self.plan_ms.append((time.perf_counter() - began) * 1000)
            return window
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any director failure: default plan, session goes on
            self.failures += 1
            log.warning("[%s] director failed for %.1f-%.1fs (%s: %s); using the default plan",
                        self.session_id, start, end, type(exc).__name__, exc)
            return Window(start=start, end=end, shots=[
                default_shot(start, end).model_copy(update={"character": c})
                for c in range(self.timeline.characters)])

    def _target(self) -> float:
        return max(self.clock.now() + self.lead_s + self.window_s, self._replan_until)

    async def step(self) -> bool:
        """Apply what arrived, then plan the next window if one is due; True if one was planned."""
        for event in self.inbox.drain():
            self._apply(event)
        if self._planned_until >= self._target() - 1e-9:
            return False
        start, generation = self._planned_until, self.generation
        self.busy = True
        try:
            window = await self._plan(start, start + self.window_s)
        finally:
            self.busy = False
        if len(self.inbox) or generation != self.generation:
            # an instruction, speech or interrupt came in while the director worked:
            # this window was planned without it, so it never reaches the scheduler
            self.stale += 1
            return False
        if self._instructed_at is not None and abs(window.start - self._instructed_at) < 1e-6:
            window = _ease_in(window, INSTRUCTED_EASE_S)
        self._instructed_at = None
        horizon = self.clock.now() - HISTORY_S
        self.storyline = self.storyline.put(window, forget_before=horizon)
        self._texts = [x for x in self._texts if x[1] > horizon]
        self._planned_until = window.end
        self.windows_planned += 1
        self.out.post(WindowPlanned(window, generation))
        return True

    async def run(self) -> None:
        """Plan until cancelled: windows in order, re-plans as control arrives.

        Windows within the lead are planned back to back; those beyond it (known
        speech, planned whole) one per frame interval, so that a re-plan of a long
        utterance does not crowd out the frames it is about to change.
        """
        while True:
            if await self.step():
                if self._planned_until > self.clock.now() + self.lead_s + self.window_s:
                    await self.inbox.wait(self.clock, self.clock.now() + EAGER_SPACING_S)
                continue
            if len(self.inbox):
                continue
            await self.inbox.wait(self.clock, self._planned_until - self.lead_s - self.window_s)
