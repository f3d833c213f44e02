"""The FlashHead DiT: a Wan2.1 transformer with per-latent-frame audio cross-attention.

SoulX-FlashHead's ``WanModelAudioProject`` (published as ``Model_Pro/`` and
``Model_Lite/``) is the Wan2.1 1.3B DiT with its text cross-attention turned
into audio cross-attention that is local in time: the tokens of latent frame
``j`` attend only to the 32 audio tokens of latent frame ``j``. Its input is
the noisy latent concatenated on channels with the reference latent ``y``.
The audio tokens come from :class:`AudioProjection` (``audio_proj.*``), which
flattens wav2vec2 windows per latent frame into 32 tokens of width 1536.

Parameter names are the original Wan names, so the published safetensors load
without renaming. The checkpoint also holds ``text_embedding.*`` and
``audio_emb.*``, which the reference builds but never calls; the loader drops
them (:data:`DROPPED_PREFIXES`).

Numerics follow the reference: everything runs in the model's dtype except
the q/k RMS statistics (float32), the RoPE rotation (float32 here, float64 in
the reference: equal to float32 rounding) and the sinusoidal timestep table,
which is computed from the timestep *after* casting it to the model dtype (in
bfloat16, 937.5 becomes 936 before the embedding, as in the reference).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

AUDIO_WINDOW = 5
"""wav2vec2 frames per video frame fed to the audio projection (frames i-2 .. i+2)."""
AUDIO_LAYERS = 12
"""wav2vec2 layer outputs stacked per frame (``hidden_states[1:]`` of wav2vec2-base)."""
AUDIO_CHANNELS = 768
"""wav2vec2-base hidden size."""
AUDIO_TOKENS = 32
"""Audio tokens per latent frame."""
AUDIO_WIDTH = 1536
"""Width of the audio tokens, fixed in the reference (so the DiT width is 1536 too)."""
AUDIO_INTERMEDIATE = 512

DROPPED_PREFIXES = ("text_embedding.", "audio_emb.")
"""Published tensors the reference constructs but never uses in its forward."""

ROPE_POSITIONS = 1024
ROPE_THETA = 10000.0


class RMSNorm(nn.Module):
    """RMS norm over the last axis; statistics in float32, the weight applied in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rope_tables(
    head_dim: int, grid: tuple[int, int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's 3-D RoPE as ``(cos, sin)``, each ``(f*h*w, 1, head_dim // 2)`` float32.

    The head's rotated pairs are split ``[c - 2*(c//3), c//3, c//3]`` (``c =
    head_dim // 2``) between frame, row and column positions, each starting at 0.
    The angles are computed in float64 (as the reference) with numpy: the tables
    depend on shapes only, so an exported graph holds them as constants.
    """
    f, h, w = grid
    if max(grid) > ROPE_POSITIONS:
        raise ValueError(f"patch grid {grid} exceeds the {ROPE_POSITIONS} RoPE positions")
    c = head_dim // 2
    sizes = (c - 2 * (c // 3), c // 3, c // 3)
    angles = []
    for axis, (n, pairs) in enumerate(zip((f, h, w), sizes, strict=True)):
        dim = 2 * pairs
        inv = 1.0 / (ROPE_THETA ** (np.arange(0, dim, 2, dtype=np.float64)[:pairs] / dim))
        a = np.outer(np.arange(n, dtype=np.float64), inv)  # (n, pairs)
        shape = [1, 1, 1, pairs]
        shape[axis] = n
        angles.append(np.broadcast_to(a.reshape(shape), (f, h, w, pairs)))
    theta = np.concatenate(angles, axis=-1).reshape(f * h * w, 1, c)
    cos = torch.from_numpy(np.cos(theta).astype(np.float32))
    sin = torch.from_numpy(np.sin(theta).astype(np.float32))
    return cos.to(device), sin.to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` ``(B, L, heads, head_dim)`` (Wan's interleaved RoPE)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """SDPA over ``(B, L, heads * d)`` inputs, returning ``(B, L, heads * d)``."""
    b, lq, _ = q.shape
    qh = q.view(b, lq, heads, -1).transpose(1, 2)
    kh = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
    vh = v.view(b, v.shape[1], heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(b, lq, -1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, s, self.num_heads, -1)
        k = self.norm_k(self.k(x)).view(b, s, self.num_heads, -1)
        q = apply_rope(q, *rope).flatten(2)
        k = apply_rope(k, *rope).flatten(2)
        return self.o(_attention(q, k, self.v(x), self.num_heads))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(self.q(x))
        k = self.norm_k(self.k(context))
        return self.o(_attention(q, k, self.v(context), self.num_heads))


class AudioBlock(nn.Module):
    """Self-attention (modulated), per-latent-frame audio cross-attention, FFN (modulated)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(dim, eps=eps)  # before the cross-attention, with weight and bias
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        audio: torch.Tensor,
        t_mod: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """``x`` ``(B, F*L, dim)``; ``audio`` ``(B, F, tokens, dim)``; ``t_mod`` ``(B, 6, dim)``."""
        e = (self.modulation.to(t_mod.dtype) + t_mod).chunk(6, dim=1)
        x = x + self.self_attn(self.norm1(x) * (1 + e[1]) + e[0], rope) * e[2]
        b, frames = audio.shape[:2]
        per_frame = self.norm3(x).reshape(b * frames, -1, x.shape[-1])
        attended = self.cross_attn(per_frame, audio.reshape(b * frames, audio.shape[2], audio.shape[3]))
        x = x + attended.reshape(b, -1, x.shape[-1])
        return x + self.ffn(self.norm2(x) * (1 + e[4]) + e[3]) * e[5]


class Head(nn.Module):
    def __init__(self, dim: int, out_features: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.to(t.dtype) + t.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + scale) + shift)


class EmbeddingMLP(nn.Module):
    """``audio_emb`` (and Wan's ``img_emb``): present in the checkpoint, unused by the forward."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, out_dim),
            nn.LayerNorm(out_dim),
        )


class AudioProjection(nn.Module):
    """``audio_proj``: wav2vec2 windows per latent frame to :data:`AUDIO_TOKENS` tokens.

    Latent frame 0 takes the full 5-frame window of video frame 0 (``proj1``);
    every later latent frame takes the ``window + temporal_stride - 1`` rows that
    :func:`group_audio_windows` gathers from its video frames (``proj1_vf``).
    """

    def __init__(self, temporal_stride: int) -> None:
        super().__init__()
        per_frame = AUDIO_LAYERS * AUDIO_CHANNELS
        self.proj1 = nn.Linear(AUDIO_WINDOW * per_frame, AUDIO_INTERMEDIATE)
        self.proj1_vf = nn.Linear((AUDIO_WINDOW + temporal_stride - 1) * per_frame, AUDIO_INTERMEDIATE)
        self.proj2 = nn.Linear(AUDIO_INTERMEDIATE, AUDIO_INTERMEDIATE)
        self.proj3 = nn.Linear(AUDIO_INTERMEDIATE, AUDIO_TOKENS * AUDIO_WIDTH)
        self.norm = nn.LayerNorm(AUDIO_WIDTH)

    def forward(self, first: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
        """``first`` ``(B, 1, 5, 12, 768)``, ``later`` ``(B, F-1, rows, 12, 768)`` -> ``(B, F, 32, 1536)``."""
        b = first.shape[0]
        h_first = torch.relu(self.proj1(first.flatten(2)))
        h_later = torch.relu(self.proj1_vf(later.flatten(2)))
        h = torch.relu(self.proj2(torch.cat([h_first, h_later], dim=1)))
        tokens = self.proj3(h).reshape(b, h.shape[1], AUDIO_TOKENS, AUDIO_WIDTH)
        return self.norm(tokens)


def group_audio_windows(context: torch.Tensor, temporal_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-video-frame windows ``(B, T, 5, ...)`` into the projection's two inputs.

    Video frame 0 is latent frame 0 and keeps its whole window. Each later
    latent frame covers ``temporal_stride`` video frames; it takes the first
    three rows (i-2, i-1, i) of its first frame's window, the centre row of
    each middle frame and the last three rows (i, i+1, i+2) of its last
    frame's window: ``3 + (stride - 2) + 3 = 5 + stride - 1`` rows.
    """
    t = context.shape[1]
    if (t - 1) % temporal_stride:
        raise ValueError(f"audio context has {t} video frames; expected 1 + {temporal_stride} * k")
    mid = AUDIO_WINDOW // 2
    first = context[:, :1]
    b, _, _, *rest = context.shape
    later = context[:, 1:].reshape(b, (t - 1) // temporal_stride, temporal_stride, AUDIO_WINDOW, *rest)
    rows = torch.cat(
        [
            later[:, :, 0, : mid + 1],
            later[:, :, 1:-1, mid],
            later[:, :, -1, mid:],
        ],
        dim=2,
    )
    return first, rows


class FlashHeadTransformer(ModelMixin, ConfigMixin):
    """SoulX-FlashHead's ``WanModelAudioProject``, in the published config's own terms.

    The constructor arguments are the keys of the published ``config.json``
    (defaults: ``Model_Pro``). ``in_dim`` is the noisy latent's channels plus
    the reference latent's (``2 * out_dim``); ``vae_stride[0]`` is the VAE's
    temporal stride, which sets how many video frames share a latent frame.
    """

    config_name = "config.json"
    _no_split_modules = ["AudioBlock"]

    @register_to_config
    def __init__(
        self,
        dim: int = 1536,
        in_dim: int = 32,
        ffn_dim: int = 8960,
        out_dim: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        eps: float = 1e-6,
        vae_stride: tuple[int, int, int] = (4, 8, 8),
        patch_size: tuple[int, int, int] = (1, 2, 2),
        num_heads: int = 12,
        num_layers: int = 30,
        has_image_input: bool = False,
    ) -> None:
        super().__init__()
        if dim != AUDIO_WIDTH:
            raise ValueError(f"dim={dim}: the audio projection's width is fixed at {AUDIO_WIDTH}")
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim={dim} does not split into {num_heads} heads of even size")
        if has_image_input:
            raise ValueError("has_image_input=True: FlashHead checkpoints take no CLIP image input")
        if in_dim != 2 * out_dim:
            raise ValueError(f"in_dim={in_dim}: FlashHead concatenates the reference latent (2 * out_dim)")
        self.dim = dim
        self.freq_dim = freq_dim
        self.num_heads = num_heads
        self.patch: tuple[int, int, int] = (int(patch_size[0]), int(patch_size[1]), int(patch_size[2]))
        self.temporal_stride = int(vae_stride[0])
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch, stride=self.patch)
        self.text_embedding = nn.Sequential(
            nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([AudioBlock(dim, ffn_dim, num_heads, eps) for _ in range(num_layers)])
        self.head = Head(dim, out_dim * math.prod(self.patch), eps)
        self.audio_emb = EmbeddingMLP(AUDIO_CHANNELS, dim)
        self.audio_proj = AudioProjection(self.temporal_stride)
        self._rope: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def drop_unused(self) -> None:
        """Free the modules the forward never calls (their tensors are in the checkpoint)."""
        self.text_embedding = None  # type: ignore[assignment]
        self.audio_emb = None  # type: ignore[assignment]

    def _rope_for(
        self, grid: tuple[int, int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (*grid, str(device))
        if key not in self._rope:
            self._rope[key] = rope_tables(self.dim // self.num_heads, grid, device)
        return self._rope[key]

    def timestep_embedding(
        self, timestep: torch.Tensor, dtype: torch.dtype, table_dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Wan's ``[cos, sin]`` table of the timestep, taken after casting it to ``dtype``.

        The reference computes the table in float64; ``table_dtype=torch.float32``
        is for exported graphs (TensorRT has no float64), where angles of up to
        1000 radians lose about 6e-5 of precision: far below a bfloat16 step.
        """
        position = timestep.to(dtype).to(table_dtype)
        half = self.freq_dim // 2
        freqs = torch.from_numpy(np.power(10000.0, -np.arange(half, dtype=np.float64) / half))
        angles = torch.outer(position, freqs.to(device=timestep.device, dtype=table_dtype))
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(dtype)

    def check_inputs(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor
    ) -> None:
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.out_dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {cfg.out_dim}, F, H, W)")
        if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:] or y.shape[1] != cfg.in_dim - cfg.out_dim:
            raise ValueError(
                f"y has shape {tuple(y.shape)}; expected ({x.shape[0]}, {cfg.in_dim - cfg.out_dim}, "
                f"{', '.join(str(s) for s in x.shape[2:])}) to match x {tuple(x.shape)}"
            )
        for axis, (size, p) in enumerate(zip(x.shape[2:], self.patch, strict=True)):
            if size % p:
                raise ValueError(f"x axis {axis + 2} has size {size}, not a multiple of the patch {p}")
        if timestep.ndim != 1 or timestep.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"timestep has shape {tuple(timestep.shape)}; expected (1,) or ({x.shape[0]},)")
        frames = 1 + self.temporal_stride * (x.shape[2] - 1)
        want = (x.shape[0], frames, AUDIO_WINDOW, AUDIO_LAYERS, AUDIO_CHANNELS)
        if tuple(context.shape) != want:
            raise ValueError(
                f"context has shape {tuple(context.shape)}; expected {want} "
                f"(1 + {self.temporal_stride} * (latent frames - 1) video frames of audio windows)"
            )

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor,
        *,
        table_dtype: torch.dtype = torch.float64,
    ) -> torch.Tensor:
        """The velocity for noisy latents ``x`` given ``timestep`` (1000-scale), audio and reference.

        ``x``: ``(B, out_dim, F, H, W)``; ``y``: the reference latent, same shape;
        ``timestep``: ``(1,)`` or ``(B,)``; ``context``: audio windows
        ``(B, 1 + stride * (F - 1), 5, 12, 768)``. Returns ``(B, out_dim, F, H, W)``.
        ``table_dtype``: see :meth:`timestep_embedding`.
        """
        self.check_inputs(x, timestep, context, y)
        dtype = self.patch_embedding.weight.dtype
        b, _, f, h, w = x.shape
        pf, ph, pw = self.patch
        grid = (f // pf, h // ph, w // pw)

        # 1. patchify the noisy latent with the reference latent on channels
        tokens = self.patch_embedding(torch.cat([x, y], dim=1).to(dtype)).flatten(2).transpose(1, 2)

        # 2. timestep conditioning
        t = self.time_embedding(self.timestep_embedding(timestep, dtype, table_dtype))
        t_mod = self.time_projection(t).unflatten(1, (6, self.dim))
        if t.shape[0] != b:
            t, t_mod = t.expand(b, -1), t_mod.expand(b, -1, -1)

        # 3. audio tokens per latent frame
        first, later = group_audio_windows(context.to(device=x.device, dtype=dtype), self.temporal_stride)
        audio = self.audio_proj(first, later).to(dtype)

        # 4. blocks
        rope = self._rope_for(grid, x.device)
        for block in self.blocks:
            tokens = block(tokens, audio, t_mod, rope)

        # 5. head and unpatchify: each token holds (pt, ph, pw, channels)
        out = self.head(tokens, t)
        out = out.reshape(b, *grid, pf, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, -1, f, h, w)


def transformer_flops(config: FlashHeadTransformer | dict[str, Any], latent: tuple[int, int, int]) -> int:
    """FLOPs (2 per multiply-add) of one batch-1 forward at latent size ``(F, H, W)``.

    Matmuls, convolutions and attention; elementwise work (norms, RoPE,
    modulation) is left out, as in the usual MFU accounting.
    """
    cfg = dict(config.config) if isinstance(config, FlashHeadTransformer) else dict(config)
    f, h, w = latent
    pf, ph, pw = cfg["patch_size"]
    d, ffn, layers = int(cfg["dim"]), int(cfg["ffn_dim"]), int(cfg["num_layers"])
    tokens = (f // pf) * (h // ph) * (w // pw)
    audio_tokens = (f // pf) * AUDIO_TOKENS
    per_frame = tokens // (f // pf)
    block = (
        2 * tokens * d * d * 4  # self-attention q, k, v, o
        + 2 * 2 * tokens * tokens * d  # scores and weighted sum
        + 2 * tokens * d * d * 2  # cross-attention q, o
        + 2 * audio_tokens * d * d * 2  # cross-attention k, v
        + 2 * 2 * (f // pf) * per_frame * AUDIO_TOKENS * d  # per-frame cross scores and sum
        + 2 * tokens * d * ffn * 2  # feed-forward
    )
    stride = int(cfg["vae_stride"][0])
    per_window = AUDIO_LAYERS * AUDIO_CHANNELS
    audio = (
        2
        * AUDIO_INTERMEDIATE
        * (
            AUDIO_WINDOW * per_window
            + (f - 1) * (AUDIO_WINDOW + stride - 1) * per_window
            + f * AUDIO_INTERMEDIATE
            + f * AUDIO_TOKENS * AUDIO_WIDTH
        )
    )
    io = 2 * tokens * d * (int(cfg["in_dim"]) + int(cfg["out_dim"])) * pf * ph * pw
    time = 2 * (int(cfg["freq_dim"]) * d + d * d + d * 6 * d)
    return layers * block + audio + io + time
