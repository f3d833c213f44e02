"""Progress and estimates for long steps (export, engine builds, weight loading and hashing).

:func:`task` logs when a step starts (with an estimate where one is known),
then every ``every`` seconds while it runs (elapsed, and time left against the
estimate), and when it ends. Estimates come from :class:`Timings`, a small JSON
file of how long the same kind of step took last time on this machine, scaled
by the step's size (parameters, bytes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import threading
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)


def fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class Timings:
    """Seconds per unit of size for each kind of step, persisted as JSON (best effort)."""

    def __init__(self, path: pathlib.Path | None) -> None:
        self.path = path
        self._data: dict[str, float] = {}
        if path is not None and path.is_file():
            try:
                self._data = {k: float(v) for k, v in json.loads(path.read_text()).items()}
            except (ValueError, OSError, AttributeError):
                logger.warning("ignoring unreadable timings file %s", path)

    def estimate(self, kind: str, size: float) -> float | None:
        rate = self._data.get(kind)
        return None if rate is None else rate * size

    def record(self, kind: str, size: float, seconds: float) -> None:
        if size <= 0:
            return
        self._data[kind] = seconds / size
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self._data, indent=2, sort_keys=True))
        except OSError as exc:
            logger.warning("could not save timings to %s: %s", self.path, exc)


@contextlib.contextmanager
def task(
    what: str,
    *,
    estimate_s: float | None = None,
    every: float = 15.0,
    log: logging.Logger = logger,
    detail: Callable[[], str] | None = None,
) -> Iterator[Callable[[], float]]:
    """Log ``what`` while it runs; yields a function giving the elapsed seconds.

    ``detail`` (optional) adds a live status to each heartbeat (a build phase).
    """
    start = time.monotonic()
    done = threading.Event()
    if estimate_s is not None:
        log.info(
            "%s: started, estimate %s (from the last run on this machine)", what, fmt_seconds(estimate_s)
        )
    else:
        log.info("%s: started (no estimate yet: first run on this machine)", what)

    def beat() -> None:
        wait = every
        while not done.wait(wait):
            wait = min(wait * 1.5, max(every, 120.0))  # long steps: fewer lines as they go
            elapsed = time.monotonic() - start
            extra = f"; {detail()}" if detail is not None else ""
            if estimate_s is not None:
                left = estimate_s - elapsed
                eta = f"about {fmt_seconds(left)} left" if left > 0 else "taking longer than the estimate"
                log.info("%s: %s elapsed, %s%s", what, fmt_seconds(elapsed), eta, extra)
            else:
                log.info("%s: %s elapsed%s", what, fmt_seconds(elapsed), extra)

    thread = threading.Thread(target=beat, name=f"progress:{what}", daemon=True)
    thread.start()
    try:
        yield lambda: time.monotonic() - start
    except BaseException:
        log.error("%s: failed after %s", what, fmt_seconds(time.monotonic() - start))
        raise
    finally:
        done.set()
        thread.join()
    log.info("%s: done in %s", what, fmt_seconds(time.monotonic() - start))


class Steps:
    """Progress over a known number of steps: logs each step with a rate-based estimate."""

    def __init__(
        self, what: str, total: int, *, log: logging.Logger = logger, min_interval: float = 5.0
    ) -> None:
        self.what = what
        self.total = max(1, total)
        self.log = log
        self.start = time.monotonic()
        self.done = 0
        self.min_interval = min_interval
        self._last = self.start
        self._logged = False

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        finished = self.done >= self.total
        if now - self._last < self.min_interval and not (finished and self._logged):
            return  # short steps stay quiet; long ones report every min_interval seconds, and their end
        self._logged = True
        self._last = now
        elapsed = now - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        pct = 100.0 * self.done / self.total
        if self.done < self.total:
            self.log.info(
                "%s: %.0f%% (%s elapsed, about %s left)",
                self.what,
                pct,
                fmt_seconds(elapsed),
                fmt_seconds(left),
            )
        else:
            self.log.info("%s: done in %s", self.what, fmt_seconds(elapsed))
