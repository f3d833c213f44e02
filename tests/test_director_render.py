"""The director's plans, measured on rendered frames (face mesh), not on the plan.

The embedded director plans a window; the portrait engine renders it through
its cascade stages (keyframes from the plan); face mesh measures the frames.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from engines.base import AUDIO_RATE, AudioSlice, Avatar
from engines.director.base import PlanRequest
from engines.director.embedded import EmbeddedDirector
from engines.face import analyse_face, brow_height, mouth_corner_lift
from engines.portrait import PortraitEngine, PreparedPortrait
from engines.storyline import Window
from tests.helpers import astronaut

WINDOW_S = 4.0
TIMES = [0.1 + 0.2 * i for i in range(19)]  # 0.1 .. 3.7 s


@functools.cache
def engine_and_prepared() -> tuple[PortraitEngine, PreparedPortrait]:
    engine = PortraitEngine()
    return engine, engine.prepare(Avatar("astronaut", astronaut()))


@pytest.fixture(scope="module")
def director() -> EmbeddedDirector:
    return EmbeddedDirector()


async def plan(director: EmbeddedDirector, line: str, instructions: list[str]) -> Window:
    """A window in which the avatar says ``line`` (Say: the words are known)."""
    return await director.plan_window(PlanRequest(
        session_id="render", start=0.0, end=WINDOW_S, text=line,
        utterances=[(0.0, WINDOW_S, line)], instructions=instructions,
        avatar_image=astronaut(), avatar_id="astronaut"))


def landmarks(window: Window) -> list[np.ndarray]:
    """Face mesh of frames rendered from the window's keyframes (mouth closed: no audio)."""
    engine, prep = engine_and_prepared()
    silence = AudioSlice(start=-0.3, samples=np.zeros(round((WINDOW_S + 0.3) * AUDIO_RATE), np.float32))
    out = []
    for kf in engine.keyframes(prep, window.shots, TIMES):
        frame = engine.keyframe_image(prep, kf, silence)
        out.append(analyse_face(frame).landmarks)
    return out


LINE = "Here is the schedule for the rest of the afternoon."


async def test_be_cheerful_raises_the_mouth_corners(director: EmbeddedDirector) -> None:
    plain = np.median([mouth_corner_lift(lm) for lm in landmarks(await plan(director, LINE, []))])
    cheerful = np.median([mouth_corner_lift(lm)
                          for lm in landmarks(await plan(director, LINE, ["be cheerful"]))])
    assert cheerful > plain + 0.005, (plain, cheerful)


async def test_no_smiling_beats_be_cheerful_on_the_frames(director: EmbeddedDirector) -> None:
    plain = np.median([mouth_corner_lift(lm) for lm in landmarks(await plan(director, LINE, []))])
    forbidden = np.median([mouth_corner_lift(lm) for lm in landmarks(
        await plan(director, LINE, ["be cheerful", "no smiling"]))])
    assert forbidden <= plain + 0.002, (plain, forbidden)


def head_energy(lms: list[np.ndarray]) -> float:
    """How much the head moves: spread of the nose tip and of the eye line's angle."""
    nose = np.array([lm[1, :2] for lm in lms])
    face_h = float(np.median([np.linalg.norm(lm[10, :2] - lm[152, :2]) for lm in lms]))
    roll = np.array([np.arctan2(*(lm[263, :2] - lm[33, :2])[::-1]) for lm in lms])
    return float(nose.std(axis=0).sum() / face_h + roll.std())


async def test_dont_move_your_head_lowers_head_motion(director: EmbeddedDirector) -> None:
    line = "Yes, absolutely, I agree with that. What do you think?"
    moving = head_energy(landmarks(await plan(director, line, ["be more animated"])))
    normal = head_energy(landmarks(await plan(director, line, [])))
    still = head_energy(landmarks(await plan(director, line, ["don't move your head"])))
    assert still < 0.6 * normal, (still, normal)
    assert normal < moving, (normal, moving)


async def test_a_sad_line_lowers_the_brows(director: EmbeddedDirector) -> None:
    sad = await plan(director, "My best friend died last night and I miss him terribly.", [])
    assert any(s.emotion.label.value == "sad" for s in sad.shots)
    neutral = np.median([brow_height(lm) for lm in landmarks(await plan(director, LINE, []))])
    lowered = np.median([brow_height(lm) for lm in landmarks(sad)])
    assert lowered < neutral - 0.003, (neutral, lowered)
