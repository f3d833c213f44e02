"""The one way to hold a process-wide model: loaded once, on first use, shared by every session.

A ``SharedModel`` wraps a loader. ``get()`` loads it the first time (one
thread loads, the others wait) and returns the same object afterwards.
Loading has no side effects on the process (no environment variables, no
thread settings): the process owner (the server's command line, a test
suite) decides those. Models that are not re-entrant keep their own lock
around inference.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class SharedModel(Generic[T]):
    def __init__(self, name: str, load: Callable[[], T]) -> None:
        self.name = name
        self._load = load
        self._value: T | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def get(self) -> T:
        value = self._value
        if value is not None:
            return value
        with self._lock:
            if self._value is None:
                start = time.perf_counter()
                self._value = self._load()
                log.info("loaded %s in %.2f s", self.name, time.perf_counter() - start)
            return self._value
