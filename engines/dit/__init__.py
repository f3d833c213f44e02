"""The ``dit`` engine: Wan-layout diffusion transformers for the three cascade stages."""

from __future__ import annotations

import pathlib

import torch

from engines.dit.config import DitEngineConfig, parse_dtype
from engines.dit.engine import RANDOM_WEIGHTS_BANNER, DitEngine, DitPrepared, SubclipResult
from engines.dit.loading import (
    CheckpointError,
    DitComponents,
    load_components,
    random_components,
    save_components,
)

__all__ = [
    "RANDOM_WEIGHTS_BANNER",
    "CheckpointError",
    "DitComponents",
    "DitEngine",
    "DitEngineConfig",
    "DitPrepared",
    "SubclipResult",
    "build_dit_engine",
    "load_components",
    "random_components",
    "save_components",
]


def build_dit_engine(
    weights: pathlib.Path | None,
    *,
    random_weights: bool = False,
    device: str = "cpu",
    dtype: str = "bf16",
    config: str = "1.3b",
    backend: str = "auto",
    trt_engines: pathlib.Path | None = None,
) -> DitEngine:
    """The ``dit`` engine from a local weights folder, or with random weights.

    ``config`` picks the preset sizes for ``random_weights`` (``tiny`` or
    ``1.3b``); with ``weights`` the folder's own configs decide. ``backend``
    and ``trt_engines`` choose how each stage runs (see
    :func:`engines.dit.backend.select_backends`).
    """
    from engines.dit.backend import BACKENDS, select_backends

    if backend not in BACKENDS:
        raise ValueError(f"--dit-backend {backend!r} is not one of {', '.join(BACKENDS)}")
    torch_dtype = parse_dtype(dtype)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} is not available on this machine: pass --device cpu")
    if weights is not None and random_weights:
        raise ValueError("pass either --weights DIR or --random-weights, not both")
    if weights is None:
        if not random_weights:
            raise ValueError(
                "the dit engine needs weights: pass --weights DIR (a local folder with "
                "engine.json, vae/, blueprint/, subclip/, audio_adapter/ and text_encoder/ or "
                "prompt_embeds.safetensors), or --random-weights for a throughput test only"
            )
        engine = DitEngine(random_components(config, dtype=torch_dtype, device=device), random_weights=True)
    else:
        engine = DitEngine(load_components(pathlib.Path(weights), dtype=torch_dtype, device=device))
    choices = select_backends(engine.parts, backend=backend, engines_dir=trt_engines, device=device)
    engine.use_backends(choices)
    return engine
