"""FlashHead's colour correction: match each frame's CIELAB statistics to the reference image.

For every frame the L, a and b channels are shifted and scaled so that
their mean and standard deviation over the image equal the reference
image's, the result goes back to sRGB and is blended with the frame by
``strength``. This holds the skin tone and white balance of a long stream to
the uploaded photo (a chunk continues from the previous chunk's frames, so
drift would otherwise accumulate). sRGB with the D65 white point, as the
reference computes it, in the dtype of the video.
"""

from __future__ import annotations

import torch

_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_XYZ_TO_RGB = (
    (3.2404542, -1.5371385, -0.4985314),
    (-0.9692660, 1.8760108, 0.0415560),
    (0.0556434, -0.2040259, 1.0572252),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_EPSILON = 0.008856
_KAPPA = 903.3


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in ``[0, 1]`` (channels last) -> CIELAB (L in 0..100)."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    xyz = (linear.reshape(-1, 3) @ m.T).reshape(linear.shape)
    xyz = xyz / torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device)
    xyz = xyz.clamp(1e-8, 1.0)
    f = torch.where(xyz > _EPSILON, xyz ** (1 / 3), (_KAPPA * xyz + 16) / 116)
    lightness = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return torch.stack([lightness, a, b], dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIELAB (channels last) -> sRGB clamped to ``[0, 1]``."""
    lightness, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    fy = (lightness + 16) / 116
    fx = a / 500 + fy
    fz = fy - b / 200
    x = torch.where(fx**3 > _EPSILON, fx**3, (116 * fx - 16) / _KAPPA)
    y = torch.where(lightness > _KAPPA * _EPSILON, ((lightness + 16) / 116) ** 3, lightness / _KAPPA)
    z = torch.where(fz**3 > _EPSILON, fz**3, (116 * fz - 16) / _KAPPA)
    xyz = torch.stack([x, y, z], dim=-1) * torch.tensor(_WHITE_D65, dtype=lab.dtype, device=lab.device)
    m = torch.tensor(_XYZ_TO_RGB, dtype=lab.dtype, device=lab.device)
    linear = (xyz.reshape(-1, 3) @ m.T).reshape(xyz.shape)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0.0, 1.0)


def color_correct(video: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """Match ``video`` ``(B, 3, T, H, W)`` in ``[-1, 1]`` to ``reference`` ``(B, 3, 1, H, W)``.

    ``strength`` 0 returns a copy; 1 replaces each frame by its corrected version.
    """
    if strength <= 0.0:
        return video.clone()
    if strength > 1.0:
        raise ValueError(f"colour correction strength {strength} is not in [0, 1]")
    b, c, t, h, w = video.shape
    if c != 3 or tuple(reference.shape) != (b, 3, 1, h, w):
        raise ValueError(
            f"reference has shape {tuple(reference.shape)}; expected ({b}, 3, 1, {h}, {w}) for video "
            f"{tuple(video.shape)}"
        )
    dtype = video.dtype
    source = ((video + 1.0) / 2.0).permute(0, 2, 3, 4, 1)  # (B, T, H, W, 3)
    ref = ((reference.to(device=video.device, dtype=dtype) + 1.0) / 2.0).permute(0, 2, 3, 4, 1)
    source_lab, ref_lab = rgb_to_lab(source), rgb_to_lab(ref)
    ref_mean = ref_lab.mean(dim=[2, 3], keepdim=True)
    ref_std = ref_lab.std(dim=[2, 3], keepdim=True, unbiased=False)
    mean = source_lab.mean(dim=[2, 3], keepdim=True)
    std = source_lab.std(dim=[2, 3], keepdim=True, unbiased=False)
    std = torch.where(std < 1e-8, torch.ones_like(std), std)
    corrected = lab_to_rgb((source_lab - mean) * (ref_std / std) + ref_mean)
    blended = (1 - strength) * source + strength * corrected
    return (blended.permute(0, 4, 1, 2, 3) * 2.0 - 1.0).contiguous().to(dtype)
