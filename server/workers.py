"""The main process's session workers: started, watched, replaced, and where each session lives.

Sessions are placed on the worker with the fewest; every call about a
session goes to its worker. A worker that dies takes only its own sessions:
they are reported as ended, with why, and a new worker takes its place. The
pool learns of sessions that ended inside a worker (the peer left) by
asking each worker for its sessions every second, which also keeps the
figures ``GET /v1/sessions`` and ``/metrics`` show.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from server.host import HostConfig
from server.worker import TOKEN_HEADER, WorkerStart

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0
POLL_S = 1.0
ENDED_KEPT = 200  # sessions that ended, remembered so a client can learn why


PASSED_HEADERS = ("Content-Type", "Location", "Retry-After", "Allow")  # a forwarded answer keeps these


class WorkerError(RuntimeError):
    """A worker could not be started, or a call to it failed."""


@dataclass(slots=True, frozen=True)
class WorkerAnswer:
    """What a worker answered: its status, body and the headers a client is to see."""

    status: int
    body: bytes
    content_type: str
    headers: dict[str, str]


@dataclass
class WorkerHandle:
    index: int
    process: asyncio.subprocess.Process
    port: int = 0
    started: float = field(default_factory=time.time)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> latest stats
    placed_at: dict[str, float] = field(default_factory=dict)  # id -> when it was placed here
    placing: int = 0  # sessions being created on it
    health: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def load(self) -> int:
        return len(self.sessions) + self.placing

    def cpu_seconds(self) -> float:
        """User + system CPU time of the worker process so far."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0


class WorkerPool:
    def __init__(self, config: HostConfig, count: int, *, warm_avatar: str, log_level: str = "INFO") -> None:
        if count < 1:
            raise ValueError(f"--session-workers must be at least 1, got {count}")
        self.config = config
        self.count = count
        self.warm_avatar = warm_avatar
        self.log_level = log_level
        self.token = secrets.token_urlsafe(24)
        self.workers: list[WorkerHandle | None] = [None] * count
        self.ended: OrderedDict[str, str] = OrderedDict()  # session id -> why it ended
        self.restarts = 0
        self.cpu_seconds_retired = 0.0  # CPU time of workers that are gone
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Start every worker; ``WorkerError`` (with the worker's reason) if one cannot start."""
        self._http = aiohttp.ClientSession(headers={TOKEN_HEADER: self.token},
                                           timeout=aiohttp.ClientTimeout(total=60))
        started = await asyncio.gather(*(self._spawn(i) for i in range(self.count)), return_exceptions=True)
        failed = [r for r in started if isinstance(r, BaseException)]
        if failed:
            await self.aclose()
            raise failed[0] if isinstance(failed[0], WorkerError) else WorkerError(str(failed[0]))
        self._own(self._poll(), "poll workers")

    def _own(self, coro: Any, name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self, index: int) -> WorkerHandle:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.worker", "--index", str(index), "--log-level", self.log_level,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        handle = WorkerHandle(index, process)
        assert process.stdin is not None and process.stdout is not None
        start = WorkerStart(config=self.config, token=self.token, warm_avatar=self.warm_avatar)
        process.stdin.write((start.model_dump_json() + "\n").encode())
        await process.stdin.drain()
        process.stdin.close()
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            raise WorkerError(f"session worker {index} did not start within {START_TIMEOUT_S:.0f} s"
                              ) from None
        if not line.startswith(b"READY "):
            code = await process.wait()
            raise WorkerError(f"session worker {index} exited with {code} before it was ready "
                              "(its log says why)")
        handle.port = int(line.split()[1])
        self.workers[index] = handle
        self._own(self._watch(handle), f"watch worker {index}")
        log.info("session worker %d (pid %d) ready on port %d", index, handle.pid, handle.port)
        return handle

    async def _watch(self, handle: WorkerHandle) -> None:
        code = await handle.process.wait()
        if self._closing:
            return
        self.cpu_seconds_retired += handle.cpu_seconds()
        why = f"its session worker (pid {handle.pid}) exited with {code}"
        lost = list(handle.sessions)
        for sid in lost:
            self._ended(sid, f"session ended: {why}")
        handle.sessions.clear()
        if self.workers[handle.index] is handle:
            self.workers[handle.index] = None
        log.error("session worker %d: %s; %d session(s) ended; starting a new one", handle.index, why,
                  len(lost))
        self.restarts += 1
        try:
            await self._spawn(handle.index)
        except WorkerError as exc:
            log.error("%s", exc)

    def _ended(self, sid: str, why: str) -> None:
        self.ended[sid] = why
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            await asyncio.gather(*(self._refresh(w) for w in self.alive()), return_exceptions=True)

    async def _refresh(self, handle: WorkerHandle) -> None:
        asked = time.monotonic()
        listed = (await self._call(handle, "GET", "/sessions"))["sessions"]
        handle.health = await self._call(handle, "GET", "/healthz")
        now = {s["session"]: s for s in listed}
        # gone from the worker's list (and placed before the list was asked for): it ended there
        for sid in [s for s in handle.sessions if s not in now and handle.placed_at.get(s, 0) < asked]:
            self._ended(sid, "session ended")
            del handle.sessions[sid]
            handle.placed_at.pop(sid, None)
        handle.sessions.update({sid: st for sid, st in now.items() if sid in handle.sessions})

    async def aclose(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in self.alive():
            with contextlib.suppress(ProcessLookupError):
                handle.process.terminate()
        for handle in self.alive():
            try:
                await asyncio.wait_for(handle.process.wait(), 15)
            except TimeoutError:
                handle.process.kill()
                await handle.process.wait()
        if self._http is not None:
            await self._http.close()

    # --- placement and calls -------------------------------------------------------------
    def alive(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w is not None and w.process.returncode is None]

    def session_count(self) -> int:
        return sum(w.load for w in self.alive())

    def owner(self, sid: str) -> WorkerHandle | None:
        return next((w for w in self.alive() if sid in w.sessions), None)

    async def _request(self, handle: WorkerHandle, method: str, path: str, *, data: bytes | None = None,
                       params: dict[str, str] | None = None, content_type: str | None = None
                       ) -> WorkerAnswer:
        """One call to a worker, answered in full; ``WorkerError`` if it did not answer."""
        assert self._http is not None
        headers = {"Content-Type": content_type} if content_type else None
        try:
            async with self._http.request(method, handle.url + path, data=data, params=params,
                                          headers=headers) as res:
                return WorkerAnswer(res.status, await res.read(), res.content_type,
                                    {k: res.headers[k] for k in PASSED_HEADERS if k in res.headers})
        except aiohttp.ClientError as exc:
            raise WorkerError(f"session worker {handle.index} did not answer: {exc}") from exc

    async def _call(self, handle: WorkerHandle, method: str, path: str, *, data: bytes | None = None,
                    params: dict[str, str] | None = None, expect_json: bool = True
                    ) -> Any:
        """A call whose answer is JSON for the main itself; ``WorkerCallError`` if the worker refused."""
        res = await self._request(handle, method, path, data=data, params=params)
        body = None
        if res.content_type == "application/json" and (expect_json or res.status >= 400):
            try:
                body = json.loads(res.body)
            except ValueError as exc:
                raise WorkerError(f"session worker {handle.index} answered bad JSON: {exc}") from exc
        if res.status >= 400:
            message = body.get("error") if isinstance(body, dict) else f"session worker answered {res.status}"
            raise WorkerCallError(res.status, str(message))
        return body

    async def create_session(self, avatar_id: str, offer_sdp: str) -> tuple[str, str, WorkerHandle]:
        """Place a session on the least loaded worker: (session id, SDP answer, its worker)."""
        alive = self.alive()
        if not alive:
            raise WorkerError("no session worker is running (one is being restarted): retry shortly")
        handle = min(alive, key=lambda w: (w.load, w.index))
        handle.placing += 1
        try:
            body = await self._call(handle, "POST", "/sessions", data=offer_sdp.encode(),
                                    params={"avatar": avatar_id})
        finally:
            handle.placing -= 1
        handle.sessions[body["id"]] = {}
        handle.placed_at[body["id"]] = time.monotonic()
        return body["id"], body["answer"], handle

    async def session_call(self, sid: str, method: str, path: str = "", *, data: bytes | None = None) -> Any:
        handle = self.owner(sid)
        if handle is None:
            raise SessionGone(sid, self.ended.get(sid))
        return await self._call(handle, method, f"/sessions/{sid}{path}", data=data,
                                expect_json=method != "DELETE")

    async def forward(self, sid: str, method: str, path: str, *, data: bytes | None = None,
                      content_type: str | None = None) -> WorkerAnswer:
        """A client's call about a session, answered by its worker as the client is to see it.

        The worker's paths are the main's without ``/v1``, so a ``Location`` it
        answers gets the ``/v1`` back. ``SessionGone`` if no worker holds ``sid``.
        """
        handle = self.owner(sid)
        if handle is None:
            raise SessionGone(sid, self.ended.get(sid))
        res = await self._request(handle, method, f"/sessions/{sid}{path}", data=data,
                                  content_type=content_type)
        location = res.headers.get("Location", "")
        if location.startswith("/sessions/"):
            return replace(res, headers={**res.headers, "Location": "/v1" + location})
        return res

    async def delete_session(self, sid: str) -> None:
        await self.session_call(sid, "DELETE")
        handle = self.owner(sid)
        if handle is not None:
            handle.sessions.pop(sid, None)
        self._ended(sid, "session ended: deleted")

    async def forget_avatar(self, avatar_id: str) -> None:
        await asyncio.gather(*(self._call(w, "DELETE", f"/avatars/{avatar_id}", expect_json=False)
                               for w in self.alive()), return_exceptions=True)

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for i, w in enumerate(self.workers):
            if w is None:
                out.append({"index": i, "state": "starting"})
                continue
            out.append({"index": i, "state": "running", "pid": w.pid, "port": w.port,
                        "sessions": len(w.sessions), "cpu_seconds": round(w.cpu_seconds(), 2),
                        "uptime_s": round(time.time() - w.started, 1),
                        "tasks": w.health.get("tasks"), "rss_bytes": w.health.get("rss_bytes")})
        return out

    def cpu_seconds(self) -> float:
        """CPU time of every worker this pool has run, the dead included."""
        return self.cpu_seconds_retired + sum(w.cpu_seconds() for w in self.alive())


class WorkerCallError(WorkerError):
    """A worker refused a call (status and its message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SessionGone(LookupError):
    """No running session with this id; ``why`` says how it ended, if it did."""

    def __init__(self, sid: str, why: str | None) -> None:
        super().__init__(why or f"no session {sid!r}")
        self.sid = sid
        self.why = why
