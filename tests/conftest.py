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
