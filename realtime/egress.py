"""Streams to platforms: the session's video and voice pushed over RTMP(S) as H.264 + AAC in FLV.

An egress reads the same A/V timeline the WebRTC peer does: each video frame
``k`` as ``VideoOut`` releases it (``k / fps + delay`` on the session clock)
and, with it, the voice for that frame's span off the session timeline. Frame
and voice travel together, stamped by the frame index, so lips and sound stay
as locked as they are in the session's own stream.

Encoding and muxing run in a process of their own (``realtime.egress_mux``),
fed frames through a pipe. FFmpeg connects and writes RTMP with blocking
calls, some of which PyAV makes holding the GIL and none with a timeout: in
the session's process, a server that accepts a connection and then stops
answering would freeze every session there. In a child, it freezes only the
child, which the egress kills once it has made no progress for
``IO_TIMEOUT_S`` (``CONNECT_TIMEOUT_S`` to connect). The session never waits
for the child: a frame the pipe cannot take at once is dropped and counted.

When the connection breaks, the egress starts a new child with backoff (1 s,
doubling to 30 s, back to 1 s after a connection that lasted); frames that
come meanwhile are dropped and counted, and a new connection starts its
timestamps at zero, as a new publish does. The session does not notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from realtime.egress_mux import RECORD_HEAD, MuxSpec
from realtime.timeline import OUT_RATE, AudioTimeline
from realtime.tracks import OutFrame, Subscription, VideoOut

log = logging.getLogger(__name__)

SCHEMES = ("rtmp", "rtmps")
BACKOFF_S = (1.0, 30.0)  # first wait after a failure, and the most it doubles to
CONNECT_TIMEOUT_S = 10.0  # from starting the muxer to its first write on the network
IO_TIMEOUT_S = 5.0  # a write that takes longer: the server counts as gone
PIPE_FRAMES = 12  # frames the pipe to the muxer may hold (~0.5 s); more, and new frames are dropped
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
        self.frames_sent = 0  # frames the muxer has written to the network, all connections
        self.dropped_frames = 0
        self.connected_at: float | None = None
        self.created = time.time()
        self._sent_bytes: deque[tuple[float, int]] = deque()
        self._stopping = False
        self._sub: Subscription | None = None
        self._done = asyncio.Event()
        self._progress = time.monotonic()  # when the muxer last reported a frame written
        self._live = False  # the current muxer has connected
        self._last_error = ""  # what the current muxer said went wrong

    # --- running -----------------------------------------------------------------------
    async def run(self) -> None:
        """Push until stopped: a muxer per connection, a new one with backoff when one fails."""
        self._sub = sub = self.video_out.subscribe("rgb")
        backoff = BACKOFF_S[0]
        try:
            while not self._stopping:
                self.state = EgressState.CONNECTING
                began = time.monotonic()
                error = await self._connection(sub)
                if self._stopping:
                    break
                self.error = error
                self.state = EgressState.RECONNECTING
                log.warning("[%s] egress %s to %s: %s; retrying in %.0f s", self.session_id, self.id,
                            redact(self.url), error, backoff)
                if time.monotonic() - began > 30:  # it had been up a while: start the backoff again
                    backoff = BACKOFF_S[0]
                until = time.monotonic() + backoff
                while not self._stopping and time.monotonic() < until:  # the stream goes on without us
                    if await sub.get() is None:
                        break
                    self.dropped_frames += 1
                backoff = min(backoff * 2, BACKOFF_S[1])
                self.reconnects += 1
        finally:
            self.video_out.unsubscribe(sub)
            self.state = EgressState.STOPPED
            self._done.set()

    async def _connection(self, sub: Subscription) -> str:
        """One muxer, fed until it fails (what went wrong) or the egress stops (``""``)."""
        first = await sub.get()
        if first is None or first.rgb is None:
            return ""
        h, w = first.rgb.shape[:2]
        s = self.settings
        spec = MuxSpec(self.url, self.fps, w, h, self.samples_per_frame, OUT_RATE, s.video_bitrate,
                       s.audio_bitrate, s.gop_s, s.preset)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "realtime.egress_mux", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        assert proc.stdin is not None and proc.stdout is not None
        started = time.monotonic()
        self._progress = started
        self._live = False
        self._last_error = ""
        reader = asyncio.ensure_future(self._read_reports(proc.stdout))
        graceful = False
        try:
            proc.stdin.write((json.dumps(asdict(spec)) + "\n").encode())  # the key goes by pipe, not argv
            item: OutFrame | None = first
            while item is not None and item.rgb is not None:
                if proc.returncode is not None or reader.done():
                    return self._last_error or f"the muxer exited with {proc.returncode}"
                now = time.monotonic()
                if self._live and now - self._progress > IO_TIMEOUT_S:
                    return f"the server accepted no data for {IO_TIMEOUT_S:.0f} s"
                if not self._live and now - started > CONNECT_TIMEOUT_S:
                    return f"no connection within {CONNECT_TIMEOUT_S:.0f} s"
                transport: Any = proc.stdin.transport
                if transport.get_write_buffer_size() > PIPE_FRAMES * spec.record_bytes:
                    self.dropped_frames += 1  # the muxer is behind: never wait for it
                else:
                    voice = self.timeline.read_out(item.index / self.fps, self.samples_per_frame)
                    # the pipe takes what it can at once and buffers the rest: no copies of our own
                    proc.stdin.write(RECORD_HEAD.pack(item.index))
                    proc.stdin.write(np.ascontiguousarray(item.rgb).data.cast("B"))
                    proc.stdin.write(np.ascontiguousarray(voice, np.int16).data.cast("B"))
                item = await sub.get()
            graceful = True  # stopped: the muxer finishes the stream (its encoders, the FLV trailer)
            return ""
        finally:
            await self._end(proc, reader, graceful)
            self._live = False
            self.connected_at = None

    async def _end(self, proc: asyncio.subprocess.Process, reader: asyncio.Future[None],
                   graceful: bool) -> None:
        if graceful and proc.returncode is None:
            assert proc.stdin is not None
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), IO_TIMEOUT_S)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, 1.0)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)

    async def _read_reports(self, stdout: asyncio.StreamReader) -> None:
        """The muxer's reports: ``{"live": true}``, ``{"bytes": n}`` per frame written, or an error."""
        async for line in stdout:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if "error" in report:
                self._last_error = str(report["error"])
            elif report.get("live"):
                self._live = True
                self.state = EgressState.LIVE
                self.connected_at = time.time()
                self.error = None
                self._progress = time.monotonic()
                log.info("[%s] egress %s live to %s", self.session_id, self.id, redact(self.url))
            elif "bytes" in report:
                self._progress = time.monotonic()
                self.frames_sent += 1
                self._sent_bytes.append((self._progress, int(report["bytes"])))

    def stop(self) -> None:
        """Stop pushing: the muxer finishes the stream (FLV trailer) and closes the connection."""
        self._stopping = True
        if self._sub is not None:
            self.video_out.unsubscribe(self._sub)  # wakes the feed with the end of the stream

    async def aclose(self) -> None:
        self.stop()
        if self._sub is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), IO_TIMEOUT_S * 2)

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
                "frames_sent": self.frames_sent,
                "dropped_frames": self.dropped_frames + (self._sub.dropped if self._sub else 0),
                "reconnects": self.reconnects, "error": self.error,
                "live_since": self.connected_at, "created": self.created}
