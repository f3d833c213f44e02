"""The muxer of one RTMP(S) connection, in a process of its own (started by ``realtime.egress``).

It reads a ``MuxSpec`` as one JSON line on stdin, then frame records (index,
RGB, int16 voice), encodes them (libx264 at the spec's bitrate with a
keyframe every ``gop_s``, AAC at the session's 48 kHz) and muxes them into FLV on the
connection. It reports on stdout, one JSON object a line: ``{"live": true}``
once the server took the first frame, ``{"bytes": n}`` for every frame
written, and ``{"error": "..."}`` before it exits 1 when the connection fails.
At the end of its stdin it flushes the encoders, writes the FLV trailer and
exits 0.

The voice is continuous: where frames were dropped (their indices skipped),
silence fills their span, so the audio timestamps stay those of the frame
indices. AAC takes frames of 1024 samples, stamped by sample count.
"""

from __future__ import annotations

import fractions
import json
import struct
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO

import av
import cv2
import numpy as np

AAC_FRAME = 1024
RECORD_HEAD = struct.Struct("<q")  # a frame record: its index, then RGB bytes, then int16 voice


@dataclass(slots=True, frozen=True)
class MuxSpec:
    """What the muxer is told first (one JSON line on its stdin)."""

    url: str
    fps: int
    width: int
    height: int
    samples_per_frame: int
    sample_rate: int
    video_bitrate: int
    audio_bitrate: int
    gop_s: float
    preset: str

    @property
    def record_bytes(self) -> int:
        return RECORD_HEAD.size + self.width * self.height * 3 + self.samples_per_frame * 2


def report(**message: Any) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def mux(spec: MuxSpec, records: BinaryIO) -> None:
    container: Any = av.open(spec.url, "w", format="flv")
    try:
        video = container.add_stream("libx264", rate=spec.fps)
        gop = max(1, round(spec.gop_s * spec.fps))
        video.options = {"preset": spec.preset, "tune": "zerolatency",
                         "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0"}
        video.width, video.height = spec.width, spec.height
        video.pix_fmt = "yuv420p"
        video.bit_rate = spec.video_bitrate
        video.codec_context.time_base = fractions.Fraction(1, spec.fps)
        audio = container.add_stream("aac", rate=spec.sample_rate)
        audio.layout = "mono"
        audio.bit_rate = spec.audio_bitrate
        rgb_bytes = spec.width * spec.height * 3
        pending = np.zeros(0, np.int16)
        voiced = 0  # samples handed to the AAC encoder so far
        base: int | None = None
        last = -1
        live = False
        while (record := read_exactly(records, spec.record_bytes)) is not None:
            (index,) = RECORD_HEAD.unpack_from(record)
            if base is None:
                base = index
            k = index - base
            if k <= last:
                continue
            body = record[RECORD_HEAD.size:]
            rgb = np.frombuffer(body[:rgb_bytes], np.uint8).reshape(spec.height, spec.width, 3)
            voice = np.frombuffer(body[rgb_bytes:], np.int16)
            frame = av.VideoFrame.from_ndarray(
                np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420), np.uint8), format="yuv420p")
            frame.pts = k
            frame.time_base = fractions.Fraction(1, spec.fps)
            gap = (k - last - 1) * spec.samples_per_frame
            pending = np.concatenate([pending, np.zeros(gap, np.int16), voice])
            last = k
            packets = list(video.encode(frame))
            while len(pending) >= AAC_FRAME:
                sound = av.AudioFrame.from_ndarray(np.ascontiguousarray(pending[None, :AAC_FRAME]),
                                                   format="s16", layout="mono")
                sound.sample_rate = spec.sample_rate
                sound.pts = voiced
                sound.time_base = fractions.Fraction(1, spec.sample_rate)
                packets += audio.encode(sound)
                pending = pending[AAC_FRAME:]
                voiced += AAC_FRAME
            container.mux(packets)  # the first one connects
            if not live:
                live = True
                report(live=True)
            report(bytes=sum(p.size for p in packets))
        for stream in (video, audio):  # what the encoders hold back, then the trailer
            container.mux(list(stream.encode(None)))
    finally:
        container.close()


def main() -> int:
    av.logging.set_level(av.logging.ERROR)
    cv2.setNumThreads(1)
    line = sys.stdin.buffer.readline()
    if not line:
        return 2
    spec = MuxSpec(**json.loads(line))
    try:
        mux(spec, sys.stdin.buffer)
    except Exception as exc:  # the server refused or went away: say why, the parent reconnects
        report(error=f"{type(exc).__name__}: {exc}".replace(spec.url, "the stream URL"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
