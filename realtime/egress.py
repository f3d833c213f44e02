"""Streams to platforms: the session's video and voice pushed over RTMP(S) as H.264 + AAC in FLV.

An egress reads the same A/V timeline the WebRTC peer does: each video frame
``k`` as ``VideoOut`` releases it (``k / fps + delay`` on the session clock)
and, with it, the voice for that frame's span off the session timeline. Frame
and voice travel together, stamped by the frame index, so lips and sound stay
as locked as they are in the session's own stream.

Muxing writes to the network and may block (a slow or dead server), so it runs
on a thread of its own; the session only hands it frames through a bounded
queue and never waits for it. When the connection breaks, the thread closes
it and reconnects with backoff (1 s, doubling to 30 s); frames that come
meanwhile are dropped and counted, and a new connection starts its
timestamps at zero, as a new publish. The session does not notice.

The stream is encoded for the egress (platforms want their own bitrate and
an FLV sequence header, not the WebRTC encoder's in-band one): libx264 at the
requested bitrate with a keyframe every 2 s, AAC at 48 kHz. The voice is
continuous: where frames were dropped, silence fills their span, so the audio
timestamps stay those of the frame indices.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import av
import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from realtime.timeline import OUT_RATE, AudioTimeline
from realtime.tracks import VideoOut

log = logging.getLogger(__name__)

SCHEMES = ("rtmp", "rtmps")
BACKOFF_S = (1.0, 30.0)  # first wait after a failure, and the most it doubles to
IO_TIMEOUT_S = 5.0  # connect and write: longer, and the server counts as gone
QUEUE_FRAMES = 50  # 2 s of frames waiting for the muxer; more, and the oldest are dropped
RATE_WINDOW_S = 5.0


class EgressError(ValueError):
    """An egress that cannot be made (a malformed URL, settings out of range)."""


def check_url(url: str) -> str:
    """``url`` if it is an RTMP(S) URL with a host, an app and a stream key; ``EgressError`` otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise EgressError("give the stream URL as rtmp://host[:port]/app/stream-key")
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise EgressError(f"not a valid URL: {exc}") from None
    if parts.scheme.lower() not in SCHEMES:
        raise EgressError(f"the stream URL must start with rtmp:// or rtmps:// (got {parts.scheme or 'none'}://)")
    if not parts.hostname:
        raise EgressError("the stream URL has no host (rtmp://host/app/stream-key)")
    if port == 0:
        raise EgressError("the stream URL's port must be 1-65535")
    path = [p for p in parts.path.split("/") if p]
    if len(path) < 2:
        raise EgressError("the stream URL needs an app and a stream key after the host "
                          "(rtmp://host/app/stream-key)")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise EgressError("the stream URL must not contain spaces or control characters")
    return url


def join_url(server: str, key: str) -> str:
    """OBS's two fields, server URL and stream key, as one URL."""
    return f"{server.rstrip('/')}/{key.lstrip('/')}"


def redact(url: str) -> str:
    """The URL with its stream key (the last path part, and any query) hidden: it is a secret."""
    parts = urlsplit(url)
    head, _, _key = parts.path.rpartition("/")
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, f"{head}/****", "", ""))


class EgressState(str, Enum):
    CONNECTING = "connecting"
    LIVE = "live"
    RECONNECTING = "reconnecting"  # the connection failed; waiting to try again
    STOPPED = "stopped"


@dataclass(slots=True, frozen=True)
class EgressSettings:
    video_bitrate: int = 2_500_000
    audio_bitrate: int = 128_000
    gop_s: float = 2.0
    preset: str = "veryfast"


class EgressRequest(BaseModel):
    """What ``POST /v1/sessions/{id}/egress`` takes: ``url``, or OBS's ``server`` and ``key``."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = None
    server: str | None = None
    key: str | None = None
    video_bitrate: int = Field(2_500_000, ge=200_000, le=20_000_000)
    audio_bitrate: int = Field(128_000, ge=32_000, le=320_000)

    @model_validator(mode="after")
    def _one_url(self) -> EgressRequest:
        if self.url is None:
            if not self.server or not self.key:
                raise ValueError('give "url" (rtmp://host/app/stream-key), or "server" and "key"')
            self.url = join_url(self.server, self.key)
        elif self.server is not None or self.key is not None:
            raise ValueError('give either "url", or "server" and "key", not both')
        self.url = check_url(self.url)
        return self

    @classmethod
    def parse(cls, data: Any) -> EgressRequest:
        """The request, or ``EgressError`` with a message a user can act on."""
        if not isinstance(data, dict):
            raise EgressError('send a JSON object: {"url": "rtmp://host/app/stream-key"}')
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "value_error":
                raise EgressError(str(err.get("ctx", {}).get("error", err["msg"]))) from None
            if err["type"] == "extra_forbidden":
                raise EgressError(f"unexpected field {where!r}") from None
            raise EgressError(f"{where}: {err['msg']}") from None

    def settings(self) -> EgressSettings:
        return EgressSettings(video_bitrate=self.video_bitrate, audio_bitrate=self.audio_bitrate)


@dataclass(slots=True)
class _Item:
    index: int
    rgb: np.ndarray
    voice: np.ndarray  # int16, this frame's span at OUT_RATE


class RtmpEgress:
    """One push of a session's stream to an RTMP(S) server, reconnecting until stopped."""

    def __init__(self, url: str, video_out: VideoOut, timeline: AudioTimeline, *, fps: int,
                 settings: EgressSettings | None = None, session_id: str = "") -> None:
        self.id = secrets.token_hex(4)
        self.url = check_url(url)
        self.video_out = video_out
        self.timeline = timeline
        self.fps = fps
        self.settings = settings or EgressSettings()
        self.session_id = session_id
        self.samples_per_frame = OUT_RATE // fps
        if self.samples_per_frame * fps != OUT_RATE:
            raise EgressError(f"{fps} fps does not divide {OUT_RATE} Hz audio into whole frames")
        self.state = EgressState.CONNECTING
        self.error: str | None = None
        self.reconnects = 0
        self.frames_sent = 0
        self.dropped_frames = 0
        self.connected_at: float | None = None
        self.created = time.time()
        self._sent_bytes: deque[tuple[float, int]] = deque()
        self._queue: queue.Queue[_Item | None] = queue.Queue(QUEUE_FRAMES)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._mux_loop, name=f"egress-{self.id}", daemon=True)
        self._started = False

    # --- the session's side: frames in, never waiting -----------------------------------------
    async def run(self) -> None:
        """Feed the muxer every frame the session sends, with its voice, until stopped."""
        if not self._started:
            self._started = True
            self._thread.start()
        sub = self.video_out.subscribe("rgb")
        try:
            while not self._stop.is_set():
                item = await sub.get()
                if item is None or item.rgb is None:
                    break
                k = item.index
                voice = self.timeline.read_out(k / self.fps, self.samples_per_frame)
                self._offer(_Item(k, item.rgb, voice))
        finally:
            self.video_out.unsubscribe(sub)
            self.stop()

    def _offer(self, item: _Item) -> None:
        if self.state is not EgressState.LIVE and self.state is not EgressState.CONNECTING:
            self.dropped_frames += 1  # no connection: the stream resumes from the present
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self.dropped_frames += 1
            self._queue.put_nowait(item)

    def stop(self) -> None:
        """Stop pushing: the muxer finishes the stream (FLV trailer) and closes the connection."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    async def aclose(self) -> None:
        self.stop()
        if self._thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, IO_TIMEOUT_S * 2)

    # --- the muxer thread -------------------------------------------------------------------
    def _mux_loop(self) -> None:
        backoff = BACKOFF_S[0]
        while not self._stop.is_set():
            self.state = EgressState.CONNECTING  # frames queue up while the connection opens
            began = time.monotonic()
            try:
                self._stream_once()
            except Exception as exc:  # the server refused, went away, or timed out
                if self._stop.is_set():
                    break
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning("[%s] egress %s to %s: %s; retrying in %.0f s", self.session_id, self.id,
                            redact(self.url), self.error, backoff)
            else:
                break  # stopped cleanly
            self.state = EgressState.RECONNECTING
            self._drain()
            if time.monotonic() - began > 30:  # it had been up a while: start the backoff again
                backoff = BACKOFF_S[0]
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, BACKOFF_S[1])
            self.reconnects += 1
        self.state = EgressState.STOPPED
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self.dropped_frames += 1

    def _stream_once(self) -> None:
        """One connection: open, mux frames until stopped (clean return) or the network fails (raise)."""
        s = self.settings
        # the timeout bounds the connect and every write: a server that stalls counts as gone
        container: Any = av.open(self.url, "w", format="flv", timeout=IO_TIMEOUT_S)
        try:
            video = container.add_stream("libx264", rate=self.fps)
            gop = max(1, round(s.gop_s * self.fps))
            video.options = {"preset": s.preset, "tune": "zerolatency",
                             "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0"}
            video.pix_fmt = "yuv420p"
            video.bit_rate = s.video_bitrate
            video.codec_context.time_base = fractions.Fraction(1, self.fps)
            video.codec_context.thread_count = 1
            audio = container.add_stream("aac", rate=OUT_RATE)
            audio.layout = "mono"
            audio.bit_rate = s.audio_bitrate
            aac_frame = 1024  # AAC's frame: the voice is cut into these, stamped by sample count
            pending = np.zeros(0, np.int16)
            voiced = 0  # samples handed to the AAC encoder so far
            base: int | None = None
            last = -1
            while True:
                item = self._queue.get()
                if item is None:
                    break
                if base is None:
                    base = item.index
                    h, w = item.rgb.shape[:2]
                    video.width, video.height = w, h
                k = item.index - base
                if k <= last:
                    continue
                yuv = np.asarray(cv2.cvtColor(item.rgb, cv2.COLOR_RGB2YUV_I420), np.uint8)
                frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
                frame.pts = k
                frame.time_base = fractions.Fraction(1, self.fps)
                gap = (k - last - 1) * self.samples_per_frame
                pending = np.concatenate([pending, np.zeros(gap, np.int16), item.voice.astype(np.int16)])
                last = k
                packets = list(video.encode(frame))
                while len(pending) >= aac_frame:
                    sound = av.AudioFrame.from_ndarray(np.ascontiguousarray(pending[None, :aac_frame]),
                                                       format="s16", layout="mono")
                    sound.sample_rate = OUT_RATE
                    sound.pts = voiced
                    sound.time_base = fractions.Fraction(1, OUT_RATE)
                    packets += audio.encode(sound)
                    pending = pending[aac_frame:]
                    voiced += aac_frame
                container.mux(packets)
                if self.state is not EgressState.LIVE:
                    self.state = EgressState.LIVE
                    self.connected_at = time.time()
                    self.error = None
                    log.info("[%s] egress %s live to %s", self.session_id, self.id, redact(self.url))
                self.frames_sent += 1
                now = time.monotonic()
                self._sent_bytes.append((now, sum(p.size for p in packets)))
            for stream in (video, audio):  # what the encoders hold back, then the trailer
                container.mux(list(stream.encode(None)))
        finally:
            self.connected_at = None
            try:
                container.close()
            except Exception as exc:  # a dead connection cannot take its trailer
                log.debug("egress %s: closing: %s", self.id, exc)

    # --- figures ----------------------------------------------------------------------------
    def bitrate_kbps(self) -> float:
        now = time.monotonic()
        while self._sent_bytes and self._sent_bytes[0][0] < now - RATE_WINDOW_S:
            self._sent_bytes.popleft()
        if self.state is not EgressState.LIVE or not self._sent_bytes:
            return 0.0
        span = max(now - self._sent_bytes[0][0], 1.0 / self.fps)
        return round(sum(b for _, b in self._sent_bytes) * 8 / span / 1000, 1)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "url": redact(self.url), "state": self.state.value,
                "bitrate_kbps": self.bitrate_kbps(), "video_bitrate": self.settings.video_bitrate,
                "frames_sent": self.frames_sent, "dropped_frames": self.dropped_frames,
                "reconnects": self.reconnects, "error": self.error,
                "live_since": self.connected_at, "created": self.created}
