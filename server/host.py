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
from server.signalling import WebRTCPeer

log = logging.getLogger(__name__)


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
    delay_ms: float = Field(130.0, gt=0)
    subclip_frames: int = Field(1, ge=1)
    workers: int = Field(1, ge=1)  # sub-clips rendered in parallel per session
    render_threads: int = Field(2, ge=1)
    cpu_threads: int = Field(1, ge=1)
    director_timeout_s: float = Field(1.5, gt=0)
    video_codec: str = "VP8"


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
        from engines.base import AUDIO_RATE, AudioSlice
        from engines.storyline import default_shot

        shot = default_shot(0.0, 1.0)
        n = max(self.config.subclip_frames, self.engine.min_subclip_frames)
        step = n / self.engine.fps
        kfs = self.engine.keyframes(prepared, [shot], [0.0, step])
        audio = AudioSlice(start=-0.3, samples=np.zeros(round((0.3 + step) * AUDIO_RATE), np.float32))
        chars = self.engine.characters(prepared)
        self.engine.upscale(self.engine.subclip(prepared, kfs[0], kfs[1], [audio] * chars, [shot] * chars))

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
            delay_s=c.delay_ms / 1000, video_codec=c.video_codec,
            scheduler=SchedulerConfig(subclip_frames=c.subclip_frames, workers=c.workers),
            director_timeout_s=c.director_timeout_s,
        )
        session = Session(engine=self.engine, prepared=prepared, avatar_id=avatar_id,
                          avatar_image=image, idle_frame=idle, director=self.director_factory(),
                          executor=self.executor, settings=settings, on_closed=self._forget)
        self.sessions[session.id] = session
        try:
            answer = await session.connect(WebRTCPeer(session, self.rtc_configuration(), c.video_codec),
                                           offer_sdp)
        except Exception:
            await session.close()
            raise
        self.sessions_total += 1
        log.info("[%s] session created (avatar %s, %d live here)", session.id, avatar_id,
                 len(self.sessions))
        return session, answer

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
