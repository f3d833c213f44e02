"""Tiny random SoulX-FlashHead checkpoints written in the published layout, for the tests.

The tensor names and shapes here are written out from the reference
architecture (``WanModelAudioProject`` and the original Wan 2.1 VAE), not
taken from the package's models, so that a loader that names or shapes a
tensor differently from the published files fails these tests. Two facts
from the published repository check the lists themselves: the sizes of the
published safetensors files (:data:`PUBLISHED_SIZES`) follow exactly from the
names and shapes at the published configs, and ``Model_Lite/config.json``
(357 bytes) holds exactly :data:`CONFIG_KEYS`.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

PUBLISHED_SIZES = {
    "Model_Pro/diffusion_pytorch_model.safetensors": 6_030_864_656,
    "Model_Lite/diffusion_pytorch_model.safetensors": 6_107_542_048,
    "VAE_LTX/diffusion_pytorch_model.safetensors": 1_676_798_532,
}
"""Byte sizes of the published files (model hub listing of Soul-AILab/SoulX-FlashHead-1_3B)."""

PRO_CONFIG: dict[str, Any] = {
    "dim": 1536,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "has_image_input": False,
    "in_dim": 32,
    "num_heads": 12,
    "num_layers": 30,
    "out_dim": 16,
    "patch_size": [1, 2, 2],
    "text_dim": 4096,
    "vae_stride": [4, 8, 8],
}
LITE_CONFIG: dict[str, Any] = {
    **PRO_CONFIG,
    "in_dim": 256,
    "out_dim": 128,
    "patch_size": [1, 1, 1],
    "vae_stride": [8, 32, 32],
}
CONFIG_KEYS = ("_class_name", "_diffusers_version", *sorted(PRO_CONFIG))


def tiny_config(base: dict[str, Any], *, num_layers: int = 2, ffn_dim: int = 64) -> dict[str, Any]:
    """A published config made small where the architecture allows (layers, FFN width)."""
    return {**base, "num_layers": num_layers, "ffn_dim": ffn_dim}


def dit_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``WanModelAudioProject`` (original Wan names plus ``audio_proj``)."""
    d, ffn, text, freq = cfg["dim"], cfg["ffn_dim"], cfg["text_dim"], cfg["freq_dim"]
    patch = tuple(cfg["patch_size"])
    out = cfg["out_dim"] * math.prod(patch)
    s: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, cfg["in_dim"], *patch),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, text),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, freq),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
        "head.head.weight": (out, d),
        "head.head.bias": (out,),
        "head.modulation": (1, 2, d),
        "audio_emb.proj.0.weight": (768,),
        "audio_emb.proj.0.bias": (768,),
        "audio_emb.proj.1.weight": (768, 768),
        "audio_emb.proj.1.bias": (768,),
        "audio_emb.proj.3.weight": (d, 768),
        "audio_emb.proj.3.bias": (d,),
        "audio_emb.proj.4.weight": (d,),
        "audio_emb.proj.4.bias": (d,),
    }
    window = 12 * 768
    rows_later = 5 + cfg["vae_stride"][0] - 1
    s |= {
        "audio_proj.proj1.weight": (512, 5 * window),
        "audio_proj.proj1.bias": (512,),
        "audio_proj.proj1_vf.weight": (512, rows_later * window),
        "audio_proj.proj1_vf.bias": (512,),
        "audio_proj.proj2.weight": (512, 512),
        "audio_proj.proj2.bias": (512,),
        "audio_proj.proj3.weight": (32 * 1536, 512),
        "audio_proj.proj3.bias": (32 * 1536,),
        "audio_proj.norm.weight": (1536,),
        "audio_proj.norm.bias": (1536,),
    }
    for i in range(cfg["num_layers"]):
        b = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                s[f"{b}{attn}.{p}.weight"] = (d, d)
                s[f"{b}{attn}.{p}.bias"] = (d,)
            s[f"{b}{attn}.norm_q.weight"] = (d,)
            s[f"{b}{attn}.norm_k.weight"] = (d,)
        s[f"{b}norm3.weight"] = (d,)
        s[f"{b}norm3.bias"] = (d,)
        s[f"{b}ffn.0.weight"] = (ffn, d)
        s[f"{b}ffn.0.bias"] = (ffn,)
        s[f"{b}ffn.2.weight"] = (d, ffn)
        s[f"{b}ffn.2.bias"] = (d,)
        s[f"{b}modulation"] = (1, 6, d)
    return s


def safetensors_size(shapes: dict[str, tuple[int, ...]], itemsize: int = 4, dtype: str = "F32") -> int:
    """Bytes of the file ``safetensors.torch.save_file`` writes (metadata ``format: pt``) for ``shapes``."""
    offset, entries = 0, {}
    for name in sorted(shapes):
        nbytes = itemsize * math.prod(shapes[name])
        span = [offset, offset + nbytes]
        entries[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": span}
        offset += nbytes
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    return 8 + len(header) + (-len(header)) % 8 + offset


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """As if trained: unit norm weights near one, small biases, weights of unit gain."""
    if name.endswith("modulation"):
        return torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    if len(shape) == 1:
        is_norm = any(k in name for k in ("norm", "audio_emb.proj.0", "audio_emb.proj.4"))
        if is_norm and name.endswith("weight"):
            return 1.0 + 0.1 * torch.randn(shape, generator=gen)
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / fan_in**0.5


def write_model_folder(
    folder: pathlib.Path, cfg: dict[str, Any], *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``Model_Pro/`` or ``Model_Lite/``: the reference's config.json and one safetensors file."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: _random_tensor(k, v, gen) for k, v in dit_tensor_shapes(cfg).items()}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    config = {"_class_name": "WanModelAudioProject", "_diffusers_version": "0.33.1", **cfg}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return tensors


def wan_vae_shapes(base: int, z_dim: int = 16) -> dict[str, tuple[int, ...]]:
    """Every tensor of the original Wan 2.1 VAE (``WanVAE_``: dim_mult 1,2,4,4, 2 res blocks)."""
    s: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cout: int, cin: int, kernel: tuple[int, ...]) -> None:
        s[f"{name}.weight"] = (cout, cin, *kernel)
        s[f"{name}.bias"] = (cout,)

    def residual(name: str, cin: int, cout: int) -> None:
        s[f"{name}.residual.0.gamma"] = (cin, 1, 1, 1)
        conv(f"{name}.residual.2", cout, cin, (3, 3, 3))
        s[f"{name}.residual.3.gamma"] = (cout, 1, 1, 1)
        conv(f"{name}.residual.6", cout, cout, (3, 3, 3))
        if cin != cout:
            conv(f"{name}.shortcut", cout, cin, (1, 1, 1))

    def attention(name: str, c: int) -> None:
        s[f"{name}.norm.gamma"] = (c, 1, 1)
        conv(f"{name}.to_qkv", 3 * c, c, (1, 1))
        conv(f"{name}.proj", c, c, (1, 1))

    def middle(prefix: str, c: int) -> None:
        residual(f"{prefix}.middle.0", c, c)
        attention(f"{prefix}.middle.1", c)
        residual(f"{prefix}.middle.2", c, c)

    # encoder: widths base * (1, 1, 2, 4, 4); time is halved after stages 2 and 3
    dims = [base * m for m in (1, 1, 2, 4, 4)]
    conv("encoder.conv1", dims[0], 3, (3, 3, 3))
    idx = 0
    for i in range(4):
        cin, cout = dims[i], dims[i + 1]
        for _ in range(2):
            residual(f"encoder.downsamples.{idx}", cin, cout)
            cin, idx = cout, idx + 1
        if i < 3:
            conv(f"encoder.downsamples.{idx}.resample.1", cout, cout, (3, 3))
            if i > 0:  # downsample3d
                conv(f"encoder.downsamples.{idx}.time_conv", cout, cout, (3, 1, 1))
            idx += 1
    middle("encoder", dims[-1])
    s["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("encoder.head.2", 2 * z_dim, dims[-1], (3, 3, 3))
    conv("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    conv("conv2", z_dim, z_dim, (1, 1, 1))

    # decoder: widths base * (4, 4, 4, 2, 1); time is doubled after stages 0 and 1
    dims = [base * m for m in (4, 4, 4, 2, 1)]
    conv("decoder.conv1", dims[0], z_dim, (3, 3, 3))
    middle("decoder", dims[0])
    idx = 0
    for i in range(4):
        cin, cout = dims[i] // (2 if i > 0 else 1), dims[i + 1]
        for _ in range(3):
            residual(f"decoder.upsamples.{idx}", cin, cout)
            cin, idx = cout, idx + 1
        if i < 3:
            conv(f"decoder.upsamples.{idx}.resample.1", cout // 2, cout, (3, 3))
            if i < 2:  # upsample3d
                conv(f"decoder.upsamples.{idx}.time_conv", 2 * cout, cout, (3, 1, 1))
            idx += 1
    s["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("decoder.head.2", 3, dims[-1], (3, 3, 3))
    return s


def write_wan_vae(path: pathlib.Path, base: int = 8, *, seed: int = 1) -> dict[str, torch.Tensor]:
    """``VAE_Wan/Wan2.1_VAE.pth``: a ``torch.save``'d state dict in the original names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in wan_vae_shapes(base).items():
        if name.endswith("gamma"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            state[name] = 0.02 * torch.randn(shape, generator=gen)
        else:
            state[name] = torch.randn(shape, generator=gen) / math.prod(shape[1:]) ** 0.5
    torch.save(state, path)
    return state


def write_wav2vec(folder: pathlib.Path, *, published_widths: bool = True, seed: int = 2) -> None:
    """A random ``Wav2Vec2ForCTC`` folder saved by transformers, with its feature extractor config.

    With ``published_widths`` it has wav2vec2-base's 12 layers of width 768 (what
    the DiT's audio projection takes) but a narrow FFN (64, not 3072), narrow
    convolutions (32 channels, not 512) and a short positional convolution
    (kernel 4, not 128); otherwise 2 layers of width 32.
    """
    import transformers

    widths: dict[str, Any] = (
        {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 64}
        if published_widths
        else {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48}
    )
    config = transformers.Wav2Vec2Config(
        **widths,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=16 if published_widths else 4,
    )
    torch.manual_seed(seed)
    model = transformers.Wav2Vec2ForCTC(config)  # as published: a CTC model, encoder under wav2vec2.*
    model.save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    ).save_pretrained(folder)


def write_ltx_vae(folder: pathlib.Path, *, seed: int = 3) -> None:
    """``VAE_LTX/``: a diffusers ``AutoencoderKLLTXVideo`` folder, 128 latent channels, narrow blocks."""
    from diffusers import AutoencoderKLLTXVideo

    torch.manual_seed(seed)
    model = AutoencoderKLLTXVideo(
        latent_channels=128,
        block_out_channels=(8, 8, 16, 16),
        decoder_block_out_channels=(8, 8, 16, 16),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
    )
    model.latents_mean.copy_(0.1 * torch.randn(128))
    model.latents_std.copy_(1.0 + 0.5 * torch.rand(128))
    model.save_pretrained(folder)


def write_published_layout(
    root: pathlib.Path, *, model: str = "pro", vae_base: int = 8, num_layers: int = 2
) -> pathlib.Path:
    """``root/SoulX-FlashHead-1_3B`` (one model's files only) and ``root/wav2vec2-base-960h``.

    Returns the first. The DiT keeps the published config but for its depth and FFN width.
    """
    weights = root / "SoulX-FlashHead-1_3B"
    if model == "pro":
        write_model_folder(weights / "Model_Pro", tiny_config(PRO_CONFIG, num_layers=num_layers))
        write_wan_vae(weights / "VAE_Wan" / "Wan2.1_VAE.pth", vae_base)
    else:
        write_model_folder(weights / "Model_Lite", tiny_config(LITE_CONFIG, num_layers=num_layers))
        write_ltx_vae(weights / "VAE_LTX")
    if not (root / "wav2vec2-base-960h").is_dir():
        write_wav2vec(root / "wav2vec2-base-960h")
    return weights


def tone(seconds: float, hz: float = 220.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
