"""``FlashHead``: the published layout, the reference's seams, and chunks that follow the audio.

The whole published Pro layout is written once per module (a 2-layer DiT, a
Wan VAE of base width 8, a wav2vec2 with base's 12 x 768 layers and narrow
everything else) and used at 64x64. Random weights make no face; what the
tests check is what the reference's structure implies.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from engines.dit.flashhead import ChunkSettings, FlashHead, LayoutError, Reference, video_to_frames
from engines.dit.flashhead.vae_ltx import LTXVAE
from engines.dit.flashhead.vae_wan import WanVAE
from tests.flashhead_layout import tone, write_published_layout
from tests.helpers import astronaut


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    root = tmp_path_factory.mktemp("published")
    return write_published_layout(root), root / "wav2vec2-base-960h"


@pytest.fixture(scope="module")
def fh(layout: tuple[pathlib.Path, pathlib.Path]) -> FlashHead:
    weights, wav2vec = layout
    return FlashHead.from_pretrained(
        weights, wav2vec=wav2vec, model="pro", device="cpu", dtype=torch.float32,
        settings=ChunkSettings(height=64, width=64),
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(fh: FlashHead) -> Reference:
    return fh.prepare_reference(astronaut())


def test_pro_needs_only_its_own_files(fh: FlashHead, layout: tuple[pathlib.Path, pathlib.Path]) -> None:
    weights, _ = layout
    assert sorted(p.name for p in weights.iterdir()) == ["Model_Pro", "VAE_Wan"]
    assert fh.model == "pro" and isinstance(fh.vae, WanVAE)
    assert (fh.motion_frames, fh.latent_frames) == (5, 9)


def test_a_folder_that_is_not_the_published_layout_names_what_is_missing(
    tmp_path: pathlib.Path, layout: tuple[pathlib.Path, pathlib.Path]
) -> None:
    weights, wav2vec = layout
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LayoutError) as err:
        FlashHead.from_pretrained(empty, wav2vec=wav2vec, device="cpu")
    msg = str(err.value)
    names = ("Model_Pro/config.json", "Model_Pro/diffusion_pytorch_model.safetensors",
             "VAE_Wan/Wan2.1_VAE.pth", "https://huggingface.co/Soul-AILab/SoulX-FlashHead-1_3B")  # fmt: skip
    for name in names:
        assert name in msg
    with pytest.raises(LayoutError, match="missing Model_Lite/config.json, .*VAE_LTX/config.json"):
        FlashHead.from_pretrained(weights, wav2vec=wav2vec, model="lite", device="cpu")
    with pytest.raises(LayoutError, match="preprocessor_config.json, model.safetensors .*wav2vec2-base-960h"):
        FlashHead.from_pretrained(weights, wav2vec=empty, device="cpu")
    with pytest.raises(LayoutError, match="does not exist"):
        FlashHead.from_pretrained(tmp_path / "nowhere", wav2vec=wav2vec, device="cpu")
    with pytest.raises(ValueError, match="'medium' is not one of pro, lite"):
        FlashHead.from_pretrained(weights, wav2vec=wav2vec, model="medium", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_says_so(layout: tuple[pathlib.Path, pathlib.Path]) -> None:
    weights, wav2vec = layout
    with pytest.raises(ValueError, match="no CUDA GPU.*device='cpu'"):
        FlashHead.from_pretrained(weights, wav2vec=wav2vec, device="cuda")


def test_the_seams_keep_the_reference_shapes(fh: FlashHead, reference: Reference) -> None:
    emb = fh.audio_embedding(tone(2.0))
    assert emb.shape == (50, 12, 768)
    ctx = fh.audio_context(emb)
    assert ctx.shape == (1, 50, 5, 12, 768)
    assert reference.image.shape == (1, 3, 1, 64, 64)
    assert reference.latent.shape == (16, 9, 8, 8)
    x = torch.randn(1, 16, 9, 8, 8)
    v = fh.velocity(x, torch.tensor([1000.0]), ctx[:, :33], reference.latent.unsqueeze(0))
    assert v.shape == (1, 16, 9, 8, 8)
    # the reference latent is vae.encode of the photo repeated over 33 frames: (16, 9, 8, 8)
    assert fh.vae.decode(reference.latent).shape == (1, 3, 33, 64, 64)


def test_chunks_continue_from_their_motion_frames_and_follow_the_audio(
    fh: FlashHead, reference: Reference
) -> None:
    speech = fh.audio_context(fh.audio_embedding(tone(1.33, hz=200) * np.hanning(21280).astype(np.float32)))
    silence = fh.audio_context(fh.audio_embedding(np.zeros(21280, dtype=np.float32)))
    assert speech.shape == silence.shape == (1, 33, 5, 12, 768)

    first = fh.generate_chunk(reference, speech, generator=torch.Generator().manual_seed(0))
    assert first.video.shape == (1, 3, 33, 64, 64)
    assert first.video.min() >= -1 and first.video.max() <= 1
    assert torch.equal(first.latents[:, :1], reference.latent[:, :1])
    assert torch.equal(first.motion_frames, first.video[:, :, -5:])
    frames = video_to_frames(first.video)
    assert frames.shape == (33, 64, 64, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames[3, 5, 7], (((first.video[0, :, 3, 5, 7] + 1) / 2) * 255).int().numpy())

    again = fh.generate_chunk(reference, speech, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.video, first.video)  # a seeded stream repeats
    quiet = fh.generate_chunk(reference, silence, generator=torch.Generator().manual_seed(0))
    assert (quiet.video - first.video).abs().mean() > 1e-3  # the audio reaches the frames

    second = fh.generate_chunk(reference, speech, first.motion_frames,
                               generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(second.latents[:, :2], fh.vae.encode(first.motion_frames))
    with pytest.raises(ValueError, match=r"context has shape \(1, 32, 5, 12, 768\)"):
        fh.generate_chunk(reference, speech[:, :32])
    with pytest.raises(ValueError, match=r"expected \(1, 3, 5, H, W\)"):
        fh.generate_chunk(reference, speech, first.video[:, :, :4])


def test_lite_loads_the_ltx_layout_and_makes_chunks_of_its_own_shape(tmp_path: pathlib.Path) -> None:
    weights = write_published_layout(tmp_path, model="lite", num_layers=1)
    lite = FlashHead.from_pretrained(
        weights, wav2vec=tmp_path / "wav2vec2-base-960h", model="lite", device="cpu", dtype=torch.float32,
        settings=ChunkSettings(height=64, width=64),
    )  # fmt: skip
    assert sorted(p.name for p in weights.iterdir()) == ["Model_Lite", "VAE_LTX"]
    assert isinstance(lite.vae, LTXVAE) and (lite.motion_frames, lite.latent_frames) == (9, 5)
    ref = lite.prepare_reference(astronaut())
    assert ref.latent.shape == (128, 5, 2, 2)
    ctx = lite.audio_context(lite.audio_embedding(tone(1.33)))
    chunk = lite.generate_chunk(ref, ctx, generator=torch.Generator().manual_seed(0))
    assert chunk.video.shape == (1, 3, 33, 64, 64) and chunk.motion_frames.shape == (1, 3, 9, 64, 64)
    nxt = lite.generate_chunk(ref, ctx, chunk.motion_frames, generator=torch.Generator().manual_seed(1))
    assert nxt.video.shape == (1, 3, 33, 64, 64)
    # 24 new frames per Lite chunk: 33 minus the 9 it continues from
    assert lite.settings.frames - lite.motion_frames == 24
