"""Loading and saving the DiT engine's models from a local diffusers-format folder.

Layout of a weights folder::

    engine.json                   DitEngineConfig
    vae/                          AutoencoderKLWan
    blueprint/                    WanTransformer3DModel, stage 1 (keyframes)
    subclip/                      WanTransformer3DModel, stage 2 (first-last-frame)
    audio_adapter/                AudioAdapter for the sub-clip backbone
    sr/                           WanTransformer3DModel, stage 3 (optional)
    text_encoder/ [+ tokenizer/]  a T5-style encoder (Wan: UMT5-XXL), or
    prompt_embeds.safetensors     precomputed prompt embeddings
    audio_encoder/                wav2vec2 folder (optional; else built-in mel features)
    image_encoder/ [+ image_processor/]  CLIP vision model, for backbones with image_dim
                                  (Wan2.1 I2V / FLF2V checkpoints)

Each model folder is what diffusers' ``save_pretrained`` writes (``config.json``
and ``diffusion_pytorch_model.safetensors``, or sharded with an index), so a
Wan2.1 ``transformer/`` folder can be used as a stage backbone as it is.
Weights are checked strictly: any missing or unexpected key is an error that
lists them.
"""

from __future__ import annotations

import json
import logging
import pathlib
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import load_file

from engines.dit.adapter import AudioAdapter
from engines.dit.conditioning import (
    AudioEncoder,
    ClipImageEncoder,
    LocalTextEncoder,
    MelAudioEncoder,
    PrecomputedTextEmbeddings,
    TextEncoder,
    Wav2Vec2AudioEncoder,
)
from engines.dit.config import DitEngineConfig, stage_in_channels
from engines.dit.model import AvatarDiT

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
ENGINE_FILE = "engine.json"

M = TypeVar("M", bound=torch.nn.Module)


class CheckpointError(ValueError):
    """A checkpoint folder that does not match its model config."""


def _read_state_dict(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    raise CheckpointError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def load_model(cls: type[M], folder: pathlib.Path, *, dtype: torch.dtype, device: str = "cpu") -> M:
    """Build ``cls`` from ``folder/config.json`` and load its weights strictly."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json (expected a diffusers model folder)")
    config = cls.load_config(folder)  # type: ignore[attr-defined]
    with torch.device("meta"):
        model = cls.from_config(config)  # type: ignore[attr-defined]
    state = _read_state_dict(folder)
    expected = set(model.state_dict())
    ignore = tuple(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ())
    missing = sorted(expected - state.keys())
    unexpected = sorted(k for k in state.keys() - expected if not any(p in k for p in ignore))
    if missing or unexpected:
        raise CheckpointError(
            f"{folder} does not match its config ({cls.__name__}): "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} "
            f"({len(unexpected)})"
        )
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in model.state_dict().items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        raise CheckpointError(f"{folder}: shape mismatch: {shapes[:10]}")
    model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    _materialise_buffers(model, cls, config)
    return _place(model, dtype, device)


def _materialise_buffers(model: torch.nn.Module, cls: type, config: dict[str, Any]) -> None:
    """Non-persistent buffers (RoPE tables) are not in the file: rebuild them on CPU."""
    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if not meta:
        return
    fresh = dict(cls.from_config(config).named_buffers())  # type: ignore[attr-defined]
    for name in meta:
        module_name, _, buf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module.register_buffer(buf, fresh[name], persistent=False)


def _place(model: M, dtype: torch.dtype, device: str) -> M:
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    # nn.Module.to: diffusers' override warns on casts, and we keep fp32 modules below
    torch.nn.Module.to(model, device=device, dtype=dtype)
    if dtype != torch.float32 and keep:
        tensors = [*model.named_parameters(), *model.named_buffers()]
        for name, tensor in tensors:
            if tensor.is_floating_point() and any(k in name.split(".") for k in keep):
                tensor.data = tensor.data.float()
    return model.eval().requires_grad_(False)


def save_model(model: torch.nn.Module, folder: pathlib.Path) -> None:
    """diffusers folder format: ``config.json`` + safetensors."""
    model.save_pretrained(folder, safe_serialization=True)  # type: ignore[operator]


@dataclass(slots=True)
class DitComponents:
    config: DitEngineConfig
    vae: AutoencoderKLWan
    blueprint: AvatarDiT
    subclip: AvatarDiT
    sr: AvatarDiT | None
    text: TextEncoder
    audio: AudioEncoder
    image: ClipImageEncoder | None = None

    def check(self) -> None:
        """Raise ``ValueError`` where parts do not fit together."""
        z = int(self.vae.config.z_dim)
        ts = int(self.vae.config.scale_factor_temporal or 4)
        stages = [("blueprint", self.blueprint), ("subclip", self.subclip)]
        if self.sr is not None:
            stages.append(("sr", self.sr))
        for stage, dit in stages:
            cfg = dit.backbone.config
            want = stage_in_channels(z, ts, stage)
            if cfg.in_channels != want or cfg.out_channels != z:
                raise ValueError(
                    f"{stage} backbone has in/out channels {cfg.in_channels}/{cfg.out_channels}; "
                    f"with a VAE of z_dim={z} the {stage} stage needs {want}/{z}"
                )
            if cfg.text_dim != self.text.dim:
                raise ValueError(
                    f"{stage} backbone takes text_dim={cfg.text_dim} but the text "
                    f"embeddings have dim {self.text.dim}"
                )
            if cfg.image_dim is not None and self.image is None:
                raise ValueError(
                    f"{stage} backbone expects CLIP image embeddings (image_dim={cfg.image_dim}): "
                    "add image_encoder/ (CLIPVisionModel) and image_processor/ to the weights"
                )
            if cfg.image_dim is not None and self.image is not None and cfg.image_dim != self.image.dim:
                raise ValueError(
                    f"{stage} backbone takes image_dim={cfg.image_dim} but the image encoder "
                    f"gives {self.image.dim}"
                )
        adapter = self.subclip.adapter
        if adapter is None:
            raise ValueError("the sub-clip stage needs an audio adapter (audio_adapter/)")
        if adapter.config.audio_dim != self.audio.dim:
            raise ValueError(
                f"audio adapter takes audio_dim={adapter.config.audio_dim} but the audio "
                f"encoder gives {self.audio.dim}"
            )


def load_components(folder: pathlib.Path, *, dtype: torch.dtype, device: str) -> DitComponents:
    """Everything the engine needs, from a local weights folder (see the module doc)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"weights folder {folder} does not exist")
    engine_file = folder / ENGINE_FILE
    config = (
        DitEngineConfig.model_validate_json(engine_file.read_text())
        if engine_file.is_file()
        else DitEngineConfig()
    )
    for part in ("vae", "blueprint", "subclip", "audio_adapter"):
        if not (folder / part).is_dir():
            raise ValueError(f"weights folder {folder} has no {part}/ (see engines/dit/loading.py)")
    vae = load_model(AutoencoderKLWan, folder / "vae", dtype=torch.float32, device=device)

    def dit(stage: str, with_adapter: bool = False) -> AvatarDiT:
        backbone = load_model(WanTransformer3DModel, folder / stage, dtype=dtype, device=device)
        adapter = (
            load_model(AudioAdapter, folder / "audio_adapter", dtype=dtype, device=device)
            if with_adapter
            else None
        )
        return AvatarDiT(backbone, adapter)

    sr = dit("sr") if (folder / "sr").is_dir() else None
    if sr is None:
        logger.info("no sr/ in %s: upscale is the identity", folder)
    text: TextEncoder
    if (folder / "text_encoder").is_dir():
        tok = folder / "tokenizer"
        text = LocalTextEncoder(
            folder / "text_encoder",
            tok if tok.is_dir() else None,
            max_length=config.text_max_length,
            device=device,
        )
    elif (folder / "prompt_embeds.safetensors").is_file():
        text = PrecomputedTextEmbeddings(folder / "prompt_embeds.safetensors")
    else:
        raise ValueError(
            f"weights folder {folder} has neither text_encoder/ nor prompt_embeds.safetensors: "
            "add a local text encoder (and tokenizer/) or precomputed prompt embeddings"
        )
    audio: AudioEncoder = (
        Wav2Vec2AudioEncoder(folder / "audio_encoder", device=device)
        if (folder / "audio_encoder").is_dir()
        else MelAudioEncoder()
    )
    image = None
    if (folder / "image_encoder").is_dir():
        proc = folder / "image_processor"
        image = ClipImageEncoder(folder / "image_encoder", proc if proc.is_dir() else None, device=device)
    components = DitComponents(
        config=config,
        vae=vae,
        blueprint=dit("blueprint"),
        subclip=dit("subclip", True),
        sr=sr,
        text=text,
        audio=audio,
        image=image,
    )
    components.check()
    return components


def save_components(components: DitComponents, folder: pathlib.Path) -> None:
    """Write the engine config and every model part (not the text/audio encoders)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ENGINE_FILE).write_text(components.config.model_dump_json(indent=2))
    save_model(components.vae, folder / "vae")
    save_model(components.blueprint.backbone, folder / "blueprint")
    save_model(components.subclip.backbone, folder / "subclip")
    if components.subclip.adapter is None:
        raise ValueError("the sub-clip stage has no audio adapter to save")
    save_model(components.subclip.adapter, folder / "audio_adapter")
    if components.sr is not None:
        save_model(components.sr.backbone, folder / "sr")


def random_components(preset_name: str, *, dtype: torch.dtype, device: str, seed: int = 0) -> DitComponents:
    """Random-weight models of a preset's sizes: for throughput tests and CI only."""
    from engines.dit.conditioning import HashTextEncoder
    from engines.dit.config import preset

    p = preset(preset_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            vae = AutoencoderKLWan(**p.vae)
            z = int(vae.config.z_dim)
            ts = int(vae.config.scale_factor_temporal or 4)

            def backbone(stage: str) -> WanTransformer3DModel:
                cfg = dict(p.backbone, in_channels=stage_in_channels(z, ts, stage), out_channels=z)
                return WanTransformer3DModel(**cfg)

            blueprint, subclip, sr = backbone("blueprint"), backbone("subclip"), backbone("sr")
            adapter = AudioAdapter(**p.adapter)
    components = DitComponents(
        config=p.engine,
        vae=_place(vae, torch.float32, device),
        blueprint=AvatarDiT(_place(blueprint, dtype, device)),
        subclip=AvatarDiT(_place(subclip, dtype, device), _place(adapter, dtype, device)),
        sr=AvatarDiT(_place(sr, dtype, device)),
        text=HashTextEncoder(int(p.backbone["text_dim"]), p.text_length),
        audio=MelAudioEncoder(int(p.adapter["audio_dim"])),
    )
    components.check()
    return components
