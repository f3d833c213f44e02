"""Motion: the slow controls (head, expression, gaze, blinks) over time, per character.

Blueprint keyframes hold these, planned from each character's shots; the
audio-driven controls (``engines.visemes``) come on top in each sub-clip.
A keyframe's state is a ``(characters, N_BLUEPRINT)`` array, row ``c`` for
character ``c`` (0 is the leftmost face). Each character has its own seed, so
two faces never blink or sway together.

A character who is not speaking listens: its gaze and a little of its head
turn towards whoever speaks (``listening``), driven by the speaker's recent
loudness, so it follows the conversation without being planned. A shot
planned for a listener (gaze ``speaker``) holds part of that turn through the
speaker's pauses; the two together never turn further than ``LISTEN_GAZE``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from engines.portrait.rig import IDX, N_BLUEPRINT
from engines.storyline import GazeTarget, GestureKind, Shot, default_shot, shot_face


def _shot_face(shot: Shot) -> np.ndarray:
    """(smile, brow_raise, brow_frown, eye_wide) targets of a shot."""
    return np.array(shot_face(shot))


def _smooth(x: float) -> float:
    x = min(max(x, 0.0), 1.0)
    return x * x * (3 - 2 * x)


@functools.lru_cache(maxsize=1024)
def _phases(seed: int, n: int) -> tuple[float, ...]:
    return tuple(float(p) for p in np.random.default_rng(seed).uniform(0, 2 * np.pi, n))


def _noise(t: float, seed: int, freqs: Sequence[float]) -> float:
    """Smooth deterministic noise in [-1, 1] (sum of incommensurate sines)."""
    phases = _phases(seed, len(freqs))
    return sum(math.sin(2 * math.pi * f * t + p) for f, p in zip(freqs, phases, strict=True)) / len(
        freqs)


@functools.lru_cache(maxsize=64)
def _blink_onsets(seed: int) -> np.ndarray:
    """Blink onsets: a deterministic sequence per avatar, 2.5-6 s apart."""
    return np.cumsum(np.random.default_rng(seed ^ 0x5EED).uniform(2.5, 6.0, 64))


def _blink_amount(t: float, seed: int) -> float:
    """Blinks every 2.5-6 s: 70 ms to close, 130 ms to open."""
    period_starts = _blink_onsets(seed)
    cycle = float(period_starts[-1])
    tt = t % cycle
    i = int(np.searchsorted(period_starts, tt, side="right")) - 1
    if i < 0:
        return 0.0
    dt = tt - float(period_starts[i])
    if dt < 0.07:
        return _smooth(dt / 0.07)
    if dt < 0.2:
        return 1.0 - _smooth((dt - 0.07) / 0.13)
    return 0.0


def _gesture_offsets(shot: Shot, t: float) -> tuple[float, float, float, float]:
    """(yaw, pitch, roll, scale) offsets from the shot's gestures at time t."""
    yaw = pitch = roll = scale = 0.0
    for g in shot.gestures:
        u = (t - g.at) / g.duration
        if not 0.0 <= u <= 1.0:
            continue
        env = math.sin(math.pi * u)
        s = g.strength
        if g.kind == GestureKind.nod:
            pitch += 0.07 * s * env * math.sin(2 * math.pi * 2 * u)
        elif g.kind == GestureKind.shake:
            yaw += 0.09 * s * env * math.sin(2 * math.pi * 2 * u)
        elif g.kind == GestureKind.tilt:
            roll += 0.08 * s * env
        elif g.kind == GestureKind.lean:
            scale += 0.05 * s * env
    return yaw, pitch, roll, scale


LISTEN_GAZE = 0.9  # gaze towards the speaker (in gaze_x units) at full attention
LISTEN_YAW = 0.045  # head turn towards the speaker, radians-ish
PLANNED_LISTEN = 0.6  # share of that gaze a planned listener's shot holds on its own


def blueprint_controls(shots: Sequence[Shot], t: float, seed: int, toward: float = 0.0
                       ) -> np.ndarray:
    """The slow controls at time t under a plan: head, expression, gaze, blink.

    ``toward`` is where the other character is (-1 left, +1 right, 0 nobody):
    the way a ``speaker`` gaze looks.
    """
    shot = next((s for s in reversed(shots) if s.covers(t)), None)
    if shot is None:
        shot = default_shot(t, t + 1.0)
    prev = next((s for s in reversed(shots) if s.end <= shot.start + 1e-9 and s is not shot),
                None)
    face = _shot_face(shot)
    energy = shot.head_motion
    if prev is not None and t - shot.start < shot.ease_s:
        # the face eases from the shot before over the shot's own ease (quicker for instructions)
        w = _smooth((t - shot.start) / shot.ease_s)
        face = (1 - w) * _shot_face(prev) + w * face
        energy = (1 - w) * prev.head_motion + w * energy
    c = np.zeros(N_BLUEPRINT, np.float32)
    amp = 0.15 + 0.85 * energy
    gy, gp, gr, gs = _gesture_offsets(shot, t)
    c[IDX["yaw"]] = 0.07 * amp * _noise(t, seed, (0.11, 0.23, 0.37)) + gy
    c[IDX["pitch"]] = 0.04 * amp * _noise(t, seed + 1, (0.13, 0.29, 0.41)) + gp
    c[IDX["roll"]] = 0.03 * amp * _noise(t, seed + 2, (0.09, 0.19, 0.31)) + gr
    c[IDX["tx"]] = 2.0 * amp * _noise(t, seed + 3, (0.07, 0.17))
    c[IDX["ty"]] = 0.8 * math.sin(2 * math.pi * 0.22 * t) + 1.0 * amp * _noise(t, seed + 4, (0.1, 0.2))
    c[IDX["scale"]] = 0.01 * amp * _noise(t, seed + 5, (0.05, 0.12)) + gs
    c[IDX["smile"]] = face[0]
    c[IDX["brow_raise"]] = face[1]
    c[IDX["brow_frown"]] = face[2]
    c[IDX["eye_wide"]] = max(face[3], 0.0)
    squint = max(-face[3], 0.0)
    c[IDX["blink"]] = max(_blink_amount(t, seed), 0.8 * squint)
    if shot.gaze == GazeTarget.away:
        gx, gyy = 0.55 + 0.15 * _noise(t, seed + 6, (0.05,)), -0.1
    elif shot.gaze == GazeTarget.down:
        gx, gyy = 0.0, 0.7
    elif shot.gaze == GazeTarget.speaker and toward:  # a listener's eyes on the other face
        gx = toward * PLANNED_LISTEN * LISTEN_GAZE + 0.06 * _noise(t, seed + 7, (0.21, 0.43))
        gyy = 0.04 * _noise(t, seed + 8, (0.17, 0.39))
    else:  # camera (or a speaker gaze with nobody to look at), with small saccades
        gx = 0.12 * _noise(t, seed + 7, (0.21, 0.43))
        gyy = 0.08 * _noise(t, seed + 8, (0.17, 0.39))
    c[IDX["gaze_x"]] = gx
    c[IDX["gaze_y"]] = gyy
    return c


# --------------------------------------------------------------------------- #


def character_seed(seed: int, character: int) -> int:
    """Each character's own seed (character 0 keeps the avatar's)."""
    return (seed + 7919 * character) & 0x7FFFFFFF


def shots_of(shots: Sequence[Shot], character: int) -> list[Shot]:
    """The shots planned for one character."""
    return [s for s in shots if s.character == character]


def towards(xs: Sequence[float]) -> list[float]:
    """For each face (by x position), where the other one is: -1 left, +1 right, 0 alone."""
    if len(xs) < 2:
        return [0.0] * len(xs)
    return [1.0 if xs[1 - c] > xs[c] else -1.0 for c in range(2)]


def keyframe_state(shots: Sequence[Shot], t: float, seed: int, characters: int,
                   xs: Sequence[float] = ()) -> np.ndarray:
    """The blueprint state at ``t``: one row of slow controls per character (``xs``: each
    face's x position, for who looks at whom)."""
    way = towards(xs) if len(xs) == characters else [0.0] * characters
    return np.stack([blueprint_controls(shots_of(shots, c), t, character_seed(seed, c), way[c])
                     for c in range(characters)])


def listening(controls: np.ndarray, levels: Sequence[float], xs: Sequence[float]) -> None:
    """Turn each quiet character's gaze and head towards a speaking one (in place).

    ``controls`` is (characters, CONTROLS); ``levels`` each character's recent
    loudness in [0, 1]; ``xs`` each face's x position in the frame.
    """
    n = len(levels)
    for c in range(n):
        for o in range(n):
            if o == c:
                continue
            attention = min(2.0 * float(levels[o]), 1.0) * (1.0 - min(2.0 * float(levels[c]), 1.0))
            if attention <= 0.0:
                continue
            toward = 1.0 if xs[o] > xs[c] else -1.0
            # as far as the louder of the two asks: the planned hold or the speaker's voice
            held = toward * float(controls[c, IDX["gaze_x"]])
            if held > 0.0:
                controls[c, IDX["gaze_x"]] = toward * max(held, LISTEN_GAZE * attention)
            else:
                controls[c, IDX["gaze_x"]] += toward * LISTEN_GAZE * attention
            controls[c, IDX["gaze_y"]] *= 1.0 - 0.6 * attention
            controls[c, IDX["yaw"]] += toward * LISTEN_YAW * attention
