"""Offline render: a live session's pipeline on a fake clock, its video and voice written to an MP4.

``avatar render`` runs exactly what a live session runs (director, rolling
planner, cascade scheduler, engine, playout, the video output), built as a
``server.session.Session`` with no peer on a ``FakeClock``. Engine and
director work run inline (``InlineExecutor``), so they take no clock time and
the clock only moves when the renderer advances it, frame by frame. What a
peer would receive is taken by frame index: frame ``k`` from the session's
video output (an ``"rgb"`` subscription) and the voice at pts ``k / fps``
from the session timeline, the same timeline the live voice track reads, so
picture and sound are locked to one clock however long the input is.

Known speech enters as it does live: text through Piper as ``say`` speaks it,
an audio file decoded as a ``/speech`` upload is. The timeline holds 90 s, so
long speech is handed over in pieces (text in Say-sized pieces, audio cut at
its quietest frame near every ``AUDIO_PIECE_S``), each once the one before it
is queued and the queue is less than ``FEED_LEAD_S`` ahead of the clock:
pieces join back to back, on frame boundaries, exactly as one long utterance.

The file is H.264 (libx264, yuv420p, CRF, a keyframe every 2 s) and AAC
(FFmpeg's native encoder, 48 kHz mono) at the engine's frame rate, written to
a temporary file beside ``--out`` and renamed over it only once the trailer
is written: a failed render leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import math
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TextIO

import av
import numpy as np

from engines.base import AUDIO_RATE, Avatar, Engine
from engines.director.base import Director
from realtime.clock import FakeClock, InlineExecutor
from realtime.encoding import yuv420p_frame
from realtime.scheduler import SchedulerConfig
from realtime.speech import SpeechInput
from realtime.timeline import OUT_RATE
from realtime.tts import MAX_SAY_CHARS, clean_text, phrases
from server.host import playout_delay_s
from server.messages import Error, MessageError, OutMessage, Stats, parse_control
from server.session import Session, SessionSettings

log = logging.getLogger(__name__)

TAIL_S = 0.5  # the file goes on this long after the speech ends
CRF = 20  # libx264 constant quality: visually clean for a talking face, ~1 Mbit/s at 512x512
PRESET = "medium"
GOP_S = 2.0  # a keyframe every 2 s: seekable, and what streaming platforms ask for
AUDIO_BITRATE = 128_000  # AAC, mono
AAC_FRAME = 1024  # samples per frame of FFmpeg's native AAC encoder
STEP_S = 0.02  # the fake clock moves in steps this long: a silent sub-clip (due at its end plus
# the grace) renders a step before its frame is due
FEED_LEAD_S = 20.0  # the next piece of speech is handed over when the queue is less than this ahead
AUDIO_PIECE_S = 28.0  # uploaded audio is handed over in pieces about this long (one Whisper window)
QUIET_SEARCH_S = 4.0  # ... each cut at the quietest frame in its last few seconds
MAX_SPEECH_S = 3600.0  # the longest audio file a render takes
MAX_TEXT_CHARS = 200_000  # the longest text (about three hours of speech)
DIRECTOR_TIMEOUT_S = 60.0  # the director runs inline, in real time: its timeout must not decide the plan


class RenderError(Exception):
    """A render that cannot be done, with a message for the user (one line)."""


# --- a session on a fake clock --------------------------------------------------------------
def offline_settings(engine: Engine, *, subclip_frames: int = 1,
                     director_timeout_s: float = DIRECTOR_TIMEOUT_S) -> SessionSettings:
    """Session settings for a run whose engine work takes no clock time: the playout delay is
    what a sub-clip needs when its render is instant (as ``avatar serve`` sets it, less the render)."""
    clip_s = max(subclip_frames, engine.min_subclip_frames) / engine.fps
    return SessionSettings(delay_s=playout_delay_s(clip_s, 0.0),
                           scheduler=SchedulerConfig(subclip_frames=subclip_frames),
                           director_timeout_s=director_timeout_s)


class OfflineSession:
    """A started session with no peer, on a ``FakeClock``; engine and director work run inline.

    Entering it makes an ``InlineExecutor`` the loop's default executor too (Piper,
    Whisper and the embedded director run there), so nothing it does takes clock
    time and every run is the same. Messages for the client (acks, errors) are kept in
    ``messages``.
    """

    def __init__(self, engine: Engine, prepared: Any, image: np.ndarray, director: Director, *,
                 avatar_id: str = "avatar", settings: SessionSettings | None = None) -> None:
        self.clock = FakeClock()
        self.executor = InlineExecutor()
        self.session = Session(engine=engine, prepared=prepared, avatar_id=avatar_id, avatar_image=image,
                               idle_frame=engine.idle_frame(prepared), director=director,
                               executor=self.executor, settings=settings or offline_settings(engine),
                               clock=self.clock)
        self.messages: list[OutMessage] = []  # acks and errors (the once-a-second stats are not kept)
        self.session.subscribe(self._keep)

    def _keep(self, message: OutMessage) -> None:
        if not isinstance(message, Stats):
            self.messages.append(message)

    async def __aenter__(self) -> Self:
        asyncio.get_running_loop().set_default_executor(self.executor)
        self.session.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.session.close()

    def send(self, **message: Any) -> None:
        """A control message, as the host's data channel sends it."""
        self.session.control.handle(json.dumps(message))

    def errors(self) -> list[str]:
        return [m.message for m in self.messages if isinstance(m, Error)]

    async def advance(self, seconds: float, step: float = STEP_S) -> None:
        await self.clock.advance(seconds, step=step)

    async def settle(self) -> None:
        """Wait, the clock standing still, for work that may not run inline: speech being
        prepared, a window the director is planning (an LLM director answers over HTTP)."""
        spins = 0
        while self.session.speech.preparing or self.session.planner.busy:
            spins += 1
            await asyncio.sleep(0 if spins < 50 else 0.001)


# --- speech, in pieces ----------------------------------------------------------------------
class SpeechFeed(Protocol):
    """Known speech handed to a session's speech input piece by piece."""

    def pending(self) -> bool:
        """Pieces remain to be handed over."""
        ...

    def next(self, speech: SpeechInput) -> None:
        """Hand over the next piece (the one before it is queued)."""
        ...

    def total_s(self, queued_until: float) -> float:
        """How long the speech lasts on the timeline (an estimate while pieces remain)."""
        ...

    def warm_up(self) -> None:
        """Blocking: load the models its pieces need (before the clock starts)."""
        ...


def text_pieces(text: str, limit: int = MAX_SAY_CHARS) -> list[str]:
    """``text`` in pieces of whole phrases, each no longer than a Say (``limit`` characters)."""
    pieces: list[str] = []
    current = ""
    for phrase in phrases(text):
        for part in textwrap.wrap(phrase, limit) or [phrase]:
            if current and len(current) + 1 + len(part) > limit:
                pieces.append(current)
                current = part
            else:
                current = f"{current} {part}".strip()
    if current:
        pieces.append(current)
    return pieces


class TextSpeech:
    """Text spoken by Piper, as ``say`` speaks it, a Say-sized piece at a time."""

    CHARS_PER_S = 15.0  # a first guess of the speech's length, until pieces are spoken

    def __init__(self, text: str, voice: str | None = None) -> None:
        try:
            self.text = clean_text(text, limit=MAX_TEXT_CHARS, what="--text")
        except ValueError as exc:
            raise RenderError(str(exc)) from None
        self.voice = voice
        self.pieces = text_pieces(self.text)
        self._next = 0
        self._chars_done = 0

    def pending(self) -> bool:
        return self._next < len(self.pieces)

    def next(self, speech: SpeechInput) -> None:
        piece = self.pieces[self._next]
        if self.voice is None:
            speech.say(piece)
        else:
            speech.say(piece, voice=self.voice)
        self._next += 1
        self._chars_done += len(piece)

    def total_s(self, queued_until: float) -> float:
        if not self.pending():
            return queued_until
        total = sum(len(p) for p in self.pieces)
        if self._chars_done == 0 or queued_until <= 0:
            return total / self.CHARS_PER_S
        return queued_until * total / self._chars_done

    def warm_up(self) -> None:
        from realtime.tts import load_voice

        load_voice()


class AudioSpeech:
    """Decoded audio (16 kHz float32 and 48 kHz int16, mono), played as an upload is, in pieces
    cut on frame boundaries at quiet moments."""

    def __init__(self, ana: np.ndarray, out: np.ndarray, fps: int = 25,
                 piece_s: float = AUDIO_PIECE_S) -> None:
        self.duration_s = len(ana) / AUDIO_RATE
        self.pieces = self.cut(ana, out, fps, piece_s)
        self._next = 0

    @staticmethod
    def cut(ana: np.ndarray, out: np.ndarray, fps: int,
            piece_s: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """Pieces of about ``piece_s``, each a whole number of frames (but the last), each cut at
        the quietest frame of the few seconds before its nominal end."""
        if AUDIO_RATE % fps or OUT_RATE % fps:
            raise ValueError(f"{fps} fps does not divide {AUDIO_RATE} and {OUT_RATE} Hz into whole samples")
        a, o = AUDIO_RATE // fps, OUT_RATE // fps  # samples per frame
        frames = len(ana) // a
        level = np.sqrt((ana[: frames * a].astype(np.float64).reshape(frames, a) ** 2).mean(axis=1)) \
            if frames else np.zeros(0)
        per, search = max(1, round(piece_s * fps)), max(1, round(QUIET_SEARCH_S * fps))
        cuts, start = [0], 0
        while frames - start > per + per // 2:
            lo = start + max(per - search, 1)
            cut = lo + int(np.argmin(level[lo : start + per + 1]))
            cuts.append(cut)
            start = cut
        pieces = [(ana[c * a : d * a], out[c * o : d * o]) for c, d in zip(cuts, cuts[1:], strict=False)]
        pieces.append((ana[cuts[-1] * a :], out[cuts[-1] * o :]))
        return pieces

    def pending(self) -> bool:
        return self._next < len(self.pieces)

    def next(self, speech: SpeechInput) -> None:
        ana, out = self.pieces[self._next]
        speech.play(ana, out)
        self._next += 1

    def total_s(self, queued_until: float) -> float:
        if not self.pending():
            return queued_until
        queued = sum(len(a) for a, _ in self.pieces[: self._next]) / AUDIO_RATE
        start = max(queued_until - queued, 0.0)  # where the first piece was placed
        return start + self.duration_s

    def warm_up(self) -> None:
        from engines.director.models import transcriber

        transcriber()  # an upload's words are transcribed, so the director can plan on them


def load_audio(path: Path, fps: int = 25) -> AudioSpeech:
    """An audio file (WAV, MP3, OGG, FLAC, ...) decoded as an upload is; ``RenderError`` if it cannot be."""
    from realtime.ingest import AudioUploadError, decode_upload

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RenderError(f"cannot read --audio {path}: {exc.strerror or exc}") from None
    try:
        ana, out = decode_upload(data, longest_s=MAX_SPEECH_S)
    except AudioUploadError as exc:
        raise RenderError(f"--audio {path}: {exc}") from None
    return AudioSpeech(ana, out, fps)


@contextlib.contextmanager
def native_stderr_quiet() -> Iterator[None]:
    """Native libraries' own lines on stderr (mediapipe's graph set-up logs a handful) go to
    /dev/null for the block, so what ``avatar render`` prints stays its own."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_portrait(path: Path) -> np.ndarray:
    """A portrait photo read and checked as an avatar upload is (one or two faces)."""
    from server.avatars import AvatarError, check_faces, decode_image

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RenderError(f"cannot read --avatar {path}: {exc.strerror or exc}") from None
    try:
        image = decode_image(data)
        with native_stderr_quiet():  # the face mesh loads here, once per process
            check_faces(image)
    except AvatarError as exc:
        raise RenderError(f"--avatar {path}: {exc.message}") from None
    return image


def check_instruction(text: str) -> None:
    """``RenderError`` for an instruction a session would refuse (checked before anything loads)."""
    try:
        parse_control(json.dumps({"type": "instruct", "text": text}))
    except MessageError as exc:
        raise RenderError(f"--instruct: {exc}") from None


# --- the file --------------------------------------------------------------------------------
class OutputFile:
    """``--out``, written atomically: a temporary file beside it, renamed over it on ``commit``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        if out.is_dir():
            raise RenderError(f"--out {out} is a directory; name the MP4 file to write")
        try:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
        except OSError as exc:
            raise RenderError(f"cannot write --out {out}: {exc.strerror or exc}") from None
        os.close(fd)
        self.temp = Path(name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.temp, 0o666 & ~umask)  # as a file the user's shell would create
        self._done = False

    def commit(self) -> None:
        os.replace(self.temp, self.out)
        self._done = True

    def discard(self) -> None:
        if not self._done:
            self.temp.unlink(missing_ok=True)


class Mp4Writer:
    """H.264 and AAC into an MP4, frame by frame: video frame ``k`` and the voice of the same
    ``1 / fps`` go in together, so the streams stay locked to the frame index.

    The AAC encoder takes 1024-sample frames: the voice goes through a FIFO, and the
    encoder's priming delay is recorded in the file (its edit list), so players and
    decoders start the voice at pts 0 with the first frame.
    """

    def __init__(self, path: Path, width: int, height: int, fps: int, *, crf: int = CRF,
                 preset: str = PRESET, gop_s: float = GOP_S) -> None:
        if width % 2 or height % 2:
            raise RenderError(f"video of {width}x{height} cannot be H.264 yuv420p: sides must be even")
        self.fps = fps
        self._container: Any = av.open(str(path), mode="w", format="mp4",
                                       options={"movflags": "+faststart"})
        try:
            gop = max(1, round(gop_s * fps))
            video = self._container.add_stream("libx264", rate=fps)
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            video.options = {"crf": str(crf), "preset": preset,
                             "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
            audio = self._container.add_stream("aac", rate=OUT_RATE, layout="mono")
            audio.bit_rate = AUDIO_BITRATE
        except Exception:
            self._container.close()
            raise
        self._video, self._audio = video, audio
        self.size = (width, height)
        self._fifo = av.AudioFifo()
        self._time_base = fractions.Fraction(1, fps)
        self._samples = 0
        self.frames = 0

    def write(self, index: int, rgb: np.ndarray, voice: np.ndarray) -> None:
        """Frame ``index`` and the voice (int16 at 48 kHz) from its pts to the next frame's."""
        frame = yuv420p_frame(rgb)
        frame.pts = index
        frame.time_base = self._time_base
        for packet in self._video.encode(frame):
            self._container.mux(packet)
        pcm = (voice.astype(np.float32) / 32768.0)[None]
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm), format="fltp", layout="mono")
        af.sample_rate = OUT_RATE
        af.pts = self._samples
        af.time_base = fractions.Fraction(1, OUT_RATE)
        self._samples += len(voice)
        self._fifo.write(af)
        while self._fifo.samples >= AAC_FRAME:
            self._encode_audio(self._fifo.read(AAC_FRAME))
        self.frames += 1

    def _encode_audio(self, frame: av.AudioFrame | None) -> None:
        for packet in self._audio.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        """The last (short) AAC frame, both encoders flushed, the trailer written."""
        rest = self._fifo.read()
        if rest is not None and rest.samples:
            self._encode_audio(rest)
        self._encode_audio(None)
        for packet in self._video.encode(None):
            self._container.mux(packet)
        self._container.close()

    def abort(self) -> None:
        try:
            self._container.close()
        except Exception:  # the file is discarded anyway
            log.debug("closing a failed render's container", exc_info=True)


# --- progress --------------------------------------------------------------------------------
def _clock_text(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Render progress on a stream (stderr): a bar redrawn in place on a terminal, otherwise a
    plain line every ``every_s`` seconds; percent, seconds rendered of the total, speed
    against real time, time left."""

    def __init__(self, stream: TextIO | None = None, *, every_s: float = 5.0, redraw_s: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.period = redraw_s if self.tty else every_s
        self.started = time.monotonic()
        self._last = -math.inf
        self._width = 0

    def restart(self) -> None:
        self.started = time.monotonic()

    @staticmethod
    def line(done_s: float, total_s: float, wall_s: float, bar: int = 0) -> str:
        frac = min(done_s / total_s, 1.0) if total_s > 0 else 0.0
        speed = done_s / wall_s if wall_s > 0 else 0.0
        eta = (total_s - done_s) / speed if speed > 0 else math.inf
        head = f"[{'#' * round(frac * bar)}{'-' * (bar - round(frac * bar))}] " if bar else ""
        return (f"{head}{frac * 100:5.1f}%  {done_s:.1f}/{total_s:.1f} s  {speed:.1f}x real time  "
                f"ETA {_clock_text(eta)}")

    def update(self, done_s: float, total_s: float, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < self.period:
            return
        self._last = now
        if self.tty:
            text = "render " + self.line(done_s, total_s, now - self.started, bar=30)
            self.stream.write("\r" + text.ljust(self._width) + ("\n" if final else ""))
            self._width = len(text)
        else:
            self.stream.write("render: " + self.line(done_s, total_s, now - self.started) + "\n")
        self.stream.flush()


# --- the render ------------------------------------------------------------------------------
@dataclass(slots=True)
class RenderResult:
    frames: int
    fps: int
    size: tuple[int, int]
    speech_s: float  # where the speech ends on the timeline (it starts a frame or two in)
    wall_s: float  # the render, from the first frame to the trailer
    held_frames: int  # slots where playout had no fresh frame (before the first render)
    plan: dict[str, int] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps

    @property
    def speed(self) -> float:
        return self.duration_s / self.wall_s if self.wall_s > 0 else math.inf


class Renderer:
    """Drives an ``OfflineSession`` frame by frame and writes what it sends to an ``Mp4Writer``."""

    def __init__(self, offline: OfflineSession, speech: SpeechFeed, *, instructions: list[str] | None = None,
                 tail_s: float = TAIL_S, progress: Progress | None = None) -> None:
        self.offline = offline
        self.speech = speech
        self.instructions = instructions or []
        self.tail_s = tail_s
        self.progress = progress

    async def run(self, writer_for: Any) -> RenderResult:
        """Render until the speech and its tail are written; ``writer_for(width, height, fps)``
        makes the ``Mp4Writer`` once the frame size is known."""
        off, s = self.offline, self.offline.session
        fps = s.engine.fps
        for text in self.instructions:  # standing instructions, before any speech is queued
            off.send(type="instruct", text=text)
        if off.errors():
            raise RenderError(f"--instruct: {off.errors()[0]}")
        sub = s.video_out.subscribe("rgb")
        self.speech.next(s.speech)
        began = time.monotonic()
        if self.progress is not None:
            self.progress.restart()
        writer: Mp4Writer | None = None
        end: int | None = None  # frames in the file, once all the speech is queued
        index = 0
        try:
            while end is None or index < end:
                await off.settle()
                if (self.speech.pending() and not s.speech.preparing
                        and s.timeline.tts_until - off.clock.now() < FEED_LEAD_S):
                    self.speech.next(s.speech)
                    await off.settle()
                if end is None and not self.speech.pending() and not s.speech.preparing:
                    if s.timeline.tts_until <= 0:
                        raise RenderError("the speech could not be prepared (the log says why)")
                    end = math.ceil(round((s.timeline.tts_until + self.tail_s) * fps, 6))
                await off.advance(1 / fps)
                while not sub.queue.empty():
                    item = sub.queue.get_nowait()
                    if item is None or item.rgb is None:
                        raise RenderError("the session's video output stopped")
                    if item.index != index or sub.dropped:
                        raise RenderError(f"frame {index} of the video output was lost")
                    if end is None or index < end:
                        if writer is None:
                            h, w = item.rgb.shape[:2]
                            writer = writer_for(w, h, fps)
                        t0, t1 = round(index * OUT_RATE / fps), round((index + 1) * OUT_RATE / fps)
                        writer.write(index, item.rgb, s.timeline.read_out(t0 / OUT_RATE, t1 - t0))
                    index += 1
                if self.progress is not None:
                    total = end / fps if end is not None else \
                        self.speech.total_s(s.timeline.tts_until) + self.tail_s
                    self.progress.update(min(index, end or index) / fps, total)
            assert writer is not None and end is not None
            writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            s.video_out.unsubscribe(sub)
        wall = time.monotonic() - began
        if self.progress is not None:
            self.progress.update(end / fps, end / fps, final=True)
        stats = s.scheduler.stats
        return RenderResult(frames=end, fps=fps, size=writer.size, speech_s=s.timeline.tts_until,
                            wall_s=wall, held_frames=s.playout.stats.held,
                            plan={"windows": s.planner.windows_planned,
                                  "director_failures": s.planner.failures,
                                  "clips": stats.clips_rendered, "skipped": stats.clips_skipped})


async def render_file(engine: Engine, image: np.ndarray, director: Director, speech: SpeechFeed,
                      path: Path, *,
                      instructions: list[str] | None = None, subclip_frames: int = 1,
                      director_timeout_s: float = DIRECTOR_TIMEOUT_S, tail_s: float = TAIL_S,
                      crf: int = CRF, preset: str = PRESET, progress: Progress | None = None,
                      avatar_id: str = "avatar") -> RenderResult:
    """Render ``speech`` by the portrait ``image`` to the MP4 at ``path`` (overwritten)."""
    loop = asyncio.get_running_loop()
    try:
        prepared = await loop.run_in_executor(None, engine.prepare, Avatar(id=avatar_id, image=image))
    except ValueError as exc:
        raise RenderError(f"--avatar: {exc}") from None
    # the models load before the clock starts, as a server warms up before its first session
    await loop.run_in_executor(None, speech.warm_up)
    try:
        await director.warm_up(image, avatar_id)
    except Exception as exc:  # e.g. an LLM endpoint that is down: windows fall back, as live
        log.warning("director %s warm-up failed: %s: %s", director.name, type(exc).__name__, exc)
    settings = offline_settings(engine, subclip_frames=subclip_frames, director_timeout_s=director_timeout_s)
    async with OfflineSession(engine, prepared, image, director, avatar_id=avatar_id,
                              settings=settings) as offline:
        renderer = Renderer(offline, speech, instructions=instructions, tail_s=tail_s, progress=progress)
        return await renderer.run(lambda w, h, fps: Mp4Writer(path, w, h, fps, crf=crf, preset=preset))
