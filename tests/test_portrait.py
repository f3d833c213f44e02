"""The portrait engine: cascade stages, joins, visible effects measured with face mesh."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from engines.base import AUDIO_RATE, AudioSlice, Avatar, PhonemeEvent
from engines.face import NoFaceError, analyse_face, brow_height, mouth_corner_lift, mouth_opening
from engines.portrait import CONTROLS, IDX, PortraitEngine, blueprint_controls
from engines.storyline import Emotion, EmotionLabel, Expression, Gesture, Shot
from tests.helpers import astronaut, speech


@functools.cache
def engine_and_prepared() -> tuple[PortraitEngine, object]:
    engine = PortraitEngine()
    return engine, engine.prepare(Avatar("astronaut", astronaut()))


def controls(**kw: float) -> np.ndarray:
    c = np.zeros(len(CONTROLS), np.float32)
    for k, v in kw.items():
        c[IDX[k]] = v
    return c


def silence(t0: float, t1: float) -> AudioSlice:
    return AudioSlice(start=t0, samples=np.zeros(round((t1 - t0) * AUDIO_RATE), np.float32))


def test_prepare_rejects_a_photo_without_a_face() -> None:
    engine = PortraitEngine()
    blank = np.full((256, 256, 3), 128, np.uint8)
    with pytest.raises(NoFaceError):
        engine.prepare(Avatar("blank", blank))


def test_render_shape_and_still_background() -> None:
    engine, prep = engine_and_prepared()
    neutral = engine.render(prep, controls())
    moved = engine.render(prep, controls(yaw=0.1, pitch=0.05, jaw=0.8, smile=0.5))
    assert neutral.shape == (512, 512, 3) and neutral.dtype == np.uint8
    # the head moves...
    assert np.abs(moved.astype(int) - neutral).mean() > 1.0
    # ...background corners and the bottom (shoulders) stay exactly still
    for region in (np.s_[:40, :40], np.s_[:40, -40:], np.s_[-60:, :]):
        assert np.array_equal(moved[region], neutral[region])


def test_jaw_control_opens_the_mouth_on_rendered_frames() -> None:
    engine, prep = engine_and_prepared()
    closed = mouth_opening(analyse_face(engine.render(prep, controls())).landmarks)
    half = mouth_opening(analyse_face(engine.render(prep, controls(jaw=0.5))).landmarks)
    wide = mouth_opening(analyse_face(engine.render(prep, controls(jaw=1.0))).landmarks)
    assert closed < half < wide
    assert wide - closed > 0.03


def test_expression_controls_are_visible() -> None:
    engine, prep = engine_and_prepared()
    base = analyse_face(engine.render(prep, controls())).landmarks
    smile = analyse_face(engine.render(prep, controls(smile=1.0))).landmarks
    frown = analyse_face(engine.render(prep, controls(brow_frown=1.0))).landmarks
    raised = analyse_face(engine.render(prep, controls(brow_raise=1.0))).landmarks
    assert mouth_corner_lift(smile) > mouth_corner_lift(base)
    assert brow_height(frown) < brow_height(base) < brow_height(raised)


def test_blink_closes_the_eyes() -> None:
    engine, prep = engine_and_prepared()
    base = analyse_face(engine.render(prep, controls())).landmarks
    shut = analyse_face(engine.render(prep, controls(blink=1.0))).landmarks
    gap = lambda lm: float(lm[145, 1] - lm[159, 1] + lm[374, 1] - lm[386, 1])  # noqa: E731
    assert gap(shut) < 0.75 * gap(base)


def test_subclip_joins_land_exactly_on_keyframes() -> None:
    engine, prep = engine_and_prepared()
    shot = Shot(start=0.0, end=10.0, gestures=[Gesture(kind="nod", at=0.2, duration=0.6)])
    times = [0.0, 0.08, 0.16]
    kfs = engine.keyframes(prep, [shot], times)
    audio = silence(-0.3, 0.16)
    a = engine.subclip(prep, kfs[0], kfs[1], [audio], [shot])
    b = engine.subclip(prep, kfs[1], kfs[2], [audio], [shot])
    assert len(a) == len(b) == 3
    assert np.array_equal(a[-1], b[0])  # the join is the same frame
    assert np.array_equal(a[0], engine.keyframe_image(prep, kfs[0]))
    assert np.array_equal(a[-1], engine.keyframe_image(prep, kfs[1]))
    assert np.array_equal(b[-1], engine.keyframe_image(prep, kfs[2]))


def test_subclip_meets_keyframes_from_another_plan() -> None:
    """First-last-frame: keyframes from a re-plan still pin both ends exactly."""
    engine, prep = engine_and_prepared()
    old = Shot(start=0.0, end=10.0)
    new = Shot(start=0.0, end=10.0, emotion=Emotion(label=EmotionLabel.happy, intensity=1.0))
    first = engine.keyframes(prep, [old], [0.4])[0]
    last = engine.keyframes(prep, [new], [0.48])[0]
    frames = engine.subclip(prep, first, last, [silence(0.1, 0.48)], [new])
    assert np.array_equal(frames[0], engine.keyframe_image(prep, first))
    assert np.array_equal(frames[-1], engine.keyframe_image(prep, last))


def test_speech_drives_the_mouth_and_silence_keeps_it_closed() -> None:
    engine, prep = engine_and_prepared()
    voice = speech("Hello, how are you?")
    samples = np.concatenate([np.zeros(AUDIO_RATE // 2, np.float32), voice,
                              np.zeros(AUDIO_RATE // 2, np.float32)])
    audio = AudioSlice(start=0.0, samples=samples, vad=np.ones(200, np.float32))
    shot = Shot(start=0.0, end=10.0)
    end = len(samples) / AUDIO_RATE
    times = [k / 25 for k in range(int(end * 25))]
    kfs = engine.keyframes(prep, [shot], times[::5])
    openings = []
    for k0, k1 in zip(kfs, kfs[1:], strict=False):
        for frame in engine.subclip(prep, k0, k1, [audio], [shot])[:-1]:
            openings.append(mouth_opening(analyse_face(frame).landmarks))
    openings_arr = np.array(openings)
    quiet = openings_arr[: int(0.45 * 25)]
    talking = openings_arr[int(0.55 * 25): int((0.5 + len(voice) / AUDIO_RATE - 0.05) * 25)]
    assert talking.max() - quiet.mean() > 0.03
    assert quiet.std() < 0.005  # no mouth motion in silence


def test_phoneme_timings_close_the_lips_on_bilabials() -> None:
    engine, prep = engine_and_prepared()
    loud = (0.2 * np.sin(np.arange(AUDIO_RATE) * 2 * np.pi * 180 / AUDIO_RATE)).astype(np.float32)
    events = [PhonemeEvent("a", 0.0, 0.3), PhonemeEvent("m", 0.3, 0.45), PhonemeEvent("a", 0.45, 0.8)]
    audio = AudioSlice(start=0.0, samples=loud, phonemes=events, vad=np.ones(40, np.float32))
    from engines.visemes import audio_controls

    c = audio_controls(audio, [0.15, 0.375, 0.62])
    assert c[1, 0] < 0.5 * c[0, 0] and c[1, 0] < 0.5 * c[2, 0]  # jaw nearly shut on /m/
    assert c[1, 2] > 0.3  # lips pressed


def test_shot_transitions_are_smooth() -> None:
    a = Shot(start=0.0, end=2.0)
    b = Shot(start=2.0, end=4.0, expression=Expression(smile=1.0, brow_raise=1.0))
    steps = [blueprint_controls([a, b], 1.9 + k / 25, seed=1) for k in range(30)]
    smile = np.array([s[IDX["smile"]] for s in steps])
    assert smile[-1] > 0.9
    assert np.abs(np.diff(smile)).max() < 0.15  # no pop at the boundary
