"""One live session: its pipeline, the tasks that run it, and its outputs.

Data flows one way: mic track -> ingest -> timeline -> scheduler (engine
workers) -> playout -> outgoing tracks (the session's own peer and its WHEP
viewers read the same encoded video and voice); known speech (Say text, uploads)
enters the timeline through the speech input. Control travels as small
events (``realtime.events``): ingest, speech input and the host's control
post to the planner's and the scheduler's inboxes, the planner posts the plan
to the scheduler, and no stage calls back into the one that feeds it.

The clock is injected: a server session runs on the event loop's clock, a
test runs the same session on a ``FakeClock`` without any peer.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.base import Engine
from engines.director.base import Director
from realtime.clock import Clock, LoopClock
from realtime.egress import EgressError, EgressSettings, RtmpEgress
from realtime.ingest import MicIngest
from realtime.planner import RollingPlanner
from realtime.playout import Playout
from realtime.scheduler import CascadeScheduler, SchedulerConfig
from realtime.speech import SpeechInput
from realtime.tasks import TaskOwner
from realtime.timeline import AudioTimeline
from realtime.tracks import AudioOut, VideoOut
from server.control import SessionControl
from server.messages import OutMessage, Stats
from server.signalling import ViewerPeer, WebRTCPeer

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 3.0
STATS_EVERY_S = 1.0
TIMELINE_HISTORY_S = 10.0  # speech bookkeeping kept behind the pts playing
MAX_EGRESSES = 4  # streams to platforms per session


@dataclass(slots=True)
class SessionSettings:
    delay_s: float = 0.13
    scheduler: SchedulerConfig | None = None
    video_codecs: tuple[str, ...] = ("H264", "VP8")  # in order of preference, as offered
    window_s: float = 2.0
    director_timeout_s: float = 1.5
    max_viewers: int = 10  # WHEP viewers at once


class ViewersFull(RuntimeError):
    """The session has as many viewers as it takes."""


def _median(values: Any) -> float | None:
    return float(np.median(values)) if len(values) else None


class Session:
    def __init__(self, *, engine: Engine, prepared: Any, avatar_id: str, avatar_image: np.ndarray,
                 idle_frame: np.ndarray, director: Director, executor: Executor | None,
                 settings: SessionSettings, on_closed: Callable[[Session], None] | None = None,
                 clock: Clock | None = None) -> None:
        self.id = secrets.token_hex(8)
        self.started_at = time.time()
        self.engine = engine
        self.settings = settings
        self.avatar_id = avatar_id
        self.clock = clock or LoopClock()
        self.tasks = TaskOwner(self.id)
        self.characters = engine.characters(prepared)
        self.timeline = AudioTimeline(characters=self.characters)
        self.playout = Playout(engine.fps, settings.delay_s)
        sched_config = settings.scheduler or SchedulerConfig()
        sched_config.delay_s = settings.delay_s
        self.scheduler = CascadeScheduler(engine, prepared, self.timeline, self.clock, self.playout,
                                          executor, sched_config, session_id=self.id)
        self.planner = RollingPlanner(director, self.clock, self.timeline, self.scheduler.inbox,
                                      session_id=self.id, window_s=settings.window_s,
                                      lead_s=settings.window_s, timeout_s=settings.director_timeout_s,
                                      avatar_image=avatar_image, avatar_id=avatar_id)
        self.ingest = MicIngest(self.timeline, self.clock, self.scheduler.inbox, self.id)
        self.speech = SpeechInput(self.timeline, self.clock, engine.fps, self.tasks,
                                  planner=self.planner.inbox, scheduler=self.scheduler.inbox,
                                  session_id=self.id)
        self.control = SessionControl(clock=self.clock, fps=engine.fps, delay_s=settings.delay_s,
                                      subclip_s=self.scheduler.clip_s, speech=self.speech,
                                      timeline=self.timeline, planner=self.planner.inbox,
                                      scheduler=self.scheduler.inbox, ingest=self.ingest.inbox,
                                      send=self.send, characters=self.characters, session_id=self.id)
        self.video_out = VideoOut(self.playout, self.clock, self.timeline, idle_frame,
                                  banner=engine.banner(), executor=executor)
        self.audio_out = AudioOut(self.timeline, self.clock, settings.delay_s)
        self.peer: WebRTCPeer | None = None
        self.egresses: dict[str, RtmpEgress] = {}
        self.viewers: dict[str, ViewerPeer] = {}
        self._listeners: list[Callable[[OutMessage], None]] = []
        self.closed = asyncio.Event()
        self._on_closed = on_closed
        self._closing = False
        self._started = False

    # --- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        """Run the pipeline: the planner, the scheduler and the housekeeping loop."""
        if self._started:
            return
        self._started = True
        self.tasks.spawn(self.scheduler.run(), "scheduler")
        self.tasks.spawn(self.video_out.run(), "video out")
        self.tasks.spawn(self.audio_out.run(), "audio out")
        self.tasks.spawn(self.planner.run(), "planner")
        self.tasks.spawn(self._housekeeping(), "housekeeping")

    async def connect(self, peer: WebRTCPeer, offer_sdp: str) -> str:
        """Answer a WebRTC offer with this session's tracks; starts the pipeline."""
        self.peer = peer
        answer = await peer.answer(offer_sdp)
        self.subscribe(lambda message: peer.send(message.wire()))
        self.start()
        return answer

    async def add_viewer(self, viewer: ViewerPeer, offer_sdp: str) -> str:
        """Answer a WHEP viewer's offer: it receives this session's encoded video and voice.

        ``ViewersFull`` past ``max_viewers``; ``OfferError`` for an offer it cannot
        answer (the viewer is closed again). The viewer's place is taken before the
        answer is awaited, so viewers arriving together cannot pass the limit.
        """
        if self._closing:
            raise ViewersFull("the session is ending")
        limit = self.settings.max_viewers
        if not limit:
            raise ViewersFull("this server takes no viewers (avatar serve --max-viewers 0)")
        if len(self.viewers) >= limit:
            raise ViewersFull(f"the session has all the viewers it takes ({limit}, avatar serve "
                              "--max-viewers); retry later")
        self.viewers[viewer.id] = viewer
        try:
            answer = await viewer.answer(offer_sdp)
        except BaseException:
            await self.remove_viewer(viewer.id)
            raise
        log.info("[%s] viewer %s added (%d watching)", self.id, viewer.id, len(self.viewers))
        return answer

    async def remove_viewer(self, viewer_id: str) -> bool:
        """End a viewer (its DELETE, or its connection failed or closed); False if unknown."""
        viewer = self.viewers.pop(viewer_id, None)
        if viewer is None:
            return False
        await viewer.close()
        log.info("[%s] viewer %s removed (%d watching)", self.id, viewer_id, len(self.viewers))
        return True

    def subscribe(self, listener: Callable[[OutMessage], None]) -> None:
        """Messages for the client (stats, acks, errors) also go to ``listener``."""
        self._listeners.append(listener)

    def send(self, message: OutMessage) -> None:
        for listener in self._listeners:
            listener(message)

    def playing_pts(self) -> float:
        return self.control.playing_pts()

    async def _housekeeping(self) -> None:
        """Once a second: stats to the client, and the timeline forgets what has played."""
        while True:
            await self.clock.sleep_until(self.clock.now() + STATS_EVERY_S)
            self.timeline.trim(self.playing_pts() - TIMELINE_HISTORY_S)
            self.send(self.stats())

    # --- streams to platforms -----------------------------------------------------------
    def start_egress(self, url: str, settings: EgressSettings | None = None) -> RtmpEgress:
        """Push this session's stream to ``url`` (RTMP or RTMPS) until stopped; ``EgressError`` if not."""
        if self._closing:
            raise EgressError("the session is closing")
        if len(self.egresses) >= MAX_EGRESSES:
            raise EgressError(f"this session already streams to {MAX_EGRESSES} places; stop one first")
        egress = RtmpEgress(url, self.video_out, self.timeline, fps=self.engine.fps, settings=settings,
                            session_id=self.id)
        self.egresses[egress.id] = egress
        self.tasks.spawn(egress.run(), f"egress {egress.id}")
        log.info("[%s] egress %s to %s", self.id, egress.id, egress.describe()["url"])
        return egress

    async def stop_egress(self, egress_id: str) -> bool:
        egress = self.egresses.pop(egress_id, None)
        if egress is None:
            return False
        await egress.aclose()
        return True

    # --- stats -----------------------------------------------------------------------
    def stats(self) -> Stats:
        now = self.clock.now()
        vs, ps, sched = self.video_out.stats, self.playout.stats, self.scheduler
        v_lag = _median(vs.send_lag_ms) or 0.0
        a_lag = _median(self.audio_out.send_lag_ms) or 0.0
        p95, p50 = vs.latency_percentile_ms(95), vs.latency_percentile_ms(50)
        margin, mic = _median(sched.stats.margin_ms), _median(self.ingest.lag_ms)
        return Stats(
            session=self.id,
            t=round(now, 3),
            started_at=round(self.started_at, 3),
            fps=vs.fps(now),
            latency_ms=round(p95, 1) if p95 is not None else None,
            latency_p50_ms=round(p50, 1) if p50 is not None else None,
            pipeline_delay_ms=round(self.settings.delay_s * 1000, 1),
            implied_latency_ms=round(sched.implied_latency_s() * 1000, 1),
            av_offset_ms=round(v_lag - a_lag, 1),
            frames_sent=vs.sent,
            viewers=len(self.viewers),
            video_encoded=self.video_out.encoded(),
            video_delivered=vs.delivered,
            audio_encoded=self.audio_out.encoded,
            audio_delivered=self.audio_out.delivered,
            held_frames=ps.held,
            late_frames=ps.late,
            dropped_frames=ps.dropped,
            clips_skipped=sched.stats.clips_skipped,
            render_ms=round(sched.stats.render_ms_median(), 2),
            render_margin_ms=round(margin, 1) if margin is not None else None,
            mic_lag_ms=round(mic, 1) if mic is not None else None,
            subclip_ms=round(sched.clip_s * 1000, 1),
            workers=sched.config.workers,
            speaking=self.timeline.speaking_tts(self.playing_pts()),
            director=self.planner.director.name,
            director_failures=self.planner.failures,
            plan_ms=round(v, 1) if (v := _median(self.planner.plan_ms)) is not None else None,
            director_fallbacks=self.planner.director.fallbacks,
            instructions=len(self.planner.instructions),
            plan_generation=self.planner.generation,
            stale_windows=self.planner.stale + sched.stats.windows_stale,
            forced_keyframes=sched.stats.forced_keyframes,
            shot=self.planner.current_shot(self.playing_pts()),
            characters=self.characters,
            mic_character=self.control.mic_character,
            shots=[self.planner.current_shot(self.playing_pts(), c) for c in range(self.characters)],
            egresses=len(self.egresses),
        )

    # --- teardown -----------------------------------------------------------------------
    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        for egress in self.egresses.values():
            egress.stop()
        await self.tasks.aclose(CLOSE_TIMEOUT_S)
        await asyncio.gather(*(e.aclose() for e in self.egresses.values()), return_exceptions=True)
        await self.scheduler.aclose()
        try:
            await self.planner.director.aclose()
        except Exception:  # a director that cannot close cleanly must not keep the session
            log.exception("[%s] director close failed", self.id)
        self.video_out.stop()
        self.audio_out.stop()
        await asyncio.gather(*(self.remove_viewer(v) for v in list(self.viewers)), return_exceptions=True)
        if self.peer is not None:
            await self.peer.close()
        self.closed.set()
        if self._on_closed is not None:
            self._on_closed(self)
        log.info("[%s] closed", self.id)
