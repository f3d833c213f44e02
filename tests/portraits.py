"""Real portraits for tests: packaged public-domain photos, and one committed painting.

See ``tests/data/README.md`` for where each comes from and its licence.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import astronaut

DATA = Path(__file__).parent / "data"


@functools.cache
def hopper() -> np.ndarray:
    """Grace Hopper, 512x600, closed mouth (matplotlib's sample data)."""
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8)


def hopper_3x4() -> np.ndarray:
    """A 360x480 (3:4) crop, tight enough that a square frame reaches past its sides."""
    return np.ascontiguousarray(hopper()[60:540, 90:450])


def hopper_bottom() -> np.ndarray:
    """A 512x320 crop with the chin 26 px above the bottom edge."""
    return np.ascontiguousarray(hopper()[40:360])


@functools.cache
def tanguy() -> np.ndarray:
    """Van Gogh's Père Tanguy: a painted face with a beard and a moustache, closed mouth."""
    return np.asarray(Image.open(DATA / "tanguy.jpg").convert("RGB"), dtype=np.uint8)


def side_by_side(*images: np.ndarray, height: int = 512) -> np.ndarray:
    """Photos scaled to one height and set next to each other: several people in one picture."""
    parts = []
    for im in images:
        w = round(im.shape[1] * height / im.shape[0])
        parts.append(np.asarray(Image.fromarray(im).resize((w, height), Image.LANCZOS)))
    return np.ascontiguousarray(np.hstack(parts))


def two_people() -> np.ndarray:
    """The astronaut (left, character 0) and Grace Hopper (right, character 1)."""
    return side_by_side(astronaut(), hopper())


def two_closed_mouths() -> np.ndarray:
    """Père Tanguy (left, character 0) and Grace Hopper (right, character 1), both with the
    mouth closed: any lip gap on their frames is the animation's."""
    return side_by_side(tanguy(), hopper())
