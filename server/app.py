"""The HTTP front (aiohttp): the page, avatars, health, metrics, and sessions placed on workers.

Sessions live in session worker processes (``server.workers``); this process
answers HTTP, keeps the avatars and the figures, and hands each session call
to the worker that holds the session. WebRTC media goes straight between the
client and that worker.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from pydantic import BaseModel, Field

from server.avatars import DEFAULT_ID, AvatarError, AvatarStore
from server.host import HostConfig
from server.signalling import MAX_SDP_BYTES
from server.workers import SessionGone, WorkerCallError, WorkerError, WorkerPool

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parent.parent / "web_client"


def _rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


class ServerConfig(BaseModel):
    """The HTTP front's settings (what sessions run with is ``HostConfig``, the workers')."""

    host: str = "127.0.0.1"
    port: int = 8080
    avatar: Path | None = None
    max_sessions: int = Field(4, ge=1)
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    data_dir: Path = Path("data")
    token: str | None = None
    session_workers: int = Field(1, ge=1)

    def requires_token(self) -> bool:
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host != "localhost"


class AvatarServer:
    def __init__(self, config: ServerConfig, host: HostConfig, *, log_level: str = "INFO") -> None:
        self.config = config
        self.host = host
        self.log_level = log_level
        self.store = AvatarStore(config.data_dir / "avatars")
        self.pool: WorkerPool | None = None
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
        self.pool = WorkerPool(self.host, self.config.session_workers, warm_avatar=self.default_avatar,
                               log_level=self.log_level)
        await self.pool.start()
        self.ready = True
        log.info("ready: engine %s, avatar %s, %d session worker(s)", self.host.engine,
                 self.default_avatar, self.config.session_workers)

    async def shutdown(self, app: web.Application) -> None:
        if self.pool is not None:
            await self.pool.aclose()

    def _pool(self) -> WorkerPool:
        if self.pool is None or not self.ready:
            raise web.HTTPServiceUnavailable(reason="server is starting", headers={"Retry-After": "1"})
        return self.pool

    # --- middleware -------------------------------------------------------------------
    @web.middleware
    async def errors(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        try:
            return await handler(request)
        except AvatarError as exc:
            return web.json_response({"error": exc.message}, status=exc.status)
        except SessionGone as exc:
            # a session that ended says how (its worker died, the peer left); others are unknown
            return web.json_response({"error": str(exc)}, status=410 if exc.why else 404)
        except WorkerCallError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        except WorkerError as exc:
            return web.json_response({"error": str(exc)}, status=503, headers={"Retry-After": "2"})
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
        app.router.add_get("/viewer", self.viewer_page)
        app.router.add_static("/static/", WEB_ROOT, show_index=False)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/sessions", self.create_session)
        app.router.add_get("/v1/sessions", self.list_sessions)
        app.router.add_get("/v1/sessions/{id}", self.get_session)
        app.router.add_delete("/v1/sessions/{id}", self.delete_session)
        app.router.add_post("/v1/sessions/{id}/speech", self.session_speech)
        app.router.add_route("*", "/v1/sessions/{id}/egress", self.forward)
        app.router.add_route("*", "/v1/sessions/{id}/egress/{eid}", self.forward)
        app.router.add_post("/v1/sessions/{id}/whep", self.forward)
        app.router.add_route("*", "/v1/sessions/{id}/whep/{viewer}", self.forward)
        app.router.add_post("/v1/avatars", self.upload_avatar)
        app.router.add_get("/v1/avatars", self.list_avatars)
        app.router.add_get("/v1/avatars/{id}/image", self.avatar_image)
        app.router.add_delete("/v1/avatars/{id}", self.delete_avatar)
        app.router.add_get("/v1/workers", self.list_workers)
        return app

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_ROOT / "index.html")

    async def viewer_page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_ROOT / "viewer.html")

    async def forward(self, request: web.Request) -> web.Response:
        """A session call its worker answers in full (WHEP viewers, egress): status, body and headers.

        The worker checks the request (content type, SDP, its limits); the main only
        finds the worker, so every such route is this one handler.
        """
        sid = request.match_info["id"]
        pool = self._pool()
        data = await request.read() if request.body_exists else None
        under = request.path[len(f"/v1/sessions/{sid}"):]
        res = await pool.forward(sid, request.method, under, data=data,
                                 content_type=request.headers.get("Content-Type"))
        return web.Response(status=res.status, body=res.body, headers=res.headers)

    async def healthz(self, request: web.Request) -> web.Response:
        if not self.ready or self.pool is None:
            return web.json_response({"status": "starting"}, status=503,
                                     headers={"Retry-After": "1"})
        return web.json_response({"status": "ok", "engine": self.host.engine,
                                  "sessions": self.pool.session_count(),
                                  "session_workers": len(self.pool.alive())})

    async def create_session(self, request: web.Request) -> web.Response:
        pool = self._pool()
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
        if pool.session_count() >= self.config.max_sessions:
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
        if "v=0" not in sdp or "m=" not in sdp:  # plainly not SDP: no worker needs to see it
            raise web.HTTPBadRequest(reason="body is not an SDP offer (expected 'v=0' and media sections)")
        sid, answer, worker = await pool.create_session(avatar_id, sdp)
        self.sessions_total += 1
        log.info("[%s] session created on worker %d (avatar %s, %d live)", sid, worker.index, avatar_id,
                 pool.session_count())
        return web.Response(status=201, text=answer, content_type="application/sdp",
                            headers={"Location": f"/v1/sessions/{sid}"})

    async def session_speech(self, request: web.Request) -> web.Response:
        """Uploaded speech for a session to say (an audio file as the body); the worker decodes it."""
        sid = request.match_info["id"]
        pool = self._pool()
        if pool.owner(sid) is None:
            raise SessionGone(sid, pool.ended.get(sid))
        data = await request.read()
        if not data:
            return web.json_response({"error": "empty body: send an audio file (WAV, MP3, OGG, FLAC)"},
                                     status=415)
        body = await pool.session_call(sid, "POST", "/speech", data=data)
        return web.json_response(body, status=202)

    async def get_session(self, request: web.Request) -> web.Response:
        stats = await self._pool().session_call(request.match_info["id"], "GET")
        return web.json_response(stats)

    async def list_sessions(self, request: web.Request) -> web.Response:
        pool = self._pool()
        sessions = []
        for w in pool.alive():
            for sid, st in w.sessions.items():
                sessions.append({**st, "session": sid, "session_worker": w.index})
        return web.json_response({"sessions": sessions, "max_sessions": self.config.max_sessions})

    async def delete_session(self, request: web.Request) -> web.Response:
        await self._pool().delete_session(request.match_info["id"])
        return web.Response(status=204)

    async def list_workers(self, request: web.Request) -> web.Response:
        pool = self._pool()
        return web.json_response({"workers": pool.describe(), "restarts": pool.restarts,
                                  "cpu_seconds": round(pool.cpu_seconds(), 2)})

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
        if self.pool is not None:
            await self.pool.forget_avatar(avatar_id)
        if self.default_avatar == avatar_id:
            self.default_avatar = DEFAULT_ID
        return web.Response(status=204)

    async def metrics(self, request: web.Request) -> web.Response:
        pool = self.pool
        live = pool.session_count() if pool is not None else 0
        lines = [
            "# TYPE avatar_sessions gauge", f"avatar_sessions {live}",
            "# TYPE avatar_sessions_total counter", f"avatar_sessions_total {self.sessions_total}",
            "# TYPE avatar_sessions_rejected_total counter",
            f"avatar_sessions_rejected_total {self.sessions_rejected}",
            "# TYPE avatar_asyncio_tasks gauge", f"avatar_asyncio_tasks {len(asyncio.all_tasks())}",
            "# TYPE process_resident_memory_bytes gauge",
            f"process_resident_memory_bytes {_rss_bytes()}",
        ]
        if pool is not None:
            lines += ["# TYPE avatar_session_workers gauge", f"avatar_session_workers {len(pool.alive())}",
                      "# TYPE avatar_session_worker_restarts_total counter",
                      f"avatar_session_worker_restarts_total {pool.restarts}",
                      "# TYPE avatar_session_worker_cpu_seconds_total counter",
                      f"avatar_session_worker_cpu_seconds_total {pool.cpu_seconds():.3f}"]
            for w in pool.alive():
                lines.append(f'avatar_session_worker_sessions{{worker="{w.index}"}} {len(w.sessions)}')
                for sid, st in w.sessions.items():
                    for key in ("fps", "latency_ms", "av_offset_ms", "held_frames", "late_frames",
                                "render_ms", "viewers"):
                        if st.get(key) is not None:
                            lines.append(f'avatar_session_{key}{{session="{sid}"}} {st[key]}')
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")
