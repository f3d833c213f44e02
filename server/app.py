"""HTTP + WebRTC signalling (aiohttp): sessions, avatars, health, metrics, the page."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer
from pydantic import BaseModel, Field

from engines.base import Avatar, Engine
from engines.director.base import Director, StaticDirector
from realtime.scheduler import SchedulerConfig
from server.avatars import DEFAULT_ID, AvatarError, AvatarStore
from server.session import Session, SessionSettings
from server.signalling import OfferError, WebRTCPeer

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parent.parent / "web_client"
MAX_SDP_BYTES = 64 * 1024


def _rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


class ServerConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8080
    engine: str = "portrait"
    avatar: Path | None = None
    ice_hosts: list[str] = Field(default_factory=list)
    ice_servers: list[str] = Field(default_factory=list)
    max_sessions: int = Field(4, ge=1)
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    data_dir: Path = Path("data")
    token: str | None = None
    delay_ms: float = Field(130.0, gt=0)
    subclip_frames: int = Field(1, ge=1)
    workers: int = Field(1, ge=1)
    render_threads: int = Field(2, ge=1)
    director: str = "embedded"
    director_timeout_s: float = Field(1.5, gt=0)

    def requires_token(self) -> bool:
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host != "localhost"


class AvatarServer:
    def __init__(self, config: ServerConfig, engine: Engine,
                 director_factory: Callable[[], Director] | None = None) -> None:
        self.config = config
        self.engine = engine
        self.director_factory = director_factory or StaticDirector
        self.store = AvatarStore(config.data_dir / "avatars")
        self.sessions: dict[str, Session] = {}
        self.executor = ThreadPoolExecutor(config.render_threads, thread_name_prefix="render")
        self._prepared: OrderedDict[str, tuple[Any, np.ndarray, np.ndarray]] = OrderedDict()
        self._prepare_lock = asyncio.Lock()
        self.ready = False
        self.default_avatar = DEFAULT_ID
        self.started = time.time()
        self.sessions_total = 0
        self.sessions_rejected = 0
        if config.requires_token() and not config.token:
            config.token = secrets.token_urlsafe(24)
            log.warning("bound to %s: API requests need 'Authorization: Bearer %s'",
                        config.host, config.token)

    # --- lifecycle -----------------------------------------------------------------
    async def startup(self, app: web.Application) -> None:
        await self.store.ensure_default()
        if self.config.avatar is not None:
            info = await self.store.add(self.config.avatar.read_bytes())
            self.default_avatar = info.id
        loop = asyncio.get_running_loop()
        from realtime.tts import load_voice
        from realtime.vad import load as load_vad

        (prepared, image, _), _, _ = await asyncio.gather(self.prepared(self.default_avatar),
                                                          loop.run_in_executor(None, load_voice),
                                                          loop.run_in_executor(None, load_vad))
        await asyncio.gather(loop.run_in_executor(self.executor, self._warm_up, prepared),
                             self._warm_up_director(image))
        self.ready = True
        log.info("ready: engine %s, avatar %s", self.engine.name, self.default_avatar)

    async def _warm_up_director(self, image: np.ndarray) -> None:
        """Load the director's models now; a failure is logged, sessions plan without it."""
        director = self.director_factory()
        try:
            await director.warm_up(image, self.default_avatar)
        except Exception as exc:  # e.g. an LLM endpoint that is down: windows fall back
            log.warning("director %s warm-up failed: %s: %s", director.name, type(exc).__name__, exc)
        finally:
            await director.aclose()

    def _warm_up(self, prepared: Any) -> None:
        """Run every stage once so the first session does not pay for first calls."""
        from engines.base import AUDIO_RATE, AudioSlice
        from engines.storyline import default_shot

        shot = default_shot(0.0, 1.0)
        step = self.config.subclip_frames / self.engine.fps
        kfs = self.engine.keyframes(prepared, [shot], [0.0, step])
        audio = AudioSlice(start=-0.3, samples=np.zeros(round((0.3 + step) * AUDIO_RATE), np.float32))
        self.engine.upscale(self.engine.subclip(prepared, kfs[0], kfs[1], [audio], [shot]))

    async def shutdown(self, app: web.Application) -> None:
        await asyncio.gather(*(s.close() for s in list(self.sessions.values())),
                             return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def prepared(self, avatar_id: str) -> tuple[Any, np.ndarray, np.ndarray]:
        """(prepared, reference image, idle frame) for an avatar, cached (LRU of 8)."""
        async with self._prepare_lock:
            if avatar_id in self._prepared:
                self._prepared.move_to_end(avatar_id)
                return self._prepared[avatar_id]
            avatar: Avatar = await self.store.load(avatar_id)
            loop = asyncio.get_running_loop()
            prep = await loop.run_in_executor(self.executor, self.engine.prepare, avatar)
            idle = self.engine.idle_frame(prep)
            self._prepared[avatar_id] = (prep, avatar.image, idle)
            while len(self._prepared) > 8:
                self._prepared.popitem(last=False)
            return self._prepared[avatar_id]

    def rtc_configuration(self) -> RTCConfiguration:
        return RTCConfiguration(iceServers=[RTCIceServer(urls=u) for u in self.config.ice_servers])

    # --- middleware -------------------------------------------------------------------
    @web.middleware
    async def errors(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        try:
            return await handler(request)
        except AvatarError as exc:
            return web.json_response({"error": exc.message}, status=exc.status)
        except web.HTTPRequestEntityTooLarge as exc:
            return web.json_response({"error": f"request body too large: {exc.text}"}, status=413)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            body = {"error": exc.reason if not exc.text or exc.text.startswith(str(exc.status))
                    else exc.text}
            return web.json_response(body, status=exc.status, headers={
                k: v for k, v in exc.headers.items() if k.lower() in ("retry-after", "allow")})

    @web.middleware
    async def auth(self, request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
        token = self.config.token
        open_paths = request.path in ("/", "/healthz", "/viewer") or request.path.startswith(
            "/static/")
        if token and not open_paths:
            given = request.headers.get("Authorization", "")
            if not secrets.compare_digest(given, f"Bearer {token}"):
                return web.json_response(
                    {"error": "missing or wrong bearer token (Authorization: Bearer ...)"},
                    status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    # --- routes -----------------------------------------------------------------------
    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_upload_bytes,
                              middlewares=[self.errors, self.auth])
        app.on_startup.append(self.startup)
        app.on_shutdown.append(self.shutdown)
        app.router.add_get("/", self.page)
        app.router.add_get("/viewer", self.page)
        app.router.add_static("/static/", WEB_ROOT, show_index=False)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/sessions", self.create_session)
        app.router.add_get("/v1/sessions", self.list_sessions)
        app.router.add_get("/v1/sessions/{id}", self.get_session)
        app.router.add_delete("/v1/sessions/{id}", self.delete_session)
        app.router.add_post("/v1/sessions/{id}/speech", self.session_speech)
        app.router.add_post("/v1/avatars", self.upload_avatar)
        app.router.add_get("/v1/avatars", self.list_avatars)
        app.router.add_get("/v1/avatars/{id}/image", self.avatar_image)
        app.router.add_delete("/v1/avatars/{id}", self.delete_avatar)
        return app

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_ROOT / "index.html")

    async def healthz(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"status": "starting"}, status=503,
                                     headers={"Retry-After": "1"})
        return web.json_response({"status": "ok", "engine": self.engine.name,
                                  "sessions": len(self.sessions)})

    async def create_session(self, request: web.Request) -> web.Response:
        if not self.ready:
            raise web.HTTPServiceUnavailable(reason="server is starting",
                                             headers={"Retry-After": "1"})
        ctype = request.content_type
        if ctype != "application/sdp":
            raise web.HTTPUnsupportedMediaType(
                reason=f"send the SDP offer as Content-Type: application/sdp (got {ctype!r})")
        if request.content_length is not None and request.content_length > MAX_SDP_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_SDP_BYTES,
                                                actual_size=request.content_length)
        raw = await request.content.read(MAX_SDP_BYTES + 1)
        if len(raw) > MAX_SDP_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_SDP_BYTES, actual_size=len(raw))
        if len(self.sessions) >= self.config.max_sessions:
            self.sessions_rejected += 1
            raise web.HTTPServiceUnavailable(
                reason=f"all {self.config.max_sessions} session slots are in use; retry later",
                headers={"Retry-After": "5"})
        try:
            sdp = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise web.HTTPBadRequest(reason="SDP offer is not UTF-8 text") from exc
        avatar_id = request.query.get("avatar", self.default_avatar)
        self.store.info(avatar_id)  # 404 if unknown
        prepared, image, idle = await self.prepared(avatar_id)
        settings = SessionSettings(
            delay_s=self.config.delay_ms / 1000,
            scheduler=SchedulerConfig(subclip_frames=self.config.subclip_frames,
                                      workers=self.config.workers),
            director_timeout_s=self.config.director_timeout_s,
        )
        session = Session(engine=self.engine, prepared=prepared, avatar_id=avatar_id,
                          avatar_image=image, idle_frame=idle, director=self.director_factory(),
                          executor=self.executor, settings=settings, on_closed=self._forget)
        self.sessions[session.id] = session
        try:
            answer = await session.connect(WebRTCPeer(session, self.rtc_configuration(),
                                                      settings.video_codec), sdp)
        except OfferError as exc:
            await session.close()
            raise web.HTTPBadRequest(reason=str(exc)) from exc
        self.sessions_total += 1
        log.info("[%s] session created (avatar %s, %d live)", session.id, avatar_id,
                 len(self.sessions))
        return web.Response(status=201, text=answer, content_type="application/sdp",
                            headers={"Location": f"/v1/sessions/{session.id}"})

    async def session_speech(self, request: web.Request) -> web.Response:
        """Uploaded speech for a session to say (an audio file as the body)."""
        from realtime.ingest import AudioUploadError, decode_upload

        session = self._session(request)
        data = await request.read()
        if not data:
            return web.json_response({"error": "empty body: send an audio file (WAV, MP3, OGG, FLAC)"},
                                     status=415)
        loop = asyncio.get_running_loop()
        try:
            ana, out = await loop.run_in_executor(None, decode_upload, data)
        except AudioUploadError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        session.speech.play(ana, out)
        return web.json_response({"duration_s": round(len(ana) / 16000, 3)}, status=202)

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    def _session(self, request: web.Request) -> Session:
        sid = request.match_info["id"]
        session = self.sessions.get(sid)
        if session is None:
            raise web.HTTPNotFound(reason=f"no session {sid!r}")
        return session

    async def get_session(self, request: web.Request) -> web.Response:
        return web.json_response(self._session(request).stats().model_dump(mode="json", by_alias=True))

    async def list_sessions(self, request: web.Request) -> web.Response:
        return web.json_response({"sessions": [s.stats().model_dump(mode="json", by_alias=True)
                                               for s in self.sessions.values()],
                                  "max_sessions": self.config.max_sessions})

    async def delete_session(self, request: web.Request) -> web.Response:
        session = self._session(request)
        await session.close()
        return web.Response(status=204)

    async def upload_avatar(self, request: web.Request) -> web.Response:
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            data = b""
            async for part in reader:
                if getattr(part, "filename", None) or getattr(part, "name", None) in (
                        "image", "file"):
                    data = await part.read()  # type: ignore[union-attr]
                    break
            if not data:
                raise AvatarError(415, "multipart upload has no image part "
                                       "(name it 'image' or 'file')")
        else:
            data = await request.read()
        if not data:
            raise AvatarError(415, "empty body: send a JPEG or PNG image")
        info = await self.store.add(data)
        return web.json_response(info.as_dict(), status=201,
                                 headers={"Location": f"/v1/avatars/{info.id}"})

    async def list_avatars(self, request: web.Request) -> web.Response:
        return web.json_response({"avatars": [a.as_dict() for a in self.store.list()],
                                  "default": self.default_avatar})

    async def avatar_image(self, request: web.Request) -> web.FileResponse:
        avatar_id = request.match_info["id"]
        self.store.info(avatar_id)
        return web.FileResponse(self.store.root / f"{avatar_id}.png")

    async def delete_avatar(self, request: web.Request) -> web.Response:
        avatar_id = request.match_info["id"]
        await self.store.delete(avatar_id)
        self._prepared.pop(avatar_id, None)
        if self.default_avatar == avatar_id:
            self.default_avatar = DEFAULT_ID
        return web.Response(status=204)

    async def metrics(self, request: web.Request) -> web.Response:
        lines = [
            "# TYPE avatar_sessions gauge", f"avatar_sessions {len(self.sessions)}",
            "# TYPE avatar_sessions_total counter", f"avatar_sessions_total {self.sessions_total}",
            "# TYPE avatar_sessions_rejected_total counter",
            f"avatar_sessions_rejected_total {self.sessions_rejected}",
            "# TYPE avatar_asyncio_tasks gauge", f"avatar_asyncio_tasks {len(asyncio.all_tasks())}",
            "# TYPE process_resident_memory_bytes gauge",
            f"process_resident_memory_bytes {_rss_bytes()}",
        ]
        for s in self.sessions.values():
            st = s.stats()
            for key in ("fps", "latency_ms", "av_offset_ms", "held_frames", "late_frames",
                        "render_ms"):
                value = getattr(st, key)
                if value is not None:
                    lines.append(f'avatar_session_{key}{{session="{s.id}"}} {value}')
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

