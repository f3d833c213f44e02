"""FlashHead's VAEs: the Wan 2.1 VAE from the original ``.pth`` names, the LTX VAE folder.

Checkpoints are tiny (base width 8 for Wan, a few channels for LTX) but in
the published layouts; the tensor names of the Wan file are written out from
the original Wan architecture in :mod:`tests.flashhead_layout`.
"""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
from diffusers import AutoencoderKLLTXVideo, AutoencoderKLWan

from engines.dit.flashhead.vae_ltx import LTXVAE
from engines.dit.flashhead.vae_wan import LATENTS_MEAN, LATENTS_STD, WanVAE, wan_to_diffusers_names
from engines.dit.loading import CheckpointError
from tests.flashhead_layout import PUBLISHED_SIZES, safetensors_size, wan_vae_shapes, write_wan_vae


@pytest.fixture(scope="module")
def wan_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("flashhead") / "VAE_Wan" / "Wan2.1_VAE.pth"
    return path, write_wan_vae(path, base=8)


def _video(frames: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """A smooth moving pattern in [-1, 1], (1, 3, frames, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, frames, size // 8, size // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(frames, size, size), mode="trilinear")


def test_the_original_wan_names_map_onto_diffusers_by_its_converter() -> None:
    shapes = wan_vae_shapes(96)  # the published sizes
    rename = wan_to_diffusers_names(list(shapes))
    with torch.device("meta"):
        model = AutoencoderKLWan()  # diffusers' Wan 2.1 defaults
    diffusers_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {rename[k]: v for k, v in shapes.items()} == diffusers_shapes
    n = sum(math.prod(s) for s in shapes.values())
    # the published Wan2.1_VAE.pth (507,609,880 bytes) is these float32 values plus ~40 kB of archive
    assert 0 < 507_609_880 - 4 * n < 64_000


def test_the_reference_normalisation_is_diffusers_wan_statistics() -> None:
    with torch.device("meta"):
        model = AutoencoderKLWan()
    assert tuple(model.config.latents_mean) == LATENTS_MEAN
    assert tuple(model.config.latents_std) == LATENTS_STD


def test_wan_vae_loads_strictly_and_keeps_the_reference_conventions(
    wan_file: tuple[pathlib.Path, dict[str, torch.Tensor]],
) -> None:
    path, written = wan_file
    vae = WanVAE.from_pth(path, dtype=torch.float32, device="cpu")
    state = vae.model.state_dict()
    rename = wan_to_diffusers_names(list(written))
    assert set(state) == set(rename.values())
    for k, v in written.items():
        assert torch.equal(state[rename[k]], v), k

    video = _video(5, size=32)
    latents = vae.encode(video)
    assert latents.shape == (16, 2, 4, 4)  # no batch axis; 1 + (5 - 1) / 4 latent frames
    mean = torch.tensor(LATENTS_MEAN).view(16, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(16, 1, 1, 1)
    mu = vae.model.encode(video).latent_dist.mean[0]  # the posterior mean, not a sample
    assert torch.allclose(latents, (mu - mean) / std, atol=1e-5)
    assert torch.equal(vae.encode(video), latents)  # deterministic

    decoded = vae.decode(latents)
    assert decoded.shape == (1, 3, 5, 32, 32)
    raw = vae.model.decode((latents * std + mean).unsqueeze(0)).sample
    assert torch.allclose(decoded, raw, atol=1e-5)
    vae.model.decoder.conv_out.weight.mul_(20)  # a loud decoder overshoots: the output is clamped
    loud = vae.decode(latents)
    assert loud.min() == -1 and loud.max() == 1 and (loud.abs() == 1).float().mean() > 0.1


def test_bad_wan_vae_files_and_inputs_are_named(
    tmp_path: pathlib.Path, wan_file: tuple[pathlib.Path, dict[str, torch.Tensor]]
) -> None:
    path, written = wan_file
    vae = WanVAE.from_pth(path, dtype=torch.float32, device="cpu")
    broken = tmp_path / "missing.pth"
    torch.save({k: v for k, v in written.items() if k != "decoder.upsamples.4.shortcut.weight"}, broken)
    with pytest.raises(CheckpointError, match="decoder.up_blocks.1.resnets.0.conv_shortcut.weight"):
        WanVAE.from_pth(broken, dtype=torch.float32, device="cpu")
    extra = tmp_path / "extra.pth"
    torch.save({**written, "decoder.upsamples.15.residual.0.gamma": torch.ones(8, 1, 1, 1)}, extra)
    with pytest.raises(CheckpointError, match=r"unexpected decoder\.upsamples\.15\.residual\.0\.gamma"):
        WanVAE.from_pth(extra, dtype=torch.float32, device="cpu")
    small_z = tmp_path / "z8.pth"
    torch.save({**written, "conv2.weight": torch.zeros(8, 8, 1, 1, 1)}, small_z)
    with pytest.raises(CheckpointError, match="8 latent channels"):
        WanVAE.from_pth(small_z, dtype=torch.float32, device="cpu")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch state dict"):
        WanVAE.from_pth(junk, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="expected 1 \\+ 4 \\* k"):
        vae.encode(_video(8, size=16))
    with pytest.raises(ValueError, match="not a multiple of 8"):
        vae.encode(_video(5, size=16)[..., :12])
    with pytest.raises(ValueError, match=r"expected \(16, T, h, w\)"):
        vae.decode(torch.zeros(1, 16, 3, 8, 8))


def test_the_published_vae_ltx_file_is_diffusers_ltx_video_autoencoder() -> None:
    # VAE_LTX/ is a diffusers folder; its safetensors has exactly the tensors (latents_mean and
    # latents_std included) of diffusers' AutoencoderKLLTXVideo with its default (LTX-Video 0.9.0) config
    with torch.device("meta"):
        model = AutoencoderKLLTXVideo()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert safetensors_size(shapes) == PUBLISHED_SIZES["VAE_LTX/diffusion_pytorch_model.safetensors"]


def test_ltx_vae_folder_loads_and_keeps_the_reference_conventions(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 16, 16),
        decoder_block_out_channels=(8, 8, 16, 16),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
    )
    model.latents_mean.copy_(torch.linspace(-0.5, 0.5, 8))
    model.latents_std.copy_(torch.linspace(0.5, 2.0, 8))
    model.save_pretrained(tmp_path / "VAE_LTX")
    vae = LTXVAE.from_folder(tmp_path / "VAE_LTX", dtype=torch.float32, device="cpu")
    assert (vae.z_dim, vae.temporal_stride, vae.spatial_stride) == (8, 8, 32)
    for k, v in model.state_dict().items():
        assert torch.equal(vae.model.state_dict()[k], v), k

    video = _video(9)
    latents = vae.encode(video, generator=torch.Generator().manual_seed(1))
    assert latents.shape == (8, 2, 2, 2)
    posterior = model.encode(video).latent_dist
    sample = posterior.sample(generator=torch.Generator().manual_seed(1))[0]  # the reference samples
    mean, std = model.latents_mean.view(8, 1, 1, 1), model.latents_std.view(8, 1, 1, 1)
    assert torch.allclose(latents, (sample - mean) / std, atol=1e-5)
    decoded = vae.decode(latents)
    assert decoded.shape == (1, 3, 9, 64, 64)
    raw = model.decode((latents * std + mean).unsqueeze(0)).sample
    assert torch.allclose(decoded, raw, atol=1e-5)  # no clamp, as the reference's LTX wrapper

    (tmp_path / "VAE_LTX" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing diffusion_pytorch_model.safetensors"):
        LTXVAE.from_folder(tmp_path / "VAE_LTX", dtype=torch.float32, device="cpu")
