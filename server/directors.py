"""Directors by name, as ``avatar serve --director NAME`` selects them."""

from __future__ import annotations

from collections.abc import Callable

from engines.director.base import Director, StaticDirector


def director_factory(name: str) -> Callable[[], Director]:
    """A factory making one director per session; ``ValueError`` for unknown names."""
    if name == "static":
        return StaticDirector
    raise ValueError(f"unknown director {name!r}; choose static")
