"""Frames <-> tensors <-> normalised Wan VAE latents, and the stage conditions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
from diffusers import AutoencoderKLWan


def fit_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop ``image`` to the aspect of ``size`` (width, height) and resize."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {tuple(image.shape)}")
    w, h = size
    ih, iw = image.shape[:2]
    scale = min(iw / w, ih / h)
    cw, ch = round(w * scale), round(h * scale)
    x0, y0 = (iw - cw) // 2, (ih - ch) // 2
    crop = image[y0 : y0 + ch, x0 : x0 + cw]
    if (cw, ch) == (w, h):
        return np.ascontiguousarray(crop)
    interp = cv2.INTER_AREA if scale > 1 else cv2.INTER_CUBIC
    return cv2.resize(crop, (w, h), interpolation=interp)


def frames_to_video(frames: Sequence[np.ndarray], device: str | torch.device) -> torch.Tensor:
    """RGB uint8 frames -> ``(1, 3, T, H, W)`` float32 in [-1, 1]."""
    arr = torch.from_numpy(np.stack(frames)).to(device)
    return (arr.permute(3, 0, 1, 2).float() / 127.5 - 1.0).unsqueeze(0)


def video_to_frames(video: torch.Tensor) -> list[np.ndarray]:
    """``(3, T, H, W)`` in [-1, 1] -> RGB uint8 frames."""
    arr = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(arr.permute(1, 2, 3, 0).cpu().numpy())


class LatentCodec:
    """Wan VAE encode/decode with the latents normalised by the VAE's mean and std."""

    def __init__(self, vae: AutoencoderKLWan) -> None:
        self.vae = vae
        z = int(vae.config.z_dim)
        self.z_dim = z
        self.temporal = int(vae.config.scale_factor_temporal or 4)
        self.spatial = int(vae.config.scale_factor_spatial or 8)
        p = next(vae.parameters())
        self.mean = torch.tensor(vae.config.latents_mean, device=p.device).view(1, z, 1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std, device=p.device).view(1, z, 1, 1, 1)
        self.decoder: Callable[[torch.Tensor], torch.Tensor] | None = None
        """Runs in place of ``vae.decode`` on raw latents (a TensorRT engine), when set."""

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` in [-1, 1] -> ``(B, z, 1 + (T - 1) / temporal, h, w)``."""
        dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(video.to(self.device, dtype)).latent_dist.mode().float()
        return (latents - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> ``(B, 3, T, H, W)`` in [-1, 1]."""
        dtype = next(self.vae.parameters()).dtype
        raw = latents.float().to(self.device) * self.std + self.mean
        if self.decoder is not None:
            return self.decoder(raw.to(dtype)).float()
        return self.vae.decode(raw.to(dtype)).sample.float()

    def encode_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Each image as its own one-frame clip: ``(1, z, len(images), h, w)``."""
        video = frames_to_video(images, self.device)  # (1, 3, N, H, W)
        per_image = video.permute(2, 1, 0, 3, 4)  # (N, 3, 1, H, W)
        return self.encode(per_image).permute(2, 1, 0, 3, 4)

    def decode_images(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Inverse of :meth:`encode_images`: each latent frame decodes to one image."""
        per_frame = latents.permute(2, 1, 0, 3, 4)  # (N, z, 1, h, w)
        video = self.decode(per_frame)  # (N, 3, 1, H, W)
        return video_to_frames(video.permute(1, 0, 2, 3, 4)[:, :, 0])

    def frame_mask(self, known: Sequence[bool], latent_hw: tuple[int, int]) -> torch.Tensor:
        """Wan's image-to-video mask ``(1, temporal, F, h, w)`` from known *video* frames.

        The first video frame is repeated ``temporal`` times so the mask has
        ``temporal`` channels per latent frame.
        """
        if (len(known) - 1) % self.temporal:
            raise ValueError(f"{len(known)} frames is not 1 + {self.temporal} * k")
        m = torch.tensor([float(k) for k in known], device=self.device)
        m = torch.cat([m[:1].repeat(self.temporal), m[1:]]).view(-1, self.temporal)  # (F, temporal)
        h, w = latent_hw
        return m.T[None, :, :, None, None].expand(1, self.temporal, m.shape[0], h, w).contiguous()

    def first_last_condition(self, first: np.ndarray, last: np.ndarray, num_frames: int) -> torch.Tensor:
        """Mask + latents of the video ``[first, 0, ..., 0, last]`` (Wan FLF2V layout)."""
        h, w = first.shape[:2]
        video = torch.zeros(1, 3, num_frames, h, w, device=self.device)
        ends = frames_to_video([first, last], self.device)
        video[:, :, 0], video[:, :, -1] = ends[:, :, 0], ends[:, :, 1]
        latents = self.encode(video)
        known = [True] + [False] * (num_frames - 2) + [True]
        mask = self.frame_mask(known, (latents.shape[-2], latents.shape[-1]))
        return torch.cat([mask, latents], dim=1)

    def slot_condition(self, known: torch.Tensor, num_slots: int) -> torch.Tensor:
        """Mask + latents for image slots: ``known`` ``(1, z, 1, h, w)`` fills slot 0.

        Each slot is one image latent; the mask's ``temporal`` channels are all 1
        for the known slot and 0 for the slots to generate.
        """
        _, z, _, h, w = known.shape
        latents = known.new_zeros(1, z, num_slots, h, w)
        latents[:, :, :1] = known
        mask = known.new_zeros(1, self.temporal, num_slots, h, w)
        mask[:, :, 0] = 1.0
        return torch.cat([mask, latents], dim=1)
