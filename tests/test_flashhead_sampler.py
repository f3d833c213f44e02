"""FlashHead's sampler (shifted 4-step schedule, re-noising update, motion latents) and colour correction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.dit.flashhead import color_correct, denoise, renoise_step, sampling_timesteps
from engines.dit.flashhead.color import lab_to_rgb, rgb_to_lab
from engines.dit.flashhead.pipeline import resize_and_center_crop
from tests.helpers import astronaut


def test_the_four_step_schedule_with_shift_five() -> None:
    steps = [float(t) for t in sampling_timesteps(4, 5.0)]
    assert steps == pytest.approx([1000.0, 937.5, 833.3333, 625.0, 0.0], abs=1e-3)
    assert [float(t) for t in sampling_timesteps(2, 5.0)] == pytest.approx([1000.0, 833.3333, 0.0], abs=1e-3)
    assert [float(t) for t in sampling_timesteps(4, 1.0)] == [1000.0, 750.0, 500.0, 250.0, 0.0]
    other = [float(t) for t in sampling_timesteps(3, 1.0)]
    assert other == pytest.approx([1000.0, 500.5, 1.0, 0.0])  # the reference's linspace(1000, 1)
    with pytest.raises(ValueError, match="steps"):
        sampling_timesteps(0)
    with pytest.raises(ValueError, match="shift"):
        sampling_timesteps(4, 0.0)


def test_the_update_takes_the_clean_estimate_and_renoises_it() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps, fresh = (torch.randn(16, 3, 4, 4, generator=g) for _ in range(3))
    t, t_next = torch.tensor([937.5]), torch.tensor([833.3333])
    x_t = (1 - 0.9375) * x0 + 0.9375 * eps
    v = eps - x0  # the flow velocity of the path
    out = renoise_step(x_t, v, t, t_next, fresh)
    assert torch.allclose(out, (1 - 0.8333333) * x0 + 0.8333333 * fresh, atol=1e-5)
    assert torch.allclose(renoise_step(x_t, v, t, torch.tensor([0.0]), fresh), x0, atol=1e-5)


def test_denoise_holds_the_motion_latents_and_lands_on_the_clean_estimate() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randn(16, 9, 4, 4, generator=g)
    motion = torch.randn(16, 2, 4, 4, generator=g)
    y = torch.randn(16, 9, 4, 4, generator=g)
    context = torch.randn(1, 33, 5, 12, 768, generator=g)
    seen: list[tuple[float, torch.Tensor]] = []

    def oracle(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        assert c is context and torch.equal(yy, y.unsqueeze(0)) and x.shape == (1, 16, 9, 4, 4)
        seen.append((float(t), x[0].clone()))
        return (x - target.unsqueeze(0)) / (t / 1000)  # its clean estimate is always the target

    noise = torch.randn(16, 9, 4, 4, generator=g)
    gen = torch.Generator().manual_seed(7)
    out = denoise(oracle, noise, reference_latent=y, context=context, motion_latent=motion,
                  timesteps=sampling_timesteps(4, 5.0), generator=gen)  # fmt: skip
    assert [t for t, _ in seen] == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
    for _, x in seen:  # every step sees the motion latents in the first frames
        assert torch.equal(x[:, :2], motion)
    assert torch.equal(seen[0][1][:, 2:], noise[:, 2:])  # and starts from the noise
    assert torch.equal(out[:, :2], motion)
    assert torch.allclose(out[:, 2:], target[:, 2:], atol=1e-5)
    # the reference draws fresh noise on every step, the last included: 4 draws from the generator
    replay = torch.Generator().manual_seed(7)
    for _ in range(4):
        torch.randn(noise.shape, generator=replay)
    assert torch.equal(torch.randn(3, generator=gen), torch.randn(3, generator=replay))
    with pytest.raises(ValueError, match="motion latent has shape"):
        denoise(oracle, noise, reference_latent=y, context=context, motion_latent=motion[:, :, :2],
                timesteps=sampling_timesteps(4, 5.0))  # fmt: skip


def test_lab_conversion_known_values_and_round_trip() -> None:
    white, black, red = rgb_to_lab(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert white.tolist() == pytest.approx([100.0, 0.0, 0.0], abs=0.05)
    assert black.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=0.05)
    assert red.tolist() == pytest.approx([53.24, 80.09, 67.20], abs=0.05)  # CIELAB of sRGB red (D65)
    rgb = torch.rand(1000, 3, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-4)


def _photo(size: int = 64) -> torch.Tensor:
    crop = resize_and_center_crop(astronaut(), size, size)
    return torch.from_numpy(crop).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1  # (1, 3, 1, H, W)


def test_colour_correction_matches_each_frame_to_the_reference() -> None:
    reference = _photo()
    # three frames drifting away: darker, bluer, lower contrast
    drift = torch.tensor([0.0, 0.1, 0.2]).view(1, 1, 3, 1, 1)
    tint = torch.tensor([-1.0, -0.5, 1.0]).view(1, 3, 1, 1, 1)
    video = ((reference * (1 - drift) + 0.3 * drift * tint) - 0.1 * drift).clamp(-1, 1)
    out = color_correct(video, reference, 1.0)
    assert out.shape == video.shape and out.dtype == video.dtype
    lab = rgb_to_lab(((out + 1) / 2).permute(0, 2, 3, 4, 1))
    ref_lab = rgb_to_lab(((reference + 1) / 2).permute(0, 2, 3, 4, 1))
    for t in range(3):
        mean, ref_mean = lab[0, t].mean(dim=(0, 1)), ref_lab[0, 0].mean(dim=(0, 1))
        std, ref_std = lab[0, t].std(dim=(0, 1)), ref_lab[0, 0].std(dim=(0, 1))
        assert torch.allclose(mean, ref_mean, atol=1.0), t  # Lab units (L in 0..100)
        assert torch.allclose(std, ref_std, rtol=0.05, atol=0.5), t
    before = rgb_to_lab(((video + 1) / 2).permute(0, 2, 3, 4, 1))[0, 2].mean(dim=(0, 1))
    assert (before - ref_lab[0, 0].mean(dim=(0, 1))).abs().max() > 5  # the drift was real
    assert (out[:, :, 0] - reference[:, :, 0]).abs().max() < 2e-3  # a matching frame stays as it is


def test_colour_correction_strength_blends_and_bad_inputs_are_named() -> None:
    reference = _photo(32)
    video = (reference.repeat(1, 1, 2, 1, 1) * 0.7).clamp(-1, 1)
    full = color_correct(video, reference, 1.0)
    half = color_correct(video, reference, 0.5)
    assert torch.allclose(half, (video + full) / 2, atol=1e-5)
    none = color_correct(video, reference, 0.0)
    assert torch.equal(none, video) and none is not video
    assert color_correct(video.bfloat16(), reference, 1.0).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="strength 1.5"):
        color_correct(video, reference, 1.5)
    with pytest.raises(ValueError, match=r"reference has shape \(1, 3, 2, 32, 32\)"):
        color_correct(video, video, 1.0)


def test_reference_crop_covers_and_centres() -> None:
    wide = np.zeros((100, 200, 3), dtype=np.uint8)
    wide[:, 50:150] = 255  # the centre square
    crop = resize_and_center_crop(wide, 64, 64)
    assert crop.shape == (64, 64, 3)
    assert crop[:, 2:-2].min() == 255  # the crop is the centre, scaled to cover
    with pytest.raises(ValueError, match="expected \\(H, W, 3\\) uint8"):
        resize_and_center_crop(wide.astype(np.float32), 64, 64)
