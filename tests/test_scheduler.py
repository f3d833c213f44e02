"""The cascade scheduler and playout, on a fake clock with engines whose work the test releases."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np
import pytest

from engines.base import AudioSlice, Engine, Keyframe
from engines.storyline import Emotion, EmotionLabel, Shot, Window, default_shot
from realtime.clock import FakeClock
from realtime.events import AudioArrived, Interrupted, PlanChanged, SpeechQueued, WindowPlanned
from realtime.playout import Playout
from realtime.scheduler import CascadeScheduler, SchedulerConfig
from realtime.timeline import AudioTimeline
from realtime.tracks import AudioOut, EncodedAudioTrack, RawVideoTrack, VideoOut


class ManualExecutor(Executor):
    """Runs submitted work only when the test says so: render time is under test control."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self.jobs.append((fn, args, fut))
        return fut

    def pending(self, kind: str) -> list[int]:
        return [i for i, (fn, _, _) in enumerate(self.jobs) if kind in getattr(fn, "__name__", "")]

    def run(self, index: int) -> None:
        fn, args, fut = self.jobs.pop(index)
        if fut.set_running_or_notify_cancel():  # a cancelled job (stale work) never runs
            fut.set_result(fn(*args))

    def run_all(self) -> None:
        while self.jobs:
            self.run(0)


HAPPY = 200  # green channel of frames rendered under a happy shot


class CountingEngine(Engine):
    """Frames whose red channel encodes their pts and green the shot's emotion; keyframes too."""

    name = "counting"

    def __init__(self) -> None:
        super().__init__(fps=25, size=(8, 8))

    def prepare(self, avatar: Any) -> None:
        return None

    def idle_frame(self, prepared: Any) -> np.ndarray:
        return np.zeros((8, 8, 3), np.uint8)

    def keyframes(self, prepared: Any, shots: Sequence[Shot], times: Sequence[float]) -> list[Keyframe]:
        out = []
        for t in times:
            shot = next((s for s in shots if s.covers(t)), default_shot(t, t + 1))
            out.append(Keyframe(pts=t, state=t, image=self.frame(t, shot)))
        return out

    def frame(self, t: float, shot: Shot | None = None) -> np.ndarray:
        f = np.full((8, 8, 3), round(t * 25) % 256, np.uint8)
        happy = shot is not None and shot.emotion.label == EmotionLabel.happy
        f[..., 1] = HAPPY if happy else 0
        return f

    def subclip(self, prepared: Any, first: Keyframe, last: Keyframe, audios: Sequence[AudioSlice],
                shots: Sequence[Shot]) -> list[np.ndarray]:
        n = self.frames_between(first, last)
        frames = [self.frame(first.pts + k / 25, shots[0]) for k in range(n + 1)]
        frames[0], frames[-1] = first.image, last.image  # first-last-frame
        return frames


async def settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)


def make(workers: int = 2, n: int = 2, delay: float = 0.2, planned_until: float | None = 60.0
         ) -> tuple[CascadeScheduler, FakeClock, ManualExecutor, AudioTimeline, Playout]:
    """A scheduler on a fake clock; the plan is one neutral window up to ``planned_until``."""
    clock = FakeClock()
    ex = ManualExecutor()
    timeline = AudioTimeline(horizon_s=20)
    playout = Playout(25, delay)
    sched = CascadeScheduler(CountingEngine(), None, timeline, clock, playout, ex,
                             SchedulerConfig(subclip_frames=n, workers=workers, delay_s=delay))
    if planned_until is not None:
        plan(sched, 0.0, planned_until, generation=0)
    return sched, clock, ex, timeline, playout


def plan(sched: CascadeScheduler, start: float, end: float, generation: int,
         label: EmotionLabel = EmotionLabel.neutral) -> None:
    shot = Shot(start=start, end=end, emotion=Emotion(label=label, intensity=0.8))
    sched.inbox.post(WindowPlanned(Window(start=start, end=end, shots=[shot]), generation))


def mic(timeline: AudioTimeline, t0: float, t1: float, arrived: float) -> None:
    n = round((t1 - t0) * 16000)
    timeline.write_mic(t0, np.zeros(n, np.float32), np.zeros(n * 3, np.int16), 0.0, arrived)


async def test_subclips_wait_for_audio_then_render_in_parallel_in_order() -> None:
    sched, clock, ex, timeline, playout = make(workers=2)
    task = asyncio.ensure_future(sched.run())
    try:
        await settle()
        ex.run_all()  # keyframes
        await settle()
        assert ex.pending("render") == []  # no audio yet, clock has not passed the grace
        mic(timeline, 0.0, 0.16, arrived=0.16)
        sched.inbox.post(AudioArrived(0.16))
        await settle()
        renders = ex.pending("render")
        assert len(renders) == 2  # two sub-clips in flight at once: they overlap
        ex.run(renders[1])  # the later clip finishes first...
        await settle()
        ex.run(ex.pending("render")[0])
        await settle()
        frames = [playout.take(k, np.zeros((8, 8, 3), np.uint8)) for k in range(4)]
        assert all(fresh for _, fresh in frames)  # ...but playout keeps pts order
        assert [int(f[0, 0, 0]) for f, _ in frames] == [0, 1, 2, 3]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_silence_renders_idle_after_the_grace_period() -> None:
    sched, clock, ex, timeline, playout = make(workers=1)
    task = asyncio.ensure_future(sched.run())
    try:
        await settle()
        ex.run_all()
        await clock.advance(0.08 + sched.config.grace_s + 0.001)
        assert len(ex.pending("render")) == 1  # nobody talks: the clip renders anyway
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_failed_keyframe_batch_is_logged_and_retried() -> None:
    sched, clock, ex, timeline, playout = make(workers=1)
    task = asyncio.ensure_future(sched.run())
    try:
        await settle()
        fn, args, fut = ex.jobs.pop(ex.pending("keyframes")[0])
        fut.set_exception(RuntimeError("engine out of memory"))
        await settle()
        assert sched.stats.keyframe_failures == 1 and not ex.pending("keyframes")
        await clock.advance(0.6)  # after the back-off the batch is asked for again
        assert ex.pending("keyframes")
        ex.run_all()
        await clock.advance(0.1)
        assert ex.pending("render"), "rendering goes on once keyframes exist"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_known_audio_renders_ahead() -> None:
    sched, clock, ex, timeline, playout = make(workers=1)
    n = 16000
    timeline.write_tts(0.0, np.zeros(n, np.float32), np.zeros(3 * n, np.int16), [], now=0.0)
    task = asyncio.ensure_future(sched.run())
    try:
        for _ in range(30):
            await settle()
            ex.run_all()
        await settle()
        # every sub-clip that the second of TTS covers completely is rendered before its time
        assert playout.buffered() == 24
        assert clock.now() == 0.0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_new_speech_drops_stale_work_and_keeps_the_join() -> None:
    sched, clock, ex, timeline, playout = make(workers=2)
    n = 16000
    timeline.write_tts(0.0, np.zeros(n, np.float32), np.zeros(3 * n, np.int16), [], now=0.0)
    task = asyncio.ensure_future(sched.run())
    try:
        await settle()
        ex.run_all()
        await settle()
        in_flight = ex.pending("render")
        assert len(in_flight) == 2
        # speech from 0.05 on: the boundary at or after it is 0.08, so clip 1 is stale, clip 0 is not
        sched.inbox.post(SpeechQueued(0.05, 1.0))
        plan(sched, 0.05, 60.0, generation=0)  # the planner's answer to it
        await settle()
        assert 0 in sched.keyframes and 1 in sched.keyframes  # the join keyframe is kept
        assert 2 not in sched.keyframes
        for _ in range(4):
            ex.run_all()
            await settle()
        assert sched.stats.clips_stale == 1
        got = [playout.take(k, np.zeros((8, 8, 3), np.uint8)) for k in range(4)]
        assert all(fresh for _, fresh in got)
        assert [int(f[0, 0, 0]) for f, _ in got] == [0, 1, 2, 3]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def run_for(sched: CascadeScheduler, clock: FakeClock, ex: ManualExecutor, seconds: float,
                  step: float = 0.01) -> None:
    """Advance the clock, releasing engine work at once (a fast engine)."""
    for _ in range(round(seconds / step)):
        ex.run_all()
        await settle()
        ex.run_all()
        await clock.advance(step)


def greens(playout: Playout, first: int, last: int) -> list[int]:
    idle = np.zeros((8, 8, 3), np.uint8)
    return [int(playout.take(k, idle)[0][0, 0, 1]) for k in range(first, last)]


async def test_a_plan_change_redoes_work_from_its_pts_and_drops_older_generations() -> None:
    sched, clock, ex, timeline, playout = make(workers=1, n=1, delay=0.1)
    n = 16000 * 3
    timeline.write_tts(0.0, np.zeros(n, np.float32), np.zeros(3 * n, np.int16), [], now=0.0)
    task = asyncio.ensure_future(sched.run())
    try:
        await run_for(sched, clock, ex, 0.2)
        assert playout.buffered() > 30  # known speech: rendered well ahead, all neutral
        sched.inbox.post(PlanChanged(0.4, generation=1))
        plan(sched, 0.4, 60.0, generation=0, label=EmotionLabel.happy)  # planned before: stale
        await settle()
        assert sched.stats.windows_stale == 1
        assert all(k < 10 for k in playout._frames), "frames from the new plan's pts were dropped"
        plan(sched, 0.4, 60.0, generation=1, label=EmotionLabel.happy)
        await run_for(sched, clock, ex, 0.1)
        g = greens(playout, 8, 16)
        assert g == [0, 0, HAPPY, HAPPY, HAPPY, HAPPY, HAPPY, HAPPY], g  # from 0.4 s (frame 10) on
        assert sched.stats.forced_keyframes == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_keyframes_after_a_plan_change_see_the_shot_they_ease_from() -> None:
    sched, clock, ex, timeline, playout = make(workers=1, n=1, delay=0.1, planned_until=1.0)
    task = asyncio.ensure_future(sched.run())
    try:
        await run_for(sched, clock, ex, 0.1)
        seen: list[list[Shot]] = []
        real = sched.engine.keyframes

        def keyframes(prepared: Any, shots: Sequence[Shot], times: Sequence[float]) -> list[Keyframe]:
            seen.append(list(shots))
            return real(prepared, shots, times)

        sched.engine.keyframes = keyframes  # type: ignore[method-assign]
        sched.inbox.post(PlanChanged(0.4, generation=1))
        plan(sched, 0.4, 60.0, generation=1, label=EmotionLabel.happy)
        await run_for(sched, clock, ex, 0.1)
        first = next(shots for shots in seen if shots)
        labels = [s.emotion.label for s in first]
        assert EmotionLabel.neutral in labels and EmotionLabel.happy in labels, labels
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_keyframes_wait_for_a_pending_plan_but_never_past_their_time() -> None:
    sched, clock, ex, timeline, playout = make(workers=1, n=1, delay=0.1, planned_until=None)
    task = asyncio.ensure_future(sched.run())
    try:
        await settle()
        assert not ex.pending("keyframes"), "no plan yet and nothing due soon: it waits"
        # frame 0 is due at 0.1 s: it stops waiting plan_wait_s before that
        await clock.advance(0.1 - sched.config.plan_wait_s - 0.005)
        assert not ex.pending("keyframes")
        await clock.advance(0.01)
        assert ex.pending("keyframes")
        ex.run_all()
        await settle()
        assert sched.stats.forced_keyframes >= 1
        plan(sched, 0.0, 60.0, generation=0, label=EmotionLabel.happy)
        await run_for(sched, clock, ex, 0.3)
        g = greens(playout, 0, 10)
        assert g[0] == 0 and g[-1] == HAPPY  # forced frames neutral; planned ones follow the plan
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_interrupt_redoes_frames_after_its_cut() -> None:
    sched, clock, ex, timeline, playout = make(workers=1, n=1, delay=0.1)
    n = 16000 * 2
    timeline.write_tts(0.0, np.ones(n, np.float32), np.zeros(3 * n, np.int16), [], now=0.0)
    task = asyncio.ensure_future(sched.run())
    try:
        await run_for(sched, clock, ex, 0.1)
        rendered = sched.stats.clips_rendered
        timeline.cut_tts(0.4)
        sched.inbox.post(Interrupted(0.4))
        await settle()
        assert all(k < 10 for k in playout._frames)
        plan(sched, 0.4, 60.0, generation=0)
        await run_for(sched, clock, ex, 0.1)
        assert sched.stats.clips_rendered == rendered  # silence after the cut is not known ahead...
        await run_for(sched, clock, ex, 0.4)
        assert sched.stats.clips_rendered > rendered  # ...it renders as the clock reaches it
        assert all(k in playout._frames for k in range(10, 13))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_slow_worker_degrades_playout_without_av_drift() -> None:
    sched, clock, ex, timeline, playout = make(workers=1, delay=0.12)
    idle = np.zeros((8, 8, 3), np.uint8)
    out = VideoOut(playout, clock, timeline, idle)
    video = RawVideoTrack(out)
    voice = AudioOut(timeline, clock, 0.12)
    audio = EncodedAudioTrack(voice)
    task = asyncio.ensure_future(sched.run())
    pacer = asyncio.ensure_future(out.run())
    voice_pacer = asyncio.ensure_future(voice.run())
    sent_v: list[tuple[float, float]] = []
    sent_a: list[tuple[float, float]] = []

    async def pull_video() -> None:
        while True:
            f = await video.recv()
            sent_v.append((clock.now(), float(f.pts * f.time_base)))

    async def pull_audio() -> None:
        while True:
            f = await audio.recv()
            sent_a.append((clock.now(), float(f.pts * f.time_base)))

    pullers = [asyncio.ensure_future(pull_video()), asyncio.ensure_future(pull_audio())]
    try:
        for step in range(100):  # 2 s; one 80 ms sub-clip per 120 ms: slower than real time
            if step % 6 == 0:
                ex.run_all()
            await clock.advance(0.02)
        assert playout.stats.held > 5  # it degraded (held frames)...
        assert sched.stats.clips_skipped > 0  # ...and shortened work to catch up
        # ...but every frame and every audio packet left exactly at pts + delay: no drift
        assert all(abs(t - pts - 0.12) < 1e-9 for t, pts in sent_v)
        assert all(abs(t - pts - 0.12) < 1e-9 for t, pts in sent_a)
        assert len(sent_v) >= 45 and len(sent_a) >= 45
    finally:
        for t in [task, pacer, voice_pacer, *pullers]:
            t.cancel()
        await asyncio.gather(task, pacer, voice_pacer, *pullers, return_exceptions=True)


def test_playout_holds_and_counts_late_frames() -> None:
    p = Playout(25, 0.1)
    idle = np.zeros((2, 2, 3), np.uint8)
    one = np.ones((2, 2, 3), np.uint8)
    assert p.put(0, one)
    f, fresh = p.take(0, idle)
    assert fresh and f is one
    f, fresh = p.take(1, idle)  # nothing rendered for slot 1: hold the last frame
    assert not fresh and f is one and p.stats.held == 1
    assert not p.put(1, idle)  # too late for its slot
    assert p.stats.late == 1
    assert p.due_time(25) == pytest.approx(1.1)


def test_scheduler_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="subclip_frames"):
        SchedulerConfig(subclip_frames=0)
    with pytest.raises(ValueError, match="workers"):
        SchedulerConfig(workers=0)
