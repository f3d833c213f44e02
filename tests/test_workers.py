"""Session worker processes, on a real server: placement, a killed worker, churn without leaks."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from server.launch import ServerProcess
from server.peer import AvatarPeer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Its own server (a test here kills one of its workers), with two session workers."""
    from server.ice import restrict_host_candidates

    restrict_host_candidates(["127.0.0.1"])
    proc = ServerProcess(tmp_path_factory.mktemp("workers"), "--session-workers", "2",
                         "--max-sessions", "8", "--director", "static", "--consent-interval", "0.5",
                         "--consent-failures", "3")
    with proc:
        yield proc


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as res:
        return res.status, await res.json()


async def workers(server: ServerProcess) -> dict[str, Any]:
    status, body = await get(f"{server.url}/v1/workers")
    assert status == 200
    return dict(body)


async def placed(server: ServerProcess, peer: AvatarPeer) -> int:
    """The worker a peer's session is on, once the server lists it."""
    assert peer.session_url is not None
    sid = peer.session_url.rsplit("/", 1)[1]
    for _ in range(50):
        _, body = await get(f"{server.url}/v1/sessions")
        match = [s for s in body["sessions"] if s["session"] == sid]
        if match:
            return int(match[0]["session_worker"])
        await asyncio.sleep(0.1)
    raise AssertionError(f"session {sid} is not listed")


async def test_sessions_are_spread_over_the_workers(two_workers: ServerProcess) -> None:
    peers = [AvatarPeer(two_workers.url, keep_frames=False) for _ in range(3)]
    try:
        for p in peers:
            await p.connect()
        await asyncio.gather(*(p.wait_open() for p in peers))
        where = [await placed(two_workers, p) for p in peers]
        assert sorted(where[:2]) == [0, 1], where  # the second goes where the first is not
        for p in peers:  # every session streams, wherever it is
            await p.wait_until(lambda p=p: len(p.got.video_times) > 25, 10, "a second of video")
        info = await workers(two_workers)
        assert sorted(w["sessions"] for w in info["workers"]) == [1, 2]
    finally:
        for p in peers:
            await p.close()


async def test_a_killed_worker_ends_only_its_sessions_and_is_replaced(two_workers: ServerProcess) -> None:
    a, b = AvatarPeer(two_workers.url, keep_frames=False), AvatarPeer(two_workers.url, keep_frames=False)
    try:
        for p in (a, b):
            await p.connect()
            await p.wait_open()
        wa, wb = await placed(two_workers, a), await placed(two_workers, b)
        assert wa != wb
        before = await workers(two_workers)
        victim = next(w for w in before["workers"] if w["index"] == wa)
        os.kill(victim["pid"], signal.SIGKILL)
        # the other session goes on streaming...
        seen = len(b.got.video_times)
        await b.wait_until(lambda: len(b.got.video_times) > seen + 50, 5, "two more seconds of video")
        # ...the killed one is reported as ended, and why
        assert a.session_url is not None
        for _ in range(50):
            status, body = await get(a.session_url)
            if status == 410:
                break
            await asyncio.sleep(0.1)
        assert status == 410 and "exited" in body["error"], (status, body)
        # a new worker takes the dead one's place, and takes sessions
        for _ in range(600):
            info = await workers(two_workers)
            replaced = next(w for w in info["workers"] if w["index"] == wa)
            if replaced.get("pid") not in (None, victim["pid"]):
                break
            await asyncio.sleep(0.1)
        assert info["restarts"] == before["restarts"] + 1
        assert replaced["pid"] != victim["pid"] and replaced["sessions"] == 0
        c = AvatarPeer(two_workers.url, keep_frames=False)
        try:
            await c.connect()
            await c.wait_open()
            await c.wait_until(lambda: len(c.got.video_times) > 25, 10, "video from the new worker")
        finally:
            await c.close()
    finally:
        for p in (a, b):
            await p.close(delete=False)


async def test_churn_across_workers_leaves_nothing_behind(two_workers: ServerProcess) -> None:
    async def settled() -> dict[str, Any]:
        for _ in range(100):
            info = await workers(two_workers)
            if all(w.get("sessions") == 0 for w in info["workers"]):
                return info
            await asyncio.sleep(0.1)
        raise AssertionError(f"sessions left: {info}")

    await asyncio.sleep(1.5)  # the workers' figures are refreshed once a second
    base = await settled()
    for round_ in range(4):
        peers = [AvatarPeer(two_workers.url, keep_frames=False) for _ in range(3)]
        for p in peers:
            await p.connect()
        await asyncio.gather(*(p.wait_open() for p in peers))
        await asyncio.gather(*(p.wait_until(lambda p=p: len(p.got.video_times) > 10, 10, "video")
                               for p in peers))
        for k, p in enumerate(peers):  # ended both ways: deleted, or the peer just leaves
            await p.close(delete=(k + round_) % 2 == 0)
    await asyncio.sleep(1.5)
    after = await settled()
    _, listed = await get(f"{two_workers.url}/v1/sessions")
    assert listed["sessions"] == []
    for w0, w1 in zip(base["workers"], after["workers"], strict=True):
        assert w1["tasks"] <= w0["tasks"] + 5, f"worker {w1['index']}: tasks {w0['tasks']} -> {w1['tasks']}"
        assert w1["rss_bytes"] - w0["rss_bytes"] < 150e6, (w0["rss_bytes"], w1["rss_bytes"])
