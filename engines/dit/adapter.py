"""Audio adapter for a Wan backbone: per-block audio cross-attention and a mask head.

The adapter is its own diffusers model (``ConfigMixin`` + safetensors), saved
beside the backbone, so a stock Wan2.1 checkpoint stays untouched:

- ``audio_proj`` maps audio features (wav2vec2 hidden states or the built-in
  mel features) to the backbone width, once per sub-clip.
- ``blocks[i]`` is an :class:`AudioCrossAttention` applied after backbone block
  ``i``. Attention is frame-local: the tokens of latent frame ``f`` attend only
  to the audio window of latent frame ``f``. The output projection starts at
  zero, so a fresh (unloaded) adapter leaves the backbone output unchanged.
- ``mask_head`` reads the features after block ``mask_block`` and predicts one
  soft mask per character slot; each character's audio injection is gated by
  its mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class AudioCrossAttention(nn.Module):
    """Frame-local cross-attention from video tokens to per-frame audio windows."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, hidden: torch.Tensor, audio: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Residual audio update of ``hidden``.

        Args:
            hidden: ``(B, F * S, D)`` video tokens, ``F`` latent frames of ``S`` tokens.
            audio: ``(B, C, F, W, D)`` projected audio, ``C`` characters, ``W`` per window.
            gates: ``(B, C, F * S)`` per-token gate of each character's injection.
        Returns:
            ``hidden`` plus the gated sum over characters of the attention output.
        """
        b, c, f, w, d = audio.shape
        s = hidden.shape[1] // f
        h = self.heads
        x = self.norm(hidden.float()).type_as(hidden)
        q = self.norm_q(self.to_q(x)).view(b, 1, f, s, h, d // h).expand(b, c, f, s, h, d // h)
        k = self.norm_k(self.to_k(audio)).view(b, c, f, w, h, d // h)
        v = self.to_v(audio).view(b, c, f, w, h, d // h)
        # (B*C*F, heads, tokens, head_dim): each (character, frame) pair is one attention
        q = q.reshape(b * c * f, s, h, d // h).transpose(1, 2)
        k = k.reshape(b * c * f, w, h, d // h).transpose(1, 2)
        v = v.reshape(b * c * f, w, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, c, f * s, d)
        out = self.to_out(out)
        gated = (out.float() * gates.unsqueeze(-1).float()).sum(dim=1)
        return (hidden.float() + gated).type_as(hidden)


class MaskHead(nn.Module):
    """Per-token logits of one mask per character slot."""

    def __init__(self, dim: int, max_characters: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(approximate="tanh"))
        self.out = nn.Linear(dim, max_characters)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, max_characters, N)`` logits."""
        return self.out(self.proj(self.norm(hidden.float()).type_as(hidden))).transpose(1, 2)


class AudioAdapter(ModelMixin, ConfigMixin):
    """Audio cross-attention after every backbone block, plus a character-mask head."""

    @register_to_config
    def __init__(
        self,
        dim: int = 1536,
        num_heads: int = 12,
        num_layers: int = 30,
        audio_dim: int = 768,
        audio_window: int = 12,
        mask_block: int = 20,
        max_characters: int = 4,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not 0 <= mask_block < num_layers:
            raise ValueError(f"mask_block {mask_block} is outside 0..{num_layers - 1}")
        if audio_window < 1 or max_characters < 1:
            raise ValueError(
                f"audio_window ({audio_window}) and max_characters ({max_characters}) must be >= 1"
            )
        self.audio_proj = nn.Sequential(
            nn.LayerNorm(audio_dim, eps=eps),
            nn.Linear(audio_dim, dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(dim, dim),
        )
        # learned position within a window, so attention can tell past from future audio
        self.window_pos = nn.Parameter(torch.zeros(1, 1, 1, audio_window, dim))
        self.blocks = nn.ModuleList(AudioCrossAttention(dim, num_heads, eps) for _ in range(num_layers))
        self.mask_head = MaskHead(dim, max_characters, eps)

    def out_projections(self) -> list[nn.Linear]:
        """Each block's output projection (zero until weights are loaded)."""
        return [block.to_out for block in self.blocks if isinstance(block, AudioCrossAttention)]

    def project_audio(self, windows: torch.Tensor) -> torch.Tensor:
        """``(B, C, F, W, audio_dim)`` windowed features -> ``(B, C, F, W, dim)``."""
        if windows.shape[-1] != self.config.audio_dim or windows.shape[-2] != self.config.audio_window:
            raise ValueError(
                f"audio windows have shape {tuple(windows.shape)}; the adapter expects "
                f"(..., {self.config.audio_window}, {self.config.audio_dim})"
            )
        return self.audio_proj(windows) + self.window_pos
