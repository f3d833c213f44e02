"""One denoiser of the cascade: a diffusers Wan backbone plus an optional audio adapter.

The backbone is diffusers' own ``WanTransformer3DModel``, so Wan2.1-family
checkpoints in diffusers format load unchanged. :class:`AvatarDiT` runs the
backbone's blocks in its own loop so that the adapter's audio attention can
follow every block; without an adapter (or with a fresh one, whose output
projections are zero) the result equals the backbone's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from engines.dit.adapter import AudioAdapter


@dataclass(slots=True)
class AudioCondition:
    """Projected audio for one forward: see :meth:`AvatarDiT.project_audio`.

    ``tokens`` is ``(B, C, F, W, D)`` for ``C`` characters. ``masks`` gates each
    character's injection per token, ``(B, C, F, H', W')`` on the patch grid,
    or ``None`` for one character speaking everywhere (or to use predictions).
    """

    tokens: torch.Tensor
    masks: torch.Tensor | None = None


@dataclass(slots=True)
class DiTOutput:
    """Velocity prediction, and mask logits ``(B, C, F, H', W')`` when the head ran."""

    sample: torch.Tensor
    mask_logits: torch.Tensor | None = None


class AvatarDiT(nn.Module):
    """A Wan backbone with the audio adapter interleaved after each block."""

    def __init__(self, backbone: WanTransformer3DModel, adapter: AudioAdapter | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        if adapter is not None:
            cfg, acfg = backbone.config, adapter.config
            width = cfg.num_attention_heads * cfg.attention_head_dim
            if acfg.dim != width or acfg.num_layers != cfg.num_layers:
                raise ValueError(
                    f"adapter (dim={acfg.dim}, num_layers={acfg.num_layers}) does not fit the "
                    f"backbone (width={width}, num_layers={cfg.num_layers})"
                )

    @property
    def in_channels(self) -> int:
        return int(self.backbone.config.in_channels)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (some small modules stay in float32)."""
        return self.backbone.patch_embedding.weight.dtype  # type: ignore[no-any-return]

    @property
    def patch_size(self) -> tuple[int, int, int]:
        p = self.backbone.config.patch_size
        return int(p[0]), int(p[1]), int(p[2])

    def project_audio(self, windows: torch.Tensor, masks: torch.Tensor | None = None) -> AudioCondition:
        """Project windowed features ``(B, C, F, W, audio_dim)`` once per clip."""
        if self.adapter is None:
            raise ValueError("this DiT has no audio adapter; it cannot take audio")
        if masks is not None and masks.shape[:3] != windows.shape[:3]:
            raise ValueError(
                f"masks of shape {tuple(masks.shape)} do not match audio windows "
                f"{tuple(windows.shape)} in (batch, characters, frames)"
            )
        tokens = self.adapter.project_audio(windows.to(self.adapter.dtype))
        return AudioCondition(tokens=tokens, masks=masks)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        audio: AudioCondition | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        predict_masks: bool = False,
    ) -> DiTOutput:
        """Velocity for ``hidden_states`` ``(B, in_channels, F, H, W)`` at ``timestep`` ``(B,)``."""
        bb = self.backbone
        b, c, f, h, w = hidden_states.shape
        if c != self.in_channels:
            raise ValueError(f"input has {c} channels; the backbone takes {self.in_channels}")
        p_t, p_h, p_w = self.patch_size
        if f % p_t or h % p_h or w % p_w:
            raise ValueError(f"input (F={f}, H={h}, W={w}) is not a multiple of the patch {p_t, p_h, p_w}")
        pf, ph, pw = f // p_t, h // p_h, w // p_w
        if audio is not None or predict_masks:
            if self.adapter is None:
                raise ValueError("audio or mask prediction needs an audio adapter")
            if p_t != 1:
                raise ValueError("frame-local audio attention needs a temporal patch size of 1")
        if audio is not None and audio.tokens.shape[2] != pf:
            raise ValueError(f"audio has {audio.tokens.shape[2]} frame windows; the latents have {pf}")

        # 1. patchify, position and condition embeddings (as WanTransformer3DModel.forward)
        rotary_emb = bb.rope(hidden_states)
        x = bb.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj, context, context_image = bb.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        if context_image is not None:
            context = torch.concat([context_image, context], dim=1)

        # 2. audio gates: explicit masks, or everywhere for every character
        gates = None
        if audio is not None:
            n_chars = audio.tokens.shape[1]
            if audio.masks is not None:
                gates = audio.masks.to(x.dtype).reshape(b, n_chars, pf * ph * pw)
            else:
                gates = x.new_ones(b, n_chars, pf * ph * pw)

        # 3. blocks, each followed by its audio attention; mask head on a deep block
        mask_logits = None
        mask_block = self.adapter.config.mask_block if self.adapter is not None else -1
        for i, block in enumerate(bb.blocks):
            x = block(x, context, timestep_proj, rotary_emb)
            if audio is not None and gates is not None and self.adapter is not None:
                x = self.adapter.blocks[i](x, audio.tokens, gates)
            if predict_masks and i == mask_block and self.adapter is not None:
                mask_logits = self.adapter.mask_head(x).reshape(b, -1, pf, ph, pw)

        # 4. output norm, projection and unpatchify (as WanTransformer3DModel.forward)
        shift, scale = (bb.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (bb.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = bb.proj_out(x)
        x = x.reshape(b, pf, ph, pw, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return DiTOutput(sample=out, mask_logits=mask_logits)
