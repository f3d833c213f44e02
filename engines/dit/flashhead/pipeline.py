"""One object for SoulX-FlashHead with the reference's tensor conventions at its seams.

::

    fh = FlashHead.from_pretrained(DIR, wav2vec=DIR2, model="pro", device="cuda", dtype=torch.bfloat16)
    emb = fh.audio_embedding(speech_16k)            # (frames, 12, 768)
    ctx = fh.audio_context(emb)                     # (1, frames, 5, 12, 768)
    ref = fh.prepare_reference(photo)               # colour reference + reference latent
    chunk = fh.generate_chunk(ref, ctx[:, :33], generator=g)
    nxt = fh.generate_chunk(ref, ctx2, motion_frames=chunk.motion_frames, generator=g)

A chunk is 33 video frames (9 Wan latent frames; 5 LTX latent frames for
Lite). It continues from the previous chunk's last ``motion_frames`` frames
(5 for Pro, 9 for Lite: two latent frames), re-encoded and held fixed in the
first latent frames while the rest is denoised. Each chunk therefore brings
``33 - motion_frames`` new frames (28 for Pro, 24 for Lite). The first chunk
continues from the reference image itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pathlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engines.dit.flashhead.audio import Wav2Vec2Features, audio_windows
from engines.dit.flashhead.color import color_correct
from engines.dit.flashhead.loading import ModelName, published_files
from engines.dit.flashhead.networks import VideoVAE, load_networks, random_networks, random_wav2vec2
from engines.dit.flashhead.sampler import Velocity, denoise, sampling_timesteps
from engines.dit.flashhead.transformer import AUDIO_CHANNELS, AUDIO_LAYERS, FlashHeadTransformer

logger = logging.getLogger(__name__)

StageTimer = Callable[[str], AbstractContextManager[Any]]
"""``timer(stage)`` -> a context manager around one stage of a chunk (benchmarks time them)."""


def _untimed(stage: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


@dataclass(frozen=True, slots=True)
class ChunkSettings:
    """The reference's inference parameters (``infer_params.yaml``; 4 steps for Pro and Lite)."""

    frames: int = 33
    motion_latent_frames: int = 2
    steps: int = 4
    shift: float = 5.0
    color_correction_strength: float = 1.0
    fps: int = 25
    height: int = 512
    width: int = 512


@dataclass(slots=True)
class Reference:
    """A prepared reference photo: what every chunk of a stream shares."""

    image: torch.Tensor  # (1, 3, 1, H, W) in [-1, 1]: the colour reference
    latent: torch.Tensor  # (C, F, h, w): the photo repeated over a chunk, encoded (the DiT's y)


@dataclass(slots=True)
class Chunk:
    video: torch.Tensor  # (1, 3, frames, H, W) in [-1, 1], colour-corrected
    latents: torch.Tensor  # (C, F, h, w), denoised (motion frames in place)
    motion_frames: torch.Tensor  # (1, 3, motion, H, W): the last frames, to continue from


def resize_and_center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale ``image`` (H, W, 3 uint8) to cover ``height x width`` (bilinear, PIL) and crop the centre."""
    from PIL import Image

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image has shape {image.shape} and dtype {image.dtype}; expected (H, W, 3) uint8")
    h0, w0 = image.shape[:2]
    scale = max(height / h0, width / w0)
    fh, fw = math.ceil(scale * h0), math.ceil(scale * w0)
    resized = np.asarray(Image.fromarray(image).resize((fw, fh), resample=Image.Resampling.BILINEAR))
    top, left = int(round((fh - height) / 2.0)), int(round((fw - width) / 2.0))
    return np.array(resized[top : top + height, left : left + width])  # a writable copy


def video_to_frames(video: torch.Tensor) -> np.ndarray:
    """``(1, 3, T, H, W)`` in ``[-1, 1]`` -> ``(T, H, W, 3)`` uint8, truncated as the reference does."""
    if video.ndim != 5 or video.shape[:2] != (1, 3):
        raise ValueError(f"video has shape {tuple(video.shape)}; expected (1, 3, T, H, W)")
    frames = ((video[0].float() + 1) / 2).permute(1, 2, 3, 0).clip(0, 1) * 255
    return frames.cpu().numpy().astype(np.uint8)


class FlashHead:
    """The SoulX-FlashHead DiT, its VAE and its audio encoder."""

    def __init__(
        self,
        transformer: FlashHeadTransformer,
        vae: VideoVAE,
        audio: Wav2Vec2Features,
        *,
        model: ModelName,
        settings: ChunkSettings | None = None,
    ) -> None:
        cfg = transformer.config
        stride = (vae.temporal_stride, vae.spatial_stride, vae.spatial_stride)
        if int(cfg.out_dim) != vae.z_dim or tuple(int(s) for s in cfg.vae_stride) != stride:
            raise ValueError(
                f"the DiT (out_dim={cfg.out_dim}, vae_stride={tuple(cfg.vae_stride)}) does not fit the VAE "
                f"({vae.z_dim} channels, stride {stride})"
            )
        if (audio.layers, audio.hidden) != (AUDIO_LAYERS, AUDIO_CHANNELS):
            raise ValueError(
                f"the wav2vec2 model gives {audio.layers} layers x {audio.hidden}; the DiT takes "
                f"{AUDIO_LAYERS} x {AUDIO_CHANNELS} (facebook/wav2vec2-base-960h)"
            )
        self.transformer = transformer
        self.vae = vae
        self.audio = audio
        self.model = model
        self.settings = settings or ChunkSettings()
        self.dtype = transformer.patch_embedding.weight.dtype
        self.device = transformer.patch_embedding.weight.device
        self.forward: Velocity = transformer.__call__
        """What runs the DiT: the module itself, or a compiled or TensorRT forward (``.backend``)."""

    @classmethod
    def from_pretrained(
        cls,
        path: str | pathlib.Path,
        *,
        wav2vec: str | pathlib.Path,
        model: str = "pro",
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        settings: ChunkSettings | None = None,
    ) -> FlashHead:
        """Load the published folder ``path`` (see :mod:`engines.dit.flashhead.loading`)."""
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} was asked for, but this machine has no CUDA GPU "
                "(torch.cuda.is_available() is False); pass device='cpu' "
                "(slow: for tests and tiny checkpoints)"
            )
        files = published_files(pathlib.Path(path), pathlib.Path(wav2vec), model)
        nets = load_networks(pathlib.Path(path), files.model, dtype=dtype, device=device)
        audio = Wav2Vec2Features(files.wav2vec, device=device)
        logger.info(
            "FlashHead %s loaded from %s on %s in %s (%d DiT layers)",
            files.model, path, device, dtype, nets.transformer.config.num_layers,
        )  # fmt: skip
        return cls(nets.transformer, nets.vae, audio, model=files.model, settings=settings)

    @classmethod
    def random(
        cls,
        model: str = "pro",
        *,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        settings: ChunkSettings | None = None,
        seed: int = 0,
        tiny: bool = False,
    ) -> FlashHead:
        """The published sizes with random weights (benchmarks); ``tiny``: 2 layers, narrow FFNs."""
        nets = random_networks(
            model, dtype=dtype, device=device, seed=seed,
            num_layers=2 if tiny else None, ffn_dim=64 if tiny else None, vae_base=8 if tiny else 96,
        )  # fmt: skip
        audio = random_wav2vec2(device=device, seed=seed, small=tiny)
        return cls(nets.transformer, nets.vae, audio, model=nets.model, settings=settings)

    # -- the reference's seams -------------------------------------------------------------

    def velocity(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """What the reference ``WanModelAudioProject.forward(x=, timestep=, context=, y=)`` returns."""
        with torch.no_grad():
            return self.forward(
                x.to(self.device), timestep.to(self.device), context.to(self.device), y.to(self.device)
            )

    def audio_embedding(self, speech_16k: np.ndarray, fps: int = 25) -> torch.Tensor:
        """What the reference ``FlashHeadPipeline.preprocess_audio`` returns: ``(frames, 12, 768)``."""
        return self.audio(speech_16k, fps=fps)

    def audio_context(
        self, embedding: torch.Tensor, start: int | None = None, end: int | None = None
    ) -> torch.Tensor:
        """The DiT's ``context``, as the reference's ``get_audio_embedding``: ``(1, n, 5, 12, 768)``."""
        return audio_windows(embedding, start, end)

    # -- chunks ----------------------------------------------------------------------------

    @property
    def motion_frames(self) -> int:
        """Video frames a chunk continues from: ``(motion latent frames - 1) * stride + 1``."""
        return (self.settings.motion_latent_frames - 1) * self.vae.temporal_stride + 1

    @property
    def latent_frames(self) -> int:
        return (self.settings.frames - 1) // self.vae.temporal_stride + 1

    def prepare_reference(self, image: np.ndarray) -> Reference:
        """Crop the photo (H, W, 3 uint8) to the chunk size and encode it over a chunk's frames."""
        s = self.settings
        if (s.frames - 1) % self.vae.temporal_stride:
            raise ValueError(f"{s.frames} frames per chunk is not 1 + {self.vae.temporal_stride} * k")
        crop = resize_and_center_crop(image, s.height, s.width)
        pixels = torch.from_numpy(crop).permute(2, 0, 1)[None, :, None]
        pixels = (pixels.to(self.device, dtype=self.dtype) / 255 - 0.5) * 2  # (1, 3, 1, H, W)
        latent = self.vae.encode(pixels.repeat(1, 1, s.frames, 1, 1))
        return Reference(image=pixels, latent=latent)

    def encode_motion(self, motion_frames: torch.Tensor) -> torch.Tensor:
        """The previous chunk's last frames ``(1, 3, motion, H, W)`` -> motion latent ``(C, M, h, w)``."""
        if motion_frames.ndim != 5 or motion_frames.shape[2] != self.motion_frames:
            raise ValueError(
                f"motion frames have shape {tuple(motion_frames.shape)}; "
                f"expected (1, 3, {self.motion_frames}, H, W)"
            )
        return self.vae.encode(motion_frames)

    def next_chunk(
        self,
        reference: Reference,
        history: np.ndarray,
        motion_frames: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        timer: StageTimer | None = None,
    ) -> Chunk:
        """The next chunk of a stream whose audio so far is ``history`` (16 kHz, the newest last).

        As the reference's streaming loop: the whole history (8 s there) is
        embedded (``audio_encode``) and the windows of its last 33 frames are
        the chunk's context, so the new frames follow the newest audio.
        """
        tm = timer or _untimed
        with tm("audio_encode"):
            embedding = self.audio_embedding(history, fps=self.settings.fps)
            n = embedding.shape[0]
            if n < self.settings.frames:
                raise ValueError(
                    f"{len(history)} samples of audio history make {n} frames; "
                    f"a chunk needs {self.settings.frames}"
                )
            context = self.audio_context(embedding, n - self.settings.frames, n)
        return self.generate_chunk(reference, context, motion_frames, generator=generator, timer=timer)

    @torch.no_grad()
    def generate_chunk(
        self,
        reference: Reference,
        context: torch.Tensor,
        motion_frames: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        timer: StageTimer | None = None,
    ) -> Chunk:
        """One chunk of video for ``context`` ``(1, frames, 5, 12, 768)``, as the reference's ``generate``.

        ``timer`` (benchmarks) wraps each stage: ``motion_encode``, every
        ``dit_step``, ``vae_decode`` and ``color_correct``.
        """
        s = self.settings
        tm = timer or _untimed
        c, f, h, w = reference.latent.shape
        if context.ndim != 5 or tuple(context.shape[:2]) != (1, s.frames):
            raise ValueError(
                f"context has shape {tuple(context.shape)}; expected (1, {s.frames}, 5, 12, 768)"
            )

        # 1. the motion latent: the reference's first latent frame, or the last chunk's frames
        #    (the reference encodes them at the end of the chunk before; the work is the same)
        with tm("motion_encode"):
            motion = (
                reference.latent[:, :1].clone()
                if motion_frames is None
                else self.encode_motion(motion_frames)
            )

        # 2. noise in the model dtype, from the stream's generator
        noise = torch.randn((c, f, h, w), dtype=self.dtype, device=self.device, generator=generator)

        # 3. the distilled steps, motion latent held fixed
        def step(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with tm("dit_step"):
                return self.velocity(x, t, ctx, y)

        latents = denoise(
            step,
            noise,
            reference_latent=reference.latent,
            context=context,
            motion_latent=motion,
            timesteps=sampling_timesteps(s.steps, s.shift, device=self.device),
            generator=generator,
        )

        # 4. decode, 5. colour correction against the photo, 6. the frames the next chunk continues from
        with tm("vae_decode"):
            video = self.vae.decode(latents)
        with tm("color_correct"):
            video = color_correct(video, reference.image, s.color_correction_strength)
        return Chunk(video=video, latents=latents, motion_frames=video[:, :, -self.motion_frames :].clone())
