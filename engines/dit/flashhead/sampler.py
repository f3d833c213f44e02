"""FlashHead's distilled sampler: a few re-noising steps with the motion latents held fixed.

The timesteps of the 4-step schedule are ``1000, 750, 500, 250`` (then 0)
warped by the flow shift ``s``: ``t' = s t / (1 + (s - 1) t)`` on the unit
scale, which with ``s = 5`` gives ``1000, 937.5, 833.33, 625, 0``. Each step
predicts the velocity, takes the clean estimate ``x0 = x - v t`` and draws the
next noisy latent ``(1 - t_next) x0 + t_next eps`` with fresh noise (the last
step, ``t_next = 0``, still draws noise, as the reference does, so a seeded
generator yields the reference's numbers). Before every step, and once after
the last, the first latent frames are overwritten with the motion latents
(the previous chunk's last frames), which is how a chunk continues the last.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

NUM_TIMESTEPS = 1000

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x, timestep, context, y) -> v``, batch first, as :meth:`FlashHeadTransformer.forward`."""


def sampling_timesteps(
    steps: int = 4, shift: float = 5.0, *, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """``steps + 1`` shifted timesteps as ``(1,)`` float32 tensors, ending with 0 (the reference's table)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if steps == 2:
        base: list[float] = [1000.0, 500.0]
    elif steps == 4:
        base = [1000.0, 750.0, 500.0, 250.0]
    else:
        base = [float(t) for t in np.linspace(NUM_TIMESTEPS, 1, steps, dtype=np.float32)]
    out = []
    for t in [*base, 0.0]:
        u = torch.tensor([t], device=device) / NUM_TIMESTEPS
        out.append(shift * u / (1 + (shift - 1) * u) * NUM_TIMESTEPS)
    return out


def renoise_step(
    x: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """One update: ``x0 = x - v t``, then ``(1 - t_next) x0 + t_next noise`` (unit-scale t, in x's dtype)."""
    t_i = (t / NUM_TIMESTEPS).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    t_n = (t_next / NUM_TIMESTEPS).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    x0 = x - velocity * t_i
    return (1 - t_n) * x0 + t_n * noise


def denoise(
    velocity: Velocity,
    noise: torch.Tensor,
    *,
    reference_latent: torch.Tensor,
    context: torch.Tensor,
    motion_latent: torch.Tensor,
    timesteps: list[torch.Tensor],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run the steps from ``noise`` ``(C, F, h, w)``; returns the latents ``(C, F, h, w)``.

    ``motion_latent`` ``(C, M, h, w)`` overwrites the first ``M`` latent frames
    before each step and at the end; ``reference_latent`` is the DiT's ``y``.
    """
    if (
        motion_latent.ndim != 4
        or motion_latent.shape[0] != noise.shape[0]
        or motion_latent.shape[2:] != noise.shape[2:]
    ):
        raise ValueError(
            f"motion latent has shape {tuple(motion_latent.shape)}; expected ({noise.shape[0]}, M, "
            f"{noise.shape[2]}, {noise.shape[3]})"
        )
    m = motion_latent.shape[1]
    if m > noise.shape[1]:
        raise ValueError(f"{m} motion latent frames do not fit in {noise.shape[1]} latent frames")
    x = noise.clone()
    y = reference_latent.unsqueeze(0)
    for t, t_next in zip(timesteps[:-1], timesteps[1:], strict=True):
        x[:, :m] = motion_latent
        v = velocity(x.unsqueeze(0), t, context, y)[0]
        eps = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        x = renoise_step(x, v, t, t_next, eps)
    x[:, :m] = motion_latent
    return x
