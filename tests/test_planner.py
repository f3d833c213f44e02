"""The rolling planner on a fake clock, with the embedded director (Whisper off: no live audio here).

``GatedDirector`` wraps the real director and holds its answer until the test
releases it: the only thing it changes is *when* a plan comes back, which is
what ordering and race tests need to control.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from engines.director.base import Director, PlanRequest
from engines.director.embedded import EmbeddedDirector
from engines.storyline import EmotionLabel, Window, shot_face
from realtime.clock import FakeClock, InlineExecutor
from realtime.events import (
    Inbox,
    Instructed,
    Interrupted,
    PlanChanged,
    SchedulerEvent,
    SpeechQueued,
    WindowPlanned,
)
from realtime.planner import RollingPlanner
from realtime.timeline import AudioTimeline


class GatedDirector(Director):
    """The embedded director, answering only once ``release()`` is called (while ``hold`` is set)."""

    name = "gated-embedded"

    def __init__(self) -> None:
        self.inner = EmbeddedDirector(transcribe=False)
        self.hold = False
        self.started: list[PlanRequest] = []
        self._gate = asyncio.Event()

    async def plan_window(self, request: PlanRequest) -> Window:
        self.started.append(request)
        window = await self.inner.plan_window(request)
        if self.hold:
            await self._gate.wait()
            self._gate.clear()
        return window

    def release(self) -> None:
        self._gate.set()


async def settle(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.fixture
async def inline_loop() -> AsyncIterator[None]:
    """The loop's default executor runs jobs inline: the director's work takes no fake time."""
    asyncio.get_running_loop().set_default_executor(InlineExecutor())
    yield


def make(director: Director) -> tuple[RollingPlanner, FakeClock, Inbox[SchedulerEvent]]:
    clock = FakeClock()
    out: Inbox[SchedulerEvent] = Inbox()
    planner = RollingPlanner(director, clock, AudioTimeline(horizon_s=30), out, session_id="test",
                             window_s=2.0, lead_s=2.0, timeout_s=5.0)
    return planner, clock, out


def planned(out: Inbox[SchedulerEvent]) -> list[SchedulerEvent]:
    return out.drain()


async def test_windows_are_planned_in_order_ahead_of_the_clock(inline_loop: None) -> None:
    planner, clock, out = make(EmbeddedDirector(transcribe=False))
    task = asyncio.ensure_future(planner.run())
    try:
        await settle()
        events = planned(out)
        assert [(e.window.start, e.window.end) for e in events if isinstance(e, WindowPlanned)] == [
            (0.0, 2.0), (2.0, 4.0)]  # lead + one window ahead of t = 0
        await clock.advance(1.0, step=0.1)
        events = planned(out)
        assert [e.window.start for e in events if isinstance(e, WindowPlanned)] == [4.0]
        assert all(e.generation == 0 for e in events if isinstance(e, WindowPlanned))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_instruction_starts_a_generation_and_replans_from_its_pts(inline_loop: None) -> None:
    planner, clock, out = make(EmbeddedDirector(transcribe=False))
    task = asyncio.ensure_future(planner.run())
    try:
        await settle()
        planned(out)
        planner.inbox.post(Instructed("be cheerful", 1.0))
        await settle()
        events = planned(out)
        assert isinstance(events[0], PlanChanged)
        assert events[0].from_pts == 1.0 and events[0].generation == 1
        windows = [e for e in events if isinstance(e, WindowPlanned)]
        assert windows and windows[0].window.start == 1.0
        assert all(e.generation == 1 for e in windows)
        assert windows[-1].window.end >= 4.0  # everything that was planned is redone
        assert all(s.emotion.label == EmotionLabel.happy for e in windows for s in e.window.shots)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_window_planned_before_an_instruction_never_lands_after_it(inline_loop: None) -> None:
    director = GatedDirector()
    planner, clock, out = make(director)
    task = asyncio.ensure_future(planner.run())
    try:
        await settle()
        planned(out)
        director.hold = True
        await clock.advance(1.0, step=0.1)  # the window 4-6 s is being planned, and held
        assert director.started[-1].start == 4.0 and not director.started[-1].instructions
        planner.inbox.post(Instructed("be cheerful", 1.2))
        planner.inbox.post(Instructed("don't move your head", 1.3))  # two, close together
        director.hold = False
        director.release()
        await settle()
        events = planned(out)
        windows = [e for e in events if isinstance(e, WindowPlanned)]
        changes = [e for e in events if isinstance(e, PlanChanged)]
        assert planner.stale == 1  # the held window came back under an old generation: dropped
        assert all(e.window.start != 4.0 or e.generation == 2 for e in windows)
        assert [c.generation for c in changes] == [1, 2] and changes[-1].from_pts == 1.2
        assert windows[0].window.start == 1.2 and all(e.generation == 2 for e in windows)
        for e in windows:  # neither instruction was lost
            for s in e.window.shots:
                assert s.emotion.label == EmotionLabel.happy
                assert s.head_motion < 0.3
        assert director.started[-1].instructions == ["be cheerful", "don't move your head"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_known_speech_is_planned_whole_with_its_words(inline_loop: None) -> None:
    planner, clock, out = make(EmbeddedDirector(transcribe=False))
    task = asyncio.ensure_future(planner.run())
    try:
        await settle()
        planned(out)
        line = "I am so happy to see you all here today, this is wonderful news!"
        planner.inbox.post(SpeechQueued(0.5, 9.0, ((0.5, 9.0, line),)))
        await settle()
        first = [e.window for e in planned(out) if isinstance(e, WindowPlanned)]
        assert [w.start for w in first] == [0.5, 2.5]  # within the lead: at once
        await clock.advance(0.2, step=0.04)  # beyond it: one window per frame interval
        windows = first + [e.window for e in planned(out) if isinstance(e, WindowPlanned)]
        assert windows[0].start == 0.5 and windows[-1].end >= 9.0  # beyond the usual lead
        assert sum(s.emotion.label == EmotionLabel.happy for w in windows for s in w.shots) >= 1
        # an interrupt at 3 s: the words after it are forgotten, the plan from there redone
        planner.inbox.post(Interrupted(3.0))
        await settle()
        events = planned(out)
        assert isinstance(events[0], PlanChanged) and events[0].from_pts == 3.0
        requests = [w for w in planner.storyline.windows if w.start >= 3.0]
        assert requests and all(w.end > 3.0 for w in requests)
        assert all(b <= 3.0 for _, b, _, _ in planner._texts)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_failing_director_gets_the_default_plan_and_the_session_goes_on(inline_loop: None) -> None:
    class Broken(Director):
        name = "broken"

        async def plan_window(self, request: PlanRequest) -> Window:
            raise RuntimeError("model crashed")

    planner, clock, out = make(Broken())
    task = asyncio.ensure_future(planner.run())
    try:
        await settle()
        windows = [e.window for e in planned(out) if isinstance(e, WindowPlanned)]
        assert len(windows) == 2 and planner.failures == 2
        assert all(shot_face(s) == (0.0, 0.0, 0.0, 0.0) for w in windows for s in w.shots)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_storyline_put_replaces_from_the_windows_start() -> None:
    from engines.storyline import Shot, Storyline

    a = Window(start=0, end=2, shots=[Shot(start=0, end=2)])
    b = Window(start=2, end=4, shots=[Shot(start=2, end=4)])
    c = Window(start=1, end=3, shots=[Shot(start=1, end=3, head_motion=0.1)])
    story = Storyline().put(a).put(b).put(c)
    assert [(w.start, w.end) for w in story.windows] == [(0, 1), (1, 3)]
    assert story.shot_at(0.5).end == 1 and story.shot_at(2.5).head_motion == 0.1
    assert story.put(Window(start=5, end=6, shots=[]), forget_before=2.5).windows[0].start == 1
    assert np.isclose(len(story.shots_between(0.5, 1.5)), 2)
