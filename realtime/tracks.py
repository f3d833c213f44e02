"""The media boundary: the session's video and voice leaving, as aiortc ``MediaStreamTrack``s.

Video leaves playout once per session (``VideoOut``), is encoded once per
codec, and fans out to every output; the voice is read off the timeline once
per session (``AudioOut``), encoded to Opus once, and fans out the same way.
Every WebRTC peer of the session (its own, WHEP viewers) has one track per
kind that reads its subscription. Both stamp pts from the session clock and
release each frame at ``pts + delay`` (the playout delay), so lips and sound
leave together. They never wait for a producer: video holds the last frame,
audio reads silence.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import av
import cv2
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from realtime.clock import Clock
from realtime.encoding import CODECS, VIDEO_CLOCK, OpusEncoder, VideoEncoder
from realtime.playout import Playout
from realtime.timeline import OUT_RATE, AudioTimeline

log = logging.getLogger(__name__)

# 40 ms voice packets: half the packets (and their per-packet work) of 20 ms, and no later, for a
# packet leaves when its first sample is due, its samples being on the timeline by then
AUDIO_PTIME = 0.04
AUDIO_SAMPLES = round(OUT_RATE * AUDIO_PTIME)
CATCH_UP_S = 0.2  # if the consumer is this far behind, skip to the present


@dataclass(slots=True)
class VideoTrackStats:
    """What the video track has sent (its own figures; playout counts held/late/dropped)."""

    sent: int = 0
    skipped: int = 0  # slots jumped over to catch up with the clock
    send_lag_ms: deque[float] = field(default_factory=lambda: deque(maxlen=250))
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=250))
    sent_at: deque[float] = field(default_factory=lambda: deque(maxlen=100))
    delivered: int = 0  # encoded frames handed to outputs (one per output per frame)

    def fps(self, now: float) -> float:
        return float(sum(1 for t in self.sent_at if t > now - 1.0))

    def latency_percentile_ms(self, q: float) -> float | None:
        """Audio arrival to frame hand-off to the encoder, over recent frames."""
        return float(np.percentile(self.latency_ms, q)) if self.latency_ms else None


@dataclass(slots=True, frozen=True)
class OutFrame:
    """Frame ``index`` of the session's video (pts ``index / fps``), as one output takes it."""

    index: int
    rgb: np.ndarray | None  # for raw outputs
    packets: tuple[av.Packet, ...] = ()  # for encoded outputs


T = TypeVar("T")


class Subscription(Generic[T]):
    """What one output receives: ``kind`` is ``"rgb"``, a video codec or ``"opus"``; a bounded
    queue, oldest dropped (an output that falls behind loses the past, never delays the present).
    ``None`` ends it."""

    def __init__(self, kind: str, maxsize: int) -> None:
        self.kind = kind
        self.queue: asyncio.Queue[T | None] = asyncio.Queue(maxsize)
        self.dropped = 0

    def put(self, item: T | None) -> bool:
        """Queue ``item``; False if the output had fallen behind and its oldest frame went."""
        dropped = False
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
            dropped = True
        self.queue.put_nowait(item)
        return not dropped

    async def get(self) -> T | None:
        return await self.queue.get()


class FanOut(Generic[T]):
    """What ``VideoOut`` and ``AudioOut`` share: their outputs' subscriptions, and the end of them."""

    def __init__(self) -> None:
        self._subs: list[Subscription[T]] = []
        self._stopped = False

    def _add(self, kind: str, maxsize: int) -> Subscription[T]:
        sub: Subscription[T] = Subscription(kind, maxsize)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription[T]) -> None:
        """The output is done (or the stream ends): it gets ``None``."""
        if sub in self._subs:
            self._subs.remove(sub)
        sub.put(None)

    def stop(self) -> None:
        self._stopped = True
        for sub in list(self._subs):
            self.unsubscribe(sub)


class VideoOut(FanOut[OutFrame]):
    """The session's video leaving playout: one frame per slot at ``pts + delay``, encoded once.

    A task takes frame ``k`` from playout when it is due (``k / fps + delay``; the
    previous frame is held when a render is late, and a stall skips ahead to the
    present rather than sending a backlog), encodes it once for each codec some
    output wants (in ``executor``), and hands it to every subscribed output.
    Outputs never slow it down: one that falls behind loses its oldest frame and
    gets a keyframe next.
    """

    def __init__(self, playout: Playout, clock: Clock, timeline: AudioTimeline, idle: np.ndarray, *,
                 banner: str | None = None, bitrate: int = 800_000, executor: Executor | None = None,
                 queue_frames: int = 4) -> None:
        super().__init__()
        self.playout = playout
        self.clock = clock
        self.timeline = timeline
        self.idle = idle
        self.banner = banner
        self.bitrate = bitrate
        self.executor = executor
        self.queue_frames = queue_frames
        self.stats = VideoTrackStats()
        self._encoders: dict[str, VideoEncoder] = {}

    def encoded(self) -> dict[str, int]:
        """Frames encoded so far, per codec: one encode per frame, however many outputs send it."""
        return {codec: enc.frames for codec, enc in sorted(self._encoders.items())}

    def subscribe(self, kind: str) -> Subscription[OutFrame]:
        if kind != "rgb" and kind not in CODECS:
            raise ValueError(f"no video output of kind {kind!r}: rgb or one of {', '.join(CODECS)}")
        sub = self._add(kind, self.queue_frames)
        if kind in self._encoders:
            self._encoders[kind].request_keyframe()  # a new viewer starts from a keyframe
        return sub


    def request_keyframe(self, codec: str) -> None:
        if codec in self._encoders:
            self._encoders[codec].request_keyframe()

    def _encoder(self, codec: str, frame: np.ndarray) -> VideoEncoder:
        enc = self._encoders.get(codec)
        if enc is None:
            h, w = frame.shape[:2]
            enc = self._encoders[codec] = VideoEncoder(codec, w, h, self.playout.fps, bitrate=self.bitrate)
        return enc

    def _encode(self, frame: np.ndarray, index: int, codecs: list[str]) -> dict[str, tuple[av.Packet, ...]]:
        return {c: tuple(self._encoder(c, frame).encode(frame, index)) for c in codecs}

    async def run(self) -> None:
        p = self.playout
        loop = asyncio.get_running_loop()
        idx = p.next_index
        try:
            while not self._stopped:
                now = self.clock.now()
                if now > p.due_time(idx) + CATCH_UP_S:
                    caught_up = max(idx, int((now - p.delay_s) * p.fps))
                    self.stats.skipped += caught_up - idx
                    idx = caught_up
                await self.clock.sleep_until(p.due_time(idx))
                frame, _ = p.take(idx, self.idle)
                sent = self.clock.now()
                st = self.stats
                st.sent += 1
                st.sent_at.append(sent)
                st.send_lag_ms.append((sent - p.due_time(idx)) * 1000)
                arrived = self.timeline.arrival_of(idx / p.fps)
                if arrived is not None:
                    st.latency_ms.append((sent - arrived) * 1000)
                if self.banner:
                    frame = frame.copy()
                    cv2.putText(frame, self.banner, (8, frame.shape[0] - 12), cv2.FONT_HERSHEY_SIMPLEX,
                                0.5, (255, 40, 40), 1, cv2.LINE_AA)
                codecs = sorted({s.kind for s in self._subs if s.kind != "rgb"})
                packets = await loop.run_in_executor(self.executor, self._encode, frame, idx, codecs) \
                    if codecs else {}
                for sub in list(self._subs):
                    out = OutFrame(idx, frame if sub.kind == "rgb" else None, packets.get(sub.kind, ()))
                    if sub.kind != "rgb":
                        st.delivered += 1
                    if not sub.put(out) and sub.kind != "rgb":
                        self._encoders[sub.kind].request_keyframe()  # its decoder lost a frame
                idx += 1
        finally:
            self.stop()


class EncodedVideoTrack(MediaStreamTrack):
    """A WebRTC peer's video: the session's packets of one codec (aiortc only packetizes them)."""

    kind = "video"

    def __init__(self, out: VideoOut) -> None:
        super().__init__()
        self.out = out
        self.codec: str | None = None  # the negotiated codec, known once the answer is made
        self.sub: Subscription[OutFrame] | None = None
        self.sender: Any = None  # set by signalling: keyframes the receiver asks for
        self._pending: list[av.Packet] = []

    def use_codec(self, codec: str) -> None:
        if codec not in CODECS:
            raise ValueError(f"cannot send video as {codec} (this server encodes {', '.join(CODECS)})")
        self.codec = codec

    async def recv(self) -> av.Packet:
        while not self._pending:
            if self.readyState != "live" or self.codec is None:
                raise MediaStreamError
            if self.sub is None:
                self.sub = self.out.subscribe(self.codec)
            # aiortc notes a receiver's picture-loss request on its sender; with packets it
            # is ours to act on (a private flag: read defensively)
            if self.sender is not None and getattr(self.sender, "_RTCRtpSender__force_keyframe", False):
                self.sender._RTCRtpSender__force_keyframe = False
                self.out.request_keyframe(self.codec)
            item = await self.sub.get()
            if item is None:
                self.stop()
                raise MediaStreamError
            self._pending = list(item.packets)
        return self._pending.pop(0)

    def stop(self) -> None:
        if self.sub is not None:
            self.out.unsubscribe(self.sub)
        super().stop()


class RawVideoTrack(MediaStreamTrack):
    """The session's video as RGB frames (what tests and file renders read)."""

    kind = "video"

    def __init__(self, out: VideoOut) -> None:
        super().__init__()
        self.out = out
        self.sub = out.subscribe("rgb")

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        item = await self.sub.get()
        if item is None or item.rgb is None:
            self.stop()
            raise MediaStreamError
        vf = av.VideoFrame.from_ndarray(item.rgb, format="rgb24")
        vf.pts = round(item.index * VIDEO_CLOCK / self.out.playout.fps)
        vf.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return vf

    def stop(self) -> None:
        self.out.unsubscribe(self.sub)
        super().stop()


class AudioOut(FanOut[av.Packet]):
    """The session's voice leaving the timeline: one 40 ms packet at ``pts + delay``, encoded once.

    A task reads packet ``k`` off the timeline when it is due (``k * 40 ms + delay``;
    a stall skips ahead to the present rather than sending a backlog), encodes it to
    Opus once and hands the packet to every subscribed output, as ``VideoOut`` does
    for frames. Its figures (how late packets leave, the level) are the session's.
    """

    def __init__(self, timeline: AudioTimeline, clock: Clock, delay_s: float, *,
                 queue_packets: int = round(CATCH_UP_S / AUDIO_PTIME)) -> None:
        super().__init__()
        self.timeline = timeline
        self.clock = clock
        self.delay_s = delay_s
        self.queue_packets = queue_packets
        self.send_lag_ms: deque[float] = deque(maxlen=250)
        self.level: deque[float] = deque(maxlen=50)  # RMS of recent packets (dBFS)
        self.encoded = 0  # packets encoded: one per 40 ms with anyone listening
        self.delivered = 0  # packets handed to outputs (one per output per packet)
        self._opus = OpusEncoder(OUT_RATE, frame_ms=round(AUDIO_PTIME * 1000))

    def due_time(self, index: int) -> float:
        return index * AUDIO_PTIME + self.delay_s

    def subscribe(self) -> Subscription[av.Packet]:
        return self._add("opus", self.queue_packets)

    async def run(self) -> None:
        idx = 0
        try:
            while not self._stopped:
                now = self.clock.now()
                if now > self.due_time(idx) + CATCH_UP_S:
                    idx = max(idx, int((now - self.delay_s) / AUDIO_PTIME))
                await self.clock.sleep_until(self.due_time(idx))
                samples = self.timeline.read_out(idx * AUDIO_PTIME, AUDIO_SAMPLES)
                self.send_lag_ms.append((self.clock.now() - self.due_time(idx)) * 1000)
                rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) / 32768 + 1e-9
                self.level.append(20 * np.log10(rms))
                if self._subs:  # nobody listening: nothing to encode
                    packets = self._opus.encode(samples, idx * AUDIO_SAMPLES)
                    self.encoded += 1
                    for sub in list(self._subs):
                        for packet in packets:
                            sub.put(packet)
                            self.delivered += 1
                idx += 1
        finally:
            self.stop()


class EncodedAudioTrack(MediaStreamTrack):
    """A WebRTC peer's voice: the session's Opus packets (aiortc only packetizes them).

    It subscribes on its first ``recv``, when its sender starts, so a peer that is
    still connecting holds no backlog to burst out once it is connected.
    """

    kind = "audio"

    def __init__(self, out: AudioOut) -> None:
        super().__init__()
        self.out = out
        self.sub: Subscription[av.Packet] | None = None

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if self.sub is None:
            self.sub = self.out.subscribe()
        packet = await self.sub.get()
        if packet is None:
            self.stop()
            raise MediaStreamError
        return packet

    def stop(self) -> None:
        if self.sub is not None:
            self.out.unsubscribe(self.sub)
        super().stop()
