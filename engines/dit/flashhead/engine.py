"""The ``flashhead`` engine: SoulX-FlashHead as a streaming chunk engine of the cascade.

FlashHead makes video in chunks of 33 frames, each continuing from the last
``M`` frames of the one before (``M`` = 5 for Pro, 9 for Lite), so a chunk
brings ``33 - M`` new frames: **28 for Pro, 24 for Lite**. The engine
declares that as ``min_subclip_frames``, so the scheduler asks for sub-clips
of exactly one chunk of new frames (or whole multiples of it).

How the stages map (see :mod:`engines.base`, chunk engines):

1. ``prepare``: the portrait rig (``engines.portrait``, CPU) frames the photo
   and analyses the face once; the framed photo at the chunk size is the
   idle frame.
2. ``keyframes``: the director's plan reaches the model here. For each
   keyframe the rig renders the photo with the planned expression (emotion,
   intensity and expression offsets, eased between shots as the portrait
   engine eases them), gaze target and the held part of the head pose (tilt
   and lean gestures), eyes open, mouth closed. That image is the reference
   of the chunk that ends at the keyframe: VAE-encoded over 33 frames it is
   the DiT's ``y`` (what the face looks like), the colour reference, and, when
   a chunk cannot continue from the one before (the first of a stream, or
   after a skipped one), its motion frames, as the reference starts a stream
   from its reference image. Encodings are cached by the rendered controls,
   so a steady plan costs one encode.
3. ``subclip``: one chunk per ``33 - M`` new frames, as the reference's
   streaming loop: the audio of the sub-clip is appended to an 8 s history
   (``cached_audio_duration``), the history is embedded by wav2vec2 and the
   last 33 frames' windows are the chunk's audio context; the chunk continues
   from the motion frames of the previous sub-clip. The state between chunks
   (motion frames, audio history, the last frame) travels in the keyframe the
   two sub-clips share (``last.state.carry`` -> the next ``first.state.carry``),
   so it is per stream without the engine keeping sessions.
   The returned frames are ``[previous chunk's last frame, new frames...]``:
   frame ``n`` of one sub-clip is frame 0 of the next. A new frame's mouth
   follows the audio of the frame interval before it (the chunk's audio ends
   where the sub-clip ends), so lips lead the displayed pts by one frame
   (40 ms), within the lip-sync window.
4. ``upscale``: none (FlashHead renders at its output size).

Sub-clips chain, so they must render one after another (``--workers 1``, the
default); one that starts before the previous finished starts from its
keyframe instead (a visible cut, logged).
"""

from __future__ import annotations

import hashlib
import logging
import math
import pathlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from engines.base import AUDIO_RATE, AudioSlice, Avatar, Engine, Keyframe
from engines.dit.flashhead.loading import FLASHHEAD_REPO, WAV2VEC_REPO
from engines.dit.flashhead.pipeline import ChunkSettings, FlashHead, Reference, video_to_frames
from engines.portrait import IDX, N_BLUEPRINT, PortraitEngine, PreparedPortrait, blueprint_controls
from engines.portrait.motion import (
    LISTEN_GAZE,
    PLANNED_LISTEN,
    _gesture_offsets,
    character_seed,
    shots_of,
    towards,
)
from engines.storyline import GazeTarget, Shot, default_shot, shot_face

logger = logging.getLogger(__name__)

HISTORY_S = 8
"""Seconds of audio embedded per chunk (the reference's ``cached_audio_duration``)."""
REFERENCE_CACHE = 16
RIG_MIN_SIDE = 512
"""The rig renders at least this size (its coarse grid needs whole cells), then scales to the chunk."""
CONTROL_STEP = 0.02
"""Rendered controls are rounded to this: a steady plan renders (and encodes) one reference."""

POSE = ("yaw", "pitch", "roll", "tx", "ty", "scale")
GAZE = {GazeTarget.camera: (0.0, 0.0), GazeTarget.away: (0.55, -0.1), GazeTarget.down: (0.0, 0.7)}
"""Gaze controls per target (the portrait rig's, without its saccades); ``speaker``: see below."""


@dataclass(slots=True)
class FlashHeadPrepared:
    avatar_id: str
    portrait: PreparedPortrait  # the rig, at the rig's size
    image: np.ndarray  # the framed photo at the chunk size (RGB uint8): the idle frame
    seed: int


@dataclass(frozen=True, slots=True)
class Continuation:
    """What the next chunk of a stream continues from (the reference keeps it between chunks)."""

    pts: float  # where the next sub-clip starts
    motion_frames: torch.Tensor  # (1, 3, M, H, W): the last M frames, colour-corrected
    last_frame: np.ndarray  # frame n of the sub-clip before: frame 0 of the next
    audio: np.ndarray  # the last HISTORY_S seconds of audio, ending at ``pts``


@dataclass(slots=True)
class ChunkKeyframe:
    """``Keyframe.state``: the plan rendered for the chunk that ends at this keyframe."""

    controls: np.ndarray  # (characters, N_BLUEPRINT): what the reference image was rendered with
    reference: Reference  # the DiT's y and the colour reference (shared by equal controls)
    carry: Continuation | None = None  # set by the sub-clip that ends here


def rig_size(width: int, height: int) -> tuple[int, int]:
    """The portrait rig's size for a chunk size: at least RIG_MIN_SIDE, whole 128-pixel cells."""
    k = max(1.0, RIG_MIN_SIDE / min(width, height))
    return 128 * math.ceil(width * k / 128), 128 * math.ceil(height * k / 128)


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def reference_controls(
    shots: Sequence[Shot], t: float, seed: int, characters: int, xs: Sequence[float] = ()
) -> np.ndarray:
    """The slow controls a chunk's reference is rendered with: the plan at ``t`` without motion.

    The planned face (eased between shots), the gaze target (``speaker``: the
    other face's way, ``xs`` being each face's x position; the camera when
    alone), and the held head pose of tilt and lean gestures; no idle sway,
    nods or shakes (FlashHead makes its own head motion), no blink (a reference
    caught mid-blink would close the eyes of a whole chunk), the mouth closed
    (the audio opens it).
    """
    out = np.zeros((characters, N_BLUEPRINT), np.float32)
    way = towards(xs) if len(xs) == characters else [0.0] * characters
    for c in range(characters):
        mine = shots_of(shots, c)
        controls = blueprint_controls(mine, t, character_seed(seed, c), way[c])
        shot = next((s for s in reversed(mine) if s.covers(t)), None) or default_shot(t, t + 1.0)
        _, _, roll, scale = _gesture_offsets(shot, t)
        for name in POSE:
            controls[IDX[name]] = 0.0
        controls[IDX["roll"]], controls[IDX["scale"]] = roll, scale
        controls[IDX["blink"]] = 0.8 * max(-shot_face(shot)[3], 0.0)  # a planned squint stays
        if shot.gaze == GazeTarget.speaker:
            gaze = (way[c] * PLANNED_LISTEN * LISTEN_GAZE, 0.0)
        else:
            gaze = GAZE.get(shot.gaze, GAZE[GazeTarget.camera])
        controls[IDX["gaze_x"]], controls[IDX["gaze_y"]] = gaze
        out[c] = np.round(controls / CONTROL_STEP) * CONTROL_STEP
    return out


RANDOM_WEIGHTS_BANNER = "RANDOM WEIGHTS - FlashHead throughput test only, not a trained model"


class FlashHeadEngine(Engine):
    """SoulX-FlashHead (Pro or Lite) through the engine contract, as a chunk engine."""

    name = "flashhead"
    chunked = True

    def __init__(self, model: FlashHead, *, seed: int = 0, random_weights: bool = False) -> None:
        s = model.settings
        super().__init__(fps=s.fps, size=(s.width, s.height))
        if s.frames <= model.motion_frames:
            raise ValueError(f"{s.frames} frames per chunk leave no new frame after {model.motion_frames}")
        self.model = model
        self.new_frames = s.frames - model.motion_frames
        self.min_subclip_frames = self.new_frames
        self.history = HISTORY_S * AUDIO_RATE
        self.rig = PortraitEngine(fps=s.fps, size=rig_size(s.width, s.height))
        self.seed = seed
        self.backends: dict[str, str] = {"dit": "eager", "vae_encoder": "eager", "vae_decoder": "eager"}
        self._refs: OrderedDict[bytes, tuple[np.ndarray, Reference]] = OrderedDict()
        self._refs_lock = threading.Lock()
        self._odd_warned = False
        self.random_weights = random_weights
        if random_weights:
            logger.warning("flashhead engine runs with %s", RANDOM_WEIGHTS_BANNER)

    def banner(self) -> str | None:
        return RANDOM_WEIGHTS_BANNER if self.random_weights else None

    def describe(self) -> str:
        cfg = self.model.transformer.config
        return (
            f"FlashHead {self.model.model} ({cfg.num_layers} layers) at {self.size[0]}x{self.size[1]}, "
            f"{self.new_frames} new frames per chunk, on {self.model.device} in {self.model.dtype}"
        )

    def use_backends(self, backends: Mapping[str, str]) -> None:
        """Record which backend runs each network (chosen by :mod:`engines.dit.flashhead.backend`)."""
        self.backends.update(backends)

    # 1. prepare ---------------------------------------------------------------------
    def prepare(self, avatar: Avatar) -> FlashHeadPrepared:
        portrait = self.rig.prepare(avatar)
        prepared = FlashHeadPrepared(avatar.id, portrait, self._to_chunk_size(portrait.image), portrait.seed)
        self._reference(prepared, self._controls(prepared, [], 0.0))  # the neutral plan
        return prepared

    def idle_frame(self, prepared: FlashHeadPrepared) -> np.ndarray:
        return prepared.image

    def _to_chunk_size(self, image: np.ndarray) -> np.ndarray:
        w, h = self.size
        if image.shape[:2] == (h, w):
            return image
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)

    @staticmethod
    def _controls(prepared: FlashHeadPrepared, shots: Sequence[Shot], t: float) -> np.ndarray:
        faces = prepared.portrait.characters
        return reference_controls(shots, t, prepared.seed, len(faces), [ch.x for ch in faces])

    def _reference(self, prepared: FlashHeadPrepared, controls: np.ndarray) -> tuple[np.ndarray, Reference]:
        """The rig's render of ``controls`` at the chunk size and its encoding (cached)."""
        key = prepared.avatar_id.encode() + b"\0" + controls.tobytes()
        with self._refs_lock:
            hit = self._refs.get(key)
            if hit is not None:
                self._refs.move_to_end(key)
                return hit
        portrait = prepared.portrait
        n = len(portrait.characters)
        quiet = np.zeros((n, 5), np.float32)  # no audio: the mouth closed
        image = self._to_chunk_size(
            self.rig.render(portrait, self.rig.full_controls(portrait, controls, quiet))
        )
        hit = (image, self.model.prepare_reference(image))
        with self._refs_lock:
            self._refs[key] = hit
            while len(self._refs) > REFERENCE_CACHE:
                self._refs.popitem(last=False)
        return hit

    # 2. keyframes: the plan, rendered into the references of the chunks ahead -----------
    def keyframes(
        self, prepared: FlashHeadPrepared, shots: Sequence[Shot], times: Sequence[float]
    ) -> list[Keyframe]:
        times = [float(t) for t in times]
        if any(b <= a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"keyframe times must increase strictly, got {times}")
        out = []
        for t in times:
            controls = self._controls(prepared, shots, t)
            image, reference = self._reference(prepared, controls)
            out.append(Keyframe(pts=t, state=ChunkKeyframe(controls, reference), image=image))
        return out

    # 3. sub-clips: chunks that continue the stream -----------------------------------
    @staticmethod
    def _state(key: Keyframe) -> ChunkKeyframe:
        if not isinstance(key.state, ChunkKeyframe):
            raise ValueError(
                f"keyframe at {key.pts} was not made by the flashhead engine "
                f"(its state is {type(key.state).__name__})"
            )
        return key.state

    def subclip(
        self,
        prepared: FlashHeadPrepared,
        first: Keyframe,
        last: Keyframe,
        audios: Sequence[AudioSlice],
        shots: Sequence[Shot],
    ) -> list[np.ndarray]:
        n = self.frames_between(first, last)
        # the voice of the face FlashHead animates (none given: silence)
        audio = audios[0] if audios else AudioSlice(start=first.pts, samples=np.zeros(0, np.float32))
        start_state, end_state = self._state(first), self._state(last)
        fh, fps, new = self.model, self.fps, self.new_frames
        chunks = math.ceil(n / new)
        whole = n % new == 0
        carry = start_state.carry
        if carry is not None and abs(carry.pts - first.pts) > 1e-6:
            carry = None
        if not whole:
            if not self._odd_warned:
                logger.warning(
                    "flashhead: a sub-clip of %d frames is not a whole number of chunks (%d new frames "
                    "each): such sub-clips start afresh from their keyframe; serve with --subclip-frames "
                    "%d (or a multiple)", n, new, new,
                )  # fmt: skip
                self._odd_warned = True
            carry = None
        elif carry is None and first.pts > 0:
            logger.info(
                "flashhead: the sub-clip at %.2f s starts afresh from its keyframe (the one before it was "
                "skipped or is not finished)", first.pts,
            )  # fmt: skip
        # the audio history ends where the new frames start
        start = last.pts - chunks * new / fps
        history = carry.audio if carry is not None else audio.window(start - HISTORY_S, start)
        motion = carry.motion_frames if carry is not None else None
        gen = torch.Generator(device=fh.device).manual_seed(
            _seed(self.seed, prepared.avatar_id, round(first.pts * fps))
        )
        frames: list[np.ndarray] = []
        head: np.ndarray | None = carry.last_frame if carry is not None else None
        for j in range(chunks):
            t0 = start + j * new / fps
            history = np.concatenate([history, audio.window(t0, t0 + new / fps)])[-self.history :]
            chunk = fh.next_chunk(end_state.reference, history, motion, generator=gen)
            video = video_to_frames(chunk.video[:, :, fh.motion_frames - 1 :])  # the last old frame, the new
            if head is None:
                head = video[0]
            frames.extend(video[1:])
            motion = chunk.motion_frames
        assert head is not None and motion is not None
        out = [head, *frames][-(n + 1) :]
        if whole:
            end_state.carry = Continuation(last.pts, motion, out[-1], history)
        return out


def build_flashhead_engine(
    weights: pathlib.Path | None,
    *,
    wav2vec: pathlib.Path | None = None,
    model: str = "pro",
    random_weights: bool = False,
    device: str = "cuda",
    dtype: str = "bf16",
    backend: str = "auto",
    trt_engines: pathlib.Path | None = None,
    size: tuple[int, int] = (512, 512),
) -> FlashHeadEngine:
    """The ``flashhead`` engine from the published folders; ``ValueError`` saying what is missing.

    ``size`` (width, height) is the chunk size: 512x512 is what the published
    model was trained at; smaller sizes are for tiny test checkpoints.
    """
    from engines.dit.backend import BACKENDS
    from engines.dit.config import parse_dtype
    from engines.dit.flashhead.backend import select_flashhead_backends

    if backend not in BACKENDS:
        raise ValueError(f"--dit-backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if model not in ("pro", "lite"):
        raise ValueError(f"--model {model!r} is not one of pro, lite")
    if weights is not None and random_weights:
        raise ValueError("pass either --weights DIR or --random-weights, not both")
    if weights is None and not random_weights:
        need = "Model_Pro/ and VAE_Wan/Wan2.1_VAE.pth" if model == "pro" else "Model_Lite/ and VAE_LTX/"
        raise ValueError(
            f"the flashhead engine needs --weights DIR: the {FLASHHEAD_REPO} folder as published ({need}; "
            f"https://huggingface.co/{FLASHHEAD_REPO}), and --wav2vec DIR2: the {WAV2VEC_REPO} folder "
            f"(https://huggingface.co/{WAV2VEC_REPO}); downloaded with your own tools"
        )
    if weights is not None and wav2vec is None:
        raise ValueError(
            f"the flashhead engine needs --wav2vec DIR: the {WAV2VEC_REPO} folder as published "
            f"(config.json, preprocessor_config.json, model.safetensors; https://huggingface.co/{WAV2VEC_REPO})"
        )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: this machine has no CUDA GPU (torch.cuda.is_available() is False). "
            "FlashHead needs one to stream in real time; --device cpu runs it slowly (tests and tiny "
            "checkpoints)"
        )
    torch_dtype = parse_dtype(dtype)
    w, h = size
    grid = 16 if model == "pro" else 32  # VAE stride x patch of the published configs
    if w % grid or h % grid:
        raise ValueError(f"size {w}x{h}: FlashHead {model} renders multiples of {grid} pixels (e.g. 512x512)")
    settings = ChunkSettings(width=w, height=h)
    if weights is None:
        fh = FlashHead.random(model, device=device, dtype=torch_dtype, settings=settings)
    else:
        assert wav2vec is not None
        fh = FlashHead.from_pretrained(
            weights, wav2vec=wav2vec, model=model, device=device, dtype=torch_dtype, settings=settings
        )
    engine = FlashHeadEngine(fh, random_weights=random_weights)
    choices = select_flashhead_backends(fh, backend=backend, engines_dir=trt_engines)
    engine.use_backends({name: c.backend for name, c in choices.items()})
    logger.info(
        "%s; a chunk renders once its %.2f s of audio are in: serve with a --delay-ms of at least %d "
        "plus a chunk's render time (bench/flashhead_gpu.py)",
        engine.describe(), engine.new_frames / engine.fps, round(1000 * engine.new_frames / engine.fps),
    )  # fmt: skip
    return engine
