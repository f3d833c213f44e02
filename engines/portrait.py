"""The ``portrait`` engine: a talking portrait on one CPU core, no weights to fetch.

How a frame is made:

* ``prepare`` finds the face mesh (478 landmarks) once, crops the portrait
  around the face, and precomputes one coarse displacement field per control
  (jaw, lip rounding, smile, brows, blink, gaze, head yaw/pitch/roll, ...).
  Each field is a thin-plate spline through landmark displacements; a spline
  is linear in its displacements, so the whole map from controls to a coarse
  grid is one matrix.
* A frame is then a small matrix-vector product (controls x fields), an
  upsample of the coarse field, one ``cv2.remap`` and a synthesized mouth
  interior (dark cavity, a hint of teeth) drawn inside the displaced inner
  lips.
* Blueprint keyframes hold the slow controls (head pose, expression, gaze,
  blinks) planned from the storyline; a sub-clip interpolates between two
  keyframes (first-last-frame: a linear correction makes both ends match the
  keyframes exactly) and adds the audio-driven controls (jaw, rounding,
  closure, speech nods) that are causal functions of the audio at each frame.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from engines.base import AudioSlice, Avatar, Engine, Keyframe
from engines.face import analyse_face
from engines.storyline import GazeTarget, GestureKind, Shot, default_shot, shot_face
from engines.visemes import audio_controls

log = logging.getLogger(__name__)

# Controls, in the order of the rows of the basis matrix.
BLUEPRINT = (
    "yaw", "pitch", "roll", "tx", "ty", "scale",
    "smile", "brow_raise", "brow_frown", "blink", "eye_wide", "gaze_x", "gaze_y",
)
AUDIO = ("jaw", "round", "press", "nod")
CONTROLS = BLUEPRINT + AUDIO[:3]  # "nod" is added to pitch, not a basis of its own
IDX = {name: i for i, name in enumerate(CONTROLS)}
N_BLUEPRINT = len(BLUEPRINT)

# Face-mesh landmark indices.
UPPER_INNER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
LOWER_INNER = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
UPPER_OUTER = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291]
LOWER_OUTER = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291]
JAW = [172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397]
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378,
             400, 377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21,
             54, 103, 67, 109]
# (upper lid, lower lid) pairs, right eye then left eye (subject's sides)
LID_PAIRS_R = [(159, 145), (158, 153), (160, 144), (161, 163), (157, 154), (173, 155),
               (246, 7)]
LID_PAIRS_L = [(386, 374), (385, 380), (387, 373), (388, 390), (384, 381), (398, 382),
               (466, 249)]
EYE_CORNERS = [33, 133, 362, 263]
IRIS_R = [468, 469, 470, 471, 472]
IRIS_L = [473, 474, 475, 476, 477]
BROW_R = [70, 63, 105, 66, 107, 46, 53, 52, 65, 55]
BROW_L = [300, 293, 334, 296, 336, 276, 283, 282, 295, 285]
BROW_INNER = [107, 66, 55, 65, 336, 296, 285, 295]
CHEEKS = [205, 425, 50, 280, 187, 411, 36, 266]
NOSE = [1, 4, 5, 195, 197, 6, 168, 98, 327, 2]

GRID = 128  # coarse field resolution (cells per side)
INVERT_STEPS = 4  # fixed-point steps that invert the forward field


@dataclass(slots=True)
class PreparedPortrait:
    avatar_id: str
    image: np.ndarray  # RGB uint8, output size
    landmarks: np.ndarray  # (478, 3) in output pixels
    face_h: float
    basis: np.ndarray  # (len(CONTROLS), GRID*GRID*2) float32: coarse field per control
    point_basis: np.ndarray  # (len(CONTROLS), 478, 2): displacement of each landmark
    base_x: np.ndarray  # (H, W) float32 pixel grid
    base_y: np.ndarray
    grid_x: np.ndarray  # (GRID, GRID) float32 coarse grid
    grid_y: np.ndarray
    roi: tuple[int, int, int, int]  # x0, y0, x1, y1: where the field is not zero
    seed: int
    teeth: TeethPatch | None = None
    joins: dict[bytes, np.ndarray] = field(default_factory=dict)  # recent frames by controls
    joins_lock: threading.Lock = field(default_factory=threading.Lock)


# --------------------------------------------------------------------------- #
# Thin-plate spline: the linear map from control-point displacements to a grid.
# --------------------------------------------------------------------------- #


def _tps_kernel(r2: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        k = 0.5 * r2 * np.log(r2)
    return np.nan_to_num(k)


def tps_matrix(points: np.ndarray, targets: np.ndarray, reg: float = 1e-7) -> np.ndarray:
    """Matrix M with ``field(targets) = M @ displacements(points)`` (thin-plate spline)."""
    n = len(points)
    scale = float(np.ptp(points, axis=0).max()) or 1.0
    p = points / scale
    t = targets / scale
    d2 = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    k = _tps_kernel(d2) + reg * np.eye(n)
    ones = np.ones((n, 1))
    big = np.zeros((n + 3, n + 3))
    big[:n, :n] = k
    big[:n, n:] = np.hstack([ones, p])
    big[n:, :n] = big[:n, n:].T
    inv = np.linalg.inv(big)[:, :n]  # (n+3, n): weights and affine part per unit displacement
    dt2 = ((t[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    kt = _tps_kernel(dt2)
    at = np.hstack([kt, np.ones((len(t), 1)), t])  # (m, n+3)
    return (at @ inv).astype(np.float32)  # (m, n)


def _crop_around_face(image: np.ndarray, landmarks: np.ndarray, size: tuple[int, int]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """A square crop showing head and shoulders, resized to ``size``."""
    w_out, h_out = size
    face_h = float(np.linalg.norm(landmarks[10, :2] - landmarks[152, :2]))
    cx = float(landmarks[:, 0].mean())
    cy = float(landmarks[:, 1].mean())
    side = max(face_h * 3.0, 64.0)
    side = min(side, float(max(image.shape[:2])))
    x0 = cx - side / 2
    y0 = cy - side * 0.42
    scale_x = w_out / side
    scale_y = h_out / side
    mat = np.array([[scale_x, 0, -x0 * scale_x], [0, scale_y, -y0 * scale_y]], np.float32)
    out = cv2.warpAffine(image, mat, (w_out, h_out), flags=cv2.INTER_AREA
                         if scale_x < 1 else cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    lm = landmarks.copy()
    lm[:, 0] = (landmarks[:, 0] - x0) * scale_x
    lm[:, 1] = (landmarks[:, 1] - y0) * scale_y
    lm[:, 2] = landmarks[:, 2] * scale_x
    return out, lm


def _control_points(lm: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, dict[str, slice]]:
    """Landmarks, a head ring that moves with the head, and fixed outer anchors."""
    w, h = size
    face_h = float(np.linalg.norm(lm[10, :2] - lm[152, :2]))
    centre = lm[:, :2].mean(axis=0)
    head_c = centre + np.array([0.0, -0.12 * face_h])
    ang = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    ring = head_c + np.stack([np.cos(ang) * 0.62 * face_h, np.sin(ang) * 0.78 * face_h], 1)
    outer = head_c + np.stack([np.cos(ang) * 1.15 * face_h, np.sin(ang) * 1.25 * face_h], 1)
    border = []
    for f in np.linspace(0, 1, 9):
        border += [(f * (w - 1), 0), (f * (w - 1), h - 1), (0, f * (h - 1)), (w - 1, f * (h - 1))]
    pts = np.vstack([lm[:, :2], ring, outer, np.array(border)])
    n_lm = len(lm)
    parts = {
        "landmarks": slice(0, n_lm),
        "ring": slice(n_lm, n_lm + len(ring)),
        "outer": slice(n_lm + len(ring), len(pts)),
    }
    return pts.astype(np.float64), parts


def _displacements(lm: np.ndarray, pts: np.ndarray, parts: dict[str, slice]) -> np.ndarray:
    """Displacement of every control point for a unit of each control: (C, N, 2)."""
    n = len(pts)
    face_h = float(np.linalg.norm(lm[10, :2] - lm[152, :2]))
    mouth_c = (lm[13, :2] + lm[14, :2]) / 2
    mouth_w = float(np.linalg.norm(lm[61, :2] - lm[291, :2]))
    centre = lm[:, :2].mean(axis=0)
    z = lm[:, 2] - float(np.median(lm[:, 2]))
    d = np.zeros((len(CONTROLS), n, 2), np.float64)
    L = parts["landmarks"]
    ring = parts["ring"]
    head = np.zeros(n, bool)
    head[L] = True
    head[ring] = True
    pivot = lm[152, :2] + np.array([0.0, 0.25 * face_h])  # roughly the neck

    # head pose: rigid-ish motions of landmarks and the head ring
    rel = pts - pivot
    d[IDX["roll"], head, 0] = -rel[head, 1]
    d[IDX["roll"], head, 1] = rel[head, 0]
    depth = np.zeros(n)
    depth[L] = -z  # mediapipe z is negative towards the camera
    depth[ring] = -0.15 * face_h
    d[IDX["yaw"], head, 0] = depth[head] + 0.25 * face_h
    d[IDX["pitch"], head, 1] = depth[head] + 0.15 * face_h
    d[IDX["tx"], head, 0] = 1.0
    d[IDX["ty"], head, 1] = 1.0
    d[IDX["scale"], head] = (pts[head] - centre) * 1.0

    # jaw opening: lower lip, chin and jaw line drop; upper lip lifts a little
    jaw = IDX["jaw"]
    for i in LOWER_INNER[1:-1] + LOWER_OUTER[1:-1]:
        across = abs(lm[i, 0] - mouth_c[0]) / max(mouth_w / 2, 1.0)
        d[jaw, i, 1] = 0.075 * face_h * max(1.0 - across**2, 0.3)  # an oval opening
    for i in UPPER_INNER[1:-1]:
        d[jaw, i, 1] = -0.012 * face_h
    for i in (61, 291, 78, 308):
        d[jaw, i, 1] = 0.035 * face_h
        d[jaw, i, 0] = 0.04 * mouth_w * np.sign(mouth_c[0] - lm[i, 0])
    chin_y = lm[152, 1]
    mouth_y = mouth_c[1]
    for i in JAW + [18, 200, 199, 175, 83, 313, 32, 262, 201, 421, 208, 428]:
        f = np.clip((lm[i, 1] - mouth_y) / max(chin_y - mouth_y, 1.0), 0.0, 1.0)
        d[jaw, i, 1] = 0.07 * face_h * f

    # lip rounding: corners move in, lips push out (a small opening)
    rnd = IDX["round"]
    for i in (61, 291, 78, 308, 185, 409, 146, 375):
        d[rnd, i, 0] = 0.22 * mouth_w * np.sign(mouth_c[0] - lm[i, 0])
    for i in UPPER_OUTER[2:-2]:
        d[rnd, i, 1] = -0.012 * face_h
    for i in LOWER_OUTER[2:-2]:
        d[rnd, i, 1] = 0.015 * face_h

    # lip press (closure): inner lips meet, lips thin
    prs = IDX["press"]
    for i in UPPER_INNER[1:-1] + UPPER_OUTER[1:-1]:
        d[prs, i, 1] = 0.012 * face_h
    for i in LOWER_INNER[1:-1] + LOWER_OUTER[1:-1]:
        d[prs, i, 1] = -0.012 * face_h

    # smile: corners up and out, cheeks up, lower lids up a touch
    sm = IDX["smile"]
    for i in (61, 291, 78, 308):
        d[sm, i, 0] = -0.16 * mouth_w * np.sign(mouth_c[0] - lm[i, 0])
        d[sm, i, 1] = -0.06 * face_h
    for i in (185, 409, 146, 375, 40, 270, 91, 321):
        d[sm, i, 0] = -0.08 * mouth_w * np.sign(mouth_c[0] - lm[i, 0])
        d[sm, i, 1] = -0.03 * face_h
    for i in CHEEKS:
        d[sm, i, 1] = -0.02 * face_h
    for _, lo in LID_PAIRS_R + LID_PAIRS_L:
        d[sm, lo, 1] = -0.004 * face_h

    # brows
    br = IDX["brow_raise"]
    for i in BROW_R + BROW_L:
        d[br, i, 1] = -0.045 * face_h
    for up, _ in LID_PAIRS_R + LID_PAIRS_L:
        d[br, up, 1] = -0.008 * face_h
    fr = IDX["brow_frown"]
    for i in BROW_R + BROW_L:
        inner = i in BROW_INNER
        d[fr, i, 1] = (0.035 if inner else 0.015) * face_h
        d[fr, i, 0] = (0.03 if inner else 0.01) * face_h * np.sign(centre[0] - lm[i, 0])

    # blink: squash each eye opening onto its lower lid; wide eyes lift the upper lids
    bl, ew = IDX["blink"], IDX["eye_wide"]
    for pairs, iris in ((LID_PAIRS_R, IRIS_R), (LID_PAIRS_L, IRIS_L)):
        lows = np.array([lm[lo, :2] for _, lo in pairs])
        for up, lo in pairs:
            d[bl, up, 1] = 0.92 * (lm[lo, 1] - lm[up, 1])
            d[ew, up, 1] = -0.3 * (lm[lo, 1] - lm[up, 1])
        for i in iris:
            nearest = lows[np.argmin(np.abs(lows[:, 0] - lm[i, 0]))]
            d[bl, i, 1] = 0.92 * max(nearest[1] - lm[i, 1], 0.0)
        # gaze: irises move within fixed eye corners
        eye_w = 0.05 * face_h
        for i in iris:
            d[IDX["gaze_x"], i, 0] = eye_w * 0.8
            d[IDX["gaze_y"], i, 1] = eye_w * 0.5
        for up, _ in pairs[:3]:
            d[IDX["gaze_y"], up, 1] = eye_w * 0.35
    return d


def _head_mask(lm: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """1 on the head, falling smoothly to 0 before the shoulders and background."""
    w, h = size
    face_h = float(np.linalg.norm(lm[10, :2] - lm[152, :2]))
    head_c = lm[:, :2].mean(axis=0) + np.array([0.0, -0.12 * face_h])
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.sqrt(((xs - head_c[0]) / (0.72 * face_h)) ** 2 + ((ys - head_c[1]) / (0.9 * face_h)) ** 2)
    t = np.clip((r - 1.0) / 0.45, 0.0, 1.0)
    return (1.0 - t * t * (3 - 2 * t)).astype(np.float32)


# --------------------------------------------------------------------------- #
# Motion: the blueprint controls as smooth functions of time and the plan.
# --------------------------------------------------------------------------- #

TRANSITION_S = 0.5  # expression changes ease over this long after a shot boundary


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


def blueprint_controls(shots: Sequence[Shot], t: float, seed: int) -> np.ndarray:
    """The slow controls at time t under a plan: head, expression, gaze, blink."""
    shot = next((s for s in reversed(shots) if s.covers(t)), None)
    if shot is None:
        shot = default_shot(t, t + 1.0)
    prev = next((s for s in reversed(shots) if s.end <= shot.start + 1e-9 and s is not shot),
                None)
    face = _shot_face(shot)
    energy = shot.head_motion
    if prev is not None and t - shot.start < TRANSITION_S:
        w = _smooth((t - shot.start) / TRANSITION_S)
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
    else:  # camera, with small saccades
        gx = 0.12 * _noise(t, seed + 7, (0.21, 0.43))
        gyy = 0.08 * _noise(t, seed + 8, (0.17, 0.39))
    c[IDX["gaze_x"]] = gx
    c[IDX["gaze_y"]] = gyy
    return c


# --------------------------------------------------------------------------- #
# The engine
# --------------------------------------------------------------------------- #


class PortraitEngine(Engine):
    """Landmark-driven warping portrait engine (CPU, embedded default)."""

    name = "portrait"

    def __init__(self, *, fps: int = 25, size: tuple[int, int] = (512, 512)) -> None:
        super().__init__(fps=fps, size=size)

    # 1. prepare ---------------------------------------------------------------
    def prepare(self, avatar: Avatar) -> PreparedPortrait:
        analysis = analyse_face(avatar.image)
        image, lm = _crop_around_face(avatar.image, analysis.landmarks, self.size)
        pts, parts = _control_points(lm, self.size)
        disp = _displacements(lm, pts, parts)  # (C, N, 2)
        w, h = self.size
        gy, gx = np.mgrid[0:GRID, 0:GRID].astype(np.float64)
        grid_pts = np.stack([(gx.ravel() + 0.5) * w / GRID, (gy.ravel() + 0.5) * h / GRID], 1)
        m = tps_matrix(pts, grid_pts)  # (G*G, N)
        fields = np.einsum("gn,cnk->cgk", m, disp.astype(np.float32))  # (C, G*G, 2)
        mask_full = _head_mask(lm, self.size)
        mask = cv2.resize(mask_full, (GRID, GRID), interpolation=cv2.INTER_AREA).reshape(-1, 1)
        fields *= mask[None]
        base_y, base_x = np.mgrid[0:h, 0:w].astype(np.float32)
        grid_y, grid_x = np.mgrid[0:GRID, 0:GRID].astype(np.float32)
        ys, xs = np.nonzero(mask_full > 1e-4)
        pad = 2 * max(w, h) // GRID
        roi = (max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0),
               min(int(xs.max()) + pad, w), min(int(ys.max()) + pad, h))
        lm_mask = mask_full[np.clip(lm[:, 1].astype(int), 0, h - 1),
                            np.clip(lm[:, 0].astype(int), 0, w - 1)]
        point_basis = disp[:, parts["landmarks"]] * lm_mask[None, :, None]
        face_h = float(np.linalg.norm(lm[10, :2] - lm[152, :2]))
        seed = int.from_bytes(avatar.id.encode()[:4].ljust(4, b"\0"), "little") & 0x7FFFFFFF
        log.info("prepared avatar %s: face height %.0f px, %d control points",
                 avatar.id, face_h, len(pts))
        return PreparedPortrait(
            avatar_id=avatar.id, image=image, landmarks=lm, face_h=face_h,
            basis=fields.reshape(len(CONTROLS), -1).astype(np.float32),
            point_basis=point_basis.astype(np.float32), base_x=base_x, base_y=base_y,
            grid_x=grid_x, grid_y=grid_y, roi=roi, seed=seed,
            teeth=_teeth_patch(image, lm, face_h),
        )

    def idle_frame(self, prepared: PreparedPortrait) -> np.ndarray:
        return prepared.image

    # 2. keyframes ---------------------------------------------------------------
    def keyframes(self, prepared: PreparedPortrait, shots: Sequence[Shot],
                  times: Sequence[float]) -> list[Keyframe]:
        return [Keyframe(pts=t, state=blueprint_controls(shots, t, prepared.seed)) for t in times]

    def keyframe_image(self, prepared: PreparedPortrait, keyframe: Keyframe,
                       audio: AudioSlice | None = None) -> np.ndarray:
        """The keyframe rendered (mouth from ``audio`` at its pts; closed without audio)."""
        mouth = np.zeros(len(AUDIO), np.float32)
        if audio is not None:
            mouth = audio_controls(audio, [keyframe.pts])[0]
        return self.render(prepared, self._full_controls(keyframe.state, mouth))

    # 3. sub-clips -----------------------------------------------------------------
    def subclip(self, prepared: PreparedPortrait, first: Keyframe, last: Keyframe,
                audios: Sequence[AudioSlice], shots: Sequence[Shot]) -> list[np.ndarray]:
        audio, shot = audios[0], shots[0]
        n = self.frames_between(first, last)
        times = [first.pts + k / self.fps for k in range(n + 1)]
        shots = [shot]
        # first-last-frame: the plan's own motion plus a linear correction that makes
        # both ends equal the keyframes (zero when keyframes came from the same plan)
        c0 = first.state - blueprint_controls(shots, first.pts, prepared.seed)
        c1 = last.state - blueprint_controls(shots, last.pts, prepared.seed)
        mouth = audio_controls(audio, times)
        frames = []
        for k, t in enumerate(times):
            if k == 0:
                state = first.state
            elif k == n:
                state = last.state
            else:
                a = k / n
                state = blueprint_controls(shots, t, prepared.seed) + (1 - a) * c0 + a * c1
            frames.append(self._render_cached(prepared, self._full_controls(state, mouth[k])))
        return frames

    def _render_cached(self, prepared: PreparedPortrait, controls: np.ndarray) -> np.ndarray:
        """A sub-clip's first frame is the previous one's last: render the join once."""
        key = controls.tobytes()
        cache = prepared.joins
        with prepared.joins_lock:
            frame = cache.get(key)
        if frame is None:
            frame = self.render(prepared, controls)
            with prepared.joins_lock:
                cache[key] = frame
                while len(cache) > 16:  # sessions sharing an avatar share the cache
                    cache.pop(next(iter(cache)))
        return frame

    # rendering --------------------------------------------------------------------
    @staticmethod
    def _full_controls(state: np.ndarray, mouth: np.ndarray) -> np.ndarray:
        c = np.zeros(len(CONTROLS), np.float32)
        c[:N_BLUEPRINT] = state
        c[IDX["jaw"]] = mouth[0]
        c[IDX["round"]] = mouth[1]
        c[IDX["press"]] = mouth[2]
        c[IDX["pitch"]] += mouth[3]
        return c

    def render(self, prepared: PreparedPortrait, controls: np.ndarray) -> np.ndarray:
        """One frame from a full control vector (see ``CONTROLS``)."""
        w, h = self.size
        # a weighted sum of a few fields (plain numpy: no BLAS thread pool on the hot path)
        field = (prepared.basis * controls[:, None]).sum(axis=0).reshape(GRID, GRID, 2)
        # backward map: solve q + d(q) = p for the source q by fixed-point steps
        # q = p - d(q) on the coarse grid (cheap; needed where eyelids squash)
        inv = field
        for _ in range(INVERT_STEPS):
            sx = prepared.grid_x - inv[..., 0] * (GRID / w)
            sy = prepared.grid_y - inv[..., 1] * (GRID / h)
            inv = cv2.remap(field, sx, sy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        full = cv2.resize(inv, (w, h), interpolation=cv2.INTER_LINEAR)
        # only the head moves: remap its box, keep background and shoulders as they are
        x0, y0, x1, y1 = prepared.roi
        frame = prepared.image.copy()
        map_x = prepared.base_x[y0:y1, x0:x1] - full[y0:y1, x0:x1, 0]
        map_y = prepared.base_y[y0:y1, x0:x1] - full[y0:y1, x0:x1, 1]
        frame[y0:y1, x0:x1] = cv2.remap(prepared.image, map_x, map_y, cv2.INTER_LINEAR,
                                        borderMode=cv2.BORDER_REFLECT)
        jaw = float(controls[IDX["jaw"]])
        if jaw > 0.02:
            offsets = (prepared.point_basis * controls[:, None, None]).sum(axis=0)
            _draw_mouth(frame, prepared.landmarks[:, :2] + offsets, jaw, prepared.face_h,
                        prepared.teeth)
        return frame


@dataclass(slots=True)
class TeethPatch:
    """The photo's own mouth interior (teeth) when the photo shows it."""

    rgb: np.ndarray  # float32 (h, w, 3)
    alpha: np.ndarray  # float32 (h, w)
    offset: np.ndarray  # top-left corner relative to landmark 13 (upper inner lip centre)


def _teeth_patch(image: np.ndarray, lm: np.ndarray, face_h: float) -> TeethPatch | None:
    if float(np.linalg.norm(lm[13, :2] - lm[14, :2])) < 0.012 * face_h:
        return None  # closed mouth in the photo: teeth are synthesized
    poly = np.concatenate([lm[UPPER_INNER, :2], lm[LOWER_INNER[::-1], :2]])
    x0, y0 = np.floor(poly.min(axis=0)).astype(int)
    x1, y1 = np.ceil(poly.max(axis=0)).astype(int) + 1
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(mask, [np.round((poly - [x0, y0]) * 4).astype(np.int32)], (255,), cv2.LINE_AA,
                 shift=2)
    inner = cv2.erode(mask, np.ones((2, 2), np.uint8))
    alpha = cv2.GaussianBlur(inner, (3, 3), 0).astype(np.float32) / 255.0
    rgb = image[y0:y1, x0:x1].astype(np.float32)
    return TeethPatch(rgb=rgb, alpha=alpha, offset=np.array([x0, y0], np.float32) - lm[13, :2])


def _draw_mouth(frame: np.ndarray, pts: np.ndarray, jaw: float, face_h: float,
                teeth_patch: TeethPatch | None = None) -> None:
    """A mouth interior inside the displaced inner lips: cavity, tongue, upper teeth.

    When the photo shows teeth, they stay with the upper lip and the cavity
    opens below them; otherwise a soft band of teeth is synthesized.
    """
    ring = np.concatenate([pts[UPPER_INNER], pts[LOWER_INNER[::-1]]]).astype(np.float32)
    poly = cv2.convexHull(ring).reshape(-1, 2)  # no self-crossing when the lips round
    x0, y0 = np.floor(poly.min(axis=0)).astype(int) - 3
    x1, y1 = np.ceil(poly.max(axis=0)).astype(int) + 4
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 - x0 < 3 or y1 - y0 < 2:
        return
    roi = frame[y0:y1, x0:x1]
    mask = np.zeros(roi.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round((poly - [x0, y0]) * 4).astype(np.int32)], (255,), cv2.LINE_AA,
                 shift=2)
    mask_f = cv2.GaussianBlur(mask, (3, 3), 0).astype(np.float32) / 255.0
    strength = _smooth((jaw - 0.02) / 0.15)
    yy = np.arange(roi.shape[0], dtype=np.float32)[:, None]
    xx = np.arange(roi.shape[1], dtype=np.float32)[None, :] + x0
    top = float(np.interp(pts[13, 0], pts[UPPER_INNER, 0], pts[UPPER_INNER, 1])) - y0
    bottom = float(pts[14, 1]) - y0
    gap = max(bottom - top, 1.0)
    depth = np.clip((yy - top) / gap, 0, 1)
    mouth_w = max(float(pts[308, 0] - pts[78, 0]), 1.0)
    across = np.clip(np.abs(xx - float(pts[13, 0])) / (0.5 * mouth_w), 0, 1)
    shade = (1.0 - 0.45 * across**2) * (1.0 - 0.35 * np.sin(np.pi * depth))  # darker inside
    cavity = np.empty(roi.shape, np.float32)
    cavity[..., 0] = 92 * shade
    cavity[..., 1] = 34 * shade
    cavity[..., 2] = 38 * shade
    tongue = np.clip((depth - 0.62) / 0.25, 0, 1) * (1 - across**2)
    cavity = cavity * (1 - 0.6 * tongue[..., None]) + 0.6 * tongue[..., None] * np.array(
        [150, 62, 66], np.float32)
    if teeth_patch is None:
        teeth_h = min(0.3 * gap, 0.04 * face_h)
        band = np.clip((top + teeth_h - yy) / 1.5, 0, 1) * (yy >= top - 1)
        band = band * np.clip(1.0 - across**2 / 0.55, 0, 1) ** 0.5
        tooth = np.array([226, 222, 212], np.float32) * (0.85 + 0.15 * (1 - across[..., None]))
        cavity = cavity * (1 - band[..., None]) + tooth * band[..., None]
    else:
        tp = teeth_patch
        ox, oy = np.round(pts[13] + tp.offset).astype(int) - [x0, y0]
        ph, pw = tp.alpha.shape
        # paste the photo's teeth where they overlap the roi
        sx0, sy0 = max(0, -ox), max(0, -oy)
        dx0, dy0 = max(0, ox), max(0, oy)
        cw = min(pw - sx0, roi.shape[1] - dx0)
        ch = min(ph - sy0, roi.shape[0] - dy0)
        if cw > 0 and ch > 0:
            a = tp.alpha[sy0:sy0 + ch, sx0:sx0 + cw, None]
            region = cavity[dy0:dy0 + ch, dx0:dx0 + cw]
            region[:] = region * (1 - a) + tp.rgb[sy0:sy0 + ch, sx0:sx0 + cw] * a
    alpha = (mask_f * strength)[..., None]
    roi[:] = (roi * (1 - alpha) + cavity * alpha).astype(np.uint8)
