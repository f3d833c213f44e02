"""The media boundary: outgoing video and voice as aiortc ``MediaStreamTrack``s.

Both tracks stamp pts from the session clock and release each frame at
``pts + delay`` (the playout delay), so lips and sound leave together. They
never wait for a producer: video holds the last frame, audio reads silence.
"""

from __future__ import annotations

import fractions
import logging
from collections import deque
from dataclasses import dataclass, field

import av
import cv2
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from realtime.clock import Clock
from realtime.playout import Playout
from realtime.timeline import OUT_RATE, AudioTimeline

log = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000
AUDIO_PTIME = 0.02
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

    def fps(self, now: float) -> float:
        return float(sum(1 for t in self.sent_at if t > now - 1.0))

    def latency_percentile_ms(self, q: float) -> float | None:
        """Audio arrival to frame hand-off to the encoder, over recent frames."""
        return float(np.percentile(self.latency_ms, q)) if self.latency_ms else None


class AvatarVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, playout: Playout, clock: Clock, timeline: AudioTimeline,
                 idle: np.ndarray, banner: str | None = None) -> None:
        super().__init__()
        self.playout = playout
        self.clock = clock
        self.timeline = timeline
        self.idle = idle
        self.banner = banner
        self.stats = VideoTrackStats()

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        p = self.playout
        idx = p.next_index
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
        vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
        vf.pts = round(idx * VIDEO_CLOCK / p.fps)
        vf.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return vf


class AvatarAudioTrack(MediaStreamTrack):
    """The avatar's voice: the session timeline, delayed by the video latency."""

    kind = "audio"

    def __init__(self, timeline: AudioTimeline, clock: Clock, delay_s: float) -> None:
        super().__init__()
        self.timeline = timeline
        self.clock = clock
        self.delay_s = delay_s
        self.next_index = 0
        self.send_lag_ms: deque[float] = deque(maxlen=250)
        self.level: deque[float] = deque(maxlen=50)  # RMS of recent frames (dBFS)

    def due_time(self, index: int) -> float:
        return index * AUDIO_PTIME + self.delay_s

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        idx = self.next_index
        now = self.clock.now()
        if now > self.due_time(idx) + CATCH_UP_S:
            idx = max(idx, int((now - self.delay_s) / AUDIO_PTIME))
        await self.clock.sleep_until(self.due_time(idx))
        samples = self.timeline.read_out(idx * AUDIO_PTIME, AUDIO_SAMPLES)
        self.next_index = idx + 1
        self.send_lag_ms.append((self.clock.now() - self.due_time(idx)) * 1000)
        rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) / 32768 + 1e-9
        self.level.append(20 * np.log10(rms))
        frame = av.AudioFrame(format="s16", layout="mono", samples=AUDIO_SAMPLES)
        frame.planes[0].update(samples.tobytes())
        frame.sample_rate = OUT_RATE
        frame.pts = idx * AUDIO_SAMPLES
        frame.time_base = fractions.Fraction(1, OUT_RATE)
        return frame
