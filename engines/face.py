"""Face analysis of a reference portrait: mediapipe face mesh (478 landmarks).

The face mesh model ships inside the mediapipe 0.10.21 wheel, so nothing is
downloaded. One FaceMesh instance per process, guarded by a lock (mediapipe
graphs are not re-entrant). It looks for up to ``MAX_DETECT`` faces so that a
photo with too many can be refused with the number found; faces come back
ordered left to right (mediapipe keeps no order of its own).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.shared import SharedModel

log = logging.getLogger(__name__)

_LOCK = threading.Lock()  # mediapipe graphs are not re-entrant: one image at a time


MAX_DETECT = 8  # faces looked for; a count at this cap means "this many or more"


class NoFaceError(ValueError):
    """The image holds no face that the face mesh can find."""


class TooManyFacesError(ValueError):
    """The image holds more faces than asked for."""

    def __init__(self, found: int, limit: int) -> None:
        more = " or more" if found >= MAX_DETECT else ""
        super().__init__(f"found {found}{more} faces in the image; at most {limit} can be animated: "
                         f"crop the photo to {'one person' if limit == 1 else 'one or two people'}")
        self.found = found
        self.limit = limit


@dataclass(slots=True)
class FaceBox:
    x: int
    y: int
    w: int
    h: int

    def as_dict(self) -> dict[str, int]:
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h}


    @classmethod
    def of(cls, landmarks: np.ndarray) -> FaceBox:
        x0, y0 = landmarks[:, :2].min(axis=0)
        x1, y1 = landmarks[:, :2].max(axis=0)
        return cls(int(round(x0)), int(round(y0)), int(round(x1 - x0)), int(round(y1 - y0)))


@dataclass(slots=True)
class FaceAnalysis:
    landmarks: np.ndarray  # (478, 3) float32 in image pixels (z scaled like x): largest face
    box: FaceBox  # box of the largest face
    num_faces: int
    faces: list[np.ndarray]  # every face's landmarks, left to right
    boxes: list[FaceBox]  # their boxes, same order


def _load_mesh() -> Any:
    import mediapipe as mp

    return mp.solutions.face_mesh.FaceMesh(
        static_image_mode=True, max_num_faces=MAX_DETECT, refine_landmarks=True,
        min_detection_confidence=0.5,
    )


MESH = SharedModel("face mesh (mediapipe)", _load_mesh)


def _detect(image: np.ndarray) -> list[np.ndarray]:
    h, w = image.shape[:2]
    with _LOCK:
        result = MESH.get().process(np.ascontiguousarray(image))
    return [np.array([[p.x * w, p.y * h, p.z * w] for p in face.landmark], dtype=np.float32)
            for face in result.multi_face_landmarks or []]


def _find_faces(image: np.ndarray) -> list[np.ndarray]:
    """Faces of the whole image, and of square tiles along a long side.

    The face detector sees the image shrunk to a small square, so on a wide
    two-person photo a face can be too small to find; each tile shows it
    larger. A face found more than once is kept from where it lies furthest
    from a tile's edge (a face cut by an edge gets a poor mesh).
    """
    h, w = image.shape[:2]
    found: list[tuple[float, np.ndarray]] = [(float("inf"), f) for f in _detect(image)]
    side, long = min(h, w), max(h, w)
    if long > 1.25 * side:
        n = int(np.ceil(long / side)) + 1
        for off in np.linspace(0, long - side, n).round().astype(int):
            tile = image[:, off:off + side] if w > h else image[off:off + side, :]
            for f in _detect(tile):
                f[:, 0 if w > h else 1] += off
                x0, y0 = f[:, :2].min(axis=0)
                x1, y1 = f[:, :2].max(axis=0)
                lo, hi = (x0, x1) if w > h else (y0, y1)
                found.append((float(min(lo - off, off + side - hi)), f))
    found.sort(key=lambda mf: -mf[0])
    kept: list[np.ndarray] = []
    for _, f in found:
        c = f[:, :2].mean(axis=0)
        if not any(np.all((k[:, :2].min(axis=0) <= c) & (c <= k[:, :2].max(axis=0))) for k in kept):
            kept.append(f)
    return kept


def analyse_face(image: np.ndarray) -> FaceAnalysis:
    """Landmarks of every face in an RGB uint8 image (left to right); NoFaceError if none."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image, got shape {image.shape} {image.dtype}")
    faces = _find_faces(image)
    if not faces:
        raise NoFaceError("no face found in the image")
    faces.sort(key=lambda pts: float(pts[234, 0] + pts[454, 0]))
    areas = [float(np.ptp(pts[:, 0]) * np.ptp(pts[:, 1])) for pts in faces]
    best = faces[int(np.argmax(areas))]
    return FaceAnalysis(landmarks=best, box=FaceBox.of(best), num_faces=len(faces), faces=faces,
                        boxes=[FaceBox.of(f) for f in faces])


def analyse_faces(image: np.ndarray, limit: int = 2) -> FaceAnalysis:
    """``analyse_face`` that refuses more than ``limit`` faces (``TooManyFacesError``)."""
    analysis = analyse_face(image)
    if analysis.num_faces > limit:
        raise TooManyFacesError(analysis.num_faces, limit)
    return analysis


def mouth_opening(landmarks: np.ndarray) -> float:
    """Inner-lip gap over face height: ~0 closed, ~0.1+ wide open."""
    face_h = float(np.linalg.norm(landmarks[10, :2] - landmarks[152, :2]))
    gap = float(np.linalg.norm(landmarks[13, :2] - landmarks[14, :2]))
    return gap / max(face_h, 1e-6)


def mouth_corner_lift(landmarks: np.ndarray) -> float:
    """How far the mouth corners sit above the lip centre, over face height."""
    face_h = float(np.linalg.norm(landmarks[10, :2] - landmarks[152, :2]))
    centre_y = (landmarks[13, 1] + landmarks[14, 1]) / 2
    corners_y = (landmarks[61, 1] + landmarks[291, 1]) / 2
    return float(centre_y - corners_y) / max(face_h, 1e-6)


def brow_height(landmarks: np.ndarray) -> float:
    """Mean brow-to-eye distance over face height."""
    face_h = float(np.linalg.norm(landmarks[10, :2] - landmarks[152, :2]))
    right = landmarks[159, 1] - landmarks[105, 1]
    left = landmarks[386, 1] - landmarks[334, 1]
    return float((right + left) / 2) / max(face_h, 1e-6)
