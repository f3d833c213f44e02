"""The avatars API's store: uploaded portraits, checked for a face, kept on disk.

Each avatar is ``<dir>/<id>.png`` plus ``<id>.json``: size, time, the faces
found (one or two, left to right: character 0 is the leftmost) with a box
each, and the framing the portrait engine's stream uses (the frame on the
photo, in photo pixels, and how much of it lies past the photo and is filled).
The default avatar (scikit-image's public-domain astronaut photo) is always
there as ``astronaut`` and cannot be deleted.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from engines.base import Avatar
from engines.face import FaceAnalysis, NoFaceError, TooManyFacesError, analyse_faces
from engines.portrait.framing import frame_faces

log = logging.getLogger(__name__)

DEFAULT_ID = "astronaut"
MAX_PIXELS = 40_000_000  # decompression-bomb guard
MAX_SIDE = 2048  # larger photos are scaled down before storing
MAX_FACES = 2  # characters one photo can have
FRAME_SIZE = (512, 512)  # the stream's frame the framing is reported for
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class AvatarError(Exception):
    """A rejected upload or lookup; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class AvatarInfo:
    id: str
    face_box: dict[str, int]  # the largest face's box
    width: int
    height: int
    faces: int
    created: float
    face_boxes: list[dict[str, int]] | None = None  # one per face, left to right
    framing: dict[str, float | int] | None = None  # see ``engines.portrait.framing.Framing``

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "face_box": self.face_box, "width": self.width,
                "height": self.height, "faces": self.faces, "face_boxes": self.face_boxes,
                "framing": self.framing, "created": self.created}


def decode_image(data: bytes) -> np.ndarray:
    """Bytes of a JPEG/PNG (or other common format) to RGB uint8; 415 if not an image."""
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise AvatarError(413, f"image is {im.width}x{im.height}; at most "
                                       f"{MAX_PIXELS} pixels are accepted")
            im.thumbnail((MAX_SIDE, MAX_SIDE))
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except AvatarError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
        raise AvatarError(415, f"not a readable image: {exc}") from exc
    if rgb.shape[0] < 64 or rgb.shape[1] < 64:
        raise AvatarError(422, f"image is {rgb.shape[1]}x{rgb.shape[0]}; at least 64x64 needed")
    return rgb


def check_faces(image: np.ndarray) -> FaceAnalysis:
    """Blocking: the faces of a portrait (one or two); ``AvatarError`` 422 saying why not."""
    try:
        return analyse_faces(image, MAX_FACES)
    except NoFaceError as exc:
        raise AvatarError(422, "no face found in the image: upload a portrait with one "
                               "clearly visible face") from exc
    except TooManyFacesError as exc:
        raise AvatarError(422, str(exc)) from exc


class AvatarStore:
    def __init__(self, root: Path, default_image: np.ndarray | None = None,
                 frame_size: tuple[int, int] = FRAME_SIZE) -> None:
        self.root = root
        self.frame_size = frame_size
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = asyncio.Lock()
        self._default_image = default_image

    def _default(self) -> np.ndarray:
        if self._default_image is None:
            from skimage import data

            self._default_image = np.ascontiguousarray(data.astronaut())
        return self._default_image

    def _check_id(self, avatar_id: str) -> None:
        if not _ID_RE.match(avatar_id):
            raise AvatarError(404, f"no avatar {avatar_id!r}")

    async def ensure_default(self) -> None:
        meta = self.root / f"{DEFAULT_ID}.json"
        if meta.exists() and "framing" in json.loads(meta.read_text()):
            return  # (a record from before framing was reported is made again)
        await self._store(DEFAULT_ID, self._default())

    async def _store(self, avatar_id: str, image: np.ndarray) -> AvatarInfo:
        loop = asyncio.get_running_loop()
        analysis = await loop.run_in_executor(None, check_faces, image)
        framing = frame_faces(analysis.faces, (image.shape[1], image.shape[0]), self.frame_size)
        info = AvatarInfo(id=avatar_id, face_box=analysis.box.as_dict(), width=image.shape[1],
                          height=image.shape[0], faces=analysis.num_faces, created=time.time(),
                          face_boxes=[b.as_dict() for b in analysis.boxes],
                          framing=framing.as_dict())
        async with self._lock:
            png = self.root / f"{avatar_id}.png"
            await loop.run_in_executor(None, lambda: Image.fromarray(image).save(png))
            (self.root / f"{avatar_id}.json").write_text(json.dumps(info.as_dict()))
        log.info("stored avatar %s (%dx%d, %d face(s))", avatar_id, info.width, info.height,
                 info.faces)
        return info

    async def add(self, data: bytes) -> AvatarInfo:
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(None, decode_image, data)
        return await self._store(secrets.token_hex(6), image)

    def list(self) -> list[AvatarInfo]:
        out = []
        for meta in sorted(self.root.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                out.append(AvatarInfo(**json.loads(meta.read_text())))
            except (OSError, ValueError, TypeError):
                log.warning("skipping unreadable avatar record %s", meta)
        return out

    def info(self, avatar_id: str) -> AvatarInfo:
        self._check_id(avatar_id)
        meta = self.root / f"{avatar_id}.json"
        if not meta.exists():
            raise AvatarError(404, f"no avatar {avatar_id!r}")
        return AvatarInfo(**json.loads(meta.read_text()))

    async def load(self, avatar_id: str) -> Avatar:
        self.info(avatar_id)
        png = self.root / f"{avatar_id}.png"
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(
            None, lambda: np.asarray(Image.open(png).convert("RGB"), dtype=np.uint8))
        return Avatar(id=avatar_id, image=image)

    async def delete(self, avatar_id: str) -> None:
        self.info(avatar_id)
        if avatar_id == DEFAULT_ID:
            raise AvatarError(409, "the default avatar cannot be deleted")
        async with self._lock:
            for ext in ("png", "json"):
                (self.root / f"{avatar_id}.{ext}").unlink(missing_ok=True)
