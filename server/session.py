"""One live session: a WebRTC peer, its pipeline, and the tasks that run it.

Data flows one way: mic track -> ingest -> timeline -> scheduler (engine
workers) -> playout -> outgoing tracks. Control messages (say, instruct,
interrupt) arrive on the ``control`` data channel and become small events:
they change the timeline or the plan and invalidate stale work; they never
call back into a producer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender

from engines.base import Engine, PhonemeEvent
from engines.director.base import Director
from realtime.clock import LoopClock
from realtime.ingest import MicIngest
from realtime.planner import RollingPlanner
from realtime.playout import Playout
from realtime.scheduler import CascadeScheduler, SchedulerConfig
from realtime.timeline import AudioTimeline
from realtime.tracks import AvatarAudioTrack, AvatarVideoTrack
from realtime.tts import MAX_SAY_CHARS, clean_text, synthesize

log = logging.getLogger(__name__)

MAX_CONTROL_BYTES = 64 * 1024
MAX_INSTRUCTION_CHARS = 2000
TTS_LEAD_S = 0.05
CLOSE_TIMEOUT_S = 3.0


class OfferError(ValueError):
    """The SDP offer cannot be answered (malformed, or missing what we need)."""


@dataclass(slots=True)
class SessionSettings:
    delay_s: float = 0.13
    scheduler: SchedulerConfig | None = None
    video_codec: str = "VP8"
    window_s: float = 2.0
    director_timeout_s: float = 1.5


class Session:
    def __init__(self, *, engine: Engine, prepared: Any, avatar_id: str, avatar_image: np.ndarray,
                 idle_frame: np.ndarray, director: Director, executor: Executor,
                 settings: SessionSettings, rtc_config: RTCConfiguration,
                 on_closed: Callable[[Session], None]) -> None:
        self.id = secrets.token_hex(8)
        self.engine = engine
        self.settings = settings
        self.avatar_id = avatar_id
        self.clock = LoopClock()
        self.timeline = AudioTimeline()
        self.playout = Playout(engine.fps, settings.delay_s)
        self.planner = RollingPlanner(director, self.clock, self.timeline, session_id=self.id,
                                      window_s=settings.window_s,
                                      timeout_s=settings.director_timeout_s,
                                      avatar_image=avatar_image, avatar_id=avatar_id)
        self.scheduler = CascadeScheduler(
            engine, prepared, self.timeline, self.clock, self.playout,
            self.planner.shots_between, executor, settings.scheduler or SchedulerConfig(),
            session_id=self.id)
        self.ingest = MicIngest(self.timeline, self.clock, self.scheduler.notify, self.id)
        self.video = AvatarVideoTrack(self.playout, self.clock, self.timeline, idle_frame,
                                      banner=engine.banner())
        self.audio = AvatarAudioTrack(self.timeline, self.clock, settings.delay_s)
        self.pc = RTCPeerConnection(configuration=rtc_config)
        self.channel: Any = None
        self.closed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tts_task: asyncio.Task[None] | None = None
        self._on_closed = on_closed
        self._closing = False
        self.errors_sent = 0

    # --- task ownership ---------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{name}:{self.id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("[%s] task %s failed", self.id, task.get_name(), exc_info=exc)

    # --- signalling -------------------------------------------------------------
    async def answer(self, offer_sdp: str) -> str:
        """Apply the client's offer and return our SDP answer."""
        if "v=0" not in offer_sdp or "m=" not in offer_sdp:
            raise OfferError("body is not an SDP offer (expected 'v=0' and media sections)")
        pc = self.pc

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            if channel.label != "control":
                log.info("[%s] ignoring data channel %r", self.id, channel.label)
                return
            self.channel = channel

            @channel.on("message")
            def on_message(message: Any) -> None:
                self._spawn(self.handle_control(message), "control")

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "audio":
                self._spawn(self.ingest.run(track), "ingest")

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("[%s] connection %s", self.id, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                self._spawn(self.close(), "close")

        try:
            offer = RTCSessionDescription(sdp=offer_sdp, type="offer")
            kinds = [line.split()[0][2:] for line in offer_sdp.splitlines() if line.startswith("m=")]
            if "video" not in kinds:
                raise OfferError("the offer has no video section (add a recvonly video transceiver)")
            if "audio" not in kinds:
                raise OfferError("the offer has no audio section (add a sendrecv audio transceiver)")
            # codec choice only takes effect if set before the remote offer is applied
            video_tr = pc.addTransceiver("video", direction="sendonly")
            self._prefer_codec(video_tr, self.settings.video_codec)
            await pc.setRemoteDescription(offer)
            audio_sender_set = False
            for tr in pc.getTransceivers():
                if tr.kind == "audio" and not audio_sender_set:
                    tr.sender.replaceTrack(self.audio)
                    tr.direction = "sendrecv"
                    audio_sender_set = True
            video_set = False
            for tr in pc.getTransceivers():
                if tr.kind == "video" and tr.mid is not None and not video_set:
                    tr.sender.replaceTrack(self.video)
                    tr.direction = "sendonly"
                    video_set = True
            if not video_set:
                video_tr.sender.replaceTrack(self.video)
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except OfferError:
            raise
        except Exception as exc:  # aiortc raises many types on bad SDP
            raise OfferError(f"cannot answer the offer: {type(exc).__name__}: {exc}") from exc
        self._spawn(self.scheduler.run(), "scheduler")
        self._spawn(self.planner.run(lead_s=self.settings.window_s), "planner")
        self._spawn(self._stats_loop(), "stats")
        return pc.localDescription.sdp

    @staticmethod
    def _prefer_codec(transceiver: RTCRtpTransceiver, name: str) -> None:
        caps = RTCRtpSender.getCapabilities("video")
        preferred = [c for c in caps.codecs if c.mimeType.lower() == f"video/{name.lower()}"]
        rest = [c for c in caps.codecs if c not in preferred]
        if preferred:
            transceiver.setCodecPreferences(preferred + [c for c in rest if c.mimeType.endswith("rtx")])

    # --- control ------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            ch.send(json.dumps(message))

    def error(self, message: str) -> None:
        self.errors_sent += 1
        self.send({"type": "error", "message": message})

    async def handle_control(self, raw: Any) -> None:
        if isinstance(raw, bytes):
            if len(raw) > MAX_CONTROL_BYTES:
                return self.error(f"message is {len(raw)} bytes; the limit is {MAX_CONTROL_BYTES}")
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                return self.error("message is not UTF-8 JSON")
        if len(raw) > MAX_CONTROL_BYTES:
            return self.error(f"message is {len(raw)} characters; the limit is {MAX_CONTROL_BYTES}")
        try:
            msg = json.loads(raw)
        except ValueError:
            return self.error("message is not valid JSON")
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            return self.error('message must be a JSON object with a "type"')
        kind = msg["type"]
        try:
            if kind == "say":
                text = clean_text(msg.get("text"), limit=MAX_SAY_CHARS, what="say text")
                self.say(text)
            elif kind == "instruct":
                text = clean_text(msg.get("text"), limit=MAX_INSTRUCTION_CHARS,
                                  what="instruction")
                await self.instruct(text)
            elif kind == "interrupt":
                self.interrupt()
            else:
                self.error(f"unknown message type {kind!r} (expected say, instruct, interrupt)")
        except ValueError as exc:
            self.error(str(exc))

    def playing_pts(self) -> float:
        """The pts now leaving (audio master clock)."""
        return max(self.clock.now() - self.settings.delay_s, 0.0)

    def _replace_speech(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """New speech replaces the speech being prepared (what is queued still plays)."""
        self._stop_speech()
        self._tts_task = self._spawn(coro, name)

    def _stop_speech(self) -> None:
        if self._tts_task is not None and not self._tts_task.done():
            self._tts_task.cancel()

    def _queue_speech(self, ana: np.ndarray, out: np.ndarray,
                      phonemes: list[PhonemeEvent]) -> tuple[float, float]:
        """Speech on the timeline, now (plus a little lead) or right after what is queued.

        ``phonemes`` are relative to the speech's start. Returns its pts span; frames
        already rendered from its start on (idle ones) are redone.
        """
        now = self.clock.now()
        fps = self.engine.fps
        t0 = round(max(now + TTS_LEAD_S, self.timeline.tts_until) * fps) / fps
        placed = [PhonemeEvent(p.phoneme, t0 + p.start, t0 + p.end) for p in phonemes]
        t1 = self.timeline.write_tts(t0, ana, out, placed, now)
        self.scheduler.invalidate(t0)
        return t0, t1

    def say(self, text: str) -> None:
        self._replace_speech(self._speak(text), "tts")

    async def _speak(self, text: str) -> None:
        loop = asyncio.get_running_loop()
        chunks = synthesize(text)
        while True:
            chunk = await loop.run_in_executor(None, next, chunks, None)
            if chunk is None:
                break
            t0, t1 = self._queue_speech(chunk.ana, chunk.out, chunk.phonemes)
            await self.planner.plan_utterance(t0, t1, text)
            self.scheduler.notify()
        log.info("[%s] said %d characters", self.id, len(text))

    def play(self, ana: np.ndarray, out: np.ndarray) -> None:
        """Uploaded speech (16 kHz and 48 kHz mono): spoken next, like Say text."""
        self._replace_speech(self._play(ana, out), "upload")

    async def _play(self, ana: np.ndarray, out: np.ndarray) -> None:
        from engines.director.models import transcriber

        loop = asyncio.get_running_loop()
        # the words first (about a second): the whole utterance is then planned ahead
        try:
            segments = await loop.run_in_executor(None, lambda: transcriber().transcribe(ana))
        except Exception as exc:  # no words: the director still has the prosody
            log.warning("[%s] upload transcript failed: %s: %s", self.id, type(exc).__name__, exc)
            segments = []
        t0, t1 = self._queue_speech(ana, out, [])
        text = " ".join(s.text for s in segments)
        spans = [(t0 + s.start, t0 + s.end, s.text) for s in segments]
        await self.planner.plan_utterance(t0, t1, text, spans)
        self.scheduler.notify()
        log.info("[%s] playing %.1f s of uploaded speech (%d words)", self.id, t1 - t0,
                 len(text.split()))

    async def instruct(self, text: str) -> None:
        self.planner.add_instruction(text)
        cut = self.playing_pts() + 2.0 / self.engine.fps
        cut = self.scheduler.invalidate(cut)
        await self.planner.replan_from(cut)
        self.scheduler.notify()
        self.send({"type": "ack", "for": "instruct", "from_pts": round(cut, 3)})

    def interrupt(self) -> None:
        self._stop_speech()
        cut = self.playing_pts() + 1.0 / self.engine.fps
        cut = self.scheduler.invalidate(cut)
        self.timeline.cut_tts(cut)
        self.scheduler.notify()
        self.send({"type": "ack", "for": "interrupt", "from_pts": round(cut, 3)})

    # --- stats -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        now = self.clock.now()
        ps = self.playout.stats
        v_lag = float(np.median(ps.send_lag_ms)) if ps.send_lag_ms else 0.0
        a_lag = float(np.median(self.audio.send_lag_ms)) if self.audio.send_lag_ms else 0.0
        shot = self.planner.current_shot(self.playing_pts())
        p95 = ps.latency_percentile_ms(95)
        p50 = ps.latency_percentile_ms(50)
        sched = self.scheduler
        return {
            "type": "stats",
            "session": self.id,
            "t": round(now, 3),
            "fps": ps.fps(now),
            "latency_ms": round(p95, 1) if p95 is not None else None,
            "latency_p50_ms": round(p50, 1) if p50 is not None else None,
            "pipeline_delay_ms": round(self.settings.delay_s * 1000, 1),
            "implied_latency_ms": round(sched.implied_latency_s() * 1000, 1),
            "av_offset_ms": round(v_lag - a_lag, 1),
            "frames_sent": ps.sent,
            "held_frames": ps.held,
            "late_frames": ps.late,
            "dropped_frames": ps.dropped,
            "clips_skipped": sched.stats.clips_skipped,
            "render_ms": round(sched.stats.render_ms_median(), 2),
            "render_margin_ms": round(float(np.median(sched.stats.margin_ms)), 1)
            if sched.stats.margin_ms else None,
            "mic_lag_ms": round(float(np.median(self.ingest.lag_ms)), 1)
            if self.ingest.lag_ms else None,
            "subclip_ms": round(sched.clip_s * 1000, 1),
            "workers": sched.config.workers,
            "speaking": self.timeline.speaking_tts(self.playing_pts()),
            "director": self.planner.director.name,
            "director_failures": self.planner.failures,
            "director_fallbacks": self.planner.director.fallbacks,
            "instructions": len(self.planner.instructions),
            "shot": shot.model_dump(mode="json") if shot is not None else None,
        }

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.send(self.stats())

    # --- teardown -----------------------------------------------------------------------
    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        me = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not me]
        for t in tasks:
            t.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
            if stuck:  # a task that ignores cancellation must not keep the peer open
                log.error("[%s] %d task(s) did not stop on close: %s", self.id, len(stuck),
                          ", ".join(sorted(t.get_name() for t in stuck)))
        await self.scheduler.aclose()
        try:
            await self.planner.director.aclose()
        except Exception:  # a director that cannot close cleanly must not keep the session
            log.exception("[%s] director close failed", self.id)
        self.video.stop()
        self.audio.stop()
        await self.pc.close()
        self.closed.set()
        self._on_closed(self)
        log.info("[%s] closed", self.id)
