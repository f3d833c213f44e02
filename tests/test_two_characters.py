"""Two people in one picture, a whole session on a fake clock: who speaks is routed per character.

The session runs the real portrait engine on a two-person photo (Père Tanguy on
the left, character 0; Grace Hopper on the right, character 1; both mouths closed), the embedded
director (Whisper off) and Piper; engine and director work runs inline. The
host's microphone is fed chunk by chunk as it would arrive (real speech, real
voice activity). Measurements are on the frames the video track sends, with
face mesh finding both faces.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from engines.base import AUDIO_RATE, Avatar
from engines.director.base import PlanRequest
from engines.director.embedded import EmbeddedDirector
from engines.face import analyse_face, mouth_opening
from engines.portrait import PortraitEngine
from engines.storyline import GazeTarget
from realtime.clock import FakeClock, InlineExecutor
from realtime.scheduler import SchedulerConfig
from realtime.tracks import RawVideoTrack
from realtime.vad import VoiceActivity
from server.messages import Ack, Error, OutMessage
from server.render import OfflineSession
from server.session import Session, SessionSettings
from tests.helpers import astronaut, running, speech
from tests.portraits import two_closed_mouths

FPS = 25
MIC_LINE = "Hi there, and welcome back to the show."
SAY_LINE = "Thank you, it is really lovely to be here with you all today, my friend."


@pytest.fixture(scope="module")
def cast() -> Iterator[tuple[PortraitEngine, Any, np.ndarray]]:
    engine = PortraitEngine()
    image = two_closed_mouths()
    EmbeddedDirector(transcribe=False).plan_sync(PlanRequest(  # the director's models, loaded once
        session_id="warm-up", start=0.0, end=2.0, text="Hello there.", avatar_image=image))
    prepared = engine.prepare(Avatar(id="two", image=image))
    assert engine.characters(prepared) == 2
    yield engine, prepared, image


@dataclass
class Sim:
    session: Session
    clock: FakeClock
    messages: list[OutMessage] = field(default_factory=list)
    frames: list[tuple[float, np.ndarray]] = field(default_factory=list)  # pts, RGB

    async def pull(self) -> None:
        video = RawVideoTrack(self.session.video_out)
        while True:
            vf = await video.recv()
            self.frames.append((float(vf.pts * vf.time_base), vf.to_ndarray(format="rgb24")))

    async def mic(self, audio: np.ndarray, start: float) -> None:
        """The microphone from ``start``: 20 ms chunks, each pushed when it has arrived."""
        vad = VoiceActivity()
        n = round(0.02 * AUDIO_RATE)
        for k in range(len(audio) // n):
            await self.clock.sleep_until(start + (k + 1) * 0.02)
            chunk = audio[k * n:(k + 1) * n]
            probs = vad.feed(chunk)
            out = np.round(np.repeat(chunk, 3) * 32767).astype(np.int16)
            self.session.ingest.push(chunk, out, max(probs) if probs else vad.last, self.clock.now())

    def send(self, **message: Any) -> None:
        self.session.control.handle(json.dumps(message))


@pytest.fixture
async def sim(cast: tuple[PortraitEngine, Any, np.ndarray]) -> AsyncIterator[Sim]:
    engine, prepared, image = cast
    async with OfflineSession(engine, prepared, image, EmbeddedDirector(transcribe=False), avatar_id="two",
                              settings=SessionSettings(scheduler=SchedulerConfig())) as off:
        s = Sim(off.session, off.clock, off.messages)
        async with running(s.pull()):
            yield s


def openings(frames: list[tuple[float, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(pts, lip gap of face 0 and face 1) of every frame where face mesh finds both faces."""
    pts, gaps = [], []
    for t, frame in frames:
        faces = analyse_face(frame).faces
        if len(faces) == 2:
            pts.append(t)
            gaps.append([mouth_opening(lm) for lm in faces])
    return np.array(pts), np.array(gaps)


def level(session: Session, pts: np.ndarray, character: int) -> np.ndarray:
    """Loudness (RMS) of a character's own analysis audio over the 64 ms before each pts."""
    out = []
    for t in pts:
        x = session.timeline.slice(t - 0.064, t, character).samples
        out.append(float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) if len(x) else 0.0)
    return np.array(out)


def energy(session: Session, t0: float, t1: float, character: int) -> float:
    x = session.timeline.slice(t0, t1, character).samples
    return float(np.abs(x).max()) if len(x) else 0.0


async def test_say_as_character_1_while_the_mic_speaks_as_0(sim: Sim) -> None:
    voice = speech(MIC_LINE)
    mic_start, lead = 0.3, 0.5
    audio = np.concatenate([np.zeros(round(lead * AUDIO_RATE), np.float32), voice,
                            np.zeros(round(4.0 * AUDIO_RATE), np.float32)])
    feeder = asyncio.ensure_future(sim.mic(audio, mic_start))
    try:
        await sim.clock.advance(1.2, step=0.01)
        sim.send(type="say", text=SAY_LINE, character=1)
        await sim.clock.advance(5.0, step=0.01)
        sim.send(type="say", text="Yes, I agree.", character=1)  # now with the mic quiet
        await sim.clock.advance(1.0, step=0.01)
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
    session, timeline = sim.session, sim.session.timeline
    assert not [m for m in sim.messages if isinstance(m, Error)]
    # each character's own voice: the mic's speech is 0's, the Say text is 1's
    spoken0 = (mic_start + lead, mic_start + lead + len(voice) / AUDIO_RATE)
    (say0, say1), (again0, again1) = timeline.tts_spans(1)
    assert timeline.tts_spans(0) == [] and 1.2 < say0 < 1.5 and say1 - say0 > 2.5
    assert energy(session, *spoken0, 0) > 0.1
    assert energy(session, 0.0, say0, 1) == 0.0, "character 1 says nothing before its line"
    assert energy(session, say0, say1, 1) > 0.1
    assert energy(session, spoken0[1] + 0.1, say1, 0) < 0.01, "character 0 says nothing after the mic"
    # what goes back is both voices, mixed
    both = max(spoken0[0], say0) + 0.3
    mix = timeline.read_out(both, 4800).astype(np.int32)
    assert np.abs(mix).max() > 0
    assert not timeline.speaking_tts(both, 0) and timeline.speaking_tts(both, 1)
    # the director planned both characters: while 1 says its line, 0 (quiet) listens, eyes on it
    planned = {s.character for w in session.planner.storyline.windows for s in w.shots}
    assert planned == {0, 1}
    listener, speaker = (session.planner.current_shot((again0 + again1) / 2, c) for c in (0, 1))
    assert listener is not None and listener.gaze == GazeTarget.speaker, listener
    assert listener.head_motion <= 0.35 and "listening to character 1" in listener.rationale
    assert speaker is not None and speaker.gaze == GazeTarget.camera
    assert session.stats().shots[0] is not None and len(session.stats().shots) == 2
    # on the frames, each face's lips follow its own voice
    pts, gaps = openings([f for f in sim.frames if 0.4 < f[0] < say1 + 0.3])
    assert len(pts) > 0.95 * len([f for f in sim.frames if 0.4 < f[0] < say1 + 0.3])
    for c in (0, 1):
        own = np.corrcoef(gaps[:, c], level(session, pts, c))[0, 1]
        other = np.corrcoef(gaps[:, c], level(session, pts, 1 - c))[0, 1]
        print(f"face {c}: lip gap vs its own voice r={own:.2f}, vs the other's r={other:.2f}")
        assert own > 0.6 and own > other + 0.3, (c, own, other)
        assert np.percentile(gaps[:, c], 95) > 0.04


async def test_the_mic_switched_mid_stream_moves_the_other_mouth(sim: Sim) -> None:
    voice = np.concatenate([speech(MIC_LINE), speech("And now it is my turn to say a few words.")])
    mic_start, lead = 0.3, 0.5
    audio = np.concatenate([np.zeros(round(lead * AUDIO_RATE), np.float32), voice,
                            np.zeros(round(0.6 * AUDIO_RATE), np.float32)])
    feeder = asyncio.ensure_future(sim.mic(audio, mic_start))
    switch_at = mic_start + lead + len(speech(MIC_LINE)) / AUDIO_RATE + 0.01
    end = mic_start + len(audio) / AUDIO_RATE
    try:
        await sim.clock.advance(switch_at, step=0.01)
        sim.send(type="mic", character=1)
        await sim.clock.advance(end - switch_at + 0.5, step=0.01)
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
    session = sim.session
    acks = [m for m in sim.messages if isinstance(m, Ack) and m.for_ == "mic"]
    assert len(acks) == 1 and acks[0].from_pts == pytest.approx(switch_at, abs=0.011)
    cut = acks[0].from_pts
    assert session.timeline.mic_character == 1 and session.stats().mic_character == 1
    assert energy(session, mic_start + lead, cut, 0) > 0.1
    assert energy(session, 0.0, cut - 0.001, 1) == 0.0, "the mic was not character 1's before"
    assert energy(session, cut + 0.001, end, 0) == 0.0, "nor character 0's after the switch"
    assert energy(session, cut, end, 1) > 0.1
    assert session.planner.generation >= 1  # the plan ahead of live audio was redone
    pts, gaps = openings([f for f in sim.frames if mic_start + lead < f[0] < end])
    before, after = pts < cut, pts > cut + 0.12
    for c, speaking, quiet in ((0, before, after), (1, after, before)):
        moving, still = gaps[speaking, c], gaps[quiet, c]
        print(f"face {c}: lip gap std {moving.std():.4f} speaking, {still.std():.4f} quiet")
        assert np.percentile(moving, 95) > 0.04 and moving.std() > 4 * still.std(), (c, moving, still)


async def test_messages_for_a_character_the_avatar_lacks_get_errors() -> None:
    asyncio.get_running_loop().set_default_executor(InlineExecutor())
    engine = PortraitEngine(size=(128, 128))
    prepared = engine.prepare(Avatar(id="astronaut", image=astronaut()))
    clock = FakeClock()
    session = Session(engine=engine, prepared=prepared, avatar_id="astronaut", avatar_image=astronaut(),
                      idle_frame=engine.idle_frame(prepared), director=EmbeddedDirector(transcribe=False),
                      executor=InlineExecutor(), settings=SessionSettings(), clock=clock)
    messages: list[OutMessage] = []
    session.subscribe(messages.append)
    try:
        for msg in ({"type": "say", "text": "hi", "character": 1}, {"type": "mic", "character": 1},
                    {"type": "mic", "character": 2}, {"type": "say", "text": "hi", "voice": "nobody"},
                    {"type": "mic", "character": "left"}):
            session.control.handle(json.dumps(msg))
        errors = [m.message for m in messages if isinstance(m, Error)]
        assert len(errors) == 5, errors
        assert errors[0] == "say: character 1 is not in this avatar: it has one face (character 0)"
        assert errors[1] == "mic: character 1 is not in this avatar: it has one face (character 0)"
        assert "character 2 does not exist" in errors[2]
        assert errors[3] == "unknown voice 'nobody'; the voices here are: joe"
        assert "mic: character" in errors[4]
        assert session.speech.utterances == 0 and not session.speech.preparing
        assert len(session.ingest.inbox) == 0 and session.control.mic_character == 0
        session.control.handle(json.dumps({"type": "mic", "character": 0}))  # the one there is
        assert isinstance(messages[-1], Ack) and messages[-1].for_ == "mic"
    finally:
        await session.close()
