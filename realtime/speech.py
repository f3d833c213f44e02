"""Speech known in full: Say text (Piper TTS) and uploaded audio, onto the session timeline.

Both are placed right after what is already queued for any character (or
now, plus a little lead): characters take turns. Each piece is announced
downstream as ``SpeechQueued`` to the planner (which plans the whole
utterance from its words) and to the scheduler (which redoes what it had
rendered there as idle). New speech for a character replaces that
character's speech still being prepared; what is already queued plays, and
a line for the other character waits until the one being prepared is queued.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from engines.base import PhonemeEvent
from realtime.clock import Clock
from realtime.events import Inbox, PlannerEvent, SchedulerEvent, SpeechQueued
from realtime.tasks import TaskOwner
from realtime.timeline import AudioTimeline
from realtime.tts import DEFAULT_VOICE, synthesize

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
        self._jobs: dict[int, asyncio.Task[None]] = {}  # speech being prepared, per character
        self._last: asyncio.Task[None] | None = None  # the latest job: the next one queues after it
        self.utterances = 0

    # --- control ---------------------------------------------------------------------
    def say(self, text: str, character: int = 0, voice: str = DEFAULT_VOICE) -> None:
        """``character`` says ``text`` (already checked) with a packaged ``voice``, next."""
        self._replace(character, lambda: self._speak(text, character, voice), "tts")

    def play(self, ana: np.ndarray, out: np.ndarray, character: int = 0) -> None:
        """Uploaded speech (16 kHz float32 and 48 kHz int16, mono): ``character`` says it next."""
        self._replace(character, lambda: self._play(ana, out, character), "upload")

    def stop(self) -> bool:
        """Stop preparing speech (an interrupt); True if something was being prepared."""
        stopped = False
        for job in self._jobs.values():
            if not job.done():
                job.cancel()
                stopped = True
        self._jobs.clear()
        return stopped

    @property
    def preparing(self) -> bool:
        return any(not job.done() for job in self._jobs.values())

    def _replace(self, character: int, make: Callable[[], Coroutine[Any, Any, None]],
                 name: str) -> None:
        job = self._jobs.pop(character, None)
        if job is not None and not job.done():
            job.cancel()
        before = self._last if self._last is not None and not self._last.done() else None
        self._last = self._jobs[character] = self.tasks.spawn(self._after(before, make), name)

    @staticmethod
    async def _after(before: asyncio.Task[None] | None,
                     make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Prepare speech once the line before it (another character's) is queued."""
        if before is not None:
            await asyncio.wait([before])  # never raises: a cancelled line ahead just lets this go
        await make()

    # --- onto the timeline -------------------------------------------------------------
    def queue(self, ana: np.ndarray, out: np.ndarray, phonemes: list[PhonemeEvent],
              spans: list[tuple[float, float, str]] | None = None,
              character: int = 0) -> tuple[float, float]:
        """``character``'s speech on the timeline, now (plus a little lead) or right after
        what is queued.

        ``phonemes`` and the ``spans`` of its words (start, end, text) are relative
        to the speech's start. Returns its pts span and announces it downstream.
        """
        now = self.clock.now()
        t0 = round(max(now + TTS_LEAD_S, self.timeline.tts_until) * self.fps) / self.fps
        placed = [PhonemeEvent(p.phoneme, t0 + p.start, t0 + p.end) for p in phonemes]
        t1 = self.timeline.write_tts(t0, ana, out, placed, now, character)
        words = tuple((t0 + a, t0 + b, text) for a, b, text in (spans or []))
        event = SpeechQueued(t0, t1, words, character)
        self.scheduler.post(event)
        self.planner.post(event)
        self.utterances += 1
        return t0, t1

    async def _speak(self, text: str, character: int, voice: str) -> None:
        loop = asyncio.get_running_loop()
        chunks = synthesize(text, voice)
        while True:
            chunk = await loop.run_in_executor(None, next, chunks, None)
            if chunk is None:
                break
            self.queue(chunk.ana, chunk.out, chunk.phonemes,
                       [(0.0, chunk.duration, chunk.text or text)], character)
        log.info("[%s] character %d said %d characters (voice %s)", self.session_id, character,
                 len(text), voice)

    async def _play(self, ana: np.ndarray, out: np.ndarray, character: int) -> None:
        from engines.director.models import transcriber

        loop = asyncio.get_running_loop()
        # the words first (about a second): the whole utterance is then planned ahead
        try:
            segments = await loop.run_in_executor(None, lambda: transcriber().transcribe(ana))
        except Exception as exc:  # no words: the director still has the prosody
            log.warning("[%s] upload transcript failed: %s: %s", self.session_id, type(exc).__name__, exc)
            segments = []
        t0, t1 = self.queue(ana, out, [], [(s.start, s.end, s.text) for s in segments], character)
        log.info("[%s] playing %.1f s of uploaded speech (%d words)", self.session_id, t1 - t0,
                 sum(len(s.text.split()) for s in segments))
