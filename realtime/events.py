"""Control between stages: small events that travel downstream, never calls back into a producer.

Each stage that takes control owns an :class:`Inbox`. Producers ``post``
events to it; the stage's own task drains it and acts. Nothing waits on a
reply: a producer never learns what became of its event, and a consumer
never reaches back into the stage that feeds it.

Who sends what::

    ingest ──AudioArrived──▶ scheduler
    speech input (TTS, uploads) ──SpeechQueued──▶ planner, scheduler
    control (the host) ──Instructed / Interrupted──▶ planner; Interrupted ──▶ scheduler
    control (the host) ──MicRouted──▶ ingest, planner
    planner ──PlanChanged / WindowPlanned──▶ scheduler
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from engines.storyline import Window
from realtime.clock import Clock, wait_until_or_event

E = TypeVar("E")


@dataclass(slots=True, frozen=True)
class AudioArrived:
    """Microphone audio is on the timeline up to ``until`` (pts)."""

    until: float


@dataclass(slots=True, frozen=True)
class SpeechQueued:
    """Speech known in full is on the timeline over ``[start, end)``; what was rendered there is stale.

    ``spans`` place its words (Say text, or an upload's transcript segments);
    ``character`` is who says it (0 is the leftmost face).
    """

    start: float
    end: float
    spans: tuple[tuple[float, float, str], ...] = ()
    character: int = 0


@dataclass(slots=True, frozen=True)
class Instructed:
    """The host gave a standing instruction; it applies from ``from_pts`` on."""

    text: str
    from_pts: float


@dataclass(slots=True, frozen=True)
class Interrupted:
    """Speech from ``from_pts`` on was cut off (its audio is silence now)."""

    from_pts: float


@dataclass(slots=True, frozen=True)
class MicRouted:
    """The host's microphone speaks for ``character`` from ``from_pts`` on."""

    character: int
    from_pts: float


@dataclass(slots=True, frozen=True)
class PlanChanged:
    """The plan from ``from_pts`` on is being redone under ``generation``: work there is stale.

    Windows of this generation follow as :class:`WindowPlanned`; anything of an
    older generation that arrives later is dropped.
    """

    from_pts: float
    generation: int


@dataclass(slots=True, frozen=True)
class WindowPlanned:
    """One window of the plan, planned under ``generation``."""

    window: Window
    generation: int


PlannerEvent = SpeechQueued | Instructed | Interrupted | MicRouted
IngestEvent = MicRouted
SchedulerEvent = AudioArrived | SpeechQueued | Interrupted | PlanChanged | WindowPlanned


class Inbox(Generic[E]):
    """A stage's inbox: producers ``post``; the owning task ``drain``s and ``wait``s."""

    def __init__(self) -> None:
        self._items: deque[E] = deque()
        self._ready = asyncio.Event()

    def post(self, event: E) -> None:
        self._items.append(event)
        self._ready.set()

    def wake(self) -> None:
        """Wake the owner without an event (its own background work finished)."""
        self._ready.set()

    def drain(self) -> list[E]:
        items = list(self._items)
        self._items.clear()
        self._ready.clear()
        return items

    def __len__(self) -> int:
        return len(self._items)

    async def wait(self, clock: Clock, until: float) -> None:
        """Until something is posted (or the owner woken), or ``clock`` reaches ``until``."""
        if self._ready.is_set():
            return
        await wait_until_or_event(clock, until, self._ready)
