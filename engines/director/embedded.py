"""The embedded director: co-reasoning experts on packaged models, no LLM, deterministic.

For one window:

1. perception: the reference photo (face mesh, cached per avatar), the
   instructions (cached), the window's audio (prosody) and its words (the Say
   text with its time span, else a Whisper transcript of the audio);
2. shots: the window is cut at speech/silence boundaries (at most three
   shots, none shorter than ``MIN_SHOT_S``);
3. per shot, the experts exchange proposals for up to ``max_rounds`` rounds,
   stopping early once nobody changes their mind; the last round is merged by
   priority, then the negative director's limits (and what the portrait
   allows) are applied, and the shot gets its prompts and a rationale.

A two-person avatar gets shots for each character (``Shot.character``), each
from its own speech: where one is silent while the other speaks, its shot is
a listener's (eyes on the speaker, small motion, mouth closed).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from engines.base import AUDIO_RATE
from engines.director.base import Director, PlanRequest
from engines.director.experts import (
    AudioExpert,
    Evidence,
    NegativeDirector,
    TextExpert,
    VisualExpert,
    VisualFacts,
    analyse_portrait,
)
from engines.director.instructions import Directives, read_instructions
from engines.director.language import read_line
from engines.director.models import Segment, transcriber
from engines.director.prosody import measure
from engines.director.protocol import Limits, Proposal, Round, apply_limits, merge
from engines.shared import SharedModel
from engines.storyline import EmotionLabel, GazeTarget, Shot, Window

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_SHOT_S = 0.5
LIVE_EVERY_S = 1.5  # a new live transcript once this much new audio has arrived
LIVE_STALE_S = 6.0  # words older than this no longer speak for what comes next
MAX_SHOTS = 3
MAX_INTENSITY_STEP = 0.4  # per shot, unless the emotion changes
LISTEN_SHARE = 0.3  # a silent shot is a listener's when another character speaks this much of it


@dataclass(slots=True)
class Exchange:
    """The rounds the experts went through for one shot (for inspection and tests)."""

    start: float
    end: float
    rounds: list[Round]
    conflicts: list[str]
    limits: list[str]


LIVE_DUTY = 0.25  # live transcription may use at most this share of one core, all sessions of a process


def _lowest_priority() -> None:
    """This thread (not the process) at nice 19, where the OS allows it (Linux: per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError) as exc:
        log.debug("live transcription keeps its priority: %s", exc)


class _TranscriptionBudget:
    """One thread for live transcripts, with a duty cycle: after a job of ``d`` seconds
    the next one waits until ``d / LIVE_DUTY`` seconds after the first began. Each
    session has at most one job queued, so the queue is short; the renderers keep
    their cores whatever the number of talking sessions."""

    def __init__(self) -> None:
        # the thread runs at the lowest CPU priority: transcripts use what the stream leaves
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="transcribe", initializer=_lowest_priority)
        self.next_start = 0.0  # only the pool's one thread reads and writes it
        # the process owner may lower it (a server with several session processes shares one
        # machine-wide budget among them)
        self.duty = LIVE_DUTY

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        def run() -> T:
            time.sleep(max(0.0, self.next_start - time.monotonic()))
            t0 = time.monotonic()
            try:
                return fn()
            finally:
                self.next_start = t0 + (time.monotonic() - t0) / self.duty

        return self.pool.submit(run)


TRANSCRIPTION_BUDGET = SharedModel("live transcription budget", _TranscriptionBudget)


def previous_shot(history: list[Window], start: float, character: int = 0) -> Shot | None:
    """``character``'s latest planned shot that ends by ``start`` (what the next one eases from)."""
    best: Shot | None = None
    for w in history:
        for s in w.shots:
            if s.character != character:
                continue
            if s.end <= start + 1e-6 and (best is None or s.end > best.end):
                best = s
    return best


def _sentences(text: str) -> list[tuple[int, int, str]]:
    out = []
    for m in re.finditer(r"[^.!?]+[.!?]*", text):
        s = m.group(0).strip()
        if s:
            out.append((m.start(), m.end(), s))
    return out or [(0, len(text), text)]


class _LRU(Generic[T]):
    """A small thread-safe cache: the value for a key, made once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.items: OrderedDict[str, T] = OrderedDict()

    def get_or(self, key: str, make: Callable[[], T]) -> T:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


class EmbeddedDirector(Director):
    """Co-reasoning director on packaged models (the default)."""

    name = "embedded"

    def __init__(self, *, max_rounds: int = 3, transcribe: bool = True) -> None:
        if not 1 <= max_rounds <= 6:
            raise ValueError(f"max_rounds must be 1..6, got {max_rounds}")
        self.max_rounds = max_rounds
        self.transcribe = transcribe
        self.audio = AudioExpert()
        self.visual = VisualExpert()
        self.text = TextExpert()
        self.negative = NegativeDirector()
        self._visuals: _LRU[VisualFacts | None] = _LRU(16)
        self._directives: _LRU[Directives] = _LRU(64)
        self._transcripts: _LRU[list[Segment]] = _LRU(64)
        self.exchanges: list[Exchange] = []  # the latest windows' exchanges, newest last
        # the latest live transcript: text, words span, audio end; and whose speech it was
        self._live: tuple[str, float, float, float] | None = None
        self._live_character = 0
        self._live_job: Future[tuple[str, float, float, float]] | None = None

    async def plan_window(self, request: PlanRequest) -> Window:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.plan_sync, request)

    async def warm_up(self, avatar_image: np.ndarray | None, avatar_id: str = "") -> None:
        loop = asyncio.get_running_loop()
        if self.transcribe:
            await loop.run_in_executor(None, transcriber)
        await super().warm_up(avatar_image, avatar_id)

    # --- perception ----------------------------------------------------------------
    def visual_facts(self, request: PlanRequest) -> VisualFacts | None:
        image = request.avatar_image
        if image is None:
            return None
        key = request.avatar_id or hashlib.sha1(image.tobytes()).hexdigest()

        def make() -> VisualFacts | None:
            try:
                return analyse_portrait(image)
            except ValueError as exc:
                log.warning("[%s] visual expert: %s", request.session_id, exc)
                return None

        return self._visuals.get_or(key, make)

    def directives(self, instructions: list[str]) -> Directives:
        key = "\x00".join(instructions)
        return self._directives.get_or(key, lambda: read_instructions(instructions))

    def transcript(self, audio: np.ndarray, offset: float) -> tuple[str, float, float]:
        """Words of the audio and the pts span they were spoken in ('' if none)."""
        if not self.transcribe or len(audio) == 0:
            return "", offset, offset
        key = hashlib.sha1(audio.tobytes()).hexdigest()
        segs = self._transcripts.get_or(key, lambda: transcriber().transcribe(audio))
        if not segs:
            return "", offset, offset
        text = " ".join(s.text for s in segs)
        return text, offset + segs[0].start, offset + segs[-1].end

    def live_transcript(self, audio: np.ndarray, offset: float, character: int = 0
                        ) -> tuple[str, float, float]:
        """The latest finished transcript of live audio; starts the next one in the background.

        Whisper encodes 30 s whatever the length (~0.5 s of a core here), so live
        audio is transcribed off the planning path, at most one job per session
        at a time, on one process-wide thread with a duty cycle (``LIVE_DUTY``):
        planning stays in milliseconds and transcripts never crowd the renderers.
        Live audio is one character's at a time (the microphone's): a transcript
        of another character's speech is not reused for this one.
        """
        if character != self._live_character:
            self._live, self._live_character = None, character
        job = self._live_job
        if job is not None and job.done():
            self._live_job = None
            try:
                self._live = job.result()
            except Exception as exc:  # a failed transcript only costs this window its words
                log.warning("live transcript failed: %s: %s", type(exc).__name__, exc)
        end = offset + len(audio) / AUDIO_RATE
        if self._live_job is None and (self._live is None or end - self._live[3] >= LIVE_EVERY_S):
            heard = audio.copy()
            self._live_job = TRANSCRIPTION_BUDGET.get().submit(
                lambda: self._transcribe_live(heard, offset, end))
        if self._live is not None and end - self._live[3] <= LIVE_STALE_S:
            return self._live[:3]
        return "", offset, offset

    @property
    def live_job(self) -> Future[tuple[str, float, float, float]] | None:
        """The live transcription in progress, if any."""
        return self._live_job

    def _transcribe_live(self, audio: np.ndarray, offset: float, end: float
                         ) -> tuple[str, float, float, float]:
        text, w0, w1 = self.transcript(audio, offset)
        return text, w0, w1, end

    # --- planning --------------------------------------------------------------------
    def plan_sync(self, req: PlanRequest) -> Window:
        shots: list[Shot] = []
        for c, evidence in enumerate(self.perceive_cast(req)):
            shots += self.plan_character(req, c, evidence)
        return Window(start=req.start, end=req.end, shots=shots)

    def plan_character(self, req: PlanRequest, character: int, evidence: list[Evidence]
                       ) -> list[Shot]:
        """One character's shots of the window, from its evidence (see ``perceive_cast``)."""
        shots: list[Shot] = []
        prev = previous_shot(req.history, req.start, character)
        for ev in evidence:
            board, rounds = self.debate(ev)
            shot = self.finish(ev, prev, board, rounds)
            shots.append(shot)
            prev = shot
        return shots

    def perceive_cast(self, req: PlanRequest) -> list[list[Evidence]]:
        """Every character's evidence for the window; silent shots while another
        character speaks are marked as listening to them."""
        if req.characters <= 1:
            return [self.perceive(req)]
        cast = [self.perceive(req.of(c)) for c in range(req.characters)]
        for c, evidence in enumerate(cast):
            for ev in evidence:
                if ev.speaking:
                    continue
                heard = [(sum(max(0.0, min(ev.end, o.end) - max(ev.start, o.start))
                              for o in cast[other] if o.speaking), other)
                         for other in range(len(cast)) if other != c]
                share, speaker = max(heard)
                if share >= LISTEN_SHARE * (ev.end - ev.start):
                    ev.listening_to = speaker
        return cast

    def perceive(self, req: PlanRequest) -> list[Evidence]:
        """The window cut into shots, with what every expert may read about each
        (``req.character``'s speech)."""
        start, end = req.start, req.end
        visual = self.visual_facts(req)
        directives = self.directives(req.instructions)
        n_window = round((end - start) * AUDIO_RATE)
        own_audio = len(req.audio) >= 0.9 * n_window and n_window > 0
        if own_audio:
            audio, offset = req.audio, start
        elif len(req.recent_audio):
            audio, offset = req.recent_audio, req.recent_start
        else:
            audio, offset = np.zeros(0, np.float32), start
        prosody = measure(audio)
        utterances = [(a, b, t) for a, b, t in req.utterances if a < end and b > start]
        if not utterances and req.text:
            utterances = [(start, end, req.text)]
        # speaking spans inside the window
        spans: list[tuple[float, float]] = []
        if utterances:
            spans = [(max(a, start), min(b, end)) for a, b, _ in utterances]
        elif own_audio:
            spans = [(start + a, start + b) for a, b in prosody.speech_spans]
        elif prosody.has_speech and prosody.speech_spans:
            # planned ahead of live audio: speech that went on until now probably goes on
            last_end = offset + prosody.speech_spans[-1][1]
            if offset + prosody.duration_s - last_end < 0.6:
                spans = [(start, end)]
        segments = self._segments(start, end, spans)
        text_src = "say" if utterances else "none"
        words_span = (start, end)
        transcript = ""
        if utterances:
            transcript = " ".join(t for _, _, t in utterances)
            words_span = (utterances[0][0], utterances[-1][1])
        elif prosody.has_speech:
            if own_audio:
                transcript, w0, w1 = self.transcript(audio, offset)
            else:  # planning ahead of live audio: the latest transcript, never waiting for one
                transcript, w0, w1 = self.live_transcript(audio, offset, req.character)
            if transcript:
                text_src, words_span = "whisper", (w0, w1)
        out: list[Evidence] = []
        for s0, s1, speaking in segments:
            words = self._words_for(transcript, words_span, s0, s1) if speaking else ""
            out.append(Evidence(
                start=s0, end=s1, speaking=speaking, transcript=words, transcript_source=text_src,
                reading=read_line(words) if words else None,
                prosody=prosody if speaking or not prosody.has_speech else None,
                prosody_offset=offset, words_start=words_span[0], words_end=words_span[1],
                visual=visual, directives=directives, history=req.history, character=req.character,
            ))
        return out

    @staticmethod
    def _segments(start: float, end: float, spans: list[tuple[float, float]]
                  ) -> list[tuple[float, float, bool]]:
        """The window cut into speaking / silent parts, none shorter than MIN_SHOT_S."""
        marks: list[tuple[float, float, bool]] = []
        t = start
        for a, b in sorted(spans):
            a, b = max(a, start), min(b, end)
            if b <= a:
                continue
            if a > t:
                marks.append((t, a, False))
            marks.append((max(a, t), b, True))
            t = max(t, b)
        if t < end:
            marks.append((t, end, False))
        merged: list[tuple[float, float, bool]] = []
        for a, b, sp in marks:
            if merged and (merged[-1][2] == sp or b - a < MIN_SHOT_S):
                pa, _, psp = merged[-1]
                merged[-1] = (pa, b, psp or sp)
            else:
                merged.append((a, b, sp))
        if len(merged) > 1 and merged[0][1] - merged[0][0] < MIN_SHOT_S:
            a, _, sp = merged.pop(0)
            b0, b1, bsp = merged[0]
            merged[0] = (a, b1, sp or bsp)
        while len(merged) > MAX_SHOTS:
            (a, _, s1), (_, b, s2) = merged[-2], merged[-1]
            merged[-2:] = [(a, b, s1 or s2)]
        return merged or [(start, end, False)]

    @staticmethod
    def _words_for(text: str, span: tuple[float, float], s0: float, s1: float) -> str:
        """The sentences of ``text`` spoken between two pts (spread evenly over ``span``)."""
        if not text:
            return ""
        a, b = span
        dur = max(b - a, 1e-6)
        n = len(text)
        out = []
        for c0, c1, sent in _sentences(text):
            t0, t1 = a + dur * c0 / n, a + dur * c1 / n
            if t0 < s1 and t1 > s0:
                out.append(sent)
        return " ".join(out) or text

    def debate(self, ev: Evidence) -> tuple[list[Proposal], list[Round]]:
        """Rounds of proposals until nobody changes their mind (or ``max_rounds``)."""
        experts = (self.audio, self.visual, self.text)
        board: list[Proposal] = []
        rounds: list[Round] = []
        for r in range(self.max_rounds):
            posts = [x.propose(ev, board) for x in experts]
            rounds.append(Round(index=r, proposals=posts))
            converged = bool(board) and [p.opinion() for p in posts] == [p.opinion() for p in board]
            board = posts
            if converged:
                break
        return board, rounds

    def finish(self, ev: Evidence, prev: Shot | None, board: list[Proposal], rounds: list[Round],
               extra: Limits | None = None) -> Shot:
        """Merge by priority, smooth against the previous shot, apply the limits."""
        shot, conflicts = merge(board, ev.start, ev.end)
        shot = self._smooth(shot, prev)
        limits = self.negative.limits(ev, shot.emotion.label).tighten(self.visual.limits(ev))
        if extra is not None:
            limits = limits.tighten(extra)
        shot, changed = apply_limits(shot, limits)
        terms = [t for p in board for t in p.prompt_terms]
        shot = shot.model_copy(update={
            "character": ev.character,
            "prompt": compose_prompt(shot, ev.speaking, terms, ev.listening_to is not None),
            "rationale": self._rationale(shot, board, conflicts, changed, ev)[:500],
        })
        self.exchanges.append(Exchange(ev.start, ev.end, rounds, conflicts, changed + limits.reasons))
        del self.exchanges[:-32]
        return shot

    @staticmethod
    def _smooth(shot: Shot, prev: Shot | None) -> Shot:
        """No pops: the same emotion changes intensity by at most a step per shot."""
        if prev is None or prev.emotion.label != shot.emotion.label:
            return shot
        k, pk = shot.emotion.intensity, prev.emotion.intensity
        if abs(k - pk) <= MAX_INTENSITY_STEP:
            return shot
        k = pk + MAX_INTENSITY_STEP * (1 if k > pk else -1)
        return shot.model_copy(update={"emotion": shot.emotion.model_copy(update={"intensity": k})})

    @staticmethod
    def _rationale(shot: Shot, board: list[Proposal], conflicts: list[str], changed: list[str],
                   ev: Evidence) -> str:
        parts = [f"{shot.emotion.label.value} {shot.emotion.intensity:.2f}"]
        parts += [f"{p.expert}: {p.rationale}" for p in board if p.rationale]
        parts += conflicts
        parts += [f"limit: {c}" for c in changed]
        return "; ".join(parts)


def compose_prompt(shot: Shot, speaking: bool, terms: list[str], listening: bool = False) -> str:
    """The positive prompt for generative engines, from the structured shot."""
    if speaking:
        who = "a person talking to the camera"
    elif listening:
        who = "a person listening to the other person speak, mouth closed"
    else:
        who = "a person listening quietly, mouth closed"
    parts = [who]
    if shot.emotion.label != EmotionLabel.neutral and shot.emotion.intensity > 0.05:
        k = shot.emotion.intensity
        adverb = "slightly " if k < 0.35 else "very " if k > 0.75 else ""
        parts.append(f"{adverb}{shot.emotion.label.value} expression")
    else:
        parts.append("calm neutral expression")
    if shot.gestures:
        parts.append(", ".join(sorted({f"{g.kind.value}s head" for g in shot.gestures})))
    if shot.head_motion < 0.1:
        parts.append("head perfectly still")
    elif shot.head_motion > 0.7:
        parts.append("lively head motion")
    parts.append({GazeTarget.camera: "looking at the camera", GazeTarget.away: "looking away",
                  GazeTarget.down: "looking down",
                  GazeTarget.speaker: "looking at the person speaking"}[shot.gaze])
    parts += terms
    return ", ".join(dict.fromkeys(parts))[:2000]

