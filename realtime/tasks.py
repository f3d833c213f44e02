"""Background tasks with an owner: named, their failures logged, cancelled and awaited on close."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskOwner:
    """The tasks of one session (or one server part): nothing runs without an owner."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{name}:{self.owner}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("[%s] task %s failed", self.owner, task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def aclose(self, grace_s: float) -> None:
        """Cancel every task but the caller's own and wait up to ``grace_s`` for them."""
        me = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not me]
        for t in tasks:
            t.cancel()
        if not tasks:
            return
        _, stuck = await asyncio.wait(tasks, timeout=grace_s)
        if stuck:  # a task that ignores cancellation must not keep its owner open
            log.error("[%s] %d task(s) did not stop on close: %s", self.owner, len(stuck),
                      ", ".join(sorted(t.get_name() for t in stuck)))
