"""Going live: a session pushed over RTMP to a real RTMP server (nginx-rtmp), read back as a platform sees it.

The server is Debian's nginx with its RTMP module, recording each publish to
an FLV file; the session is a real one on the real server process, driven by
a WebRTC peer. What arrives is checked with PyAV: H.264 and AAC, 25 fps, the
lips in sync with the voice (face mesh on the decoded frames against the
decoded sound), and a push that survives the RTMP server's restart.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest

from engines.face import NoFaceError, analyse_face, mouth_opening
from server.peer import AvatarPeer
from tests import rtmp_server
from tests.conftest import RunningServer
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, NO_CHROMIUM, until
from tests.portraits import hopper
from tests.rtmp_server import RtmpServer
from tests.test_e2e_lips import upload

pytestmark = pytest.mark.slow

LINE = ("Hello everyone, and welcome back to the stream. Today we talk about rockets, "
        "the people who build them, and where they will take us next year.")
LAGS = np.arange(-0.2, 0.2001, 0.01)


@pytest.fixture(scope="module")
def rtmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RtmpServer]:
    why = rtmp_server.missing()
    if why:
        pytest.skip(why)
    srv = RtmpServer(tmp_path_factory.mktemp("rtmp"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def peer(server: RunningServer) -> AsyncIterator[AvatarPeer]:
    """A session on a closed-mouth portrait (Grace Hopper), whose lip gap follows loudness."""
    info = await upload(server, hopper())
    p = AvatarPeer(server.url, keep_frames=False)
    await p.connect(avatar=info["id"])
    await p.wait_open()
    await p.wait_until(lambda: p.first_frame_at is not None, 10, "the first frame")
    try:
        yield p
    finally:
        await p.close()


async def call(method: str, url: str, **kw: Any) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as http, http.request(method, url, **kw) as res:
        body = await res.json() if res.content_type == "application/json" else await res.text()
        return res.status, body, dict(res.headers)


async def egress_state(peer: AvatarPeer, eid: str) -> dict[str, Any]:
    status, body, _ = await call("GET", f"{peer.session_url}/egress/{eid}")
    assert status == 200, body
    return dict(body)


async def failed(peer: AvatarPeer, eid: str) -> bool:
    return bool((await egress_state(peer, eid))["error"])


async def live(peer: AvatarPeer, eid: str, reconnects: int) -> bool:
    state = await egress_state(peer, eid)
    return state["state"] == "live" and state["reconnects"] >= reconnects


async def session_stats(peer: AvatarPeer) -> dict[str, Any]:
    status, body, _ = await call("GET", peer.session_url or "")
    assert status == 200, body
    return dict(body)


async def say_all(peer: AvatarPeer, text: str, within: float) -> None:
    """Say ``text`` and wait until the avatar has said it (the session's ``speaking`` rises and falls)."""
    peer.send({"type": "say", "text": text})
    await until(lambda: _speaking(peer, True), 10, "the avatar to start speaking")
    await until(lambda: _speaking(peer, False), within, "the avatar to finish speaking")


async def _speaking(peer: AvatarPeer, yes: bool) -> bool:
    return bool((await session_stats(peer))["speaking"]) is yes


async def recorded(rtmp: RtmpServer, key: str, n: int) -> list[Path]:
    """The ``n`` recordings of ``key``'s publishes, once nginx has closed them."""
    async def closed() -> bool:
        return len(rtmp.recordings(key)) >= n

    await until(closed, 10, f"{n} closed recording(s) of {key}")
    return rtmp.recordings(key)


def read_back(path: Path) -> dict[str, Any]:
    """What a platform received: codecs, frame times, lip gaps, and the sound."""
    with av.open(str(path)) as c:
        kinds = {s.type: s.codec_context.name for s in c.streams}
        vpts, gaps, apts, sound = [], [], [], []
        for frame in c.decode(*c.streams):
            t = float(frame.pts * frame.time_base)
            if isinstance(frame, av.VideoFrame):
                vpts.append(t)
                try:
                    gaps.append(mouth_opening(analyse_face(frame.to_ndarray(format="rgb24")).landmarks))
                except NoFaceError:
                    gaps.append(np.nan)
            else:
                x = frame.to_ndarray().astype(np.float32).reshape(-1)
                apts.append(t)
                sound.append(x / 32768 if frame.format.name.startswith("s16") else x)
        rate = c.streams.audio[0].codec_context.sample_rate if c.streams.audio else 0
    return {"kinds": kinds, "video_pts": np.array(vpts), "gaps": np.array(gaps), "audio_pts": apts,
            "sound": sound, "rate": rate}


def sync(got: dict[str, Any]) -> tuple[float, float]:
    """(correlation, lag s) of the lip gap against the sound's envelope, at the best lag.

    A positive lag means the lips follow the sound.
    """
    hop = 0.02
    times, env = [], []
    for t0, x in zip(got["audio_pts"], got["sound"], strict=True):
        n = int(len(x) // (got["rate"] * hop))
        for i in range(n):
            chunk = x[int(i * got["rate"] * hop):int((i + 1) * got["rate"] * hop)]
            times.append(t0 + (i + 0.5) * hop)
            env.append(float(np.sqrt(np.mean(chunk ** 2))))
    grid, level = np.array(times), np.array(env)
    t, g = got["video_pts"], got["gaps"]
    ok = ~np.isnan(g)
    return max((float(np.corrcoef(np.interp(t[ok] - lag, grid, level), g[ok])[0, 1]), float(lag))
               for lag in LAGS)


async def test_bad_egress_requests_get_clear_errors(server: RunningServer, peer: AvatarPeer) -> None:
    url = f"{peer.session_url}/egress"
    for body, words in [({"url": "http://example.com/live/key"}, "rtmp://"),
                        ({"url": "rtmp://"}, "no host"),
                        ({"url": "rtmp://127.0.0.1/live"}, "stream key"),
                        ({}, '"url"'),
                        ({"url": "rtmp://127.0.0.1/live/key", "bitrate": 5}, "unexpected"),
                        ({"url": "rtmp://127.0.0.1/live/key", "video_bitrate": 10}, "video_bitrate"),
                        ({"server": "rtmp://127.0.0.1/live"}, "key")]:
        status, got, _ = await call("POST", url, json=body)
        assert status == 422 and words in got["error"], (body, status, got)
    status, got, _ = await call("POST", url, data=b"{not json", headers={"Content-Type": "application/json"})
    assert status == 422 and "JSON" in got["error"]
    status, got, _ = await call("POST", f"{server.url}/v1/sessions/nosuchsession/egress",
                                json={"url": "rtmp://127.0.0.1/live/key"})
    assert status == 404, got
    status, got, _ = await call("DELETE", f"{url}/nosuchegress")
    assert status == 404 and "nosuchegress" in got["error"]
    status, got, _ = await call("GET", url)
    assert status == 200 and got["egress"] == []


async def test_an_unreachable_server_is_an_error_state_and_the_session_streams_on(
        peer: AvatarPeer) -> None:
    from server.launch import free_port

    status, got, headers = await call("POST", f"{peer.session_url}/egress",
                                      json={"url": f"rtmp://127.0.0.1:{free_port()}/live/secret-key"})
    assert status == 201, got
    eid = got["id"]
    assert headers["Location"].endswith(f"/egress/{eid}") and "secret-key" not in str(got)
    await until(lambda: failed(peer, eid), 15, "the failure to show")
    state = await egress_state(peer, eid)
    assert state["state"] in ("reconnecting", "connecting") and state["error"], state
    async def full_rate() -> bool:  # the session streams on (fps counts the last second)
        stats = await session_stats(peer)
        return bool(stats["egresses"] == 1 and stats["fps"] >= 20)

    await until(full_rate, 5, "the session to stream at full rate with the push failing")
    status, _, _ = await call("DELETE", f"{peer.session_url}/egress/{eid}")
    assert status == 204
    status, got, _ = await call("GET", f"{peer.session_url}/egress")
    assert got["egress"] == []


async def test_a_session_goes_live_in_sync_and_survives_a_server_restart(
        peer: AvatarPeer, rtmp: RtmpServer) -> None:
    key = f"test-{time.monotonic_ns()}"
    status, got, headers = await call("POST", f"{peer.session_url}/egress",
                                      json={"server": f"rtmp://127.0.0.1:{rtmp.port}/live", "key": key,
                                            "video_bitrate": 1_500_000})
    assert status == 201, got
    eid = got["id"]
    assert key not in str(got), "the stream key is a secret: never echoed"
    await until(lambda: live(peer, eid, 0), 15, "the push to go live")
    await say_all(peer, LINE, 20)  # about 9 s of speech
    state = await egress_state(peer, eid)
    assert state["state"] == "live" and state["frames_sent"] > 200 and state["bitrate_kbps"] > 50, state
    assert state["dropped_frames"] <= 3, state

    rtmp.stop()  # the platform goes away...
    await until(lambda: failed(peer, eid), 15, "the push to notice")
    rtmp.start()  # ...and comes back: the push reconnects by itself
    await until(lambda: live(peer, eid, 1), 40, "the push to reconnect")
    await say_all(peer, "And we are back.", 10)
    written = (await egress_state(peer, eid))["frames_sent"]  # over both connections
    status, _, _ = await call("DELETE", f"{peer.session_url}/egress/{eid}")
    assert status == 204

    files = await recorded(rtmp, key, 2)
    assert len(files) == 2, f"one recording per connection: {files}"
    first = read_back(files[0])
    assert first["kinds"] == {"video": "h264", "audio": "aac"}, first["kinds"]
    assert first["rate"] == 48_000
    steps = np.diff(first["video_pts"])
    on_time = np.mean(np.abs(steps - 0.04) < 1e-3)
    # every frame the push counted as written before the server went away reached the platform
    assert len(steps) + 1 >= state["frames_sent"] - 2 and on_time > 0.99, (
        f"25 fps: frame steps {np.unique(np.round(steps, 3), return_counts=True)}")
    span = first["video_pts"][-1] - first["video_pts"][0]
    sound_end = first["audio_pts"][-1]
    assert abs(sound_end - first["video_pts"][-1]) < 0.2, "sound and video run for the same time"
    corr, lag = sync(first)
    print(f"rtmp: {len(steps) + 1} frames over {span:.1f} s; lip gap vs sound r={corr:.2f}, the lips "
          f"{lag * 1000:+.0f} ms after the voice")
    assert corr > 0.5, f"the lips follow the voice in the stream (r={corr:.2f})"
    # the mouth of frame t is shaped by the 64 ms of voice that end at t (engines.visemes), so the
    # lips trail the voice by about 32 ms in every output; what the stream adds is its A/V offset
    assert abs(lag - 0.032) <= 0.04, f"lips and voice are {lag * 1000:+.0f} ms apart in the stream"
    again = read_back(files[1])
    assert again["kinds"] == {"video": "h264", "audio": "aac"}
    assert len(again["video_pts"]) >= written - len(first["video_pts"]) - 5, "the second connection's frames"
    assert np.nanmax(again["gaps"]) > 0.03, "the reconnected stream carries the speech"


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=NO_CHROMIUM)
async def test_a_host_goes_live_from_the_page(server: RunningServer, rtmp: RtmpServer,
                                             tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    key = f"page-{time.monotonic_ns()}"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(server.url)
            await page.wait_for_function("document.querySelector('#avatar').options.length > 0")
            await page.uncheck("#mic")
            await page.click("#start")
            await page.wait_for_function("window.avatarClient.framesDecoded > 10", timeout=30_000)
            await page.wait_for_function("!document.querySelector('#golive').disabled", timeout=5_000)
            await page.fill("#golive-server", f"rtmp://127.0.0.1:{rtmp.port}/live")
            await page.fill("#golive-key", key)
            await page.click("#golive")
            await page.wait_for_function(
                "window.avatarGoLive.egress.length === 1 && window.avatarGoLive.egress[0].state === 'live'",
                timeout=20_000)
            await page.fill("#say-text", "We are live on the stream now.")
            await page.click("#say")
            speaking = "window.avatarClient.lastStats && window.avatarClient.lastStats.speaking"
            await page.wait_for_function(speaking, timeout=10_000)
            await page.wait_for_function(f"!({speaking})", timeout=10_000)
            shown = await page.text_content("#egress-list")
            assert shown is not None and "live" in shown and key not in shown, shown
            await page.screenshot(path=str(tmp_path / "golive.png"), full_page=True)
            await page.click("#egress-list li button")
            await page.wait_for_function("window.avatarGoLive.egress.length === 0", timeout=10_000)
            await page.click("#stop")
            assert errors == [] and await page.evaluate("window.avatarClient.errors") == [], errors
        finally:
            await browser.close()
    files = await recorded(rtmp, key, 1)
    assert len(files) == 1, files
    got = read_back(files[0])
    assert got["kinds"] == {"video": "h264", "audio": "aac"} and len(got["video_pts"]) > 75
    assert np.nanmax(got["gaps"]) > 0.03, "the line said on the page reached the platform"
