"""Engines by name, as ``avatar serve --engine NAME`` selects them."""

from __future__ import annotations

from pathlib import Path

from engines.base import Engine

ENGINES = ("portrait", "dit", "flashhead")


def create_engine(name: str, *, weights: Path | None = None, random_weights: bool = False,
                  device: str = "cpu", dtype: str = "bf16", dit_backend: str = "auto",
                  trt_engines: Path | None = None, wav2vec: Path | None = None,
                  model: str = "pro", size: str = "512x512") -> Engine:
    """Build an engine; ``ValueError`` with what to pass when it cannot start.

    ``wav2vec``, ``model`` and ``size`` (WIDTHxHEIGHT) are the flashhead engine's.
    """
    if name == "portrait":
        from engines.portrait import PortraitEngine

        return PortraitEngine()
    if name == "dit":
        try:
            from engines.dit import build_dit_engine
        except ImportError as exc:
            raise ValueError(f"the dit engine is not available in this install: {exc}") from exc
        return build_dit_engine(weights, random_weights=random_weights, device=device,
                                dtype=dtype, backend=dit_backend, trt_engines=trt_engines)
    if name == "flashhead":
        try:
            from engines.dit.flashhead.engine import build_flashhead_engine, parse_size
        except ImportError as exc:
            raise ValueError(f"the flashhead engine is not available in this install: {exc}") from exc
        return build_flashhead_engine(weights, wav2vec=wav2vec, model=model, random_weights=random_weights,
                                      device=device, dtype=dtype, backend=dit_backend,
                                      trt_engines=trt_engines, size=parse_size(size))
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
