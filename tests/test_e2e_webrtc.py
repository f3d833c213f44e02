"""Two WebRTC peers on 127.0.0.1: a Python client talks to the real server process.

Assertions are on what a user perceives: frame rate, lips that follow the
voice that comes back, a closed mouth in silence, Say and Interrupt.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from engines.face import NoFaceError, analyse_face, mouth_corner_lift, mouth_opening
from server.peer import RATE, AvatarPeer
from tests.conftest import RunningServer
from tests.helpers import envelope, returned_envelope, speech, wav_bytes

pytestmark = pytest.mark.slow


def openings(peer: AvatarPeer) -> tuple[np.ndarray, np.ndarray]:
    times, values = [], []
    for t, frame in peer.got.video:
        try:
            values.append(mouth_opening(analyse_face(frame).landmarks))
        except NoFaceError:
            values.append(np.nan)
        times.append(t)
    return np.array(times), np.array(values)


async def test_speech_round_trip_lips_follow_the_voice(server: RunningServer) -> None:
    voice = speech("Hello everyone, and welcome back to the stream. Today we talk about rockets.",
                   rate=RATE)
    gap = np.zeros(RATE, np.float32)
    audio = np.concatenate([gap, voice, 2 * gap, voice[: RATE * 2], gap])
    peer = AvatarPeer(server.url, audio)
    try:
        await peer.connect()
        await peer.wait_open()
        duration = len(audio) / RATE
        await peer.wait_until(lambda: peer.first_frame_at is not None, 5, "the first frame")
        chunks = int(duration / 0.02)  # until all our audio has been sent, and a bit more
        await peer.wait_until(lambda: len(peer.mic.sent_at) >= chunks + 25, duration + 10,
                              "the speech to be sent")
    finally:
        await peer.close()
    assert peer.answered_at is not None and peer.first_frame_at is not None
    first_frame = peer.first_frame_at - peer.answered_at
    assert first_frame < 2.0, f"first frame {first_frame:.2f}s after the answer"
    vt = np.array(peer.got.video_times)
    steady = vt[vt > vt[0] + 1.0]
    fps = (len(steady) - 1) / (steady[-1] - steady[0])
    assert 22.0 <= fps <= 27.0, f"received {fps:.1f} fps"

    # lips follow the voice that comes back with them
    ft, op = openings(peer)
    ok = ~np.isnan(op)
    assert ok.mean() > 0.95  # the face is found on (nearly) every received frame
    grid, env = returned_envelope(peer)
    env_at_frames = np.interp(ft[ok], grid, env)
    op_ok = op[ok]
    best = max(
        (np.corrcoef(np.interp(ft[ok] + lag, grid, env), op_ok)[0, 1], lag)
        for lag in np.arange(-0.2, 0.2001, 0.02)
    )
    corr, lag = best
    assert corr > 0.5, f"mouth opening vs returned voice: r={corr:.2f}"
    assert abs(lag) <= 0.1, f"lips and voice are {lag * 1000:.0f} ms apart"
    # near closed in silence
    loud = env_at_frames > 0.02
    quiet = env_at_frames < 0.002
    assert quiet.sum() > 20 and loud.sum() > 20
    assert np.median(op_ok[quiet]) < np.median(op_ok[loud]) - 0.02
    assert np.percentile(op_ok[quiet], 90) - np.percentile(op_ok[quiet], 10) < 0.01

    stats = peer.messages("stats")
    assert stats, "no stats events on the control channel"
    assert {"fps", "latency_ms", "av_offset_ms", "shot"} <= set(stats[-1])
    assert abs(stats[-1]["av_offset_ms"]) < 20


async def test_say_speaks_and_interrupt_cuts_it_off(server: RunningServer) -> None:
    peer = AvatarPeer(server.url, keep_frames=False)
    try:
        await peer.connect()
        await peer.wait_open()
        await peer.wait_until(lambda: len(peer.got.audio) > 25, 5, "returned audio")
        peer.send({"type": "say", "text": "This is a long sentence that the avatar says out loud, "
                                          "and it goes on for quite a while so we can cut it."})
        said_at = time.perf_counter()

        def loud_since(t0: float) -> bool:
            return any(a > t0 and np.abs(x).max() > 3000 for a, x in peer.got.audio)

        await peer.wait_until(lambda: loud_since(said_at), 5, "the avatar's voice")
        speaking_at = min(a for a, x in peer.got.audio if a > said_at and np.abs(x).max() > 3000)
        assert speaking_at - said_at < 1.5
        await peer.wait_until(lambda: time.perf_counter() > speaking_at + 1.0, 3, "1 s of speech")
        peer.send({"type": "interrupt"})
        cut_at = time.perf_counter()
        await peer.wait_until(lambda: bool(peer.messages("ack")), 2, "the interrupt ack")
        await peer.wait_until(lambda: peer.got.audio[-1][0] > cut_at + 1.0, 3, "1 s more audio")
        after = [x for a, x in peer.got.audio if a > cut_at + 0.35]
        assert after and max(np.abs(x).max() for x in after) < 200, "speech went on after Interrupt"
    finally:
        await peer.close()


async def test_an_instruction_mid_stream_changes_the_video_within_a_window(server: RunningServer) -> None:
    peer = AvatarPeer(server.url)
    try:
        await peer.connect()
        await peer.wait_open()
        await peer.wait_until(lambda: len(peer.got.video) > 50, 10, "2 s of video")
        peer.send({"type": "instruct", "text": "be cheerful"})
        sent_at = time.perf_counter()
        await peer.wait_until(lambda: bool(peer.messages("ack")), 3, "the instruct ack")
        window_s = 2.0
        await peer.wait_until(lambda: peer.got.video[-1][0] > sent_at + window_s + 1.0, window_s + 5,
                              "video a window after the instruction")
        await peer.wait_until(lambda: any(m.get("shot") and m["shot"]["emotion"]["label"] == "happy"
                                          for m in peer.messages("stats")), 3, "stats showing the plan")
    finally:
        await peer.close()

    def lift(frames: list[np.ndarray]) -> float:
        values = []
        for frame in frames:
            try:
                values.append(mouth_corner_lift(analyse_face(frame).landmarks))
            except NoFaceError:
                pass
        return float(np.median(values))

    before = lift([f for t, f in peer.got.video if t < sent_at][-25:])
    after = lift([f for t, f in peer.got.video if sent_at + window_s <= t <= sent_at + window_s + 1.0])
    assert after > before + 0.005, f"mouth corners {before:.4f} before, {after:.4f} a window after"
    shot = next(m["shot"] for m in reversed(peer.messages("stats")) if m.get("shot"))
    assert shot["negative_prompt"] and shot["rationale"], "the page can show what was decided and why"


async def test_uploaded_speech_is_spoken_and_planned_whole(server: RunningServer) -> None:
    import aiohttp

    line = "Yes, I agree with you. I am so happy that we won the game today!"
    peer = AvatarPeer(server.url)
    try:
        await peer.connect()
        await peer.wait_open()
        await peer.wait_until(lambda: len(peer.got.audio) > 25, 5, "returned audio")
        async with aiohttp.ClientSession() as http, http.post(
                f"{peer.session_url}/speech", data=wav_bytes(speech(line), 16000),
                headers={"Content-Type": "audio/wav"}) as res:
            assert res.status == 202, await res.text()
            duration = (await res.json())["duration_s"]
        posted = time.perf_counter()

        def loud_since(t0: float) -> bool:
            return any(a > t0 and np.abs(x).max() > 3000 for a, x in peer.got.audio)

        await peer.wait_until(lambda: loud_since(posted), 8, "the uploaded voice")
        await peer.wait_until(lambda: any(m.get("speaking") and m.get("shot") and
                                          m["shot"]["emotion"]["label"] == "happy"
                                          for m in peer.messages("stats")), duration + 3,
                              "stats showing a plan made from the upload's words")
        await peer.wait_until(lambda: peer.got.video[-1][0] > posted + duration + 0.5, duration + 5,
                              "video until the upload has been said")
    finally:
        await peer.close()
    times, opening = openings(peer)
    spoken = opening[(times > posted + 1.0) & (times < posted + duration)]
    assert np.nanmax(spoken) > 0.04, "the lips move with the uploaded speech"


async def test_sessions_are_listed_and_deleted(server: RunningServer) -> None:
    import aiohttp

    peer = AvatarPeer(server.url, keep_frames=False)
    await peer.connect()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(peer.session_url) as res:
                assert res.status == 200
                assert (await res.json())["type"] == "stats"
            async with http.delete(peer.session_url) as res:
                assert res.status == 204
            async with http.get(peer.session_url) as res:
                assert res.status == 410 and "ended" in (await res.json())["error"]  # gone, and why
    finally:
        await peer.close(delete=False)


def test_envelope_helper() -> None:
    x = np.concatenate([np.zeros(100), np.ones(100)])
    assert list(envelope(x, 100, 1.0)) == [0.0, 1.0]
