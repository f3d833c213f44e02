"""Python WebRTC clients of the server (what a browser does, in aiortc).

Used by the tests and benchmarks, and usable by any Python frontend.
``AvatarPeer`` opens a session: it sends audio from an array (paced in real
time, then silence), receives the avatar's video and voice with their arrival
times, and speaks the ``control`` channel. ``WhepViewer`` watches a session
over WHEP: a recvonly offer, video and voice received the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

log = logging.getLogger(__name__)

RATE = 48_000
PTIME = 0.02
SAMPLES = round(RATE * PTIME)


class ArrayAudioTrack(MediaStreamTrack):
    """Plays a 48 kHz mono float array in real time, then silence."""

    kind = "audio"

    def __init__(self, audio: np.ndarray | None = None) -> None:
        super().__init__()
        self.audio = np.zeros(0, np.float32) if audio is None else audio.astype(np.float32)
        self._index = 0
        self._start: float | None = None
        self.sent_at: list[float] = []  # wall time each chunk left (perf_counter)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.perf_counter()
        due = self._start + self._index * PTIME
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        chunk = self.audio[self._index * SAMPLES:(self._index + 1) * SAMPLES]
        if len(chunk) < SAMPLES:
            chunk = np.pad(chunk, (0, SAMPLES - len(chunk)))
        pcm = np.clip(chunk * 32767, -32768, 32767).astype(np.int16)
        frame = av.AudioFrame(format="s16", layout="mono", samples=SAMPLES)
        frame.planes[0].update(pcm.tobytes())
        frame.sample_rate = RATE
        frame.pts = self._index * SAMPLES
        frame.time_base = fractions.Fraction(1, RATE)
        self._index += 1
        self.sent_at.append(time.perf_counter())
        return frame

    def played_time(self, chunk: int) -> float | None:
        return self.sent_at[chunk] if chunk < len(self.sent_at) else None


@dataclass(slots=True)
class Received:
    video: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (arrival, RGB frame)
    video_times: list[float] = field(default_factory=list)
    audio: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (arrival, int16 mono)
    messages: list[dict[str, Any]] = field(default_factory=list)


class _Receiving:
    """What a client receives (video frames and voice, with arrival times) and waiting on it."""

    def __init__(self, *, token: str | None, keep_frames: bool, frame_stride: int) -> None:
        self.token = token
        self.keep_frames = keep_frames
        self.frame_stride = frame_stride
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.got = Received()
        self.first_frame_at: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()  # set whenever anything arrives

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            reader = self._read_video(track) if track.kind == "video" else self._read_audio(track)
            self._tasks.append(asyncio.ensure_future(reader))

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = dict(extra or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    async def _read_video(self, track: Any) -> None:
        n = 0
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.perf_counter()
            if self.first_frame_at is None:
                self.first_frame_at = now
            self.got.video_times.append(now)
            self._changed.set()
            if self.keep_frames and n % self.frame_stride == 0:
                self.got.video.append((now, frame.to_ndarray(format="rgb24")))
            n += 1

    async def _read_audio(self, track: Any) -> None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.perf_counter()
            for f in resampler.resample(frame):
                self.got.audio.append((now, f.to_ndarray().reshape(-1).astype(np.int16)))
            self._changed.set()

    async def wait_until(self, condition: Callable[[], bool], within: float, what: str) -> None:
        """Wait (at most ``within`` s) until ``condition()`` holds, re-checking on each arrival."""
        async def watch() -> None:
            while not condition():
                self._changed.clear()
                try:  # also re-check now and then: a condition may hold without an arrival
                    await asyncio.wait_for(self._changed.wait(), 0.5)
                except TimeoutError:
                    pass

        try:
            await asyncio.wait_for(watch(), within)
        except TimeoutError:
            raise AssertionError(f"timed out after {within}s waiting for {what}") from None

    async def _delete(self, url: str | None) -> None:
        if not url:
            return
        try:
            async with aiohttp.ClientSession() as http, http.delete(url, headers=self._headers()) as res:
                await res.read()
        except aiohttp.ClientError as exc:
            log.info("delete of %s failed: %s", url, exc)

    async def _stop(self) -> None:
        await self.pc.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


class AvatarPeer(_Receiving):
    def __init__(self, base_url: str, audio: np.ndarray | None = None, *,
                 token: str | None = None, keep_frames: bool = True,
                 frame_stride: int = 1) -> None:
        super().__init__(token=token, keep_frames=keep_frames, frame_stride=frame_stride)
        self.base_url = base_url.rstrip("/")
        self.mic = ArrayAudioTrack(audio)
        self.channel: Any = None
        self.session_url: str | None = None
        self.answered_at: float | None = None
        self._open = asyncio.Event()

    async def connect(self, avatar: str | None = None) -> None:
        pc = self.pc
        pc.addTransceiver(self.mic, direction="sendrecv")
        pc.addTransceiver("video", direction="recvonly")
        self.channel = pc.createDataChannel("control")
        self.channel.on("open", self._open.set)
        self.channel.on("message", self._on_message)
        await pc.setLocalDescription(await pc.createOffer())
        url = f"{self.base_url}/v1/sessions" + (f"?avatar={avatar}" if avatar else "")
        async with aiohttp.ClientSession() as http, http.post(
                url, data=pc.localDescription.sdp,
                headers=self._headers({"Content-Type": "application/sdp"})) as res:
            body = await res.text()
            if res.status != 201:
                raise RuntimeError(f"session refused: {res.status} {body}")
            self.session_url = self.base_url + res.headers["Location"]
        self.answered_at = time.perf_counter()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))

    def _on_message(self, message: Any) -> None:
        with contextlib.suppress(ValueError):
            self.got.messages.append(json.loads(message))
        self._changed.set()

    async def wait_open(self, within: float = 10.0) -> None:
        await asyncio.wait_for(self._open.wait(), within)

    def send(self, message: dict[str, Any] | str) -> None:
        self.channel.send(message if isinstance(message, str) else json.dumps(message))

    def messages(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.got.messages if m.get("type") == kind]

    async def close(self, *, delete: bool = True) -> None:
        if delete:
            await self._delete(self.session_url)
        await self._stop()


class WhepRefused(RuntimeError):
    """The WHEP endpoint did not answer ``201``: its status, error and headers."""

    def __init__(self, status: int, error: str, headers: dict[str, str]) -> None:
        super().__init__(f"WHEP offer refused: {status} {error}")
        self.status = status
        self.error = error
        self.headers = headers


class WhepViewer(_Receiving):
    """Watches a session over WHEP (``POST {session_url}/whep``): video and voice, nothing sent.

    ``video_codecs`` limits what the offer takes (e.g. ``["VP8"]``); by default it
    offers what aiortc decodes and the server picks.
    """

    def __init__(self, session_url: str, *, token: str | None = None, keep_frames: bool = True,
                 frame_stride: int = 1, video_codecs: list[str] | None = None) -> None:
        super().__init__(token=token, keep_frames=keep_frames, frame_stride=frame_stride)
        self.endpoint = session_url.rstrip("/") + "/whep"
        self.video_codecs = video_codecs
        self.resource_url: str | None = None  # the viewer's own URL (DELETE ends it)
        self.answer_sdp: str | None = None

    async def connect(self) -> None:
        from aiortc.rtcrtpsender import RTCRtpSender

        pc = self.pc
        pc.addTransceiver("audio", direction="recvonly")
        video = pc.addTransceiver("video", direction="recvonly")
        if self.video_codecs:
            caps = RTCRtpSender.getCapabilities("video").codecs
            video.setCodecPreferences([c for name in self.video_codecs for c in caps
                                       if c.mimeType.lower() == f"video/{name.lower()}"])
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http, http.post(
                self.endpoint, data=pc.localDescription.sdp,
                headers=self._headers({"Content-Type": "application/sdp"})) as res:
            body = await res.text()
            if res.status != 201:
                try:
                    error = str(json.loads(body)["error"])
                except (ValueError, KeyError, TypeError):
                    error = body
                raise WhepRefused(res.status, error, dict(res.headers))
            location = res.headers["Location"]
        base = self.endpoint.split("/v1/", 1)[0]
        self.resource_url = base + location if location.startswith("/") else location
        self.answer_sdp = body
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))

    async def close(self, *, delete: bool = True) -> None:
        if delete:
            await self._delete(self.resource_url)
        await self._stop()
