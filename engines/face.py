"""Face analysis of a reference portrait: mediapipe face mesh (478 landmarks).

The face mesh model ships inside the mediapipe 0.10.21 wheel, so nothing is
downloaded. One FaceMesh instance per process, guarded by a lock (mediapipe
graphs are not re-entrant).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_MESH: Any = None


class NoFaceError(ValueError):
    """The image holds no face that the face mesh can find."""


@dataclass(slots=True)
class FaceBox:
    x: int
    y: int
    w: int
    h: int

    def as_dict(self) -> dict[str, int]:
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h}


@dataclass(slots=True)
class FaceAnalysis:
    landmarks: np.ndarray  # (478, 3) float32 in image pixels (z scaled like x)
    box: FaceBox  # box of the largest face
    num_faces: int


def _mesh() -> Any:
    global _MESH
    if _MESH is None:
        import mediapipe as mp

        _MESH = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True, max_num_faces=4, refine_landmarks=True,
            min_detection_confidence=0.5,
        )
    return _MESH


def analyse_face(image: np.ndarray) -> FaceAnalysis:
    """Landmarks of the largest face in an RGB uint8 image; NoFaceError if none."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image, got shape {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    with _LOCK:
        result = _mesh().process(np.ascontiguousarray(image))
    faces = result.multi_face_landmarks or []
    if not faces:
        raise NoFaceError("no face found in the image")
    best: np.ndarray | None = None
    best_area = -1.0
    for face in faces:
        pts = np.array([[p.x * w, p.y * h, p.z * w] for p in face.landmark], dtype=np.float32)
        area = float(np.ptp(pts[:, 0]) * np.ptp(pts[:, 1]))
        if area > best_area:
            best, best_area = pts, area
    assert best is not None
    x0, y0 = best[:, :2].min(axis=0)
    x1, y1 = best[:, :2].max(axis=0)
    box = FaceBox(int(round(x0)), int(round(y0)), int(round(x1 - x0)), int(round(y1 - y0)))
    return FaceAnalysis(landmarks=best, box=box, num_faces=len(faces))


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
