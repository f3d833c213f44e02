"""The rig: the linear map from controls to a coarse warp field, one face at a time.

Each control (head yaw, pitch, roll, shift and scale; smile, brows, blink,
wide eyes, gaze; the lip shapes of ``engines.portrait.mouth``) moves some
face-mesh landmarks by a set amount per unit. A thin-plate spline through
those landmark displacements (plus a ring around the head that moves with it
and fixed anchors further out) gives a displacement field; a spline is
linear in its displacements, so each control's field is precomputed once
per face on a coarse grid, and a frame's field is a weighted sum of a few of
them. The jaw is not among them: its field has a tear along the lips (the
mouth opens), which no smooth field can make; ``mouth`` renders it at full
resolution.

The fields are forward (where a photo pixel goes); ``invert`` turns their sum
into the backward map ``cv2.remap`` needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Controls, in the order of the rows of the basis.
BLUEPRINT = (
    "yaw", "pitch", "roll", "tx", "ty", "scale",
    "smile", "brow_raise", "brow_frown", "blink", "eye_wide", "gaze_x", "gaze_y",
)
MOUTH = ("jaw", "round", "press")
CONTROLS = BLUEPRINT + MOUTH
IDX = {name: i for i, name in enumerate(CONTROLS)}
N_BLUEPRINT = len(BLUEPRINT)

# Face-mesh landmark indices.
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378,
             400, 377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21,
             54, 103, 67, 109]
# (upper lid, lower lid) pairs, right eye then left eye (subject's sides)
LID_PAIRS_R = [(159, 145), (158, 153), (160, 144), (161, 163), (157, 154), (173, 155),
               (246, 7)]
LID_PAIRS_L = [(386, 374), (385, 380), (387, 373), (388, 390), (384, 381), (398, 382),
               (466, 249)]
IRIS_R = [468, 469, 470, 471, 472]
IRIS_L = [473, 474, 475, 476, 477]
BROW_R = [70, 63, 105, 66, 107, 46, 53, 52, 65, 55]
BROW_L = [300, 293, 334, 296, 336, 276, 283, 282, 295, 285]
BROW_INNER = [107, 66, 55, 65, 336, 296, 285, 295]
CHEEKS = [205, 425, 50, 280, 187, 411, 36, 266]

GRID = 128  # coarse field resolution (cells per side)
INVERT_STEPS = 4  # fixed-point steps that invert the forward field


def face_h_of(lm: np.ndarray) -> float:
    return float(np.linalg.norm(lm[10, :2] - lm[152, :2]))


def face_axis(lm: np.ndarray) -> np.ndarray:
    """Unit vector down the face (forehead to chin), in image coordinates."""
    v = (lm[152, :2] - lm[10, :2]).astype(np.float64)
    return v / max(float(np.linalg.norm(v)), 1e-6)


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


# --------------------------------------------------------------------------- #
# Control points and their displacements per unit of each control.
# --------------------------------------------------------------------------- #


@dataclass(slots=True)
class ControlPoints:
    points: np.ndarray  # (N, 2) float64, frame pixels
    n_landmarks: int
    ring: slice  # moves with the head
    outer: slice  # fixed anchors


def control_points(lm: np.ndarray, size: tuple[int, int]) -> ControlPoints:
    """Landmarks, a head ring that moves with the head, and fixed outer anchors."""
    w, h = size
    face_h = face_h_of(lm)
    centre = lm[:, :2].mean(axis=0)
    head_c = centre + np.array([0.0, -0.12 * face_h])
    ang = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    ring = head_c + np.stack([np.cos(ang) * 0.62 * face_h, np.sin(ang) * 0.78 * face_h], 1)
    outer = head_c + np.stack([np.cos(ang) * 1.15 * face_h, np.sin(ang) * 1.25 * face_h], 1)
    border = []
    for f in np.linspace(0, 1, 9):
        border += [(f * (w - 1), 0), (f * (w - 1), h - 1), (0, f * (h - 1)), (w - 1, f * (h - 1))]
    pts = np.vstack([lm[:, :2], ring, outer, np.array(border)]).astype(np.float64)
    n_lm = len(lm)
    return ControlPoints(points=pts, n_landmarks=n_lm, ring=slice(n_lm, n_lm + len(ring)),
                         outer=slice(n_lm + len(ring), len(pts)))


def head_displacements(lm: np.ndarray, cp: ControlPoints) -> np.ndarray:
    """(len(CONTROLS), N, 2): head pose, expression and eyes; the mouth adds its own rows."""
    pts = cp.points
    n = len(pts)
    face_h = face_h_of(lm)
    mouth_c = (lm[13, :2] + lm[14, :2]) / 2
    mouth_w = float(np.linalg.norm(lm[61, :2] - lm[291, :2]))
    centre = lm[:, :2].mean(axis=0)
    z = lm[:, 2] - float(np.median(lm[:, 2]))
    d = np.zeros((len(CONTROLS), n, 2), np.float64)
    head = np.zeros(n, bool)
    head[: cp.n_landmarks] = True
    head[cp.ring] = True
    pivot = lm[152, :2] + np.array([0.0, 0.25 * face_h])  # roughly the neck

    # head pose: rigid-ish motions of landmarks and the head ring
    rel = pts - pivot
    d[IDX["roll"], head, 0] = -rel[head, 1]
    d[IDX["roll"], head, 1] = rel[head, 0]
    depth = np.zeros(n)
    depth[: cp.n_landmarks] = -z  # mediapipe z is negative towards the camera
    depth[cp.ring] = -0.15 * face_h
    d[IDX["yaw"], head, 0] = depth[head] + 0.25 * face_h
    d[IDX["pitch"], head, 1] = depth[head] + 0.15 * face_h
    d[IDX["tx"], head, 0] = 1.0
    d[IDX["ty"], head, 1] = 1.0
    d[IDX["scale"], head] = (pts[head] - centre) * 1.0

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
        for up, lo in pairs:  # the lids meet a little above the lower lid's line
            d[bl, up, 1] = 0.9 * (lm[lo, 1] - lm[up, 1])
            d[bl, lo, 1] = -0.1 * (lm[lo, 1] - lm[up, 1])
            d[ew, up, 1] = -0.3 * (lm[lo, 1] - lm[up, 1])
        for i in iris:
            nearest = lows[np.argmin(np.abs(lows[:, 0] - lm[i, 0]))]
            d[bl, i, 1] = 0.9 * max(nearest[1] - lm[i, 1], 0.0)
        # gaze: irises move within fixed eye corners
        eye_w = 0.05 * face_h
        for i in iris:
            d[IDX["gaze_x"], i, 0] = eye_w * 0.8
            d[IDX["gaze_y"], i, 1] = eye_w * 0.5
        for up, _ in pairs[:3]:
            d[IDX["gaze_y"], up, 1] = eye_w * 0.35
    return d


def head_mask(lm: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """1 on the head, falling smoothly to 0 before the shoulders and background."""
    w, h = size
    face_h = face_h_of(lm)
    head_c = lm[:, :2].mean(axis=0) + np.array([0.0, -0.12 * face_h])
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.sqrt(((xs - head_c[0]) / (0.72 * face_h)) ** 2 + ((ys - head_c[1]) / (0.9 * face_h)) ** 2)
    t = np.clip((r - 1.0) / 0.4, 0.0, 1.0)
    return (1.0 - t * t * (3 - 2 * t)).astype(np.float32)


def _merge_close(points: np.ndarray, disp: np.ndarray, tol: float = 0.5
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Drop control points that sit on an earlier one and move with it (a closed
    mouth's inner lips); points that move apart (a lid on the iris) stay."""
    d2 = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    keep = np.ones(len(points), bool)
    for j in range(len(points)):
        if not keep[j]:
            continue
        close = np.flatnonzero((d2[j] < tol * tol) & keep)
        close = close[close > j]
        close = close[np.abs(disp[:, close] - disp[:, j:j + 1]).max(axis=(0, 2)) < 0.05]
        if len(close):
            group = np.concatenate([[j], close])
            disp[:, j] = disp[:, group].mean(axis=1)
            keep[close] = False
    return points[keep], disp[:, keep]


@dataclass(slots=True)
class FaceRig:
    """One face's precomputed fields."""

    landmarks: np.ndarray  # (478, 3) frame pixels
    face_h: float
    box: tuple[int, int, int, int]  # gx0, gy0, gx1, gy1: the coarse cells the fields touch
    basis: np.ndarray  # (len(CONTROLS), gy1-gy0, gx1-gx0, 2) float32 forward fields
    active: tuple[int, ...]  # rows of the basis that are not all zero
    point_basis: np.ndarray  # (len(CONTROLS), 478, 2): forward displacement of each landmark
    extra_basis: np.ndarray  # (len(CONTROLS), M, 2): same at extra points asked for
    roi: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels: where the head may move
    active_basis: np.ndarray  # (len(active), cells * 2) float32: the active rows, flat


def build_face_rig(lm: np.ndarray, cp: ControlPoints, disp: np.ndarray, size: tuple[int, int],
                   extra_points: np.ndarray) -> FaceRig:
    """Precompute one face's coarse fields from control points and their displacements."""
    w, h = size
    mask_full = head_mask(lm, size)
    mask = cv2.resize(mask_full, (GRID, GRID), interpolation=cv2.INTER_AREA)
    cells = np.argwhere(mask > 1e-4)
    gy0, gx0 = cells.min(axis=0)
    gy1, gx1 = cells.max(axis=0) + 1
    gy, gx = np.mgrid[gy0:gy1, gx0:gx1].astype(np.float64)
    grid_pts = np.stack([(gx.ravel() + 0.5) * w / GRID, (gy.ravel() + 0.5) * h / GRID], 1)
    pts, dsp = _merge_close(cp.points, disp.copy())
    targets = np.vstack([grid_pts, extra_points.reshape(-1, 2)])
    m = tps_matrix(pts, targets)  # (cells + M, N)
    fields = np.einsum("gn,cnk->cgk", m, dsp.astype(np.float32))
    n_cells = len(grid_pts)
    cell_mask = mask[gy0:gy1, gx0:gx1].reshape(-1, 1)
    basis = (fields[:, :n_cells] * cell_mask[None]).reshape(len(CONTROLS), gy1 - gy0, gx1 - gx0, 2)
    sample = lambda p: mask_full[np.clip(p[:, 1].astype(int), 0, h - 1),  # noqa: E731
                                 np.clip(p[:, 0].astype(int), 0, w - 1)]
    extra = fields[:, n_cells:] * sample(extra_points.reshape(-1, 2))[None, :, None]
    point_basis = disp[:, : cp.n_landmarks] * sample(lm[:, :2])[None, :, None]
    ys, xs = np.nonzero(mask_full > 1e-4)
    pad = 2 * max(w, h) // GRID
    roi = (max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0),
           min(int(xs.max()) + pad, w), min(int(ys.max()) + pad, h))
    active = tuple(int(i) for i in np.flatnonzero(np.abs(basis).reshape(len(CONTROLS), -1).max(1) > 0))
    return FaceRig(landmarks=lm, face_h=face_h_of(lm), box=(int(gx0), int(gy0), int(gx1), int(gy1)),
                   basis=basis.astype(np.float32), active=active,
                   point_basis=point_basis.astype(np.float32), extra_basis=extra.astype(np.float32),
                   roi=roi, active_basis=np.ascontiguousarray(
                       basis[list(active)].reshape(len(active), -1), dtype=np.float32))


# --------------------------------------------------------------------------- #
# Per frame: weighted sum, inversion.
# --------------------------------------------------------------------------- #


def coarse_field(rigs: list[FaceRig], controls: np.ndarray) -> np.ndarray:
    """The forward field (GRID, GRID, 2) in pixels for a (characters, CONTROLS) array."""
    field = np.zeros((GRID, GRID, 2), np.float32)
    for rig, c in zip(rigs, controls, strict=True):
        gx0, gy0, gx1, gy1 = rig.box
        weights = np.ascontiguousarray(c[list(rig.active)], dtype=np.float32)
        if not np.any(weights):
            continue
        # einsum's own loop, not BLAS: one thread, as a frame must be rendered on one core
        field[gy0:gy1, gx0:gx1] += np.einsum("a,ak->k", weights, rig.active_basis).reshape(
            gy1 - gy0, gx1 - gx0, 2)
    return field


def invert(field: np.ndarray, size: tuple[int, int], grid_x: np.ndarray, grid_y: np.ndarray,
           offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Backward field: solve q + d(q) = p for q by fixed-point steps q = p - d(q).

    Where the field compresses (a closing eyelid) the steps overshoot back and
    forth; the mean of the last two cancels most of that.
    """
    w, h = size
    gx = grid_x - offset[0]  # ``field`` may be a part of the grid starting at ``offset``
    gy = grid_y - offset[1]
    inv = prev = field
    for _ in range(INVERT_STEPS):
        sx = gx - inv[..., 0] * (GRID / w)
        sy = gy - inv[..., 1] * (GRID / h)
        prev, inv = inv, cv2.remap(field, sx, sy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return 0.5 * (prev + inv)
