"""A session worker process: it owns its sessions' ingest, planning, rendering, encoding and WebRTC.

The main process (``server.app``) starts one worker per core
(``avatar serve --session-workers N``) as ``python -m server.worker`` and
sends it one line of JSON on stdin: its ``HostConfig``, the token the main
will use, and the avatar to warm up with. The worker loads the engine and the
shared models, answers on a loopback HTTP port of its own and prints
``READY <port>`` on stdout. Its API is the main's only, behind the token:

========================================  ==============================================
``POST /sessions?avatar=ID`` (SDP offer)  ``201 {"id", "answer"}``; 400 for a bad offer
``GET /sessions``, ``GET /sessions/{id}``  stats
``DELETE /sessions/{id}``                 ``204``
``POST /sessions/{id}/speech`` (audio)    ``202 {"duration_s"}``; 413/415/422 as the main's
``POST /sessions/{id}/egress`` (JSON)     ``201`` the new egress, ``Location``; 422 bad URL or settings
``GET /sessions/{id}/egress[/{eid}]``     the session's egresses (RTMP pushes), or one
``DELETE /sessions/{id}/egress/{eid}``    ``204``: stop pushing
``POST /sessions/{id}/whep`` (SDP offer)  ``201``, SDP answer, ``Location: /sessions/{id}/whep/{viewer}``;
                                          400 bad offer, 413, 415, 503 + ``Retry-After`` (viewers full)
``DELETE /sessions/{id}/whep/{viewer}``   ``204``; 404 unknown viewer
``PATCH /sessions/{id}/whep/{viewer}``    ``405``: no trickle ICE, every candidate is in the answer
``DELETE /avatars/{id}``                  forget a prepared avatar
``GET /healthz``                          sessions, tasks, memory
========================================  ==============================================

The WHEP routes answer in full (status, body, ``Location``, ``Retry-After``,
``Allow``): the main passes them through to the client as they are, with its
``/v1`` in front of a ``Location``, for the worker's paths are the main's
without it.

WebRTC media goes straight between the client and the worker (the answer
carries the worker's ICE candidates). The worker exits when its parent does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from server.host import HostConfig, SessionHost
from server.session import ViewersFull
from server.signalling import MAX_SDP_BYTES, OfferError

log = logging.getLogger(__name__)

TOKEN_HEADER = "X-Worker-Token"
PATH_OPTIONS = ("weights", "trt_engines", "wav2vec")  # engine options that are paths (JSON has strings)
PARENT_CHECK_S = 1.0
PASSED_HEADERS = ("Retry-After", "Allow")  # what an error keeps of its headers


class WorkerStart(BaseModel):
    """The one line of JSON a worker reads on stdin."""

    config: HostConfig
    token: str
    warm_avatar: str


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class WorkerApp:
    def __init__(self, host: SessionHost, token: str) -> None:
        self.host = host
        self.token = token

    @web.middleware
    async def guard(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if not secrets.compare_digest(request.headers.get(TOKEN_HEADER, ""), self.token):
            return web.json_response({"error": "this port is a session worker's, for its server only"},
                                     status=403)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return web.json_response({"error": exc.reason}, status=exc.status,
                                     headers={k: exc.headers[k] for k in PASSED_HEADERS if k in exc.headers})

    def build(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024, middlewares=[self.guard])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_post("/sessions", self.create)
        app.router.add_get("/sessions", self.list)
        app.router.add_get("/sessions/{id}", self.get)
        app.router.add_delete("/sessions/{id}", self.delete)
        app.router.add_post("/sessions/{id}/speech", self.speech)
        app.router.add_post("/sessions/{id}/egress", self.start_egress)
        app.router.add_get("/sessions/{id}/egress", self.list_egress)
        app.router.add_get("/sessions/{id}/egress/{eid}", self.get_egress)
        app.router.add_delete("/sessions/{id}/egress/{eid}", self.stop_egress)
        app.router.add_post("/sessions/{id}/whep", self.whep_offer)
        app.router.add_delete("/sessions/{id}/whep/{viewer}", self.whep_delete)
        app.router.add_patch("/sessions/{id}/whep/{viewer}", self.whep_patch)
        app.router.add_delete("/avatars/{id}", self.forget_avatar)
        return app

    def _session(self, request: web.Request) -> Any:
        sid = request.match_info["id"]
        session = self.host.sessions.get(sid)
        if session is None:
            raise web.HTTPNotFound(reason=f"no session {sid!r}")
        return session

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "pid": os.getpid(), "sessions": len(self.host.sessions),
                                  "sessions_total": self.host.sessions_total,
                                  "tasks": len(asyncio.all_tasks()), "rss_bytes": _rss_bytes()})

    async def create(self, request: web.Request) -> web.Response:
        sdp = (await request.read()).decode("utf-8", errors="replace")
        avatar = request.query.get("avatar", "")
        try:
            session, answer = await self.host.create_session(avatar, sdp)
        except OfferError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"id": session.id, "answer": answer}, status=201)

    async def list(self, request: web.Request) -> web.Response:
        return web.json_response({"sessions": [s.stats().model_dump(mode="json", by_alias=True)
                                               for s in self.host.sessions.values()]})

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(self._session(request).stats().model_dump(mode="json", by_alias=True))

    async def delete(self, request: web.Request) -> web.Response:
        await self._session(request).close()
        return web.Response(status=204)

    async def speech(self, request: web.Request) -> web.Response:
        from realtime.ingest import AudioUploadError, decode_upload

        session = self._session(request)
        data = await request.read()
        loop = asyncio.get_running_loop()
        try:
            ana, out = await loop.run_in_executor(None, decode_upload, data)
        except AudioUploadError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        session.speech.play(ana, out)
        return web.json_response({"duration_s": round(len(ana) / 16000, 3)}, status=202)

    async def start_egress(self, request: web.Request) -> web.Response:
        from realtime.egress import EgressError, EgressRequest

        session = self._session(request)
        try:
            body = EgressRequest.parse(await request.json())
            assert body.url is not None
            egress = session.start_egress(body.url, body.settings())
        except ValueError as exc:  # EgressError, or a body that is not JSON
            message = str(exc) if isinstance(exc, EgressError) else "the body is not valid JSON"
            return web.json_response({"error": message}, status=422)
        return web.json_response(egress.describe(), status=201,
                                 headers={"Location": f"/sessions/{session.id}/egress/{egress.id}"})

    async def list_egress(self, request: web.Request) -> web.Response:
        session = self._session(request)
        return web.json_response({"egress": [e.describe() for e in session.egresses.values()]})

    def _egress(self, request: web.Request) -> Any:
        session = self._session(request)
        egress = session.egresses.get(request.match_info["eid"])
        if egress is None:
            raise web.HTTPNotFound(reason=f"session {session.id} has no egress {request.match_info['eid']!r}")
        return session, egress

    async def get_egress(self, request: web.Request) -> web.Response:
        return web.json_response(self._egress(request)[1].describe())

    async def stop_egress(self, request: web.Request) -> web.Response:
        session, egress = self._egress(request)
        await session.stop_egress(egress.id)
        return web.Response(status=204)

    async def whep_offer(self, request: web.Request) -> web.Response:
        """A WHEP viewer's offer (draft-ietf-wish-whep): ``201``, the SDP answer and the viewer's resource."""
        session = self._session(request)
        if request.content_type != "application/sdp":
            raise web.HTTPUnsupportedMediaType(
                reason=f"send the SDP offer as Content-Type: application/sdp (got {request.content_type!r})")
        raw = await request.content.read(MAX_SDP_BYTES + 1)
        if len(raw) > MAX_SDP_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_SDP_BYTES, actual_size=len(raw),
                                                reason=f"SDP offer too large (at most {MAX_SDP_BYTES} bytes)")
        try:
            sdp = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise web.HTTPBadRequest(reason="SDP offer is not UTF-8 text") from exc
        try:
            viewer, answer = await self.host.add_viewer(session, sdp)
        except ViewersFull as exc:
            raise web.HTTPServiceUnavailable(reason=str(exc), headers={"Retry-After": "10"}) from exc
        except OfferError as exc:
            raise web.HTTPBadRequest(reason=str(exc)) from exc
        return web.Response(status=201, text=answer, content_type="application/sdp",
                            headers={"Location": f"/sessions/{session.id}/whep/{viewer.id}"})

    async def whep_delete(self, request: web.Request) -> web.Response:
        viewer = request.match_info["viewer"]
        if not await self._session(request).remove_viewer(viewer):
            raise web.HTTPNotFound(reason=f"no viewer {viewer!r} of this session (ended, or never was)")
        return web.Response(status=204)

    async def whep_patch(self, request: web.Request) -> web.Response:
        self._session(request)
        raise web.HTTPMethodNotAllowed(
            "PATCH", ["DELETE"], reason="trickle ICE is not supported: every candidate is in the SDP "
                                        "answer, and the offer should carry all of the viewer's")

    async def forget_avatar(self, request: web.Request) -> web.Response:
        self.host.forget_avatar(request.match_info["id"])
        return web.Response(status=204)


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    while os.getppid() == parent:
        try:
            await asyncio.wait_for(stop.wait(), PARENT_CHECK_S)
            return
        except TimeoutError:
            continue
    log.warning("the server process is gone: this worker stops")
    stop.set()


async def serve(start: WorkerStart, parent: int) -> None:
    import signal

    from engines.registry import create_engine
    from server.directors import director_factory

    c = start.config
    options: dict[str, Any] = {k: Path(v) if k in PATH_OPTIONS and isinstance(v, str) else v
                               for k, v in c.engine_options.items()}
    try:
        engine = create_engine(c.engine, **options)
    except ValueError as exc:  # what to pass: the main reports that this worker could not start
        log.error("%s", exc)
        raise SystemExit(2) from None
    host = SessionHost(c, engine, director_factory(c.director, **c.director_options))
    await host.start(start.warm_avatar)
    runner = web.AppRunner(WorkerApp(host, start.token).build(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    log.info("session worker %d ready on 127.0.0.1:%d (engine %s)", os.getpid(), port, engine.name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.ensure_future(_watch_parent(parent, stop))
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await host.aclose()
        await runner.cleanup()


def configure_process(config: HostConfig) -> None:
    """Process-wide settings a session process runs under (its owner's choice)."""
    import cv2
    import torch

    from server.ice import restrict_host_candidates, set_consent_timers

    cv2.setNumThreads(1)  # one core per render; parallelism comes from the worker pool
    # small models, one request at a time: more threads only contend with the renderers
    torch.set_num_threads(config.cpu_threads)
    if config.director == "embedded":
        from engines.director.embedded import TRANSCRIPTION_BUDGET

        TRANSCRIPTION_BUDGET.get().duty = config.live_transcription_duty
    restrict_host_candidates(config.ice_hosts)
    set_consent_timers(config.consent_interval_s, config.consent_failures)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="a session worker (started by avatar serve)")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s worker{args.index} %(name)s: %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    parent = os.getppid()
    line = sys.stdin.readline()
    if not line:
        log.error("no start message on stdin: a session worker is started by avatar serve")
        return 2
    start = WorkerStart.model_validate_json(line)
    configure_process(start.config)
    asyncio.run(serve(start, parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
