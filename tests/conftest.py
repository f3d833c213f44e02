"""Shared fixtures: no leaked asyncio tasks, and a real server process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from server.launch import ServerProcess

MAX_SESSIONS = 3
MAX_VIEWERS = 2
RunningServer = ServerProcess


def pytest_configure(config: pytest.Config) -> None:
    """The test process owns its settings, as ``avatar serve`` does: one PyTorch thread."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Every test fails if it leaves asyncio tasks behind."""
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


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``avatar serve`` as a user starts it, shared by the end-to-end tests."""
    from server.ice import restrict_host_candidates

    restrict_host_candidates(["127.0.0.1"])  # the test peers stay on loopback too
    proc = ServerProcess(tmp_path_factory.mktemp("server"), "--max-sessions", str(MAX_SESSIONS),
                         "--max-viewers", str(MAX_VIEWERS), "--max-upload-mb", "2",
                         "--consent-interval", "0.5", "--consent-failures", "3")
    with proc:
        yield proc
