"""Speech known in full: Say text (Piper TTS) and uploaded audio, onto the session timeline.

Both are placed right after what is already queued (or now, plus a little
lead), and each piece is announced downstream as ``SpeechQueued`` to the
planner (which plans the whole utterance from its words) and to the
scheduler (which redoes what it had rendered there as idle). New speech
replaces the speech still being prepared; what is already queued plays.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import numpy as np

from engines.base import PhonemeEvent
from realtime.clock import Clock
from realtime.events import Inbox, PlannerEvent, SchedulerEvent, SpeechQueued
from realtime.tasks import TaskOwner
from realtime.timeline import AudioTimeline
from realtime.tts import synthesize

log = logging.getLogger(__name__)

TTS_LEAD_S = 0.05  # speech starts this far after now, so its first frames can be rendered in time


class SpeechInput:
    def __init__(self, timeline: AudioTimeline, clock: Clock, fps: int, tasks: TaskOwner, *,
                 planner: Inbox[PlannerEvent], scheduler: Inbox[SchedulerEvent],
                 session_id: str = "") -> None:
        self.timeline = timeline
        self.clock = clock
        self.fps = fps
        self.tasks = tasks
        self.planner = planner
        self.scheduler = scheduler
        self.session_id = session_id
        self._job: asyncio.Task[None] | None = None
        self.utterances = 0

    # --- control ---------------------------------------------------------------------
    def say(self, text: str) -> None:
        """Say ``text`` (already checked) with the packaged voice, next."""
        self._replace(self._speak(text), "tts")

    def play(self, ana: np.ndarray, out: np.ndarray) -> None:
        """Uploaded speech (16 kHz float32 and 48 kHz int16, mono): spoken next."""
        self._replace(self._play(ana, out), "upload")

    def stop(self) -> bool:
        """Stop preparing speech (an interrupt); True if something was being prepared."""
        if self._job is not None and not self._job.done():
            self._job.cancel()
            return True
        return False

    @property
    def preparing(self) -> bool:
        return self._job is not None and not self._job.done()

    def _replace(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self.stop()
        self._job = self.tasks.spawn(coro, name)

    # --- onto the timeline -------------------------------------------------------------
    def queue(self, ana: np.ndarray, out: np.ndarray, phonemes: list[PhonemeEvent],
              spans: list[tuple[float, float, str]] | None = None) -> tuple[float, float]:
        """Speech on the timeline, now (plus a little lead) or right after what is queued.

        ``phonemes`` and the ``spans`` of its words (start, end, text) are relative
        to the speech's start. Returns its pts span and announces it downstream.
        """
        now = self.clock.now()
        t0 = round(max(now + TTS_LEAD_S, self.timeline.tts_until) * self.fps) / self.fps
        placed = [PhonemeEvent(p.phoneme, t0 + p.start, t0 + p.end) for p in phonemes]
        t1 = self.timeline.write_tts(t0, ana, out, placed, now)
        words = tuple((t0 + a, t0 + b, text) for a, b, text in (spans or []))
        event = SpeechQueued(t0, t1, words)
        self.scheduler.post(event)
        self.planner.post(event)
        self.utterances += 1
        return t0, t1

    async def _speak(self, text: str) -> None:
        loop = asyncio.get_running_loop()
        chunks = synthesize(text)
        while True:
            chunk = await loop.run_in_executor(None, next, chunks, None)
            if chunk is None:
                break
            self.queue(chunk.ana, chunk.out, chunk.phonemes, [(0.0, chunk.duration, chunk.text or text)])
        log.info("[%s] said %d characters", self.session_id, len(text))

    async def _play(self, ana: np.ndarray, out: np.ndarray) -> None:
        from engines.director.models import transcriber

        loop = asyncio.get_running_loop()
        # the words first (about a second): the whole utterance is then planned ahead
        try:
            segments = await loop.run_in_executor(None, lambda: transcriber().transcribe(ana))
        except Exception as exc:  # no words: the director still has the prosody
            log.warning("[%s] upload transcript failed: %s: %s", self.session_id, type(exc).__name__, exc)
            segments = []
        t0, t1 = self.queue(ana, out, [], [(s.start, s.end, s.text) for s in segments])
        log.info("[%s] playing %.1f s of uploaded speech (%d words)", self.session_id, t1 - t0,
                 sum(len(s.text.split()) for s in segments))
