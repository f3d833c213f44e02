"""The session clock: seconds since the session started, on the event loop's clock.

Everything that decides on timing takes a ``Clock``; tests and offline
renders pass a ``FakeClock`` and advance it instead of sleeping, with engine
and director work run by an ``InlineExecutor`` so that it takes no clock time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on the session clock."""
        ...

    async def sleep_until(self, t: float) -> None:
        """Return once ``now() >= t``."""
        ...


async def wait_until_or_event(clock: Clock, t: float, event: asyncio.Event) -> None:
    """Return when ``event`` is set or ``clock`` reaches ``t``, whichever comes first."""
    waiter = asyncio.ensure_future(event.wait())
    sleeper = asyncio.ensure_future(clock.sleep_until(t))
    try:
        await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        sleeper.cancel()
        await asyncio.gather(waiter, sleeper, return_exceptions=True)


class LoopClock:
    """The real clock: the event loop's monotonic time, zeroed at creation."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._t0 = self._loop.time()

    def now(self) -> float:
        return self._loop.time() - self._t0

    async def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


class FakeClock:
    """A clock that only moves when a test calls ``advance``."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep_until(self, t: float) -> None:
        if t <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (t, next(self._seq), fut))
        await fut

    async def advance(self, dt: float, step: float | None = None) -> None:
        """Move time forward by ``dt`` (in ``step`` increments), letting waiters run."""
        target = self._now + dt
        step = step or dt
        while self._now < target - 1e-12:
            self._now = min(self._now + step, target)
            while self._waiters and self._waiters[0][0] <= self._now + 1e-12:
                _, _, fut = heapq.heappop(self._waiters)
                if not fut.done():
                    fut.set_result(None)
            # let woken tasks (and what they wake) run before time moves again
            for _ in range(20):
                await asyncio.sleep(0)


class InlineExecutor(ThreadPoolExecutor):
    """Runs each job at submit, in the caller's thread: deterministic, and on a fake clock
    engine and director work take no clock time (a ThreadPoolExecutor, so asyncio takes it
    as a loop's default executor too)."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            fut.set_exception(exc)
        return fut
