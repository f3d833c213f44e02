"""The ``dit`` engine: the three cascade stages on Wan-layout diffusion transformers.

1. ``keyframes``: the blueprint DiT generates one image latent per keyframe
   time, conditioned on the reference portrait (slot 0 of the latent
   sequence, Wan image-to-video channel layout) and the shot prompts.
2. ``subclip``: the sub-clip DiT generates the frames between two keyframes
   with first-last-frame conditioning and audio attention in every block.
3. ``upscale``: the super-resolution DiT regenerates the clip at the output
   size, conditioned on the low-resolution clip's latents.

Keyframes and sub-clips are at ``config.keyframe_size``; ``upscale`` returns
``config.output_size`` (the identity when the weights have no SR stage).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engines.base import AudioSlice, Avatar, Engine, Keyframe
from engines.dit.backend import BackendChoice
from engines.dit.conditioning import audio_span, latent_frame_centres, window_features
from engines.dit.loading import DitComponents
from engines.dit.model import AvatarDiT, DiTOutput
from engines.dit.sampler import SamplerConfig, sample
from engines.dit.video import LatentCodec, fit_image, frames_to_video, video_to_frames
from engines.storyline import Shot, default_shot

logger = logging.getLogger(__name__)

TEXT_CACHE_SIZE = 64

WAN_TEXT_TOKENS = 512
"""Text context length that Wan's image cross-attention assumes (diffusers' WanAttnProcessor)."""

RANDOM_WEIGHTS_BANNER = "RANDOM WEIGHTS - throughput test only, not a trained model"


@dataclass(slots=True)
class DitPrepared:
    """The reference portrait at keyframe size and its image latent ``(1, z, 1, h, w)``."""

    avatar_id: str
    image: np.ndarray
    latent: torch.Tensor


@dataclass(slots=True)
class KeyframeLatent:
    """``Keyframe.state`` of this engine: the keyframe's image latent ``(1, z, 1, h, w)``."""

    latent: torch.Tensor


@dataclass(slots=True)
class SubclipResult:
    """Frames ``first .. last`` inclusive and, for several characters, their masks.

    ``masks`` is ``(characters, latent_frames, h', w')`` in [0, 1] on the patch
    grid: the host's masks when given, else the mask head's last prediction.
    """

    frames: list[np.ndarray]
    masks: np.ndarray | None = None


def shot_prompt(shot: Shot) -> str:
    """The shot's prompt, or one composed from its structured plan when empty."""
    if shot.prompt.strip():
        return shot.prompt
    parts = [f"a person talking to the camera, {shot.framing.value.replace('_', ' ')} shot"]
    if shot.emotion.intensity > 0:
        parts.append(f"{shot.emotion.label.value} expression (intensity {shot.emotion.intensity:.1f})")
    parts.append(f"looking {'at the camera' if shot.gaze.value == 'camera' else shot.gaze.value}")
    parts.append("lively head motion" if shot.head_motion > 0.6 else "gentle head motion")
    parts += [f"{g.kind.value}s" for g in shot.gestures]
    return ", ".join(parts)


def _seed(base: int, *parts: object) -> int:
    digest = hashlib.sha256(repr((base, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class DitEngine(Engine):
    name = "dit"

    def __init__(self, components: DitComponents, *, random_weights: bool = False) -> None:
        cfg = components.config
        out = cfg.output_size if components.sr is not None else cfg.keyframe_size
        super().__init__(fps=cfg.fps, size=out)
        components.check()
        self.parts = components
        self.config = cfg
        self.codec = LatentCodec(components.vae)
        # the VAE codes video ``temporal`` frames at a time: shorter sub-clips are wasted work
        self.min_subclip_frames = self.codec.temporal
        self.random_weights = random_weights
        self.device = self.codec.device
        self.sampler = SamplerConfig(cfg.steps, cfg.shift, cfg.guidance_scale)
        w, h = cfg.keyframe_size
        s = self.codec.spatial
        self.latent_hw = (h // s, w // s)
        self._text_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self._text_lock = threading.Lock()
        self.forwards: dict[str, Callable[..., DiTOutput]] = {}
        self.backends: dict[str, str] = {}
        if random_weights:
            logger.warning("dit engine runs with %s", RANDOM_WEIGHTS_BANNER)

    def use_backends(self, choices: Mapping[str, BackendChoice]) -> None:
        """Run stages on the backends :func:`engines.dit.backend.select_backends` chose."""
        for stage, choice in choices.items():
            self.backends[stage] = choice.backend
            if stage == "vae_decoder":
                self.codec.decoder = choice.forward if choice.backend != "eager" else None
            else:
                self.forwards[stage] = choice.forward

    def banner(self) -> str | None:
        return RANDOM_WEIGHTS_BANNER if self.random_weights else None

    # ---------------------------------------------------------------- helpers
    def _noise(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=gen).to(self.device)

    def _text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Distinct prompts, encoded and joined along the sequence: ``(1, L, dim)``.

        Cached on the device: the director repeats a shot's prompts clip after clip.
        """
        unique = tuple(dict.fromkeys(prompts))
        with self._text_lock:  # stages may run on several worker threads
            hit = self._text_cache.get(unique)
            if hit is not None:
                self._text_cache.move_to_end(unique)
                return hit
        emb = self.parts.text.encode(unique)
        hit = emb.reshape(1, -1, emb.shape[-1]).to(self.device)
        with self._text_lock:
            self._text_cache[unique] = hit
            if len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return hit

    def _prompts(self, dit: AvatarDiT, shots: Sequence[Shot]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positive (and, with CFG, negative) text of a stage for its shots.

        Backbones with CLIP image attention (Wan I2V/FLF2V) split their context
        at a fixed 512 text tokens, so they get the first shot's prompt alone.
        """
        if dit.backbone.config.added_kv_proj_dim is not None:
            shots = shots[:1]
        text = self._text([shot_prompt(s) for s in shots])
        negative = None
        if self.sampler.guidance_scale != 1.0:
            negative = self._text([s.negative_prompt for s in shots])
        if dit.backbone.config.added_kv_proj_dim is not None and text.shape[1] != WAN_TEXT_TOKENS:
            raise ValueError(
                f"this backbone needs {WAN_TEXT_TOKENS}-token text embeddings (Wan's text "
                f"context), got {text.shape[1]}: set text_max_length to {WAN_TEXT_TOKENS}"
            )
        return text, negative

    def image_embeds_for(self, dit: AvatarDiT, images: Sequence[np.ndarray]) -> torch.Tensor | None:
        """CLIP embeddings for backbones with ``image_dim`` (first, or first and last image)."""
        cfg = dit.backbone.config
        if cfg.image_dim is None:
            return None
        if self.parts.image is None:
            raise ValueError("this backbone needs image_encoder/ (CLIP) in the weights folder")
        pair = cfg.pos_embed_seq_len is not None  # FLF2V: first and last image side by side
        chosen = [images[0], images[-1]] if pair else [images[0]]
        return self.parts.image.encode(chosen).to(self.device, dit.dtype)

    def _keyframe_image(self, key: Keyframe) -> np.ndarray:
        if key.image is None:
            raise ValueError(f"keyframe at {key.pts} has no image; the dit engine needs one")
        return fit_image(key.image, self.config.keyframe_size)

    # ---------------------------------------------------------------- stages
    def prepare(self, avatar: Avatar) -> DitPrepared:
        image = fit_image(avatar.image, self.config.keyframe_size)
        latent = self.codec.encode_images([image])
        return DitPrepared(avatar_id=avatar.id, image=image, latent=latent)

    def idle_frame(self, prepared: DitPrepared) -> np.ndarray:
        return fit_image(prepared.image, self.size)

    def keyframes(
        self, prepared: DitPrepared, shots: Sequence[Shot], times: Sequence[float]
    ) -> list[Keyframe]:
        times = [float(t) for t in times]
        if not times:
            raise ValueError("keyframes needs at least one time")
        if any(b <= a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"keyframe times must increase strictly, got {times}")
        # 1. the shot of each keyframe, and the prompts of those shots
        planned = [next((s for s in shots if s.covers(t)), None) for t in times]
        plan = [s if s is not None else default_shot(t, t) for s, t in zip(planned, times, strict=True)]
        text, negative = self._prompts(self.parts.blueprint, plan)
        # 2. slot 0 holds the reference latent; slots 1..K are the keyframes
        condition = self.codec.slot_condition(prepared.latent.to(self.device), 1 + len(times))
        h, w = self.latent_hw
        noise = self._noise(
            (1, self.codec.z_dim, 1 + len(times), h, w),
            _seed(self.config.seed, "keyframes", prepared.avatar_id, times[0]),
        )
        # 3. denoise and decode each keyframe latent as one image
        result = sample(
            self.parts.blueprint,
            noise,
            condition,
            text,
            self.sampler,
            negative_text=negative,
            image_embeds=self.image_embeds_for(self.parts.blueprint, [prepared.image]),
            forward=self.forwards.get("blueprint"),
        )
        latents = result.latents[:, :, 1:]
        images = self.codec.decode_images(latents)
        return [
            Keyframe(pts=t, state=KeyframeLatent(latents[:, :, i : i + 1].cpu()), image=img)
            for i, (t, img) in enumerate(zip(times, images, strict=True))
        ]

    def subclip(
        self, prepared: DitPrepared, first: Keyframe, last: Keyframe, audios: Sequence[AudioSlice],
        shots: Sequence[Shot],
    ) -> list[np.ndarray]:
        return self.subclip_multi(prepared, first, last, audios, shots[0]).frames

    def subclip_multi(
        self,
        prepared: DitPrepared,
        first: Keyframe,
        last: Keyframe,
        audios: Sequence[AudioSlice],
        shot: Shot,
        masks: np.ndarray | None = None,
    ) -> SubclipResult:
        """A sub-clip with one audio track per character.

        ``masks`` (characters, H, W) in [0, 1], when given, are the host's
        explicit masks (any size; resized to the patch grid) and override the
        mask head's predictions. Character ``c``'s audio only reaches the
        tokens its mask covers; where its mask is 0 it has no influence at all.
        """
        n = self.frames_between(first, last)
        adapter = self.parts.subclip.adapter
        if adapter is None:
            raise ValueError("the sub-clip DiT has no audio adapter")
        if not 1 <= len(audios) <= adapter.config.max_characters:
            raise ValueError(
                f"{len(audios)} audio tracks; this adapter takes 1..{adapter.config.max_characters}"
            )
        if masks is not None and (masks.ndim != 3 or masks.shape[0] != len(audios)):
            raise ValueError(f"masks of shape {masks.shape} must be (characters={len(audios)}, H, W)")
        ts = self.codec.temporal
        frames = 1 + ts * math.ceil(n / ts)  # the VAE's 1 + 4k frames, resampled to n + 1 below
        # 1. first-last-frame condition: mask + latents of [first, 0, ..., 0, last]
        first_img, last_img = self._keyframe_image(first), self._keyframe_image(last)
        condition = self.codec.first_last_condition(first_img, last_img, frames)
        latent_frames = condition.shape[2]
        # 2. audio: one window of features per latent frame, per character
        window = int(adapter.config.audio_window)
        centres = latent_frame_centres(first.pts, last.pts, frames, ts)
        t0, t1 = audio_span(centres, window)
        windows = torch.stack(
            [
                window_features(self.parts.audio.features(a.window(t0, t1)), t0, centres, window)
                for a in audios
            ]
        )[None].to(self.device)
        gates = None
        ph, pw = (
            self.latent_hw[0] // self.parts.subclip.patch_size[1],
            self.latent_hw[1] // self.parts.subclip.patch_size[2],
        )
        if masks is not None:
            grid = F.interpolate(
                torch.as_tensor(masks, dtype=torch.float32)[None], size=(ph, pw), mode="area"
            )
            gates = grid[:, :, None].expand(1, len(audios), latent_frames, ph, pw).to(self.device)
        audio_cond = self.parts.subclip.project_audio(windows, gates)
        # 3. denoise
        text, negative = self._prompts(self.parts.subclip, [shot])
        h, w = self.latent_hw
        noise = self._noise(
            (1, self.codec.z_dim, latent_frames, h, w),
            _seed(self.config.seed, "subclip", prepared.avatar_id, first.pts),
        )
        result = sample(
            self.parts.subclip,
            noise,
            condition,
            text,
            self.sampler,
            negative_text=negative,
            audio=audio_cond,
            image_embeds=self.image_embeds_for(self.parts.subclip, [first_img, last_img]),
            forward=self.forwards.get("subclip"),
        )
        # 4. decode, resample 1 + 4k frames to n + 1, and pin both ends to the keyframes
        decoded = video_to_frames(self.codec.decode(result.latents)[0])
        out = [decoded[round(k * (frames - 1) / n)] for k in range(n + 1)]
        out[0], out[-1] = first_img.copy(), last_img.copy()
        mask_out = None
        if gates is not None:
            mask_out = gates[0].cpu().numpy()
        elif result.mask_logits is not None:
            mask_out = torch.sigmoid(result.mask_logits[0, : len(audios)].float()).cpu().numpy()
        return SubclipResult(frames=out, masks=mask_out)

    def upscale(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        sr = self.parts.sr
        if sr is None or not frames:
            return frames
        w, h = self.config.keyframe_size
        if any(f.shape != (h, w, 3) for f in frames):
            raise ValueError(f"upscale takes {w}x{h} RGB frames, got {frames[0].shape}")
        # 1. low-resolution latents of the clip (padded to the VAE's 1 + 4k frames)
        ts = self.codec.temporal
        count = 1 + ts * math.ceil((len(frames) - 1) / ts)
        padded = list(frames) + [frames[-1]] * (count - len(frames))
        low = self.codec.encode(frames_to_video(padded, self.device))
        # 2. upsampled to the output latent grid as the condition
        ow, oh = self.config.output_size
        s = self.codec.spatial
        cond = F.interpolate(low, size=(low.shape[2], oh // s, ow // s), mode="trilinear")
        noise = self._noise(tuple(cond.shape), _seed(self.config.seed, "sr", len(frames)))
        text = self._text([""])
        config = SamplerConfig(self.config.sr_steps, self.sampler.shift, 1.0)
        result = sample(sr, noise, cond, text, config, image_embeds=self.image_embeds_for(sr, [frames[0]]),
                        forward=self.forwards.get("sr"))
        return video_to_frames(self.codec.decode(result.latents)[0])[: len(frames)]
