"""Configuration of the DiT engine: the engine file and the built-in size presets.

A weights folder holds ``engine.json`` (:class:`DitEngineConfig`) beside the
diffusers model folders; see :mod:`engines.dit.loading`. The presets give the
model configs used for random-weight runs (throughput tests) and in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}") from None


class DitEngineConfig(BaseModel):
    """``engine.json``: how the engine runs its three stages."""

    model_config = ConfigDict(extra="forbid")
    fps: int = Field(default=25, gt=0)
    keyframe_size: tuple[int, int] = Field(default=(256, 256), description="(width, height) of stages 1-2")
    output_size: tuple[int, int] = Field(default=(512, 512), description="(width, height) after SR")
    steps: int = Field(default=4, ge=1, le=100)
    shift: float = Field(default=5.0, gt=0.0)
    guidance_scale: float = Field(default=1.0, ge=1.0, description="1 = no CFG (CFG-distilled)")
    sr_steps: int = Field(default=4, ge=1, le=100)
    text_max_length: int = Field(default=512, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sizes(self) -> DitEngineConfig:
        for name in ("keyframe_size", "output_size"):
            w, h = getattr(self, name)
            if w <= 0 or h <= 0 or w % 16 or h % 16:
                raise ValueError(f"{name} {w}x{h} must be positive multiples of 16")
        return self


@dataclass(slots=True)
class Preset:
    """Model configs for one size class (random weights)."""

    engine: DitEngineConfig
    backbone: dict[str, Any]
    vae: dict[str, Any]
    adapter: dict[str, Any]
    text_length: int


def _wan_1p3b() -> dict[str, Any]:
    # Wan2.1-T2V-1.3B (diffusers config), in_channels set per stage
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )


def preset(name: Literal["tiny", "1.3b"] | str) -> Preset:
    """``tiny`` (tests, CPU CI) or ``1.3b`` (Wan2.1-1.3B sizes)."""
    if name == "tiny":
        z = 4
        return Preset(
            engine=DitEngineConfig(keyframe_size=(64, 64), output_size=(128, 128), text_max_length=8),
            backbone=dict(
                patch_size=(1, 2, 2),
                num_attention_heads=2,
                attention_head_dim=8,
                in_channels=z,
                out_channels=z,
                text_dim=16,
                freq_dim=32,
                ffn_dim=32,
                num_layers=2,
            ),
            vae=dict(
                base_dim=8,
                z_dim=z,
                dim_mult=[1, 1, 1, 1],
                num_res_blocks=1,
                latents_mean=[0.0] * z,
                latents_std=[1.0] * z,
            ),
            adapter=dict(
                dim=16,
                num_heads=2,
                num_layers=2,
                audio_dim=80,
                audio_window=4,
                mask_block=1,
                max_characters=2,
            ),
            text_length=8,
        )
    if name == "1.3b":
        return Preset(
            engine=DitEngineConfig(keyframe_size=(256, 256), output_size=(512, 512)),
            backbone=_wan_1p3b(),
            vae={},  # the Wan2.1 VAE (diffusers defaults)
            adapter=dict(
                dim=1536,
                num_heads=12,
                num_layers=30,
                audio_dim=80,
                audio_window=12,
                mask_block=20,
                max_characters=4,
            ),
            text_length=512,
        )
    raise ValueError(f"config {name!r} is not a preset; use 'tiny' or '1.3b'")


def stage_in_channels(z_dim: int, temporal_scale: int, stage: str) -> int:
    """Input channels of each stage's backbone.

    ``blueprint`` and ``subclip``: noisy latents + frame mask + condition latents
    (Wan image-to-video layout, 36 for the Wan VAE); ``sr``: noisy latents +
    upsampled low-resolution latents.
    """
    if stage in ("blueprint", "subclip"):
        return 2 * z_dim + temporal_scale
    if stage == "sr":
        return 2 * z_dim
    raise ValueError(f"unknown stage {stage!r}")
