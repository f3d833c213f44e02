"""Sessions in one process: the engine, prepared avatars, the render pool, and the sessions themselves.

A session worker process (``server.worker``) runs one ``SessionHost``. It
loads the engine and the models the sessions share (Piper, voice activity,
the director's), warms every stage up once, prepares avatars (an LRU of 8)
and creates, lists and closes its sessions.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from aiortc import RTCConfiguration, RTCIceServer
from pydantic import BaseModel, Field

from engines.base import Engine
from engines.director.base import Director
from realtime.scheduler import SchedulerConfig
from server.avatars import AvatarStore
from server.session import Session, SessionSettings
from server.signalling import ViewerPeer, WebRTCPeer

log = logging.getLogger(__name__)

GRACE_S = 0.02  # the scheduler's wait past a sub-clip's end for its audio (SchedulerConfig.grace_s)
DELAY_MARGIN_S = 0.03  # encoding, hand-offs and scheduling on a busy machine, on top of the render
WARM_UP_RENDERS = 12
WARM_UP_BUDGET_S = 5.0


def playout_delay_s(subclip_s: float, render_s: float) -> float:
    """The video latency a sub-clip of ``subclip_s`` needs when it renders in ``render_s``:
    its audio, the scheduler's grace, the render, and a margin for encoding and scheduling."""
    return subclip_s + GRACE_S + render_s + DELAY_MARGIN_S


class HostConfig(BaseModel):
    """What a process that runs sessions needs to know (sent to each worker as JSON)."""

    engine: str = "portrait"
    engine_options: dict[str, Any] = Field(default_factory=dict)
    director: str = "embedded"
    director_options: dict[str, Any] = Field(default_factory=dict)
    data_dir: Path = Path("data")
    ice_hosts: list[str] = Field(default_factory=list)
    ice_servers: list[str] = Field(default_factory=list)
    consent_interval_s: float = 2.0
    consent_failures: int = 5
    delay_ms: float | None = Field(None, gt=0)  # None: measured at start (see SessionHost.playout_delay_s)
    subclip_frames: int = Field(1, ge=1)
    workers: int = Field(1, ge=1)  # sub-clips rendered in parallel per session
    render_threads: int = Field(2, ge=1)
    cpu_threads: int = Field(1, ge=1)
    director_timeout_s: float = Field(1.5, gt=0)
    live_transcription_duty: float = Field(0.25, gt=0, le=1)  # share of a core for this process
    video_codecs: list[str] = Field(default_factory=lambda: ["H264", "VP8"])  # preferred first
    max_viewers: int = Field(10, ge=0)  # WHEP viewers per session


class SessionHost:
    def __init__(self, config: HostConfig, engine: Engine, director_factory: Callable[[], Director]) -> None:
        self.config = config
        self.engine = engine
        self.director_factory = director_factory
        self.store = AvatarStore(config.data_dir / "avatars")
        self.sessions: dict[str, Session] = {}
        self.executor = ThreadPoolExecutor(config.render_threads, thread_name_prefix="render")
        self._prepared: OrderedDict[str, tuple[Any, np.ndarray, np.ndarray]] = OrderedDict()
        self._prepare_lock = asyncio.Lock()
        self.sessions_total = 0
        self.render_s: list[float] = []  # sub-clip render times measured at start

    # --- lifecycle -----------------------------------------------------------------
    async def start(self, avatar_id: str) -> None:
        """Load the shared models and run every stage once, so the first session pays for nothing."""
        loop = asyncio.get_running_loop()
        from realtime.tts import load_voice
        from realtime.vad import load as load_vad

        (prepared, image, _), _, _ = await asyncio.gather(self.prepared(avatar_id),
                                                          loop.run_in_executor(None, load_voice),
                                                          loop.run_in_executor(None, load_vad))
        await asyncio.gather(loop.run_in_executor(self.executor, self._warm_up, prepared),
                             self._warm_up_director(image, avatar_id))
        log.info("playout delay %.0f ms (%s)", self.playout_delay_s * 1000,
                 "as configured" if self.config.delay_ms is not None else
                 f"{self.subclip_s * 1000:.0f} ms sub-clips, slowest render "
                 f"{max(self.render_s) * 1000:.1f} ms")

    async def _warm_up_director(self, image: np.ndarray, avatar_id: str) -> None:
        """Load the director's models now; a failure is logged, sessions plan without it."""
        director = self.director_factory()
        try:
            await director.warm_up(image, avatar_id)
        except Exception as exc:  # e.g. an LLM endpoint that is down: windows fall back
            log.warning("director %s warm-up failed: %s: %s", director.name, type(exc).__name__, exc)
        finally:
            await director.aclose()

    def _warm_up(self, prepared: Any) -> None:
        """Every stage once, then a few sub-clips of speech-like noise timed for the playout delay."""
        import time

        from engines.base import AUDIO_RATE, AudioSlice
        from engines.storyline import default_shot

        shot = default_shot(0.0, 1.0)
        step = self.subclip_s
        chars = self.engine.characters(prepared)
        rng = np.random.default_rng(0)
        renders = 1 if self.config.delay_ms is not None else WARM_UP_RENDERS
        began = time.perf_counter()
        for k in range(renders + 1):
            if k > 1 and time.perf_counter() - began > WARM_UP_BUDGET_S:
                break  # a slow engine (a DiT on a CPU): a few renders say enough
            kfs = self.engine.keyframes(prepared, [shot], [k * step, (k + 1) * step])
            samples = (0.1 * rng.standard_normal(round((0.3 + step) * AUDIO_RATE))).astype(np.float32)
            audio = AudioSlice(start=k * step - 0.3, samples=samples,
                               vad=np.ones(64, np.float32), vad_start=k * step - 0.3)
            t = time.perf_counter()
            frames = self.engine.subclip(prepared, kfs[0], kfs[1], [audio] * chars, [shot] * chars)
            self.engine.upscale(frames)
            if k:  # the first call pays for first calls
                self.render_s.append(time.perf_counter() - t)

    @property
    def subclip_s(self) -> float:
        return max(self.config.subclip_frames, self.engine.min_subclip_frames) / self.engine.fps

    @property
    def playout_delay_s(self) -> float:
        """The video's latency: as configured, else what a sub-clip needs, measured.

        A sub-clip renders once the audio it covers has arrived (its length, plus the
        scheduler's grace), then takes its render time; the delay adds a margin for
        encoding and scheduling on a busy machine, and the slowest warm-up render.
        """
        if self.config.delay_ms is not None:
            return self.config.delay_ms / 1000
        return playout_delay_s(self.subclip_s, max(self.render_s) if self.render_s else 0.05)

    async def aclose(self) -> None:
        await asyncio.gather(*(s.close() for s in list(self.sessions.values())), return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def prepared(self, avatar_id: str) -> tuple[Any, np.ndarray, np.ndarray]:
        """(prepared, reference image, idle frame) for an avatar, cached (LRU of 8)."""
        async with self._prepare_lock:
            if avatar_id in self._prepared:
                self._prepared.move_to_end(avatar_id)
                return self._prepared[avatar_id]
            avatar = await self.store.load(avatar_id)
            loop = asyncio.get_running_loop()
            prep = await loop.run_in_executor(self.executor, self.engine.prepare, avatar)
            self._prepared[avatar_id] = (prep, avatar.image, self.engine.idle_frame(prep))
            while len(self._prepared) > 8:
                self._prepared.popitem(last=False)
            return self._prepared[avatar_id]

    def forget_avatar(self, avatar_id: str) -> None:
        self._prepared.pop(avatar_id, None)

    def rtc_configuration(self) -> RTCConfiguration:
        return RTCConfiguration(iceServers=[RTCIceServer(urls=u) for u in self.config.ice_servers])

    # --- sessions ------------------------------------------------------------------
    async def create_session(self, avatar_id: str, offer_sdp: str) -> tuple[Session, str]:
        """A session for ``avatar_id`` answering ``offer_sdp``: (session, SDP answer).

        ``OfferError`` for an offer that cannot be answered (the session is closed again).
        """
        prepared, image, idle = await self.prepared(avatar_id)
        c = self.config
        settings = SessionSettings(
            delay_s=self.playout_delay_s, video_codecs=tuple(c.video_codecs),
            scheduler=SchedulerConfig(subclip_frames=c.subclip_frames, workers=c.workers),
            director_timeout_s=c.director_timeout_s, max_viewers=c.max_viewers,
        )
        session = Session(engine=self.engine, prepared=prepared, avatar_id=avatar_id,
                          avatar_image=image, idle_frame=idle, director=self.director_factory(),
                          executor=self.executor, settings=settings, on_closed=self._forget)
        self.sessions[session.id] = session
        try:
            answer = await session.connect(WebRTCPeer(session, self.rtc_configuration(), c.video_codecs),
                                           offer_sdp)
        except Exception:
            await session.close()
            raise
        self.sessions_total += 1
        log.info("[%s] session created (avatar %s, %d live here)", session.id, avatar_id,
                 len(self.sessions))
        return session, answer

    async def add_viewer(self, session: Session, offer_sdp: str) -> tuple[ViewerPeer, str]:
        """A WHEP viewer of ``session`` answering ``offer_sdp``: (viewer, SDP answer).

        ``ViewersFull`` when the session has ``max_viewers``; ``OfferError`` for a bad offer.
        """
        viewer = ViewerPeer(session, self.rtc_configuration(), self.config.video_codecs)
        return viewer, await session.add_viewer(viewer, offer_sdp)

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
