"""Ingest: the host's microphone from WebRTC onto the session's audio timeline.

Decodes (aiortc already gives PCM frames), resamples to 16 kHz for analysis
and 48 kHz mono for the way back, runs voice activity, and places each chunk
on the session clock by its arrival time (audio is the master clock).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError

from engines.base import AUDIO_RATE
from realtime.clock import Clock
from realtime.timeline import OUT_RATE, AudioTimeline
from realtime.vad import VoiceActivity

log = logging.getLogger(__name__)

RESYNC_S = 0.06  # placement this far behind arrival restarts at the arrival (gap/stall)
AHEAD_S = 0.03  # placement may run this far ahead of arrival (jitter) before it is clamped


class MicIngest:
    def __init__(self, timeline: AudioTimeline, clock: Clock,
                 on_audio: Callable[[], None], session_id: str = "") -> None:
        self.timeline = timeline
        self.clock = clock
        self.on_audio = on_audio
        self.session_id = session_id
        self._head: float | None = None
        self._vad = VoiceActivity()
        self._to16 = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        self._to48 = av.AudioResampler(format="s16", layout="mono", rate=OUT_RATE)
        self.chunks = 0
        self.bad_frames = 0

    def place(self, duration: float, arrived: float) -> float:
        """Session pts of a chunk that ends about on arrival; keeps chunks contiguous.

        Network jitter moves arrivals by a few ms either way: chunks stay back to
        back unless placement would run more than ``AHEAD_S`` ahead of arrival (a
        burst, or a sender clock running fast: clamp) or ``RESYNC_S`` behind it
        (a gap or stall: restart at the arrival time).
        """
        ideal = arrived - duration
        if self._head is None or self._head < ideal - RESYNC_S:
            start = ideal
        else:
            start = min(self._head, ideal + AHEAD_S)
        self._head = start + duration
        return start

    def push(self, ana: np.ndarray, out: np.ndarray, voice: float, arrived: float) -> float:
        """Put one decoded chunk on the timeline; returns its start pts."""
        start = self.place(len(ana) / AUDIO_RATE, arrived)
        self.timeline.write_mic(start, ana, out, voice, arrived)
        self.chunks += 1
        self.on_audio()
        return start

    def decode(self, frame: Any) -> tuple[np.ndarray, np.ndarray, float]:
        """Blocking: resample one frame and run voice activity (in an executor)."""
        ana = np.concatenate([f.to_ndarray().reshape(-1) for f in self._to16.resample(frame)]
                             or [np.zeros(0, np.float32)])
        out = np.concatenate([f.to_ndarray().reshape(-1) for f in self._to48.resample(frame)]
                             or [np.zeros(0, np.int16)])
        ana = np.nan_to_num(np.clip(ana, -1.0, 1.0)).astype(np.float32)
        probs = self._vad.feed(ana)
        voice = max(probs) if probs else self._vad.last
        return ana, out.astype(np.int16), voice

    async def run(self, track: Any) -> None:
        """Read the remote audio track until it ends."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                log.info("[%s] microphone track ended", self.session_id)
                return
            arrived = self.clock.now()
            try:
                ana, out, voice = await loop.run_in_executor(None, self.decode, frame)
            except (ValueError, av.error.FFmpegError) as exc:  # garbage in: skip the frame
                self.bad_frames += 1
                log.warning("[%s] dropped an undecodable audio frame: %s", self.session_id, exc)
                continue
            if len(ana):
                self.push(ana, out, voice, arrived)
