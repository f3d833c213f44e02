"""Few-step flow-matching sampling for the cascade's DiTs.

The model predicts the velocity ``v = noise - x0`` of the path
``x_sigma = (1 - sigma) * x0 + sigma * noise``; an Euler step moves ``x`` from
``sigma`` to the next sigma. Sigmas are a uniform grid from 1 to 0 warped by
``shift`` (``s * sigma / (1 + (s - 1) * sigma)``), which spends the few steps
of a distilled checkpoint at high noise where layout is decided.
Classifier-free guidance runs the negative prompts in the same batch; it is
skipped when ``guidance_scale == 1`` (CFG-distilled checkpoints).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engines.dit.model import AudioCondition, AvatarDiT, DiTOutput

logger = logging.getLogger(__name__)


def shifted_sigmas(steps: int, shift: float) -> torch.Tensor:
    """``steps + 1`` decreasing sigmas from 1 to 0 with the flow shift applied."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * sigmas / (1 + (shift - 1) * sigmas)).float()


@dataclass(slots=True)
class SamplerConfig:
    steps: int = 4
    shift: float = 5.0
    guidance_scale: float = 1.0


@dataclass(slots=True)
class SampleResult:
    latents: torch.Tensor
    mask_logits: torch.Tensor | None = None  # last prediction, (B, C, F, H', W')


def _pad_to_same_length(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad two ``(B, L, D)`` text embeddings to one length (zeros are Wan's padding)."""
    n = max(a.shape[1], b.shape[1])
    return F.pad(a, (0, 0, 0, n - a.shape[1])), F.pad(b, (0, 0, 0, n - b.shape[1]))


def _gates_from_logits(logits: torch.Tensor, n_chars: int) -> torch.Tensor:
    return torch.sigmoid(logits[:, :n_chars].float())


@torch.no_grad()
def sample(
    model: AvatarDiT,
    noise: torch.Tensor,
    condition: torch.Tensor | None,
    text: torch.Tensor,
    config: SamplerConfig,
    *,
    negative_text: torch.Tensor | None = None,
    audio: AudioCondition | None = None,
    image_embeds: torch.Tensor | None = None,
    forward: Callable[..., DiTOutput] | None = None,
) -> SampleResult:
    """Denoise ``noise`` ``(B, C, F, H, W)`` from sigma 1 to 0.

    ``condition`` ``(B, C', F, H, W)`` is concatenated to the latents on the channel
    axis at every step (first/last-frame masks and latents, low-resolution
    latents for super-resolution). With several characters and no explicit
    masks, the gates of each step are the masks the head predicted at the step
    before (a first forward without audio predicts the masks for step one).
    ``forward`` runs the model in its place (a TensorRT engine, ``torch.compile``).
    """
    cfg_on = config.guidance_scale != 1.0
    if cfg_on and negative_text is None:
        raise ValueError("guidance_scale != 1 needs negative_text")
    sigmas = shifted_sigmas(config.steps, config.shift)
    x = noise
    n_chars = audio.tokens.shape[1] if audio is not None else 0
    predict = audio is not None and audio.masks is None and n_chars > 1
    dtype = model.dtype
    run = forward or model

    def model_input(latents: torch.Tensor) -> torch.Tensor:
        inp = latents if condition is None else torch.cat([latents, condition], dim=1)
        return inp.to(dtype)

    mask_logits = None
    if predict:  # masks for the first step, from a forward without audio
        t0 = torch.full((x.shape[0],), 1000.0, device=x.device)
        probe = run(
            model_input(x),
            t0,
            text.to(dtype),
            predict_masks=True,
            encoder_hidden_states_image=image_embeds,
        )
        mask_logits = probe.mask_logits

    for i in range(config.steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        step_audio = audio
        if predict and audio is not None and mask_logits is not None:
            step_audio = AudioCondition(audio.tokens, _gates_from_logits(mask_logits, n_chars))
        inp = model_input(x)
        ctx = text.to(dtype)
        img = image_embeds
        if cfg_on and negative_text is not None:
            inp = torch.cat([inp, inp])
            ctx = torch.cat(_pad_to_same_length(ctx, negative_text.to(dtype)))
            img = None if image_embeds is None else torch.cat([image_embeds, image_embeds])
            if step_audio is not None:
                m = step_audio.masks
                step_audio = AudioCondition(
                    torch.cat([step_audio.tokens, step_audio.tokens]),
                    None if m is None else torch.cat([m, m]),
                )
        t = torch.full((inp.shape[0],), sigma * 1000.0, device=x.device)
        out = run(inp, t, ctx, audio=step_audio, encoder_hidden_states_image=img, predict_masks=predict)
        v = out.sample.float()
        if cfg_on:
            v_pos, v_neg = v.chunk(2)
            v = v_neg + config.guidance_scale * (v_pos - v_neg)
        if out.mask_logits is not None:
            mask_logits = out.mask_logits[: x.shape[0]]
        x = (x.float() + (sigma_next - sigma) * v).to(noise.dtype)
        logger.debug("step %d/%d sigma %.3f -> %.3f", i + 1, config.steps, sigma, sigma_next)
    return SampleResult(latents=x, mask_logits=mask_logits)
