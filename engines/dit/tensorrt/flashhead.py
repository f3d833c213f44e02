"""Export specs of SoulX-FlashHead's networks, at the fixed shapes a chunk has.

Every FlashHead chunk has the same shapes, so every axis is fixed per export
(``static``) and each network is one graph per shape:

- ``flashhead_dit``: the DiT's velocity (``x``, ``timestep``, ``context``,
  ``y`` -> ``velocity``), the reference's ``WanModelAudioProject.forward``. A
  chunk of 33 frames is 9 latent frames (Pro; Lite: 5) with 32 audio tokens
  per latent frame, made inside the graph from the 33 frames' wav2vec2
  windows. The sinusoidal timestep table is computed in float32 (TensorRT has
  no float64; the difference is far below a bfloat16 step); RoPE tables are
  constants.
- ``flashhead_vae_encoder``: the Wan VAE's ``encode`` seam, video in
  ``[-1, 1]`` -> normalised posterior mean; two shapes are served, the
  33-frame reference and the 5 motion frames.
- ``flashhead_vae_decoder``: the ``decode`` seam, normalised latents -> video
  clamped to ``[-1, 1]``, at 9 latent frames.

Axes count latent frames, latent rows and columns (``height``/``width``, 1/8 of
the pixels for the Wan VAE) and video frames. The LTX VAE of Lite has no
export: Lite's DiT exports, its VAE runs in PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from engines.dit.flashhead.networks import FlashHeadNetworks
from engines.dit.flashhead.transformer import AUDIO_CHANNELS, AUDIO_LAYERS, AUDIO_WINDOW, FlashHeadTransformer
from engines.dit.tensorrt.spec import (
    FLASHHEAD_STAGES,
    Axis,
    Dim,
    ExportSpec,
    InputSpec,
    Profile,
    ProfileError,
    _plain,
)

CHUNK_FRAMES = 33
MOTION_LATENT_FRAMES = 2


def _static(name: str, lo: int, hi: int, doc: str, multiple_of: int = 1) -> Axis:
    return Axis(name, lo, hi, multiple_of, static=True, doc=doc)


class FlashHeadDitExport(nn.Module):
    """The velocity with tensors only in and out; the timestep table in float32."""

    def __init__(self, transformer: FlashHeadTransformer) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        return self.transformer(x, timestep, context, y, table_dtype=torch.float32)  # type: ignore[no-any-return]


class WanEncodeExport(nn.Module):
    """``WanVAE.encode``: video ``(1, 3, T, H, W)`` in ``[-1, 1]`` -> normalised mean ``(16, T', h, w)``."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.model = vae.model
        self.vae = vae

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video)  # type: ignore[no-any-return]


class WanDecodeExport(nn.Module):
    """``WanVAE.decode``: normalised ``(16, T', h, w)`` -> video ``(1, 3, 4 (T' - 1) + 1, 8h, 8w)``."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.model = vae.model
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents)  # type: ignore[no-any-return]


@dataclass
class FlashHeadDitSpec(ExportSpec):
    stage: ClassVar[str] = "flashhead_dit"

    @classmethod
    def build(cls, transformer: FlashHeadTransformer) -> FlashHeadDitSpec:
        cfg = transformer.config
        c = int(cfg.out_dim)
        _, ph, pw = (int(p) for p in cfg.patch_size)
        latent = (Dim("frames"), Dim("height"), Dim("width"))
        inputs = (
            InputSpec("x", (1, c, *latent)),
            InputSpec("timestep", (1,), "timestep", float32=True),
            InputSpec(
                "context", (1, Dim("video_frames"), AUDIO_WINDOW, AUDIO_LAYERS, AUDIO_CHANNELS), "embedding"
            ),
            InputSpec("y", (1, int(cfg.in_dim) - c, *latent)),
        )
        axes = {
            "frames": _static("frames", 1, 64, "latent frames of a chunk (33 video frames: Pro 9, Lite 5)"),
            "video_frames": _static("video_frames", 1, 253, "video frames of the audio context (33)"),
            "height": _static("height", ph, 256, f"latent rows, a multiple of {ph}", ph),
            "width": _static("width", pw, 256, f"latent columns, a multiple of {pw}", pw),
        }
        return cls(
            module=transformer,
            dtype=transformer.patch_embedding.weight.dtype,
            inputs=inputs,
            outputs=("velocity",),
            axes=axes,
            config={"transformer": _plain(cfg)},
        )

    def export_module(self) -> nn.Module:
        assert isinstance(self.module, FlashHeadTransformer)
        return FlashHeadDitExport(self.module).eval()

    def validate(self, profile: Profile, where: str = "") -> None:
        where = where or f"profile {profile.name!r} ({profile.stage})"
        super().validate(profile, where)
        assert isinstance(self.module, FlashHeadTransformer)
        stride = self.module.temporal_stride
        f, t = profile.axes["frames"][0], profile.axes["video_frames"][0]
        if t != 1 + stride * (f - 1):
            raise ProfileError(
                f"{where}: {t} video frames of audio do not make {f} latent frames "
                f"(1 + {stride} * (frames - 1))"
            )


@dataclass
class FlashHeadVaeEncoderSpec(ExportSpec):
    stage: ClassVar[str] = "flashhead_vae_encoder"
    vae: Any = None  # the WanVAE whose seam is exported (its model is ``module``)

    @classmethod
    def build(cls, vae: Any) -> FlashHeadVaeEncoderSpec:
        s = int(vae.spatial_stride)
        inputs = (InputSpec("video", (1, 3, Dim("video_frames"), Dim("height", s), Dim("width", s))),)
        axes = {
            "video_frames": _static("video_frames", 1, 253, "video frames: 33 (reference) or 5 (motion)"),
            "height": _static("height", 1, 256, "latent rows (pixels / 8)"),
            "width": _static("width", 1, 256, "latent columns (pixels / 8)"),
        }
        return cls(
            module=vae.model, dtype=vae.dtype, inputs=inputs, outputs=("latents",), axes=axes,
            config={"vae": _plain(vae.model.config), "seam": "encode"},
        )  # fmt: skip

    def export_module(self) -> nn.Module:
        return WanEncodeExport(self.vae).eval()

    def validate(self, profile: Profile, where: str = "") -> None:
        where = where or f"profile {profile.name!r} ({profile.stage})"
        super().validate(profile, where)
        t = profile.axes["video_frames"][0]
        if (t - 1) % 4:
            raise ProfileError(f"{where}: {t} video frames is not 1 + 4k (the Wan VAE's temporal stride)")


@dataclass
class FlashHeadVaeDecoderSpec(ExportSpec):
    stage: ClassVar[str] = "flashhead_vae_decoder"
    vae: Any = None

    @classmethod
    def build(cls, vae: Any) -> FlashHeadVaeDecoderSpec:
        inputs = (InputSpec("latents", (int(vae.z_dim), Dim("frames"), Dim("height"), Dim("width"))),)
        axes = {
            "frames": _static("frames", 1, 64, "latent frames (9 for a chunk)"),
            "height": _static("height", 1, 256, "latent rows"),
            "width": _static("width", 1, 256, "latent columns"),
        }
        return cls(
            module=vae.model, dtype=vae.dtype, inputs=inputs, outputs=("video",), axes=axes,
            config={"vae": _plain(vae.model.config), "seam": "decode"},
        )  # fmt: skip

    def export_module(self) -> nn.Module:
        return WanDecodeExport(self.vae).eval()


def flashhead_stage_spec(stage: str, nets: FlashHeadNetworks) -> ExportSpec:
    """The export spec of one FlashHead network."""
    if stage == "flashhead_dit":
        return FlashHeadDitSpec.build(nets.transformer)
    if stage in ("flashhead_vae_encoder", "flashhead_vae_decoder"):
        if nets.model != "pro":
            raise ValueError(
                f"{stage}: the LTX VAE of --model lite has no export spec (it runs in PyTorch); "
                "export flashhead_dit alone (--stages flashhead_dit)"
            )
        spec: FlashHeadVaeEncoderSpec | FlashHeadVaeDecoderSpec
        if stage == "flashhead_vae_encoder":
            spec = FlashHeadVaeEncoderSpec.build(nets.vae)
        else:
            spec = FlashHeadVaeDecoderSpec.build(nets.vae)
        spec.vae = nets.vae
        return spec
    raise ValueError(f"unknown FlashHead stage {stage!r}; stages are {', '.join(FLASHHEAD_STAGES)}")


def default_flashhead_stages(model: str) -> list[str]:
    return list(FLASHHEAD_STAGES) if model == "pro" else ["flashhead_dit"]


def flashhead_profiles(
    model: str, *, spatial_stride: int, temporal_stride: int, sizes: Sequence[tuple[int, int]] = ((512, 512),)
) -> list[Profile]:
    """The shapes a chunk has at each size (width, height in pixels): one profile per graph."""
    frames = (CHUNK_FRAMES - 1) // temporal_stride + 1
    motion = (MOTION_LATENT_FRAMES - 1) * temporal_stride + 1
    out: list[Profile] = []
    for w, h in sizes:
        if w % spatial_stride or h % spatial_stride:
            raise ValueError(f"size {w}x{h} is not a multiple of the VAE's {spatial_stride} pixels")
        lh, lw = h // spatial_stride, w // spatial_stride
        tag = f"{w}x{h}"

        def fixed(**axes: int) -> dict[str, tuple[int, int, int]]:
            return {a: (v, v, v) for a, v in axes.items()}

        out.append(
            Profile(
                "flashhead_dit", tag, fixed(frames=frames, video_frames=CHUNK_FRAMES, height=lh, width=lw)
            )
        )
        if model == "pro":
            out.append(Profile("flashhead_vae_encoder", f"{tag}-reference",
                               fixed(video_frames=CHUNK_FRAMES, height=lh, width=lw)))  # fmt: skip
            out.append(Profile("flashhead_vae_encoder", f"{tag}-motion",
                               fixed(video_frames=motion, height=lh, width=lw)))  # fmt: skip
            out.append(
                Profile("flashhead_vae_decoder", f"{tag}-chunk", fixed(frames=frames, height=lh, width=lw))
            )
    return out
