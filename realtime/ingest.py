"""Ingest: the host's microphone from WebRTC onto the session's audio timeline.

Decodes (aiortc already gives PCM frames), resamples to 16 kHz for analysis
and 48 kHz mono for the way back, runs voice activity, and places each chunk
on the session clock by its arrival time (audio is the master clock). The
host routes the microphone to one character at a time (``MicRouted`` events
in the ingest's inbox); each chunk goes to the character it was routed to at
its pts, split where the route changes.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError
from scipy.signal import firwin

from engines.base import AUDIO_RATE
from realtime.clock import Clock
from realtime.events import AudioArrived, Inbox, IngestEvent, MicRouted, SchedulerEvent
from realtime.timeline import OUT_RATE, AudioTimeline
from realtime.vad import VoiceActivity

log = logging.getLogger(__name__)

_LOWPASS = firwin(61, 7_200, fs=OUT_RATE)  # for 48 -> 16 kHz (Nyquist 8 kHz); delays 10 samples at 16 kHz
RESYNC_S = 0.06  # placement this far behind arrival restarts at the arrival (gap/stall)
AHEAD_S = 0.1  # placement this far ahead of arrival (a burst) re-syncs
SILENT_RESYNC_S = 0.005  # in silence, re-sync as soon as placement is this far ahead


class MicIngest:
    """The microphone onto the timeline; each chunk is announced downstream (``AudioArrived``)."""

    def __init__(self, timeline: AudioTimeline, clock: Clock,
                 out: Inbox[SchedulerEvent], session_id: str = "") -> None:
        self.timeline = timeline
        self.clock = clock
        self.out = out
        self.session_id = session_id
        self._head: float | None = None
        self._vad = VoiceActivity()
        self._to16 = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        self._lp_state = np.zeros(len(_LOWPASS) - 1)
        self._phase = 0
        self._to48 = av.AudioResampler(format="s16", layout="mono", rate=OUT_RATE)
        self.inbox: Inbox[IngestEvent] = Inbox()
        self._routes: list[MicRouted] = []  # route changes not yet reached by placed audio
        self.chunks = 0
        self.bad_frames = 0
        self.lag_ms: deque[float] = deque(maxlen=200)  # arrival minus placed end

    def place(self, duration: float, arrived: float, voice: float) -> float:
        """Session pts of a chunk that ends about on arrival; keeps chunks contiguous.

        Network jitter moves arrivals by a few ms either way, so chunks stay back
        to back. Placement re-syncs to the arrival time when it has fallen more
        than ``RESYNC_S`` behind (a gap or stall; the gap reads as silence), when
        it runs more than ``AHEAD_S`` ahead (a burst), or when it is a little
        ahead during silence, where skipping a few ms of audio is inaudible: so
        a burst at start-up does not add latency for the rest of the session.
        """
        ideal = arrived - duration
        head = self._head
        if head is None or head < ideal - RESYNC_S or head > ideal + AHEAD_S:
            start = ideal
        elif head > ideal + SILENT_RESYNC_S and voice < 0.2:
            start = ideal
        else:
            start = head
        self._head = start + duration
        return start

    def push(self, ana: np.ndarray, out: np.ndarray, voice: float, arrived: float) -> float:
        """Put one decoded chunk on the timeline; returns its start pts."""
        for event in self.inbox.drain():
            self._routes.append(event)
            self._routes.sort(key=lambda r: r.from_pts)
        previous = self._head
        start = self.place(len(ana) / AUDIO_RATE, arrived, voice)
        if previous is not None and start > previous:  # a gap: it must read as silence
            gap = round((start - previous) * AUDIO_RATE)
            self._write(previous, np.zeros(gap, np.float32), np.zeros(gap * 3, np.int16), 0.0,
                        arrived)
        self.lag_ms.append((arrived - start - len(ana) / AUDIO_RATE) * 1000)
        self._write(start, ana, out, voice, arrived)
        self.chunks += 1
        self.out.post(AudioArrived(self.timeline.mic_head))
        return start

    def _write(self, t0: float, ana: np.ndarray, out: np.ndarray, voice: float,
               arrived: float) -> None:
        """A stretch of mic audio onto the timeline, each part as the character routed there."""
        t1 = t0 + len(ana) / AUDIO_RATE
        while self._routes and self._routes[0].from_pts < t1:
            route = self._routes.pop(0)
            cut = min(max(round((route.from_pts - t0) * AUDIO_RATE), 0), len(ana))
            if cut > 0:
                self.timeline.write_mic(t0, ana[:cut], out[:cut * 3], voice, arrived,
                                        self.timeline.mic_character)
                t0, ana, out = t0 + cut / AUDIO_RATE, ana[cut:], out[cut * 3:]
            self.timeline.mic_character = route.character
            log.info("[%s] microphone speaks for character %d from %.2f s", self.session_id,
                     route.character, route.from_pts)
        if len(ana):
            self.timeline.write_mic(t0, ana, out, voice, arrived, self.timeline.mic_character)

    def decode(self, frame: Any) -> tuple[np.ndarray, np.ndarray, float]:
        """Resample one frame and run voice activity (about 0.1 ms for 20 ms of audio).

        WebRTC's Opus decodes to 48 kHz s16: mixed to mono and decimated by three with
        a filter that keeps its state across frames (plain numpy and scipy, no per-frame
        resampler objects). Anything else goes through PyAV's resamplers.
        """
        if frame.sample_rate == OUT_RATE and frame.format.name == "s16" and not frame.format.is_planar:
            x = frame.to_ndarray().reshape(-1, len(frame.layout.channels))
            mono = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0].astype(np.float32)
            out = np.round(mono).astype(np.int16)
            ana = self._decimate(mono / 32768.0)
        else:
            ana = np.concatenate([f.to_ndarray().reshape(-1) for f in self._to16.resample(frame)]
                                 or [np.zeros(0, np.float32)])
            out = np.concatenate([f.to_ndarray().reshape(-1) for f in self._to48.resample(frame)]
                                 or [np.zeros(0, np.int16)]).astype(np.int16)
        ana = np.nan_to_num(np.clip(ana, -1.0, 1.0)).astype(np.float32)
        probs = self._vad.feed(ana)
        voice = max(probs) if probs else self._vad.last
        return ana, out, voice

    def _decimate(self, x: np.ndarray) -> np.ndarray:
        """48 kHz to 16 kHz, streaming: low-pass (state kept), then every third sample."""
        from scipy.signal import lfilter

        y, self._lp_state = lfilter(_LOWPASS, 1.0, x, zi=self._lp_state)
        y = y[self._phase::3]
        self._phase = (self._phase - len(x)) % 3
        return np.asarray(y, np.float32)

    async def run(self, track: Any) -> None:
        """Read the remote audio track until it ends."""
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                log.info("[%s] microphone track ended", self.session_id)
                return
            arrived = self.clock.now()
            try:
                # inline: resampling 20 ms and a voice-activity step take less than a thread hop
                ana, out, voice = self.decode(frame)
            except (ValueError, av.error.FFmpegError) as exc:  # garbage in: skip the frame
                self.bad_frames += 1
                log.warning("[%s] dropped an undecodable audio frame: %s", self.session_id, exc)
                continue
            if len(ana):
                self.push(ana, out, voice, arrived)


MAX_UPLOAD_SPEECH_S = 60.0


class AudioUploadError(ValueError):
    """Uploaded audio that cannot be played (with the HTTP status that says why)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, *, longest_s: float = MAX_UPLOAD_SPEECH_S) -> tuple[np.ndarray, np.ndarray]:
    """Blocking: an uploaded audio file (WAV, MP3, OGG, ...) as (16 kHz float32, 48 kHz int16), mono.

    ``AudioUploadError`` 415 when it is not audio PyAV can decode, 422 when it
    is too short, too long or not finite.
    """
    import io

    to48 = av.AudioResampler(format="flt", layout="mono", rate=OUT_RATE)
    chunks: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioUploadError(415, "the upload has no audio stream (send WAV, MP3, OGG or FLAC)")
            n = 0
            for frame in container.decode(container.streams.audio[0]):
                for f in to48.resample(frame):
                    chunks.append(f.to_ndarray().reshape(-1).astype(np.float32))
                    n += len(chunks[-1])
                if n > (longest_s + 1) * OUT_RATE:
                    raise AudioUploadError(422, f"audio is longer than {longest_s:.0f} s")
            for f in to48.resample(None):
                chunks.append(f.to_ndarray().reshape(-1).astype(np.float32))
    except AudioUploadError:
        raise
    except (av.FFmpegError, ValueError, IndexError, EOFError) as exc:
        raise AudioUploadError(415, f"not audio that can be decoded: {type(exc).__name__}: {exc}") from exc
    x48 = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    dur = len(x48) / OUT_RATE
    if dur < 0.2:
        raise AudioUploadError(422, f"audio is {dur:.2f} s long; send at least 0.2 s")
    if dur > longest_s:
        raise AudioUploadError(422, f"audio is {dur:.1f} s long; the limit is {longest_s:.0f} s")
    if not np.all(np.isfinite(x48)):
        raise AudioUploadError(422, "audio has samples that are not finite numbers")
    x48 = np.clip(x48, -1.0, 1.0)
    from scipy.signal import resample_poly

    ana = resample_poly(x48, AUDIO_RATE, OUT_RATE).astype(np.float32)
    out = np.round(x48 * 32767.0).astype(np.int16)
    return ana, out
