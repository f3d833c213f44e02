"""FlashHead's two networks (the DiT and the video VAE) from the published files, or random.

:func:`load_networks` reads one published model without the audio encoder
(what ``avatar trt`` exports); :func:`random_networks` builds the published
sizes with random weights straight on the device in the target dtype (one
copy, no float32 detour), for benchmarks, where random weights measure speed
honestly.
"""

from __future__ import annotations

import logging
import math
import pathlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engines.dit.flashhead.loading import ModelName, load_transformer, model_files, model_name
from engines.dit.flashhead.transformer import FlashHeadTransformer

logger = logging.getLogger(__name__)

PUBLISHED_CONFIGS: dict[ModelName, dict[str, Any]] = {
    "pro": {
        "dim": 1536, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "has_image_input": False,
        "in_dim": 32, "num_heads": 12, "num_layers": 30, "out_dim": 16, "patch_size": [1, 2, 2],
        "text_dim": 4096, "vae_stride": [4, 8, 8],
    },
    "lite": {
        "dim": 1536, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "has_image_input": False,
        "in_dim": 256, "num_heads": 12, "num_layers": 30, "out_dim": 128, "patch_size": [1, 1, 1],
        "text_dim": 4096, "vae_stride": [8, 32, 32],
    },
}  # fmt: skip
"""The published ``Model_Pro/config.json`` and ``Model_Lite/config.json`` (constructor arguments)."""

WAN_VAE_BASE = 96
"""Base width of the published ``Wan2.1_VAE.pth``."""


class VideoVAE(Protocol):
    @property
    def z_dim(self) -> int: ...

    @property
    def temporal_stride(self) -> int: ...

    @property
    def spatial_stride(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@dataclass(slots=True)
class FlashHeadNetworks:
    model: ModelName
    transformer: FlashHeadTransformer
    vae: VideoVAE


def load_vae(
    model: ModelName, path: pathlib.Path, *, dtype: torch.dtype, device: torch.device | str
) -> VideoVAE:
    if model == "pro":
        from engines.dit.flashhead.vae_wan import WanVAE

        return WanVAE.from_pth(path, dtype=dtype, device=device)
    from engines.dit.flashhead.vae_ltx import LTXVAE

    return LTXVAE.from_folder(path, dtype=dtype, device=device)


def load_networks(
    weights: pathlib.Path, model: str = "pro", *, dtype: torch.dtype, device: torch.device | str
) -> FlashHeadNetworks:
    """The DiT and the VAE of ``model`` from the published folder (strictly, as :mod:`.loading`)."""
    name, dit, vae = model_files(pathlib.Path(weights), model)
    transformer = load_transformer(dit, dtype=dtype, device=device)
    return FlashHeadNetworks(name, transformer, load_vae(name, vae, dtype=dtype, device=device))


def fill_random_(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights in place, as if trained: unit-gain matrices, norms near one, small biases."""
    params = list(module.named_parameters())
    if not params:
        return
    gen = torch.Generator(device=params[0][1].device).manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if name.endswith("modulation"):
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5, generator=gen)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=gen)
            elif p.ndim == 1 or name.endswith("gamma"):  # norm weights and scales
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 1.0 / math.prod(p.shape[1:]) ** 0.5, generator=gen)


def _on_device(build: Any, *, dtype: torch.dtype, device: torch.device | str, seed: int) -> Any:
    """``build()`` on the meta device, then allocated on ``device`` in ``dtype`` and filled."""
    with torch.device("meta"):
        module = build()
    module = torch.nn.Module.to(module, dtype=dtype).to_empty(device=device)  # (diffusers' .to warns)
    fill_random_(module, seed)
    return module.eval().requires_grad_(False)


def random_networks(
    model: str = "pro",
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    num_layers: int | None = None,
    ffn_dim: int | None = None,
    vae_base: int = WAN_VAE_BASE,
) -> FlashHeadNetworks:
    """The published architecture with random weights (smaller only where asked: tests)."""
    name = model_name(model)
    config = dict(PUBLISHED_CONFIGS[name])
    if num_layers is not None:
        config["num_layers"] = num_layers
    if ffn_dim is not None:
        config["ffn_dim"] = ffn_dim

    def dit() -> FlashHeadTransformer:
        built = FlashHeadTransformer(**config)
        built.drop_unused()  # before allocation: the forward never runs them
        return built

    transformer = _on_device(dit, dtype=dtype, device=device, seed=seed)
    vae: VideoVAE
    if name == "pro":
        from diffusers import AutoencoderKLWan

        from engines.dit.flashhead.vae_wan import Z_DIM, WanVAE

        wan = _on_device(
            lambda: AutoencoderKLWan(base_dim=vae_base, z_dim=Z_DIM),
            dtype=dtype,
            device=device,
            seed=seed + 1,
        )
        vae = WanVAE(wan)
    else:
        from diffusers import AutoencoderKLLTXVideo

        from engines.dit.flashhead.vae_ltx import LTXVAE

        ltx = _on_device(AutoencoderKLLTXVideo, dtype=dtype, device=device, seed=seed + 1)
        with torch.no_grad():
            ltx.latents_mean.zero_()
            ltx.latents_std.fill_(1.0)
        vae = LTXVAE(ltx)
    logger.info(
        "random FlashHead %s networks on %s in %s (%d DiT layers)", name, device, dtype, config["num_layers"]
    )
    return FlashHeadNetworks(name, transformer, vae)


def random_wav2vec2(*, device: torch.device | str, seed: int = 0, small: bool = False) -> Any:
    """wav2vec2-base's architecture with random weights (``small``: narrow FFN and convolutions)."""
    import transformers

    from engines.dit.flashhead.audio import Wav2Vec2Features

    extra: dict[str, Any] = (
        {"intermediate_size": 64, "conv_dim": (32,) * 7, "num_conv_pos_embeddings": 4} if small else {}
    )
    config = transformers.Wav2Vec2Config(**extra)  # the defaults are wav2vec2-base's
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Wav2Vec2Model(config)
    extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    )
    return Wav2Vec2Features.from_modules(model, extractor, device=device)
