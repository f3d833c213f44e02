"""A whole session on a fake clock, without a peer: control, speech input, tracks, bounded state.

The session (``server.render.OfflineSession``, what ``avatar render`` runs)
runs the real portrait engine, the embedded director (Whisper off: there is
no live audio here) and Piper; engine and director work runs inline
(``InlineExecutor``), so it takes no clock time and every run is the same.
Frames are pulled from the session's video track as a peer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from scipy.signal import resample_poly

from engines.base import AUDIO_RATE, Avatar
from engines.director.base import Director, PlanRequest
from engines.director.embedded import EmbeddedDirector
from engines.face import NoFaceError, analyse_face, mouth_corner_lift, mouth_opening
from engines.portrait import PortraitEngine
from engines.storyline import Window
from realtime.clock import FakeClock
from realtime.playout import Playout
from realtime.scheduler import SchedulerConfig
from realtime.timeline import AudioTimeline
from realtime.tracks import CATCH_UP_S, RawVideoTrack, VideoOut
from server.messages import Ack, Error, OutMessage
from server.render import OfflineSession
from server.session import Session, SessionSettings
from tests.helpers import astronaut, running, speech

SIZE = (256, 256)
LINE = ("Hello everyone, and welcome back to the stream. Today we talk about rockets, "
        "the people who build them, and where they will take us next year.")


@pytest.fixture(scope="module")
def portrait() -> Iterator[tuple[PortraitEngine, Any, np.ndarray]]:
    engine = PortraitEngine(size=SIZE)
    image = astronaut()
    # the director's models load once per process, as the server's warm-up does before sessions
    EmbeddedDirector(transcribe=False).plan_sync(PlanRequest(
        session_id="warm-up", start=0.0, end=2.0, text="Hello there.", instructions=["be cheerful"],
        avatar_image=image, avatar_id="astronaut"))
    yield engine, engine.prepare(Avatar(id="astronaut", image=image)), image


class GatedDirector(Director):
    """The embedded director, holding its answers while ``hold`` is set, until ``release()``."""

    name = "gated-embedded"

    def __init__(self) -> None:
        self.inner = EmbeddedDirector(transcribe=False)
        self.hold = False
        self.held = 0
        self._gate = asyncio.Event()

    async def plan_window(self, request: PlanRequest) -> Window:
        window = await self.inner.plan_window(request)
        while self.hold:
            self.held += 1
            await self._gate.wait()
            self._gate.clear()
        return window

    def release(self) -> None:
        self.hold = False
        self._gate.set()


@dataclass
class Sim:
    """An offline session (``server.render.OfflineSession``) and a task pulling its video as a peer would."""

    offline: OfflineSession
    frames: list[tuple[float, float, np.ndarray]] = field(default_factory=list)  # sent, pts, RGB
    keep_frames: bool = True

    @property
    def session(self) -> Session:
        return self.offline.session

    @property
    def clock(self) -> FakeClock:
        return self.offline.clock

    @property
    def messages(self) -> list[OutMessage]:
        return self.offline.messages

    async def pull(self) -> None:
        video = RawVideoTrack(self.session.video_out)
        while True:
            vf = await video.recv()
            if self.keep_frames:
                self.frames.append((self.clock.now(), float(vf.pts * vf.time_base),
                                    vf.to_ndarray(format="rgb24")))

    async def advance(self, seconds: float, step: float = 0.01) -> None:
        await self.offline.advance(seconds, step=step)

    def send(self, **message: Any) -> None:
        self.offline.send(**message)

    def acks(self, kind: str) -> list[Ack]:
        return [m for m in self.messages if isinstance(m, Ack) and m.for_ == kind]


@contextlib.asynccontextmanager
async def simulated(portrait: tuple[PortraitEngine, Any, np.ndarray], director: Director | None = None,
                    settings: SessionSettings | None = None, keep_frames: bool = True) -> AsyncIterator[Sim]:
    """A started session on a fake clock, with a task pulling its video as a peer would."""
    engine, prepared, image = portrait
    # the director runs inline, in real time: its timeout must not decide the plan
    settings = settings or SessionSettings(scheduler=SchedulerConfig(), director_timeout_s=60.0)
    async with OfflineSession(engine, prepared, image, director or GatedDirector(), avatar_id="astronaut",
                              settings=settings) as offline:
        s = Sim(offline, keep_frames=keep_frames)
        async with running(s.pull()):
            yield s


@pytest.fixture
async def sim(portrait: tuple[PortraitEngine, Any, np.ndarray]) -> AsyncIterator[Sim]:
    async with simulated(portrait) as s:
        yield s


def measure(frames: list[tuple[float, float, np.ndarray]], what: Any) -> tuple[np.ndarray, np.ndarray]:
    times, values = [], []
    for sent, _, frame in frames:
        try:
            values.append(what(analyse_face(frame).landmarks))
        except NoFaceError:
            values.append(np.nan)
        times.append(sent)
    return np.array(times), np.array(values)


async def test_an_instruction_during_speech_shows_within_300_ms(
        portrait: tuple[PortraitEngine, Any, np.ndarray]) -> None:
    """The same speech twice, once with "be cheerful" 2.5 s in: the difference is the instruction's.

    The speech is known ahead (an upload), so what the instruction changes was already rendered.
    """
    from bench.instruct_latency import fit_step

    voice = speech(LINE)  # known speech, rendered ahead like Say (Piper itself is not deterministic)
    out = np.round(resample_poly(voice, 3, 1) * 32767).astype(np.int16)
    runs = []
    for instruct in (False, True):
        async with simulated(portrait) as sim:
            sim.session.speech.play(voice, out)
            await sim.advance(2.5)
            assert sim.session.timeline.speaking_tts(sim.session.playing_pts())
            sent_at = sim.clock.now()
            if instruct:
                sim.send(type="instruct", text="be cheerful")
            await sim.advance(1.6)
            frames = [f for f in sim.frames if sent_at - 1.0 <= f[0] < sent_at + 1.6]
            runs.append(measure(frames, mouth_corner_lift))
            if instruct:
                assert sim.acks("instruct")
                assert sim.session.scheduler.stats.forced_keyframes == 0
                cut = sim.acks("instruct")[0].from_pts
                assert sim.session.planner.current_shot(cut + 0.01).emotion.label.value == "happy"
    (tc, control), (t, lift) = runs
    assert np.array_equal(t, tc) and np.allclose(lift[t < sent_at], control[tc < sent_at], equal_nan=True)
    step = fit_step(t, lift - control, sent_at)
    assert step.amount > 0.005, f"the smile shows (mouth-corner lift {step.amount:+.4f})"
    # the frame due first after the cut (two frames after the one playing) starts easing into it
    assert step.start <= 0.3, f"the smile showed {step.start:.2f} s after the message"
    assert np.all((lift - control)[t < sent_at + 0.08] == 0), "nothing changes before the cut"


async def test_an_interrupt_during_a_replan_keeps_both(sim: Sim) -> None:
    director = sim.session.planner.director
    assert isinstance(director, GatedDirector)
    sim.send(type="say", text=LINE)
    await sim.advance(1.5)
    director.hold = True
    sim.send(type="instruct", text="be cheerful")
    await sim.advance(0.02)
    assert director.held >= 1, "the re-plan is on its way"
    sim.send(type="interrupt")
    cut = sim.acks("interrupt")[0].from_pts
    await sim.advance(0.02)
    director.release()
    await sim.advance(1.5)
    planner = sim.session.planner
    assert planner.stale >= 1  # the plan that was under way when the interrupt came is dropped
    assert planner.instructions == ["be cheerful"]
    assert not any(b > cut + 1e-6 for _, b, _, _ in planner._texts)  # no words after the cut
    assert not sim.session.timeline.speaking_tts(cut + 0.1)
    silent = sim.session.timeline.read_out(cut + 0.05, 48_000)
    assert np.abs(silent).max() == 0, "no voice after the interrupt"
    later = [s for w in planner.storyline.windows for s in w.shots if s.start >= cut]
    assert later and all(s.emotion.label.value == "happy" for s in later)
    # what is shown after the cut: the mouth at rest (silence), where it moved with the speech
    _, speaking = measure([f for f in sim.frames if 0.5 < f[1] < cut], mouth_opening)
    _, quiet = measure([f for f in sim.frames if f[1] > cut + 0.3], mouth_opening)
    assert np.nanstd(quiet) < 0.004 < np.nanstd(speaking)  # still where it moved with the words


async def test_say_during_an_upload_replaces_it(sim: Sim) -> None:
    upload = speech("This is an uploaded recording that should never be heard.")
    out = np.round(np.repeat(upload, 3) * 32767).astype(np.int16)
    sim.session.speech.play(upload, out)
    sim.send(type="say", text="Hello there.")
    await sim.advance(0.5)
    timeline = sim.session.timeline
    said = speech("Hello there.")
    queued = timeline.tts_until - timeline.tts_spans()[0][0]
    assert abs(queued - len(said) / AUDIO_RATE) < 0.1, "only the Say text was queued"
    assert sim.session.speech.utterances == 1
    texts = [tx for _, _, tx, _ in sim.session.planner._texts]
    assert texts == ["Hello there."]


async def test_bad_control_messages_get_errors_and_change_nothing(sim: Sim) -> None:
    for raw in ["not json", json.dumps({"type": "dance"}), json.dumps({"type": "say"}),
                json.dumps({"type": "say", "text": "hi", "loud": True}),
                json.dumps({"type": "instruct", "text": 5})]:
        sim.session.control.handle(raw)
    errors = [m.message for m in sim.messages if isinstance(m, Error)]
    assert len(errors) == 5, errors
    assert "not valid JSON" in errors[0]
    assert "unknown message type 'dance'" in errors[1]
    assert "'text' is missing" in errors[2] and "unexpected field 'loud'" in errors[3]
    assert sim.session.speech.utterances == 0 and not sim.session.planner.instructions


async def test_the_video_output_catches_up_with_the_clock() -> None:
    clock = FakeClock()
    playout = Playout(25, 0.1)
    out = VideoOut(playout, clock, AudioTimeline(horizon_s=5), np.zeros((8, 8, 3), np.uint8))
    video = RawVideoTrack(out)
    task = asyncio.ensure_future(out.run())
    try:
        async def pts_of_next() -> float:
            pending = asyncio.ensure_future(video.recv())
            while not pending.done():
                await clock.advance(0.001)
            frame = pending.result()
            return float(frame.pts * frame.time_base)

        assert await pts_of_next() == 0.0  # frame 0 leaves when it is due, at 0.1 s
        # the output stalls for a second (the loop was blocked): the frame it was waiting
        # to send goes, late, and then it skips to the frame due now, not a backlog
        await clock.advance(1.0)
        assert await pts_of_next() == pytest.approx(0.04)
        assert await pts_of_next() == pytest.approx(1.0)
        assert out.stats.skipped == 23 and out.stats.sent == 3
        # a short hiccup (under CATCH_UP_S) is not skipped: those frames still go, in order
        await clock.advance(CATCH_UP_S / 2)
        assert await pts_of_next() == pytest.approx(1.04)
        assert out.stats.skipped == 23
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _rss_mb() -> float:
    from pathlib import Path

    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 1e6


async def test_an_hour_of_streaming_holds_memory_flat(portrait: tuple[PortraitEngine, Any, np.ndarray]
                                                      ) -> None:
    """An hour on the fake clock: Say every 30 s, an instruction every 5 minutes, idle between.

    Bookkeeping sizes, live Python objects and resident memory at 10 minutes and at
    an hour must match (the 128x128 portrait keeps the hour to about a minute of CPU).
    """
    import gc

    _, _, image = portrait
    small = PortraitEngine(size=(128, 128))
    prepared = small.prepare(Avatar(id="astronaut", image=image))
    sizes: dict[int, tuple[float, ...]] = {}
    settings = SessionSettings(scheduler=SchedulerConfig(subclip_frames=5))
    async with simulated((small, prepared, image), EmbeddedDirector(transcribe=False), settings,
                         keep_frames=False) as s:
        session = s.session
        for minute in range(60):
            for k in range(2):
                s.send(type="say", text=f"Minute {minute}, part {k}: thanks for watching, more soon.")
                await s.advance(30.0, step=0.2)
            if minute % 5 == 0:
                s.send(type="instruct", text="be cheerful" if minute % 10 else "look sad")
            if minute in (10, 59):
                gc.collect()
                tl, pl, sc = session.timeline, session.planner, session.scheduler
                voice = tl._voices[0]
                sizes[minute] = (len(voice.tts), len(voice.phonemes), len(pl.storyline.windows),
                                 len(pl._texts), len(sc.storyline.windows), len(sc.keyframes),
                                 session.playout.buffered(), len(session.tasks), len(gc.get_objects()),
                                 _rss_mb())
    early, late = sizes[10], sizes[59]
    assert session.video_out.stats.sent > 0.99 * 3600 * 25
    assert session.speech.utterances >= 120
    names = ["tts spans", "phonemes", "planned windows", "texts", "scheduler windows", "keyframes",
             "buffered frames", "tasks"]
    for name, a, b in zip(names, early, late, strict=False):
        assert b <= max(2 * a, a + 20), f"{name}: {a} after 10 minutes, {b} after an hour"
    assert late[-2] - early[-2] < 20_000, f"live objects: {early[-2]:.0f} -> {late[-2]:.0f}"
    assert late[-1] - early[-1] < 50, f"resident memory: {early[-1]:.0f} MB -> {late[-1]:.0f} MB"
