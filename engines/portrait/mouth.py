"""The mouth: lips that part along a line, a jaw that drops, and what shows between.

The photo's mouth is split along one curve between the mouth corners: the
line where the lips meet on a closed mouth, the line where the teeth meet on
a smile that shows them. Everything below the curve moves with the jaw (the
lower lip, the chin, the lower teeth), everything above stays with the skull
(the upper lip, the upper teeth); the lower face's skin stretches smoothly
into the cheeks and the neck, so no seam shows at the chin or the face's
edge. That field has a tear along the curve, so it is kept at full
resolution in a patch around the lower face (a backward field: the pixel at
``p`` shows the photo at ``p - jaw * V(p)``); the opening it leaves is painted
as a mouth interior: a dark cavity shaded deeper towards the back, a hint
of tongue on open vowels, and (on a photo whose mouth is closed, so it has
no teeth to show) upper teeth that stay with the skull and the edges of
lower teeth that move with the jaw. Nothing is painted outside the opening,
so the lips stay the photo's own.

Lip shapes that need no tear (rounding, pressing, the corners) are ordinary
landmark displacements of the rig (``lip_displacements``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from engines.portrait.rig import FACE_OVAL, IDX, face_axis, face_h_of

UPPER_INNER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
LOWER_INNER = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
UPPER_OUTER = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291]
LOWER_OUTER = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291]
CORNERS = (61, 291, 78, 308)
NOSE_BASE = 2

N_SPLIT = 17  # points along the split curve
OPEN_GAP = 0.025  # inner-lip gap (face heights) from which the photo's mouth counts as open
JAW_DROP = 0.09  # lower-lip drop at jaw 1, face heights
LIP_LIFT = 0.03  # upper-lip lift at lift 1, face heights
SPREAD = 0.8  # how the opening tapers to the corners: (1 - x^2) ** SPREAD
TEETH_GAPS = np.array([-0.7, -0.55, -0.38, -0.2, 0.0, 0.2, 0.38, 0.55, 0.7], np.float32)
UPPER_TEETH = 0.024  # upper teeth showing below the lip line on an opened mouth, face heights


@dataclass(slots=True)
class MouthRig:
    """One face's mouth: the split curve, the jaw and lip-lift patch, colours."""

    axis: np.ndarray  # unit vector down the face
    perp: np.ndarray  # unit vector across it (towards image right for an upright face)
    face_h: float
    split: np.ndarray  # (N_SPLIT, 2) the curve, frame pixels, from corner 78 to corner 308
    spread: np.ndarray  # (N_SPLIT,) 1 mid-mouth, 0 at the corners: how far the lips part
    open: bool  # the photo shows an open mouth (its own teeth, no synthesized ones)
    origin: tuple[int, int]  # top-left of the patch, frame pixels
    patch: np.ndarray  # (h, w, 4) float32: backward field per unit jaw (0:2) and lift (2:4)
    cavity_edge: np.ndarray  # RGB float32
    cavity_deep: np.ndarray
    tongue: np.ndarray
    teeth: np.ndarray
    lift_px: float  # upper-lip lift at lift 1

    jaw_patch: np.ndarray = field(init=False)  # contiguous halves of ``patch``
    lift_patch: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.jaw_patch = np.ascontiguousarray(self.patch[..., 0:2])
        self.lift_patch = np.ascontiguousarray(self.patch[..., 2:4])

    @property
    def box(self) -> tuple[int, int, int, int]:
        x0, y0 = self.origin
        return x0, y0, x0 + self.patch.shape[1], y0 + self.patch.shape[0]


def _smooth(x: np.ndarray | float) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _curve(lm: np.ndarray, idx: list[int], o: np.ndarray, a: np.ndarray, b: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    rel = lm[idx, :2].astype(np.float64) - o
    u, v = rel @ b, rel @ a
    order = np.argsort(u)
    return u[order], v[order]


def _luma_at(image: np.ndarray, pts: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    mx = pts[:, 0].astype(np.float32)[None]
    my = pts[:, 1].astype(np.float32)[None]
    return cv2.remap(grey, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0]


def _mean_rgb(image: np.ndarray, poly: np.ndarray) -> np.ndarray | None:
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], (255,))
    if int(mask.sum()) < 255 * 4:
        return None
    return np.array(cv2.mean(image, mask=mask)[:3], np.float32)


def build_mouth(image: np.ndarray, lm: np.ndarray, size: tuple[int, int]) -> MouthRig:
    """Analyse the framed photo's mouth and precompute its jaw and lip-lift field."""
    w, h = size
    fh = face_h_of(lm)
    a = face_axis(lm)
    b = np.array([a[1], -a[0]])  # across the face: image right for an upright face
    o = ((lm[13, :2] + lm[14, :2]) / 2).astype(np.float64)
    uu, vu = _curve(lm, UPPER_INNER, o, a, b)
    ul, vl = _curve(lm, LOWER_INNER, o, a, b)
    u_left = float((lm[78, :2] - o) @ b)
    u_right = float((lm[308, :2] - o) @ b)
    if u_right < u_left:
        u_left, u_right = u_right, u_left
    us = np.linspace(u_left, u_right, N_SPLIT)
    v_up = np.interp(us, uu, vu)
    v_lo = np.interp(us, ul, vl)
    gap = float(np.linalg.norm(lm[13, :2] - lm[14, :2])) / fh
    is_open = gap >= OPEN_GAP
    if is_open:
        # the split follows the darkest line between the lips (where the teeth meet,
        # or the dark of the mouth below the upper teeth)
        uc, hw = (u_left + u_right) / 2, (u_right - u_left) / 2
        central = np.abs(us - uc) < 0.5 * hw
        fracs = np.linspace(0.2, 0.85, 27)
        dark = []
        for f in fracs:
            vv = v_up[central] + f * (v_lo[central] - v_up[central])
            pts = o + us[central, None] * b + vv[:, None] * a
            dark.append(float(_luma_at(image, pts).mean()))
        f_split = float(fracs[int(np.argmin(dark))])
        v_split = v_up + f_split * (v_lo - v_up)
    else:
        v_split = (v_up + v_lo) / 2
    split = o + us[:, None] * b + v_split[:, None] * a
    uc, hw = (u_left + u_right) / 2, max((u_right - u_left) / 2, 1.0)
    spread = np.clip(1 - ((us - uc) / hw) ** 2, 0, 1) ** SPREAD

    # the patch: the lower face, the chin and the top of the neck
    oval = lm[FACE_OVAL, :2]
    x0 = int(max(np.floor(oval[:, 0].min() - 0.25 * fh), 0))
    x1 = int(min(np.ceil(oval[:, 0].max() + 0.25 * fh), w))
    y0 = int(max(np.floor(split[:, 1].min() - 0.3 * fh), 0))
    y1 = int(min(np.ceil(lm[152, 1] + 0.65 * fh), h))
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    rx, ry = xs - o[0], ys - o[1]
    u = rx * b[0] + ry * b[1]
    v = rx * a[0] + ry * a[1]
    s = np.clip(1 - ((u - uc) / hw) ** 2, 0, 1) ** SPREAD
    d = v - np.interp(u, us, v_split)
    step = np.clip(d / 1.2 + 0.5, 0, 1)
    v_lo_outer = float((lm[17, :2] - o) @ a)
    v_chin = max(float((lm[152, :2] - o) @ a), 1.0)
    # towards the corners (and past them) the lower face follows the jaw gradually; the
    # ramp is long enough there that the skin stretches without folding (the drop
    # changes by at most ~0.6 px per px along the face)
    drop = JAW_DROP * fh / 0.85
    ramp_len = (v_lo_outer + 0.08 * fh) * s + 2.6 * drop * (1 - s)
    ramp = _smooth(d / ramp_len)
    t = s * step + (1 - s) * ramp
    lever = 0.85 + 0.15 * _smooth(v / v_chin)
    half_w = max(float(np.linalg.norm(lm[454, :2] - lm[234, :2])) / 2, 1.0)
    lat = np.abs(u - uc) / half_w
    lever *= 1 - 0.55 * _smooth((lat - 0.45) / 0.55)
    inside = np.zeros(xs.shape, np.uint8)
    cv2.fillPoly(inside, [np.round(oval - [x0, y0]).astype(np.int32)], (1,))
    dist_out = cv2.distanceTransform(1 - inside, cv2.DIST_L2, 5).astype(np.float64)
    below = _smooth((v - 0.75 * v_chin) / (0.35 * v_chin))
    fall = 1 - _smooth(dist_out / (fh * (0.12 + 0.33 * below)))
    s_jaw = t * lever * fall
    v_nose = float((lm[NOSE_BASE, :2] - o) @ a)
    v_up_outer = float((lm[0, :2] - o) @ a)
    # the lift fades from the upper lip to nothing at the base of the nose
    g = _smooth((v - v_nose) / max(v_up_outer - v_nose, 1.0))
    s_up = (1 - step) * s * g * (1 - _smooth(dist_out / (0.05 * fh)))
    lift = LIP_LIFT * fh
    patch = np.stack([drop * s_jaw * a[0], drop * s_jaw * a[1],
                      -lift * s_up * a[0], -lift * s_up * a[1]], axis=-1).astype(np.float32)
    # keep only where the field moves anything (plus a pixel)
    moving = np.argwhere(np.abs(patch).max(axis=-1) > 1e-3)
    if len(moving):
        (ty0, tx0), (ty1, tx1) = moving.min(axis=0), moving.max(axis=0) + 1
        ty0, tx0 = max(int(ty0) - 1, 0), max(int(tx0) - 1, 0)
        ty1, tx1 = min(int(ty1) + 1, patch.shape[0]), min(int(tx1) + 1, patch.shape[1])
        patch = np.ascontiguousarray(patch[ty0:ty1, tx0:tx1])
        x0, y0 = x0 + tx0, y0 + ty0

    # colours of the interior, from the photo's own lips and skin
    lip_poly = np.concatenate([lm[UPPER_OUTER, :2], lm[UPPER_INNER[::-1], :2]])
    lip = _mean_rgb(image, lip_poly)
    if lip is None:
        lip = np.array([150, 80, 80], np.float32)
    cheek = _mean_rgb(image, lm[[205, 50, 187, 147, 123, 116], :2])
    skin_luma = float(cheek.mean()) if cheek is not None else 160.0
    skin = cheek if cheek is not None else np.array([190, 150, 130], np.float32)
    ivory = np.array([236, 228, 208], np.float32)
    teeth = np.clip((0.7 * ivory + 0.3 * skin * 1.15) * float(np.clip(0.6 + 0.4 * skin_luma / 170,
                                                                         0.65, 1.0)), 0, 240)
    return MouthRig(
        axis=a.astype(np.float32), perp=b.astype(np.float32), face_h=fh,
        split=split.astype(np.float32), spread=spread.astype(np.float32), open=is_open,
        origin=(x0, y0), patch=patch,
        cavity_edge=(lip * np.array([0.42, 0.30, 0.30])).astype(np.float32),
        cavity_deep=(lip * np.array([0.13, 0.07, 0.07]) + 3).astype(np.float32),
        tongue=np.clip(lip * np.array([0.9, 0.55, 0.57]), 0, 255).astype(np.float32),
        teeth=teeth, lift_px=lift,
    )


def lip_displacements(d: np.ndarray, lm: np.ndarray, mouth: MouthRig) -> None:
    """Fill the rig's lip-shape rows (rounding, pressing) of ``d`` (C, N, 2).

    The jaw has no row: its field is ``MouthRig.patch``."""
    fh = mouth.face_h
    a, b = mouth.axis.astype(np.float64), mouth.perp.astype(np.float64)
    centre = (lm[13, :2] + lm[14, :2]) / 2
    mouth_w = float(np.linalg.norm(lm[61, :2] - lm[291, :2]))

    def inward(i: int) -> np.ndarray:  # across the face, towards the mouth's middle
        return b * float(np.sign((centre - lm[i, :2]) @ b))

    rnd = IDX["round"]  # corners in, lips pushed out
    for i in (61, 291, 78, 308):
        d[rnd, i] = 0.22 * mouth_w * inward(i)
    for i in (185, 409, 146, 375):
        d[rnd, i] = 0.15 * mouth_w * inward(i)
    for i in UPPER_OUTER[2:-2]:
        d[rnd, i] = -0.012 * fh * a
    for i in LOWER_OUTER[2:-2]:
        d[rnd, i] = 0.015 * fh * a
    prs = IDX["press"]
    if mouth.open:  # the lips close over the teeth, meeting on the split curve
        o = (lm[13, :2] + lm[14, :2]) / 2
        us = (mouth.split.astype(np.float64) - o) @ b
        vs = (mouth.split.astype(np.float64) - o) @ a
        for inner, outer in ((UPPER_INNER, UPPER_OUTER), (LOWER_INNER, LOWER_OUTER)):
            for i, j in zip(inner[1:-1], outer[1:-1], strict=True):
                rel = lm[i, :2] - o
                move = float(np.interp(rel @ b, us, vs) - rel @ a)
                d[prs, i] = move * a
                d[prs, j] = 0.55 * move * a
    else:  # a closed mouth presses: the lips thin
        for i in UPPER_OUTER[1:-1]:
            d[prs, i] = 0.012 * fh * a
        for i in LOWER_OUTER[1:-1]:
            d[prs, i] = -0.012 * fh * a


def _sample(mouth: MouthRig, pts: np.ndarray) -> np.ndarray:
    x0, y0 = mouth.origin
    mx = (pts[:, 0] - x0).astype(np.float32)[None]
    my = (pts[:, 1] - y0).astype(np.float32)[None]
    return cv2.remap(mouth.patch, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                     borderValue=(0, 0, 0, 0))[0]


def opening(mouth: MouthRig, jaw: float, lift: float) -> tuple[np.ndarray, np.ndarray]:
    """Where the split's upper side and lower side land (rest frame pixels)."""
    q = mouth.split.astype(np.float32)
    a = mouth.axis
    lower = q + 1.5 * a
    for _ in range(3):
        lower = q + jaw * _sample(mouth, lower)[:, 0:2]
    upper = q - 1.5 * a
    for _ in range(3):
        upper = q + lift * _sample(mouth, upper)[:, 2:4]
    return upper, lower


def apply_field(mouth: MouthRig, maps: np.ndarray, roi: tuple[int, int], jaw: float,
                lift: float) -> None:
    """Add the jaw and lip-lift field to a backward map (h, w, 2) whose pixel (0, 0) is ``roi``."""
    if jaw <= 1e-4 and lift <= 1e-4:
        return
    rx0, ry0 = roi
    px0, py0, px1, py1 = mouth.box
    h, w = maps.shape[:2]
    x0, y0 = max(px0 - rx0, 0), max(py0 - ry0, 0)
    x1, y1 = min(px1 - rx0, w), min(py1 - ry0, h)
    if x1 <= x0 or y1 <= y0:
        return
    sub = maps[y0:y1, x0:x1]
    both = cv2.addWeighted(mouth.jaw_patch, jaw, mouth.lift_patch, lift, 0.0)
    at: np.ndarray = sub - np.array([px0, py0], np.float32)
    # a two-channel map needs no second one (the stubs do not know that)
    sub -= cv2.remap(both, at, None, cv2.INTER_LINEAR,  # type: ignore[call-overload]
                     borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0))


def draw_interior(frame: np.ndarray, mouth: MouthRig, upper: np.ndarray, lower: np.ndarray,
                  jaw: float, lift: float) -> None:
    """Paint the opening between the split's two sides (output pixels) in place."""
    gap_px = float(np.max((lower - upper) @ mouth.axis))
    if gap_px < 0.6:
        return
    poly = np.concatenate([upper, lower[::-1]]).astype(np.float32)
    h, w = frame.shape[:2]
    x0 = max(int(np.floor(poly[:, 0].min())) - 2, 0)
    y0 = max(int(np.floor(poly[:, 1].min())) - 2, 0)
    x1 = min(int(np.ceil(poly[:, 0].max())) + 3, w)
    y1 = min(int(np.ceil(poly[:, 1].max())) + 3, h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    roi = frame[y0:y1, x0:x1]
    mask = np.zeros(roi.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round((poly - [x0, y0]) * 4).astype(np.int32)], (255,), cv2.LINE_AA,
                 shift=2)
    alpha = mask.astype(np.float32) / 255.0
    a, b = mouth.axis, mouth.perp
    fh = mouth.face_h
    centre = (upper[len(upper) // 2] + lower[len(lower) // 2]) / 2
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    rx, ry = xs - centre[0], ys - centre[1]
    u = rx * b[0] + ry * b[1]
    v = rx * a[0] + ry * a[1]
    ut = (upper - centre) @ b
    vt = (upper - centre) @ a
    ub = (lower - centre) @ b
    vb = (lower - centre) @ a
    ot, ob = np.argsort(ut), np.argsort(ub)
    v_top = np.interp(u, ut[ot], vt[ot]).astype(np.float32)
    v_bot = np.interp(u, ub[ob], vb[ob]).astype(np.float32)
    gap = np.maximum(v_bot - v_top, 1e-3)
    uc = float((ut[0] + ut[-1]) / 2)
    hw = max(float(abs(ut[-1] - ut[0]) / 2), 1.0)
    across = np.clip(np.abs(u - uc) / hw, 0, 1)
    depth = np.clip((v - v_top) / gap, 0, 1)
    spread = np.clip(1 - across**2, 0, 1)
    # the cavity: darkest in the middle and at the back, warmer towards the lips
    shade = spread**0.7 * (0.35 + 0.65 * np.sin(np.pi * depth))
    out = mouth.cavity_edge * (1 - shade[..., None]) + mouth.cavity_deep * shade[..., None]
    gap_mid = float(np.max(gap))
    # tongue: a lit hump low in the mouth on open vowels
    t_amount = float(_smooth((jaw - 0.25) / 0.4)) * 0.7
    if t_amount > 0:
        tv = (v - (float(np.interp(uc, ub[ob], vb[ob])) - 0.04 * gap_mid)) / (0.36 * gap_mid)
        r = np.sqrt(((u - uc) / (0.72 * hw)) ** 2 + tv**2)
        ta = (_smooth((1 - r) / 0.45) * t_amount).astype(np.float32)
        tongue = mouth.tongue * (0.5 + 0.4 * np.clip(1 - r, 0, 1))[..., None]
        out = out * (1 - ta[..., None]) + tongue * ta[..., None]
    if not mouth.open:
        # upper teeth stay with the skull just behind the lip line; lower teeth edges rise
        # with the jaw just above the lower lip
        edge = v_top + (lift * mouth.lift_px + UPPER_TEETH * fh) * spread**0.5
        up = np.clip(edge - v + 0.5, 0, 1) * _smooth((0.92 - across) / 0.2)
        lit = np.clip((v - v_top) / np.maximum(edge - v_top, 1e-3), 0, 1)
        gaps = np.abs((u - uc)[..., None] - TEETH_GAPS * hw).min(axis=-1)
        seams = np.clip(1 - gaps / 0.8, 0, 1)
        tooth = mouth.teeth * ((0.62 + 0.38 * lit) * (1 - 0.45 * across**2)
                               * (1 - 0.22 * seams))[..., None]
        out = out * (1 - up[..., None]) + tooth * up[..., None]
        low_h = np.clip(0.16 * gap - 0.006 * fh, 0, 0.016 * fh) * spread**2
        lo = np.clip(v - (v_bot - low_h) + 0.5, 0, 1) * (low_h > 0.3) * _smooth((0.8 - across) / 0.2)
        lo = lo * 0.8
        out = out * (1 - lo[..., None]) + (0.8 * mouth.teeth) * (1 - 0.5 * across**2)[..., None] \
            * lo[..., None]
    al = alpha[..., None]
    roi[:] = np.clip(roi * (1 - al) + out * al + 0.5, 0, 255).astype(np.uint8)
