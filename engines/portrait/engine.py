"""The ``portrait`` engine: a talking portrait on one CPU core, no weights to fetch.

How a frame is made:

* ``prepare`` finds the faces (face mesh, one or two, left to right), frames
  them like a camera operator (``framing``), and for each face precomputes
  the rig (``rig``: one coarse displacement field per control) and the mouth
  (``mouth``: the jaw's full-resolution field and the interior's colours).
* A frame is then a weighted sum of a few coarse fields per face, its
  inversion and upsample, the jaw field added around each mouth, one
  ``cv2.remap`` per head, and each opened mouth's interior painted.
* Blueprint keyframes hold the slow controls of every character (``motion``);
  a sub-clip interpolates between two keyframes (first-last-frame: a linear
  correction makes both ends match the keyframes exactly) and adds the
  audio-driven controls (``engines.visemes``: jaw, rounding, closure, speech
  nods, and how loudly each character speaks, which turns the listener
  towards the speaker), causal functions of each character's own audio.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from engines.base import AUDIO_RATE, AudioSlice, Avatar, Engine, Keyframe
from engines.face import analyse_faces
from engines.portrait import mouth as mouth_mod
from engines.portrait.framing import Framing, frame_faces, frame_scale_note, render_framed
from engines.portrait.motion import (
    blueprint_controls,
    character_seed,
    keyframe_state,
    listening,
    towards,
)
from engines.portrait.rig import (
    CONTROLS,
    GRID,
    IDX,
    N_BLUEPRINT,
    FaceRig,
    build_face_rig,
    coarse_field,
    control_points,
    head_displacements,
    invert,
)
from engines.storyline import Shot, default_shot
from engines.visemes import AUDIO_CONTROLS, audio_controls

log = logging.getLogger(__name__)

MAX_CHARACTERS = 2
LEVEL = AUDIO_CONTROLS.index("level")


@dataclass(slots=True)
class Character:
    """One face of the portrait: its rig, its mouth, its own seed."""

    rig: FaceRig
    mouth: mouth_mod.MouthRig
    seed: int
    x: float  # face centre across the frame (for who looks at whom)


@dataclass(slots=True)
class PreparedPortrait:
    avatar_id: str
    image: np.ndarray  # RGB uint8, output size: the framed photo
    framing: Framing
    characters: list[Character]
    grid_x: np.ndarray  # (GRID, GRID) float32 coarse grid
    grid_y: np.ndarray
    cell_px: np.ndarray  # (GRID, GRID, 2) float32: pixel position of each cell centre
    grid_box: tuple[int, int, int, int]  # gx0, gy0, gx1, gy1: cells any face's fields touch
    rois: list[tuple[int, int, int, int]]  # x0, y0, x1, y1: where heads move (no overlaps)
    seed: int
    joins: dict[bytes, np.ndarray] = field(default_factory=dict)  # recent frames by controls
    joins_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def landmarks(self) -> np.ndarray:
        """Character 0's landmarks in output pixels."""
        return self.characters[0].rig.landmarks

    @property
    def face_h(self) -> float:
        return self.characters[0].rig.face_h


def _union(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _merge_rois(boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    out: list[tuple[int, int, int, int]] = []
    for box in boxes:
        for i, other in enumerate(out):
            if _overlap(box, other):
                out[i] = _union(box, other)
                break
        else:
            out.append(box)
    return out


def _cells(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A pixel box grown to whole cells of the coarse grid."""
    cw, ch = size[0] // GRID, size[1] // GRID
    return (box[0] // cw * cw, box[1] // ch * ch, min(-(-box[2] // cw) * cw, size[0]),
            min(-(-box[3] // ch) * ch, size[1]))


def _silence(t0: float, t1: float) -> AudioSlice:
    return AudioSlice(start=t0, samples=np.zeros(max(round((t1 - t0) * AUDIO_RATE), 0), np.float32))


class PortraitEngine(Engine):
    """Landmark-driven warping portrait engine (CPU, embedded default); one or two faces."""

    name = "portrait"

    def __init__(self, *, fps: int = 25, size: tuple[int, int] = (512, 512)) -> None:
        super().__init__(fps=fps, size=size)
        if size[0] % GRID or size[1] % GRID:
            # the warp is upsampled from whole pixel cells of the coarse grid
            raise ValueError(f"portrait engine size {size[0]}x{size[1]} must be a multiple of {GRID} "
                             f"on both sides (e.g. 512x512)")

    # 1. prepare ---------------------------------------------------------------
    def prepare(self, avatar: Avatar) -> PreparedPortrait:
        analysis = analyse_faces(avatar.image, limit=MAX_CHARACTERS)
        h_img, w_img = avatar.image.shape[:2]
        framing = frame_faces(analysis.faces, (w_img, h_img), self.size)
        image = render_framed(avatar.image, framing)
        w, h = self.size
        seed = int.from_bytes(avatar.id.encode()[:4].ljust(4, b"\0"), "little") & 0x7FFFFFFF
        characters = []
        for c, face in enumerate(analysis.faces):
            lm = framing.to_frame(face)
            mouth = mouth_mod.build_mouth(image, lm, self.size)
            cp = control_points(lm, self.size)
            disp = head_displacements(lm, cp)
            mouth_mod.lip_displacements(disp, lm, mouth)
            rig = build_face_rig(lm, cp, disp, self.size, mouth.split)
            rig.roi = _union(rig.roi, mouth.box)
            characters.append(Character(rig=rig, mouth=mouth, seed=character_seed(seed, c),
                                        x=float(lm[[234, 454], 0].mean())))
        grid_y, grid_x = np.mgrid[0:GRID, 0:GRID].astype(np.float32)
        cell_px = np.stack([(grid_x + 0.5) * (w / GRID) - 0.5, (grid_y + 0.5) * (h / GRID) - 0.5],
                           axis=-1).astype(np.float32)
        boxes = np.array([ch.rig.box for ch in characters])
        grid_box = (max(int(boxes[:, 0].min()) - 2, 0), max(int(boxes[:, 1].min()) - 2, 0),
                    min(int(boxes[:, 2].max()) + 2, GRID), min(int(boxes[:, 3].max()) + 2, GRID))
        log.info("prepared avatar %s: %d character(s), %s, face height %s px", avatar.id,
                 len(characters), frame_scale_note(framing),
                 ", ".join(f"{ch.rig.face_h:.0f}" for ch in characters))
        return PreparedPortrait(
            avatar_id=avatar.id, image=image, framing=framing, characters=characters,
            grid_x=grid_x, grid_y=grid_y, cell_px=cell_px, grid_box=grid_box,
            rois=_merge_rois([_cells(ch.rig.roi, self.size) for ch in characters]), seed=seed)

    def characters(self, prepared: PreparedPortrait) -> int:
        return len(prepared.characters)

    def idle_frame(self, prepared: PreparedPortrait) -> np.ndarray:
        return prepared.image

    # 2. keyframes ---------------------------------------------------------------
    def keyframes(self, prepared: PreparedPortrait, shots: Sequence[Shot],
                  times: Sequence[float]) -> list[Keyframe]:
        n = len(prepared.characters)
        xs = [ch.x for ch in prepared.characters]
        return [Keyframe(pts=t, state=keyframe_state(shots, t, prepared.seed, n, xs)) for t in times]

    def keyframe_image(self, prepared: PreparedPortrait, keyframe: Keyframe,
                       audio: AudioSlice | Sequence[AudioSlice] | None = None) -> np.ndarray:
        """The keyframe rendered (mouths from the audio at its pts; closed without audio)."""
        n = len(prepared.characters)
        audios = self._audios(audio, n, keyframe.pts)
        sound = np.stack([audio_controls(a, [keyframe.pts])[0] for a in audios])
        return self.render(prepared, self.full_controls(prepared, keyframe.state, sound))

    # 3. sub-clips -----------------------------------------------------------------
    def subclip(self, prepared: PreparedPortrait, first: Keyframe, last: Keyframe,
                audios: Sequence[AudioSlice], shots: Sequence[Shot]) -> list[np.ndarray]:
        n_chars = len(prepared.characters)
        n = self.frames_between(first, last)
        times = [first.pts + k / self.fps for k in range(n + 1)]
        slices = self._audios(audios, n_chars, first.pts)
        plans = [[shots[c]] if c < len(shots) else [default_shot(first.pts, last.pts)]
                 for c in range(n_chars)]
        seeds = [ch.seed for ch in prepared.characters]
        way = towards([ch.x for ch in prepared.characters])

        def planned(t: float) -> np.ndarray:
            return np.stack([blueprint_controls(plans[c], t, seeds[c], way[c])
                             for c in range(n_chars)])

        # first-last-frame: the plan's own motion plus a linear correction that makes
        # both ends equal the keyframes (zero when keyframes came from the same plan)
        c0 = first.state - planned(first.pts)
        c1 = last.state - planned(last.pts)
        sound = np.stack([audio_controls(a, times) for a in slices], axis=1)  # (T, chars, 5)
        frames = []
        for k, t in enumerate(times):
            if k == 0:
                state = first.state
            elif k == n:
                state = last.state
            else:
                a = k / n
                state = planned(t) + (1 - a) * c0 + a * c1
            controls = self.full_controls(prepared, state, sound[k])
            frames.append(self._render_cached(prepared, controls))
        return frames

    @staticmethod
    def _audios(audio: AudioSlice | Sequence[AudioSlice] | None, n: int, t: float
                ) -> list[AudioSlice]:
        """One audio slice per character; a character without one is silent."""
        if audio is None:
            given: list[AudioSlice] = []
        elif isinstance(audio, AudioSlice):
            given = [audio]
        else:
            given = list(audio)
        return [given[c] if c < len(given) else _silence(t - 0.3, t + 1.0) for c in range(n)]

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
    def full_controls(prepared: PreparedPortrait, state: np.ndarray, sound: np.ndarray
                      ) -> np.ndarray:
        """(characters, CONTROLS) from a keyframe state and each character's audio controls."""
        state = np.atleast_2d(state)
        sound = np.atleast_2d(sound)
        n = len(prepared.characters)
        c = np.zeros((n, len(CONTROLS)), np.float32)
        c[:, :N_BLUEPRINT] = state[:n]
        press = sound[:n, 2]
        c[:, IDX["jaw"]] = sound[:n, 0] * (1.0 - np.clip(press, 0.0, 1.0))
        c[:, IDX["round"]] = sound[:n, 1]
        c[:, IDX["press"]] = press
        c[:, IDX["pitch"]] += sound[:n, 3]
        if n > 1:
            listening(c, [float(v) for v in sound[:n, LEVEL]], [ch.x for ch in prepared.characters])
        return c

    def render(self, prepared: PreparedPortrait, controls: np.ndarray) -> np.ndarray:
        """One frame from full controls: (characters, CONTROLS), or one row for character 0."""
        w, h = self.size
        n = len(prepared.characters)
        c = np.zeros((n, len(CONTROLS)), np.float32)
        ctl = np.atleast_2d(np.asarray(controls, np.float32))
        c[: len(ctl)] = ctl[:n]
        rigs = [ch.rig for ch in prepared.characters]
        fwd = coarse_field(rigs, c)
        gx0, gy0, gx1, gy1 = prepared.grid_box
        # the coarse backward map: pixel position of each cell centre minus the backward
        # field; its bilinear upsample is the full map exactly (a position is linear)
        inv = invert(fwd[gy0:gy1, gx0:gx1], self.size, prepared.grid_x[gy0:gy1, gx0:gx1],
                     prepared.grid_y[gy0:gy1, gx0:gx1], offset=(gx0, gy0))
        coarse_map = prepared.cell_px[gy0:gy1, gx0:gx1] - inv
        frame = prepared.image.copy()
        lifts = [0.12 * float(c[i, IDX["jaw"]]) + 0.5 * float(c[i, IDX["round"]]) for i in range(n)]
        cell_w, cell_h = w // GRID, h // GRID
        for x0, y0, x1, y1 in prepared.rois:  # cell-aligned, a cell of margin in the grid
            cx0, cy0 = max(x0 // cell_w - 1, gx0), max(y0 // cell_h - 1, gy0)
            cx1, cy1 = min(x1 // cell_w + 1, gx1), min(y1 // cell_h + 1, gy1)
            part = cv2.resize(coarse_map[cy0 - gy0:cy1 - gy0, cx0 - gx0:cx1 - gx0],
                              ((cx1 - cx0) * cell_w, (cy1 - cy0) * cell_h),
                              interpolation=cv2.INTER_LINEAR)
            ox, oy = x0 - cx0 * cell_w, y0 - cy0 * cell_h
            maps = part[oy:oy + y1 - y0, ox:ox + x1 - x0]
            for i, ch in enumerate(prepared.characters):
                mouth_mod.apply_field(ch.mouth, maps, (x0, y0), float(c[i, IDX["jaw"]]), lifts[i])
            frame[y0:y1, x0:x1] = cv2.remap(  # type: ignore[call-overload]
                prepared.image, maps, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        for i, ch in enumerate(prepared.characters):
            jaw = float(c[i, IDX["jaw"]])
            if jaw <= 1e-3 and lifts[i] <= 1e-3:
                continue
            upper, lower = mouth_mod.opening(ch.mouth, jaw, lifts[i])
            moved = (ch.rig.extra_basis * c[i][:, None, None]).sum(axis=0)
            mouth_mod.draw_interior(frame, ch.mouth, upper + moved, lower + moved, jaw, lifts[i])
        return frame
