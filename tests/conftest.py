"""Shared fixtures. Every async test fails if it leaks asyncio tasks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    before = set(asyncio.all_tasks())
    yield
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t not in before and t is not current]
    if leaked:  # give tasks that are finishing a bounded chance to do so
        await asyncio.wait(leaked, timeout=0.5)
    leaked = [t for t in leaked if not t.done()]
    if not leaked:
        return
    names = ", ".join(sorted(t.get_name() + ":" + repr(t.get_coro()) for t in leaked))
    pytest.fail(f"test leaked {len(leaked)} asyncio task(s): {names}")


# --------------------------------------------------------------------------- #
# A real server process, as a user starts it, shared by the end-to-end tests.
# --------------------------------------------------------------------------- #

import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

MAX_SESSIONS = 3


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    from server.ice import restrict_host_candidates

    restrict_host_candidates(["127.0.0.1"])  # the test peers stay on loopback too
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    log = root / "server.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--ice-host", "127.0.0.1", "--data-dir", str(root / "data"),
           "--max-sessions", str(MAX_SESSIONS), "--max-upload-mb", "2",
           "--consent-interval", "0.5", "--consent-failures", "3"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parent.parent,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as res:
                if res.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server not ready in 120 s:\n{log.read_text()[-3000:]}")
        try:  # wait a moment for the process to exit, which would be an error
            proc.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            pass
    try:
        yield RunningServer(url=url, process=proc, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
