"""Framing: where the stream's frame sits on the photo, and what fills it past the photo.

A camera operator frames a host head and shoulders: the face (forehead to
chin) takes a set share of the frame height, the eyes sit a little above the
upper third, the face is centred across. ``frame_faces`` does that for one
face or two (a two-shot: both faces in, a little smaller), for any output
aspect ratio, then trades a little of the ideal (a tighter shot, a face a
little off centre or higher) for staying on the photo. What still reaches
past the photo is filled by ``render_framed`` with a mirrored extension of
the photo that blurs and darkens with the distance from its edge, so no
edge pixel is ever stretched into streaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

FACE_SHARE = 0.34  # face height (landmarks 10 to 152) over frame height, one face
FACE_SHARE_TWO = 0.28  # a two-shot is a little wider
FACE_SHARE_MAX = 0.45  # the tightest shot taken to stay on the photo
EYE_LINE = 0.38  # eyes this far down the frame
EYE_LINE_RANGE = (0.30, 0.46)  # allowed when staying on the photo
OFF_CENTRE = 0.10  # the face may move this share of the frame width off centre
SIDE_ROOM = 0.95  # face heights from each face's centre to the frame side (two-shot)
SIDE_ROOM_MIN = 0.70

EYES = (33, 133, 362, 263)


def face_height(lm: np.ndarray) -> float:
    """Forehead-to-chin distance (landmarks 10 and 152) in pixels."""
    return float(np.linalg.norm(lm[10, :2] - lm[152, :2]))


def face_centre_x(lm: np.ndarray) -> float:
    """Middle between the face's sides (landmarks 234 and 454)."""
    return float(lm[234, 0] + lm[454, 0]) / 2


def eye_line(lm: np.ndarray) -> float:
    return float(lm[list(EYES), 1].mean())


@dataclass(slots=True, frozen=True)
class Framing:
    """The frame on the photo: top-left ``(x, y)`` and size ``(w, h)`` in photo pixels.

    The frame may reach past the photo (negative ``x``, or ``x + w`` beyond its
    width); it is shown at the output size ``(out_w, out_h)``.
    """

    x: float
    y: float
    w: float
    h: float
    out_w: int
    out_h: int
    image_w: int
    image_h: int

    @property
    def scale(self) -> float:
        """Output pixels per photo pixel."""
        return self.out_w / self.w

    @property
    def outside(self) -> float:
        """Share of the frame's area that lies past the photo (filled, not photographed)."""
        ix = max(0.0, min(self.x + self.w, self.image_w) - max(self.x, 0.0))
        iy = max(0.0, min(self.y + self.h, self.image_h) - max(self.y, 0.0))
        return 1.0 - ix * iy / (self.w * self.h)

    def to_frame(self, points: np.ndarray) -> np.ndarray:
        """Photo coordinates (N, 2 or 3) to output pixels; z scales like x."""
        out = np.array(points, dtype=np.float32, copy=True)
        s = self.scale
        out[:, 0] = (points[:, 0] - self.x) * s
        out[:, 1] = (points[:, 1] - self.y) * s
        if out.shape[1] > 2:
            out[:, 2] = points[:, 2] * s
        return out

    def as_dict(self) -> dict[str, float | int]:
        return {"x": round(self.x, 1), "y": round(self.y, 1), "w": round(self.w, 1),
                "h": round(self.h, 1), "out_w": self.out_w, "out_h": self.out_h,
                "outside": round(self.outside, 4)}


def _place(lo: float, hi: float, size: float, extent: float, ideal: float) -> float:
    """A frame start in ``[lo, hi]`` that keeps ``[start, start + size]`` on ``[0, extent]``
    as far as it can, nearest ``ideal`` among the equally good."""
    if size <= extent:
        inside_lo, inside_hi = 0.0, extent - size
    else:  # cannot fit: centre the photo in the frame
        inside_lo = inside_hi = (extent - size) / 2
    best = min(max(ideal, inside_lo), inside_hi)
    return min(max(best, lo), hi)


def frame_faces(faces: Sequence[np.ndarray], image_size: tuple[int, int],
                out_size: tuple[int, int]) -> Framing:
    """The frame for one or two faces (landmarks in photo pixels) of a ``(w, h)`` photo."""
    if not 1 <= len(faces) <= 2:
        raise ValueError(f"framing takes one or two faces, got {len(faces)}")
    iw, ih = image_size
    ow, oh = out_size
    if ow <= 0 or oh <= 0:
        raise ValueError(f"output size must be positive, got {out_size}")
    aspect = ow / oh
    heights = [face_height(lm) for lm in faces]
    if min(heights) < 4.0:
        raise ValueError(f"face is {min(heights):.1f} px tall; too small to frame")
    centres = [face_centre_x(lm) for lm in faces]
    fh = float(np.mean(heights))
    eye_y = float(np.mean([eye_line(lm) for lm in faces]))
    cx = float(np.mean(centres))
    span = max(centres) - min(centres)
    if len(faces) == 1:
        ideal_h = fh / FACE_SHARE
        tightest = fh / FACE_SHARE_MAX
    else:
        ideal_h = max(fh / FACE_SHARE_TWO, (span + 2 * SIDE_ROOM * max(heights)) / aspect)
        tightest = max(fh / FACE_SHARE_MAX, (span + 2 * SIDE_ROOM_MIN * max(heights)) / aspect)
    # zoom in (down to the tightest shot) rather than fill past a small photo
    fits = min(ih, iw / aspect)
    frame_h = ideal_h if ideal_h <= fits else max(fits, tightest)
    frame_w = frame_h * aspect
    x_ideal = cx - frame_w / 2
    x0 = _place(x_ideal - OFF_CENTRE * frame_w, x_ideal + OFF_CENTRE * frame_w, frame_w, iw,
                x_ideal)
    y_ideal = eye_y - EYE_LINE * frame_h
    y0 = _place(eye_y - EYE_LINE_RANGE[1] * frame_h, eye_y - EYE_LINE_RANGE[0] * frame_h,
                frame_h, ih, y_ideal)
    return Framing(x=x0, y=y0, w=frame_w, h=frame_h, out_w=ow, out_h=oh, image_w=iw, image_h=ih)


def _smooth(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def render_framed(image: np.ndarray, framing: Framing) -> np.ndarray:
    """The photo seen through the frame, at the output size, filled past its edges.

    Past the photo: the photo mirrored at its edge (so colours and structure
    continue), blurred more and darkened a little more the further it lies
    from the edge.
    """
    ow, oh = framing.out_w, framing.out_h
    s = framing.scale
    src = image
    sx = sy = s
    if s < 1.0:  # shrink with area averaging first, then place
        w_small = max(1, round(image.shape[1] * s))
        h_small = max(1, round(image.shape[0] * s))
        src = cv2.resize(image, (w_small, h_small), interpolation=cv2.INTER_AREA)
        sx, sy = w_small / image.shape[1], h_small / image.shape[0]
        mat = np.array([[s / sx, 0, -framing.x * s], [0, s / sy, -framing.y * s]], np.float32)
        flags = cv2.INTER_LINEAR
    else:
        mat = np.array([[s, 0, -framing.x * s], [0, s, -framing.y * s]], np.float32)
        flags = cv2.INTER_CUBIC
    sharp = cv2.warpAffine(src, mat, (ow, oh), flags=flags, borderMode=cv2.BORDER_REFLECT_101)
    ones = np.full(src.shape[:2], 255, np.uint8)
    inside = cv2.warpAffine(ones, mat, (ow, oh), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0,))
    if int(inside.min()) >= 250:
        return sharp
    dist = cv2.distanceTransform((inside < 128).astype(np.uint8), cv2.DIST_L2, 5)
    size = float(max(ow, oh))
    near = cv2.GaussianBlur(sharp, (0, 0), 0.012 * size)
    far = cv2.GaussianBlur(sharp, (0, 0), 0.07 * size)
    a1 = _smooth(dist / (0.025 * size))[..., None]
    a2 = _smooth((dist - 0.01 * size) / (0.1 * size))[..., None]
    fill = sharp * (1 - a1) + near * a1
    fill = fill * (1 - a2) + far * a2
    grey = fill.mean(axis=2, keepdims=True)
    fade = _smooth(dist / (0.35 * size))[..., None]
    fill = (fill * (1 - 0.3 * fade) + grey * 0.3 * fade) * (1 - 0.3 * fade)
    return np.clip(fill + 0.5, 0, 255).astype(np.uint8)


def frame_scale_note(framing: Framing) -> str:
    """A short human description of the framing (for logs)."""
    return (f"frame {framing.w:.0f}x{framing.h:.0f} at ({framing.x:.0f}, {framing.y:.0f}), "
            f"x{framing.scale:.2f}, {100 * framing.outside:.0f}% filled")


__all__ = ["Framing", "face_height", "frame_faces", "frame_scale_note", "render_framed"]

