"""The Wan 2.1 video VAE of ``--model pro``, from ``VAE_Wan/Wan2.1_VAE.pth`` as published.

The file is a ``torch.save``'d state dict in the original Wan names
(``encoder.downsamples.*``, ``decoder.upsamples.*``, ``conv1``/``conv2``);
diffusers' ``convert_wan_vae_to_diffusers`` renames it for
``AutoencoderKLWan``, which computes the same network. The published file has
the Wan 2.1 sizes (base width 96, 16 latent channels); the base width is read
from the file so that small test checkpoints load the same way.

Conventions, as the reference's ``WanVAE`` wrapper has them: ``encode`` takes
``(1, 3, T, H, W)`` in ``[-1, 1]`` (``T = 1 + 4k``) and returns the posterior
mean ``(16, 1 + k, H/8, W/8)`` without a batch axis, normalised per channel as
``(mu - mean) * (1 / std)``; ``decode`` inverts the normalisation
(``z / (1 / std) + mean``) and returns ``(1, 3, 1 + 4k, 8h, 8w)`` clamped to
``[-1, 1]``. The whole VAE runs in the chosen dtype, as in the reference.
"""

from __future__ import annotations

import logging
import pathlib

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from engines.dit.flashhead.loading import LayoutError, load_into
from engines.dit.loading import CheckpointError

logger = logging.getLogger(__name__)

LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
"""Per-channel statistics of Wan 2.1 latents (the reference's ``WanVAE``; diffusers' defaults too)."""

Z_DIM = 16


def wan_to_diffusers_names(names: list[str]) -> dict[str, str]:
    """Original Wan VAE tensor name -> ``AutoencoderKLWan`` name, by diffusers' own converter."""
    out: dict[str, str] = {}
    for name in names:
        (converted,) = convert_wan_vae_to_diffusers({name: None})
        out[name] = converted
    return out


class WanVAE:
    """``AutoencoderKLWan`` with the reference's normalisation and tensor conventions."""

    temporal_stride = 4
    spatial_stride = 8
    z_dim = Z_DIM

    def __init__(self, model: AutoencoderKLWan) -> None:
        if int(model.config.z_dim) != Z_DIM:
            raise ValueError(f"the Wan VAE has z_dim={model.config.z_dim}; FlashHead's is {Z_DIM}")
        self.model = model
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.mean = torch.tensor(LATENTS_MEAN, dtype=self.dtype, device=self.device).view(1, Z_DIM, 1, 1, 1)
        self.inv_std = (1.0 / torch.tensor(LATENTS_STD, dtype=self.dtype, device=self.device)).view(
            1, Z_DIM, 1, 1, 1
        )

    @classmethod
    def from_pth(cls, path: pathlib.Path, *, dtype: torch.dtype, device: torch.device | str) -> WanVAE:
        """Load ``Wan2.1_VAE.pth`` (original Wan names) strictly into ``AutoencoderKLWan``."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise LayoutError(f"{path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # a truncated download or a different format
            raise CheckpointError(f"{path} is not a PyTorch state dict: {err}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} is not a state dict of tensors")
        for key in ("encoder.conv1.weight", "conv2.weight"):
            if key not in state:
                raise CheckpointError(f"{path} has no {key}: not a Wan 2.1 VAE in original names")
        base_dim = int(state["encoder.conv1.weight"].shape[0])
        z_dim = int(state["conv2.weight"].shape[0])
        if z_dim != Z_DIM:
            raise CheckpointError(f"{path} has {z_dim} latent channels; the Wan 2.1 VAE has {Z_DIM}")
        with torch.device("meta"):
            model = AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim)
        names = list(state)
        load_into(
            model,
            path,
            names,
            state.__getitem__,
            dtype=dtype,
            device=device,
            rename=wan_to_diffusers_names(names),
        )
        logger.info("loaded the Wan VAE from %s (base width %d)", path, base_dim)
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
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(1, 3, 1 + 4k, H, W)`` in ``[-1, 1]`` -> normalised posterior mean ``(16, 1 + k, H/8, W/8)``."""
        self._check_video(video)
        mu = self.model.encode(video.to(device=self.device, dtype=self.dtype)).latent_dist.mode()
        return ((mu - self.mean) * self.inv_std)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised ``(16, T', h, w)`` -> video ``(1, 3, 4 (T' - 1) + 1, 8h, 8w)`` in ``[-1, 1]``."""
        if latents.ndim != 4 or latents.shape[0] != Z_DIM:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected ({Z_DIM}, T, h, w)")
        z = latents.to(device=self.device, dtype=self.dtype).unsqueeze(0) / self.inv_std + self.mean
        return self.model.decode(z).sample.clamp(-1, 1)  # type: ignore[no-any-return]
