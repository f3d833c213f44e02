"""WHEP viewers: aiortc clients watch a live session of the real server, and Chromium's /viewer.

A viewer is a recvonly offer POSTed to ``/v1/sessions/{id}/whep``; it gets the
session's video and voice as they are encoded once for every output.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from realtime.clock import FakeClock
from realtime.timeline import AudioTimeline
from realtime.tracks import AUDIO_PTIME, AudioOut, EncodedAudioTrack
from server.peer import AvatarPeer, WhepRefused, WhepViewer
from tests.conftest import MAX_VIEWERS, RunningServer
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, NO_CHROMIUM, until

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=NO_CHROMIUM)


# --- the voice, encoded once -------------------------------------------------------------------------
async def test_the_voice_is_encoded_once_for_every_output() -> None:
    clock = FakeClock()
    timeline = AudioTimeline()
    n = 16000  # one second of speech-like noise on the timeline
    rng = np.random.default_rng(0)
    timeline.write_tts(0.0, np.ones(n, np.float32),
                       (3000 * rng.standard_normal(3 * n)).astype(np.int16), [], now=0.0)
    out = AudioOut(timeline, clock, 0.1)
    first, second = EncodedAudioTrack(out), EncodedAudioTrack(out)
    got: dict[str, list[tuple[float, Any]]] = {"first": [], "second": []}

    async def pull(track: EncodedAudioTrack, name: str) -> None:
        while True:
            packet = await track.recv()
            got[name].append((clock.now(), packet))

    pacer = asyncio.ensure_future(out.run())
    pullers = [asyncio.ensure_future(pull(first, "first"))]
    try:
        await clock.advance(0.5, step=0.01)
        pullers.append(asyncio.ensure_future(pull(second, "second")))  # joins late
        await clock.advance(0.5, step=0.01)
    finally:
        first.stop()
        second.stop()
        for t in [pacer, *pullers]:
            t.cancel()
        await asyncio.gather(pacer, *pullers, return_exceptions=True)
    a, b = got["first"], got["second"]
    assert len(a) >= 20 and len(b) >= 8
    # every packet left when due (pts + delay), and the late one starts at the present: no backlog
    assert all(abs(t - float(p.pts * p.time_base) - 0.1) < 1e-9 for t, p in a + b)
    assert b[0][0] >= 0.5 - 1e-9
    # the same packets, not encodes of their own
    shared = {id(p) for _, p in a} & {id(p) for _, p in b}
    assert len(shared) == len(b)
    assert out.encoded == len(a) and out.delivered == len(a) + len(b)
    assert max(out.level) > -30  # the timeline's noise, measured as it leaves
    assert AUDIO_PTIME == 0.04


# --- aiortc viewers against the server -------------------------------------------------------------
async def stats(session_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(session_url) as res:
        assert res.status == 200, await res.text()
        return dict(await res.json())


async def request(method: str, url: str, data: bytes | str | None = None,
                  ctype: str | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Content-Type": ctype} if ctype else {}
    async with aiohttp.ClientSession() as http, http.request(method, url, data=data,
                                                             headers=headers) as res:
        try:
            parsed = await res.json(content_type=None)
        except ValueError:
            parsed = None
        return res.status, parsed if isinstance(parsed, dict) else {}, dict(res.headers)


def steady_fps(times: list[float]) -> float:
    t = np.array(times)
    steady = t[t > t[0] + 1.0]
    return float((len(steady) - 1) / (steady[-1] - steady[0]))


def loud_from(audio: list[tuple[float, np.ndarray]], since: float) -> float | None:
    return next((a for a, x in audio if a > since and np.abs(x).max() > 3000), None)


async def test_a_viewer_watches_and_hears_the_avatar(server: RunningServer) -> None:
    host = AvatarPeer(server.url, keep_frames=False)
    viewer: WhepViewer | None = None
    try:
        await host.connect()
        await host.wait_open()
        assert host.session_url is not None
        viewer = WhepViewer(host.session_url, frame_stride=5)
        await viewer.connect()
        assert viewer.resource_url is not None
        assert viewer.resource_url.startswith(f"{host.session_url}/whep/")
        assert viewer.answer_sdp is not None and "a=sendonly" in viewer.answer_sdp
        await viewer.wait_until(lambda: len(viewer.got.video_times) > 100, 15, "4 s of video")
        assert (await stats(host.session_url))["viewers"] == 1
        host.send({"type": "say", "text": "Hello to everyone watching the stream."})
        said = time.perf_counter()
        await viewer.wait_until(lambda: loud_from(viewer.got.audio, said) is not None, 8,
                                "the avatar's voice at the viewer")
        await host.wait_until(lambda: loud_from(host.got.audio, said) is not None, 3,
                              "the avatar's voice at the host")
    finally:
        if viewer is not None:
            await viewer.close()
        await host.close()
    fps = steady_fps(viewer.got.video_times)
    assert 22.0 <= fps <= 27.0, f"the viewer received {fps:.1f} fps"
    frames = [f for _, f in viewer.got.video]
    assert frames[0].shape == (512, 512, 3)
    assert max(float(np.abs(f.astype(np.int16) - frames[0]).mean()) for f in frames[1:]) > 0.5, \
        "the avatar moves"
    # one voice for everyone: it reaches the viewer when it reaches the host
    heard_v, heard_h = loud_from(viewer.got.audio, said), loud_from(host.got.audio, said)
    assert heard_v is not None and heard_h is not None
    assert abs(heard_v - heard_h) < 0.15, f"viewer {heard_v - said:.2f} s, host {heard_h - said:.2f} s"


async def test_two_viewers_and_the_session_share_one_encode(server: RunningServer) -> None:
    host = AvatarPeer(server.url, keep_frames=False)
    viewers: list[WhepViewer] = []
    try:
        await host.connect()
        await host.wait_open()
        assert host.session_url is not None
        viewers = [WhepViewer(host.session_url, keep_frames=False) for _ in range(2)]
        for v in viewers:
            await v.connect()
        for v in viewers:
            await v.wait_until(lambda v=v: len(v.got.video_times) > 25, 15, "a viewer's video")  # type: ignore[misc]
        before = await stats(host.session_url)
        received = [len(v.got.video_times) for v in [host, *viewers]]
        await host.wait_until(lambda: len(host.got.video_times) >= received[0] + 75, 10,
                              "three seconds of video")
        after = await stats(host.session_url)
        received = [len(v.got.video_times) - r for v, r in zip([host, *viewers], received, strict=True)]
    finally:
        for v in viewers:
            await v.close()
        await host.close()
    assert after["viewers"] == 2
    sent = after["frames_sent"] - before["frames_sent"]
    assert sent >= 60
    encoded = {c: n - before["video_encoded"].get(c, 0) for c, n in after["video_encoded"].items()}
    assert set(encoded) == {"H264"}, encoded  # one codec, so one encoder...
    assert abs(encoded["H264"] - sent) <= 2, (encoded, sent)  # ...that encodes each frame once
    delivered = after["video_delivered"] - before["video_delivered"]
    assert abs(delivered - 3 * sent) <= 6, (delivered, sent)  # and hands it to all three outputs
    assert all(r >= 0.8 * sent for r in received), (received, sent)
    voice = after["audio_encoded"] - before["audio_encoded"]
    assert voice >= 60 and abs(after["audio_delivered"] - before["audio_delivered"] - 3 * voice) <= 6


async def test_delete_ends_a_viewer_and_the_session_goes_on(server: RunningServer) -> None:
    host = AvatarPeer(server.url, keep_frames=False)
    gone: WhepViewer | None = None
    quitter: WhepViewer | None = None
    try:
        await host.connect()
        await host.wait_open()
        assert host.session_url is not None
        gone = WhepViewer(host.session_url, keep_frames=False, video_codecs=["VP8"])
        await gone.connect()
        await gone.wait_until(lambda: len(gone.got.video_times) > 25, 15, "the VP8 viewer's video")
        assert gone.resource_url is not None
        assert "VP8" in (await stats(host.session_url))["video_encoded"]
        status, _, _ = await request("DELETE", gone.resource_url)
        assert status == 204
        status, body, _ = await request("DELETE", gone.resource_url)
        assert status == 404 and "viewer" in body["error"]
        # the server closed it: the viewer's connection ends, nothing more arrives
        await gone.wait_until(lambda: gone.pc.connectionState == "closed", 10, "the viewer to be closed")
        st = await stats(host.session_url)
        assert st["viewers"] == 0
        vp8 = st["video_encoded"]["VP8"]
        at = len(host.got.video_times)
        await host.wait_until(lambda: len(host.got.video_times) > at + 40, 5, "the host's video going on")
        st = await stats(host.session_url)
        assert st["video_encoded"]["VP8"] <= vp8 + 1, "nobody watches in VP8: it is not encoded"
        # a viewer that just leaves (no DELETE) is removed as well
        quitter = WhepViewer(host.session_url, keep_frames=False)
        await quitter.connect()
        await quitter.wait_until(lambda: len(quitter.got.video_times) > 10, 15, "the second viewer's video")
        assert (await stats(host.session_url))["viewers"] == 1
        await quitter.close(delete=False)
        url = host.session_url

        async def nobody_watches() -> bool:
            return (await stats(url))["viewers"] == 0

        await until(nobody_watches, 10, "the viewer that left to be removed")
    finally:
        for v in (gone, quitter):
            if v is not None:
                await v.close(delete=False)
        await host.close()


async def test_the_viewer_limit_and_no_trickle(server: RunningServer) -> None:
    host = AvatarPeer(server.url, keep_frames=False)
    viewers: list[WhepViewer] = []
    try:
        await host.connect()
        await host.wait_open()
        assert host.session_url is not None
        for _ in range(MAX_VIEWERS):
            v = WhepViewer(host.session_url, keep_frames=False)
            viewers.append(v)
            await v.connect()
            await v.wait_until(lambda v=v: len(v.got.video_times) > 5, 15, "a viewer's video")  # type: ignore[misc]
        extra = WhepViewer(host.session_url)
        try:
            with pytest.raises(WhepRefused) as refused:
                await extra.connect()
        finally:
            await extra.close()
        assert refused.value.status == 503
        assert int(refused.value.headers["Retry-After"]) > 0
        assert "viewers" in refused.value.error and str(MAX_VIEWERS) in refused.value.error
        resource = viewers[0].resource_url
        assert resource is not None
        status, body, headers = await request("PATCH", resource, "a=candidate:1 1 udp 1 127.0.0.1 9 typ host",
                                              "application/trickle-ice-sdpfrag")
        assert status == 405 and "trickle" in body["error"] and "DELETE" in headers["Allow"]
        # one leaves, and there is room again
        await viewers.pop().close()
        again = WhepViewer(host.session_url, keep_frames=False)
        viewers.append(again)
        await again.connect()
        await again.wait_until(lambda: len(again.got.video_times) > 10, 15, "video for the new viewer")
    finally:
        for v in viewers:
            await v.close()
        await host.close()


OFFER_ERRORS = [
    (b"{}", "application/json", 415, "application/sdp"),
    (b"this is not sdp", "application/sdp", 400, "SDP"),
    (b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=recvonly\r\n",
     "application/sdp", 400, "audio"),
    (b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=recvonly\r\n"
     b"m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n", "application/sdp", 400, "recvonly"),
    (b"v=0\r\nm=audio garbage\r\nm=video garbage\r\n", "application/sdp", 400, "offer"),
    (b"\xff\xfe\x00v=0 m=", "application/sdp", 400, "UTF-8"),
    (b"v=0\r\n" + b"a=x\r\n" * 40000, "application/sdp", 413, "too large"),
]


async def test_bad_whep_offers_get_clear_errors_and_the_session_goes_on(server: RunningServer) -> None:
    host = AvatarPeer(server.url, keep_frames=False)
    try:
        await host.connect()
        await host.wait_open()
        assert host.session_url is not None
        for body, ctype, status, words in OFFER_ERRORS:
            got, payload, _ = await request("POST", f"{host.session_url}/whep", body, ctype)
            assert got == status and words.lower() in payload["error"].lower(), (body[:60], got, payload)
        st = await stats(host.session_url)
        assert st["viewers"] == 0  # nothing half-open is left behind
        at = len(host.got.video_times)
        await host.wait_until(lambda: len(host.got.video_times) > at + 25, 5, "the session going on")
    finally:
        await host.close()


async def test_unknown_and_ended_sessions(server: RunningServer) -> None:
    offer_peer = WhepViewer(f"{server.url}/v1/sessions/0123456789abcdef")
    try:
        with pytest.raises(WhepRefused) as refused:
            await offer_peer.connect()
        assert refused.value.status == 404
    finally:
        await offer_peer.close()
    host = AvatarPeer(server.url, keep_frames=False)
    viewer: WhepViewer | None = None
    try:
        await host.connect()
        await host.wait_open()
        assert host.session_url is not None
        viewer = WhepViewer(host.session_url, keep_frames=False)
        await viewer.connect()
        await viewer.wait_until(lambda: len(viewer.got.video_times) > 10, 15, "the viewer's video")
        status, _, _ = await request("DELETE", host.session_url)
        assert status == 204
        # the session's end closes its viewers
        await viewer.wait_until(lambda: viewer.pc.connectionState == "closed", 10, "the viewer to be closed")
        late = WhepViewer(host.session_url)
        try:
            with pytest.raises(WhepRefused) as refused:
                await late.connect()
            assert refused.value.status == 410 and "ended" in refused.value.error
        finally:
            await late.close()
        assert viewer.resource_url is not None
        status, body, _ = await request("DELETE", viewer.resource_url)
        assert status == 410 and "ended" in body["error"]
    finally:
        if viewer is not None:
            await viewer.close(delete=False)
        await host.close(delete=False)


async def test_viewers_coming_and_going_leave_nothing_behind(server: RunningServer) -> None:
    host = AvatarPeer(server.url, keep_frames=False)
    try:
        await host.connect()
        await host.wait_open()
        assert host.session_url is not None
        url, sid = host.session_url, host.session_url.rsplit("/", 1)[1]

        async def cycle(k: int) -> None:
            viewer = WhepViewer(url, keep_frames=False)
            try:
                await viewer.connect()
                await viewer.wait_until(lambda: len(viewer.got.video_times) > 5, 15, "a viewer's video")
            finally:
                await viewer.close(delete=k % 2 == 0)  # every other one just leaves

        async def nobody_watches() -> bool:
            return (await stats(url))["viewers"] == 0

        async def worker_tasks() -> int:
            await asyncio.sleep(2.5)  # the main asks its workers once a second
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{server.url}/v1/sessions") as res:
                    index = next(s["session_worker"] for s in (await res.json())["sessions"]
                                 if s["session"] == sid)
                async with http.get(f"{server.url}/v1/workers") as res:
                    return int(next(w["tasks"] for w in (await res.json())["workers"] if w["index"] == index))

        for k in range(2):  # warm up
            await cycle(k)
        await until(nobody_watches, 10, "warm-up viewers to be removed")
        before = await worker_tasks()
        for k in range(10):
            await cycle(k)
        await until(nobody_watches, 10, "viewers to be removed")
        after = await worker_tasks()
        assert after <= before + 3, f"the session's worker ran {before} tasks before, {after} after"
        at = len(host.got.video_times)
        await host.wait_until(lambda: len(host.got.video_times) > at + 25, 5, "the session going on")
    finally:
        await host.close()


# --- /viewer in Chromium -------------------------------------------------------------------------
FRAME_PROBE = """() => {
  const v = document.querySelector('video');
  const c = document.createElement('canvas');
  c.width = 64; c.height = 64;
  const g = c.getContext('2d');
  g.drawImage(v, 0, 0, 64, 64);
  return Array.from(g.getImageData(0, 0, 64, 64).data.filter((_, i) => i % 4 === 1));
}"""

LAYOUT_PROBE = """() => {
  const v = document.querySelector('video');
  const r = v.getBoundingClientRect();
  const visible = [...document.body.querySelectorAll('*')].filter((e) => {
    const b = e.getBoundingClientRect(), s = getComputedStyle(e);
    return b.width > 0 && b.height > 0 && s.display !== 'none' && s.visibility !== 'hidden'
      && e.tagName !== 'SCRIPT';
  }).map((e) => e.tagName + (e.id ? '#' + e.id : ''));
  const doc = document.documentElement;
  return {visible, controls: v.controls, fit: getComputedStyle(v).objectFit,
          background: getComputedStyle(document.body).backgroundColor,
          rect: [r.left, r.top, r.width, r.height], window: [innerWidth, innerHeight],
          scroll: [doc.scrollWidth, doc.scrollHeight], videoWidth: v.videoWidth, videoHeight: v.videoHeight,
          muted: v.muted, audioTracks: v.srcObject ? v.srcObject.getAudioTracks().length : 0};
}"""


@pytest.mark.browser
@pytest.mark.slow
@needs_chromium
async def test_viewer_page_plays_the_stream_alone_in_chromium(server: RunningServer, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    host = AvatarPeer(server.url, keep_frames=False)
    try:
        await host.connect()
        await host.wait_open()
        assert host.session_url is not None
        sid = host.session_url.rsplit("/", 1)[1]
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 720})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                await page.goto(f"{server.url}/viewer?session={sid}")
                await page.wait_for_function("window.avatarViewer.framesDecoded > 25", timeout=30_000)
                t1 = await page.evaluate("window.avatarViewer.videoTime")
                first = await page.evaluate(FRAME_PROBE)
                host.send({"type": "say", "text": "Hello to the people watching in the browser."})
                await page.wait_for_function(f"window.avatarViewer.videoTime > {t1} + 2.0", timeout=8_000)
                second = await page.evaluate(FRAME_PROBE)
                layout = await page.evaluate(LAYOUT_PROBE)
                assert (await stats(host.session_url))["viewers"] == 1
                await page.screenshot(path=str(tmp_path / "viewer.png"))
                state = await page.evaluate("window.avatarViewer")
            finally:
                await browser.close()
    finally:
        await host.close()
    assert errors == [] and state["errors"] == [], (errors, state["errors"])
    assert state["sessionId"] == sid and state["attaches"] == 1
    assert layout["videoWidth"] == 512 and layout["videoHeight"] == 512
    assert np.abs(np.array(first, float) - np.array(second, float)).mean() > 0.5, "the frames change"
    assert layout["visible"] == ["VIDEO#video"], layout["visible"]  # no controls, no text
    assert not layout["controls"] and layout["fit"] == "contain" and layout["background"] == "rgb(0, 0, 0)"
    assert layout["rect"] == [0, 0, 1280, 720] and layout["window"] == [1280, 720]
    assert layout["scroll"][0] <= 1280 and layout["scroll"][1] <= 720, "no scrollbars"
    assert layout["audioTracks"] == 1 and not layout["muted"] and not state["muted"], "the voice plays"


GESTURE_FOR_SOUND = """(() => {
  let gesture = false;  // (navigator.userActivation is set already in an automated Chromium)
  for (const kind of ["pointerdown", "keydown"]) {
    addEventListener(kind, (ev) => { if (ev.isTrusted) gesture = true; }, true);
  }
  const play = HTMLMediaElement.prototype.play;
  HTMLMediaElement.prototype.play = function () {
    if (!this.muted && !gesture) {
      return Promise.reject(new DOMException("play() with sound needs a user gesture", "NotAllowedError"));
    }
    return play.call(this);
  };
})();"""


@pytest.mark.browser
@pytest.mark.slow
@needs_chromium
async def test_viewer_page_starts_muted_where_autoplay_needs_a_gesture(server: RunningServer) -> None:
    """A browser that holds sound back until a gesture still shows the stream, and a click unmutes it.

    Chromium here plays a MediaStream with sound whatever its autoplay flag says, so
    the page gets the policy of browsers that do hold it back, as they signal it:
    ``play()`` with sound is refused with ``NotAllowedError`` until the user acts.
    """
    from playwright.async_api import async_playwright

    host = AvatarPeer(server.url, keep_frames=False)
    try:
        await host.connect()
        await host.wait_open()
        assert host.session_url is not None
        sid = host.session_url.rsplit("/", 1)[1]
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page()
                await page.add_init_script(GESTURE_FOR_SOUND)
                await page.goto(f"{server.url}/viewer?session={sid}")
                await page.wait_for_function("window.avatarViewer.framesDecoded > 25", timeout=30_000)
                muted = "window.avatarViewer.muted && document.querySelector('video').muted"
                assert await page.evaluate(muted)
                assert await page.text_content("#note") == "click to unmute"
                await page.mouse.click(10, 10)
                await page.wait_for_function("!window.avatarViewer.muted", timeout=5_000)
                assert not await page.evaluate("document.querySelector('video').muted")
                assert await page.is_hidden("#note")
                frames = await page.evaluate("window.avatarViewer.framesDecoded")
                await page.wait_for_function(f"window.avatarViewer.framesDecoded > {frames} + 25",
                                             timeout=8_000)  # and it goes on playing, with sound
            finally:
                await browser.close()
    finally:
        await host.close()


@pytest.mark.browser
@pytest.mark.slow
@needs_chromium
async def test_viewer_page_follows_the_newest_session(server: RunningServer) -> None:
    from playwright.async_api import async_playwright

    first = AvatarPeer(server.url, keep_frames=False)
    second: AvatarPeer | None = None
    try:
        await first.connect()
        await first.wait_open()
        assert first.session_url is not None
        a = first.session_url.rsplit("/", 1)[1]
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page()
                await page.goto(f"{server.url}/viewer")
                await page.wait_for_function(f"window.avatarViewer.sessionId === '{a}' && "
                                             "window.avatarViewer.framesDecoded > 10", timeout=30_000)
                second = AvatarPeer(server.url, keep_frames=False)
                await second.connect()
                assert second.session_url is not None
                b = second.session_url.rsplit("/", 1)[1]
                await page.wait_for_function(f"window.avatarViewer.sessionId === '{b}' && "
                                             "window.avatarViewer.connected", timeout=15_000)
                frames = await page.evaluate("window.avatarViewer.framesDecoded")
                await page.wait_for_function(f"window.avatarViewer.framesDecoded > {frames} + 25",
                                             timeout=8_000)
                assert (await stats(second.session_url))["viewers"] == 1
                assert (await stats(first.session_url))["viewers"] == 0  # it left the older one
                await second.close()
                second = None
                await page.wait_for_function(f"window.avatarViewer.sessionId === '{a}' && "
                                             "window.avatarViewer.connected", timeout=15_000)
                state = await page.evaluate("window.avatarViewer")
            finally:
                await browser.close()
    finally:
        if second is not None:
            await second.close()
        await first.close()
    assert state["attaches"] == 3 and state["errors"] == [], state
