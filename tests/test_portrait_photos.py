"""The portrait engine on real photos, measured on rendered frames as a viewer sees them.

Photos: ``tests/portraits.py`` (packaged public-domain photos and one committed
painting). Measurements use face mesh on the engine's output frames.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import pytest

from engines.base import AUDIO_RATE, AudioSlice, Avatar, PhonemeEvent
from engines.face import analyse_face, mouth_opening
from engines.portrait import PortraitEngine, PreparedPortrait
from engines.portrait.framing import Framing, frame_faces, render_framed
from engines.storyline import Shot
from tests.helpers import astronaut, envelope, speech
from tests.portraits import hopper, hopper_3x4, hopper_bottom, side_by_side, tanguy, two_people

FPS = 25
LINE = "Hello there, how are you today? Maybe we could talk about the weather."


@functools.cache
def prepared(name: str) -> tuple[PortraitEngine, PreparedPortrait]:
    photos = {"astronaut": astronaut, "hopper_3x4": hopper_3x4, "hopper_bottom": hopper_bottom,
              "tanguy": tanguy, "two": two_people}
    engine = PortraitEngine()
    return engine, engine.prepare(Avatar(name, photos[name]()))


def bands(framing: Framing) -> dict[str, np.ndarray]:
    """Output pixels whose centre maps past each side of the photo."""
    ys, xs = np.mgrid[0:framing.out_h, 0:framing.out_w].astype(np.float64)
    px = framing.x + (xs + 0.5) / framing.scale
    py = framing.y + (ys + 0.5) / framing.scale
    inside_x = (px >= 0) & (px < framing.image_w)
    inside_y = (py >= 0) & (py < framing.image_h)
    return {"above": (py < 0) & inside_x, "below": (py >= framing.image_h) & inside_x,
            "left": (px < 0) & inside_y, "right": (px >= framing.image_w) & inside_y}


def band_spread(frame: np.ndarray, band: np.ndarray, along_columns: bool) -> float:
    """Mean spread of a filled band's pixels along each column (above/below the photo) or
    each row (beside it): zero where edge pixels were stretched into streaks."""
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float64)
    if not along_columns:
        grey, band = grey.T, band.T
    spreads = [grey[band[:, x], x].std() for x in range(grey.shape[1]) if band[:, x].sum() >= 6]
    return float(np.mean(spreads))


@pytest.mark.parametrize("name", ["hopper_3x4", "hopper_bottom"])
def test_frame_past_the_photo_is_filled_not_streaked(name: str) -> None:
    engine, prep = prepared(name)
    frame = engine.idle_frame(prep)
    # what stretched edge pixels look like, for the same frame: the measure sees streaks
    photo = {"hopper_3x4": hopper_3x4, "hopper_bottom": hopper_bottom}[name]()
    s = prep.framing.scale
    mat = np.array([[s, 0, -prep.framing.x * s], [0, s, -prep.framing.y * s]], np.float32)
    streaks = cv2.warpAffine(photo, mat, (512, 512), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
    checked = 0
    for side, band in bands(prep.framing).items():
        if band.sum() < 512 * 6:
            continue
        along_columns = side in ("above", "below")
        filled = band_spread(frame, band, along_columns)
        streaked = band_spread(streaks, band, along_columns)
        assert streaked < 1.0, (side, streaked)
        assert filled > 3.0, (side, filled)
        checked += 1
    assert checked >= (2 if name == "hopper_3x4" else 1), "this frame should reach past the photo"


def test_framing_puts_faces_at_a_consistent_size_and_height() -> None:
    for photo in (astronaut(), hopper_3x4(), hopper(), tanguy()):
        a = analyse_face(photo)
        f = frame_faces(a.faces, (photo.shape[1], photo.shape[0]), (512, 512))
        lm = f.to_frame(a.faces[0])
        face = float(np.linalg.norm(lm[10, :2] - lm[152, :2])) / 512
        eyes = float(lm[[33, 133, 362, 263], 1].mean()) / 512
        centre = float(lm[[234, 454], 0].mean()) / 512
        assert 0.3 <= face <= 0.46, face
        assert 0.3 <= eyes <= 0.46, eyes
        assert abs(centre - 0.5) <= 0.11, centre
        assert lm[10, 1] - 0.35 * face * 512 > 0, "headroom above the forehead"
    # other aspect ratios: a portrait (9:16) and a landscape (16:9) stream
    for size in ((288, 512), (640, 360)):
        a = analyse_face(hopper())
        f = frame_faces(a.faces, (512, 600), size)
        assert abs(f.w / f.h - size[0] / size[1]) < 1e-6
        frame = render_framed(hopper(), f)
        assert frame.shape == (size[1], size[0], 3)


def talk(engine: PortraitEngine, prep: PreparedPortrait, audios: list[AudioSlice], seconds: float,
         ) -> list[np.ndarray]:
    """Frames of sub-clips (two frames each) over ``seconds``, joins counted once."""
    times = [k * 2 / FPS for k in range(int(seconds * FPS / 2) + 1)]
    shots = [Shot(start=0.0, end=seconds + 1, character=c) for c in range(len(audios))]
    kfs = engine.keyframes(prep, shots, times)
    frames: list[np.ndarray] = []
    for a, b in zip(kfs, kfs[1:], strict=False):
        frames += engine.subclip(prep, a, b, audios, shots)[:-1]
    return frames


def spoken(lead: float = 0.6, tail: float = 0.6) -> tuple[AudioSlice, float, float]:
    voice = speech(LINE)
    samples = np.concatenate([np.zeros(round(lead * AUDIO_RATE), np.float32), voice,
                              np.zeros(round(tail * AUDIO_RATE), np.float32)])
    vad = np.ones(len(samples) // 512 + 2, np.float32)
    return AudioSlice(start=0.0, samples=samples, vad=vad), lead, lead + len(voice) / AUDIO_RATE


def loudness(audio: AudioSlice, n_frames: int) -> np.ndarray:
    """The audio's level (dB) over the 64 ms before each frame."""
    env = envelope(audio.samples, AUDIO_RATE, 0.008)
    per = np.array([env[max(0, k * 5 - 8): k * 5].mean() if k else 0.0 for k in range(n_frames)])
    return 20 * np.log10(per + 1e-5)


@pytest.mark.parametrize("name", ["hopper_3x4", "tanguy"])
def test_closed_mouth_opens_with_speech(name: str) -> None:
    engine, prep = prepared(name)
    audio, t0, t1 = spoken()
    frames = talk(engine, prep, [audio], t1 + 0.5)
    gap = np.array([mouth_opening(analyse_face(f).landmarks) for f in frames])
    k0, k1 = int(t0 * FPS), int(t1 * FPS)
    during, quiet = gap[k0 + 2:k1], np.concatenate([gap[:k0 - 1], gap[k1 + 4:]])
    level = loudness(audio, len(frames))
    corr = float(np.corrcoef(gap[k0 - 5:k1 + 5], level[k0 - 5:k1 + 5])[0, 1])
    p95 = float(np.percentile(during, 95))
    print(f"{name}: lip gap p95 {p95:.3f}, quiet median {np.median(quiet):.4f}, corr {corr:.2f}")
    assert p95 >= 0.05, (name, p95)
    assert float(np.median(quiet)) < 0.012 and float(quiet.max()) < 0.02, (name, quiet)
    assert corr > 0.6, (name, corr)


def test_bilabials_close_the_lips_on_the_frames() -> None:
    engine, prep = prepared("hopper_3x4")
    loud = (0.2 * np.sin(np.arange(AUDIO_RATE) * 2 * np.pi * 180 / AUDIO_RATE)).astype(np.float32)
    events = [PhonemeEvent("a", 0.0, 0.3), PhonemeEvent("m", 0.3, 0.45),
              PhonemeEvent("a", 0.45, 0.8)]
    audio = AudioSlice(start=0.0, samples=loud, phonemes=events, vad=np.ones(40, np.float32))
    kfs = engine.keyframes(prep, [Shot(start=0, end=1)], [0.16, 0.36, 0.6])
    gaps = [mouth_opening(analyse_face(engine.keyframe_image(prep, k, audio)).landmarks)
            for k in kfs]
    assert gaps[1] < 0.012, gaps  # closed on /m/
    assert gaps[0] > 0.04 and gaps[2] > 0.04, gaps


def test_open_smile_keeps_upper_teeth_and_moves_the_lower_ones() -> None:
    engine, prep = prepared("astronaut")
    from engines.portrait.rig import CONTROLS, IDX

    rest = np.zeros(len(CONTROLS), np.float32)
    opened = rest.copy()
    opened[IDX["jaw"]] = 0.7
    a, b = engine.render(prep, rest), engine.render(prep, opened)
    mouth = prep.characters[0].mouth
    split = mouth.split
    x0, x1 = int(split[6, 0]), int(split[-7, 0])  # the middle of the mouth
    top = int(split[6:-6, 1].max())
    fh = prep.face_h
    high = int(split[6:-6, 1].min())
    upper = np.s_[high - int(0.025 * fh):high - 1, x0:x1]  # the upper teeth, above the split
    assert np.abs(a[upper].astype(int) - b[upper]).mean() < 6.0  # they stay with the skull
    lower_a = analyse_face(a).landmarks[14, 1]
    lower_b = analyse_face(b).landmarks[14, 1]
    assert lower_b - lower_a > 0.035 * fh  # the lower lip (and teeth) dropped
    gap = np.s_[top + 2:top + int(0.03 * fh), x0:x1]
    assert cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)[gap].mean() < 90  # a dark cavity between


def test_two_people_each_speak_with_their_own_audio() -> None:
    engine, prep = prepared("two")
    assert engine.characters(prep) == 2
    xs = [ch.x for ch in prep.characters]
    assert xs[0] < xs[1]  # character 0 is the leftmost face
    audio, t0, t1 = spoken(lead=0.4, tail=0.2)
    quiet = AudioSlice(start=0.0, samples=np.zeros_like(audio.samples), vad=np.zeros_like(audio.vad))
    for speaker in (1, 0):
        audios = [audio, quiet] if speaker == 0 else [quiet, audio]
        frames = talk(engine, prep, audios, min(t1, 2.6))
        gaps, irises = [], []
        for f in frames:
            faces = analyse_face(f).faces
            assert len(faces) == 2
            gaps.append([mouth_opening(lm) for lm in faces])
            # where the listener looks: iris centre between its eye corners, -1..1
            irises.append([float((lm[468, 0] - (lm[33, 0] + lm[133, 0]) / 2)
                                 / max(abs(lm[133, 0] - lm[33, 0]) / 2, 1.0)) for lm in faces])
        g, eye = np.array(gaps), np.array(irises)
        k0 = int(t0 * FPS)
        talking = g[k0 + 2:]
        listener = 1 - speaker
        assert np.percentile(talking[:, speaker], 95) > 0.05, talking[:, speaker]
        # the listener's mouth stays as it was (face mesh jitters a little on a small face)
        assert talking[:, listener].std() < 0.25 * talking[:, speaker].std(), (
            talking[:, listener].std(), talking[:, speaker].std())
        assert abs(np.median(talking[:, listener]) - np.median(g[:k0, listener])) < 0.01
        # the listener turns its eyes towards the speaker (right for character 0)
        towards = 1.0 if speaker > listener else -1.0
        shift = towards * (eye[k0 + 8:, listener].mean() - eye[:k0, listener].mean())
        assert shift > 0.008, shift  # face mesh registers little of an iris turn


def test_three_faces_are_refused_with_the_count() -> None:
    from engines.face import TooManyFacesError

    three = side_by_side(astronaut(), hopper(), astronaut()[:, ::-1])
    with pytest.raises(TooManyFacesError, match="found 3 faces"):
        PortraitEngine().prepare(Avatar("three", three))
