"""The LTX-Video VAE of ``--model lite``, from ``VAE_LTX/`` as published.

``VAE_LTX/`` is a diffusers ``AutoencoderKLLTXVideo`` folder (``config.json``
+ ``diffusion_pytorch_model.safetensors``): the reference's own LTX loader
accepts only the LTX-Video 0.9.0 diffusers config and renames diffusers'
tensor names to its own, and the published file's size (1,676,798,532 bytes)
is exactly that of diffusers' ``AutoencoderKLLTXVideo()`` state dict in
float32, ``latents_mean``/``latents_std`` included. So diffusers loads it as
it is. The latents have 128 channels at 1/8 time and 1/32 space.

Conventions, as the reference's ``LtxVAE`` has them: ``encode`` takes
``(1, 3, 1 + 8k, H, W)`` in ``[-1, 1]`` and returns a *sample* of the
posterior (the reference calls ``.sample()``, unlike its Wan VAE, which takes
the mean), normalised with the file's ``latents_mean``/``latents_std``, without
a batch axis: ``(128, 1 + k, H/32, W/32)``. ``decode`` un-normalises and
decodes without clamping (the reference does not clamp LTX output).
"""

from __future__ import annotations

import logging
import pathlib

import torch
from diffusers import AutoencoderKLLTXVideo
from safetensors import safe_open

from engines.dit.flashhead.loading import WEIGHTS_NAME, LayoutError, load_into
from engines.dit.loading import CheckpointError

logger = logging.getLogger(__name__)


class LTXVAE:
    """``AutoencoderKLLTXVideo`` with the reference's normalisation and tensor conventions."""

    def __init__(self, model: AutoencoderKLLTXVideo) -> None:
        self.model = model
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        cfg = model.config
        self.z_dim = int(cfg.latent_channels)
        self.temporal_stride = int(model.temporal_compression_ratio)
        self.spatial_stride = int(model.spatial_compression_ratio)
        self.mean = model.latents_mean.view(1, -1, 1, 1, 1)
        self.std = model.latents_std.view(1, -1, 1, 1, 1)

    @classmethod
    def from_folder(cls, folder: pathlib.Path, *, dtype: torch.dtype, device: torch.device | str) -> LTXVAE:
        folder = pathlib.Path(folder)
        weights = folder / WEIGHTS_NAME
        missing = [n for n in ("config.json", WEIGHTS_NAME) if not (folder / n).is_file()]
        if missing:
            raise LayoutError(
                f"{folder} is not an AutoencoderKLLTXVideo folder: missing {', '.join(missing)}"
            )
        config = AutoencoderKLLTXVideo.load_config(folder)
        if config.get("_class_name") not in (None, "AutoencoderKLLTXVideo"):
            raise CheckpointError(
                f"{folder}/config.json describes {config['_class_name']!r}, not AutoencoderKLLTXVideo"
            )
        with torch.device("meta"):
            model = AutoencoderKLLTXVideo.from_config(config)
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            load_into(model, weights, f.keys(), f.get_tensor, dtype=dtype, device=device)
        logger.info("loaded the LTX video VAE from %s", folder)
        return cls(model.eval().requires_grad_(False))

    def _check_video(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3:
            raise ValueError(f"video has shape {tuple(video.shape)}; expected (1, 3, T, H, W)")
        t, h, w = video.shape[2:]
        if (t - 1) % self.temporal_stride:
            raise ValueError(f"video has {t} frames; expected 1 + {self.temporal_stride} * k")
        if h % self.spatial_stride or w % self.spatial_stride:
            raise ValueError(f"video size {h}x{w} is not a multiple of {self.spatial_stride}")

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(1, 3, 1 + 8k, H, W)`` -> normalised posterior sample ``(128, 1 + k, H/32, W/32)``."""
        self._check_video(video)
        posterior = self.model.encode(video.to(device=self.device, dtype=self.dtype)).latent_dist
        return ((posterior.sample(generator=generator) - self.mean) / self.std)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised ``(128, T', h, w)`` -> video ``(1, 3, 8 (T' - 1) + 1, 32h, 32w)``, unclamped."""
        if latents.ndim != 4 or latents.shape[0] != self.z_dim:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected ({self.z_dim}, T, h, w)")
        z = latents.to(device=self.device, dtype=self.dtype).unsqueeze(0) * self.std + self.mean
        return self.model.decode(z).sample  # type: ignore[no-any-return]
