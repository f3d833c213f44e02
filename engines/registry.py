"""Engines by name, as ``avatar serve --engine NAME`` and ``avatar render --engine NAME`` select them."""

from __future__ import annotations

from pathlib import Path

from engines.base import Engine

ENGINES = ("portrait", "dit", "flashhead")


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` -> ``(width, height)``, a ``ValueError`` naming the value otherwise."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT (e.g. 512x512)") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return w, h


def create_engine(name: str, *, weights: Path | None = None, random_weights: bool = False,
                  device: str = "cpu", dtype: str = "bf16", dit_backend: str = "auto",
                  trt_engines: Path | None = None, wav2vec: Path | None = None,
                  model: str = "pro", size: str | None = None) -> Engine:
    """Build an engine; ``ValueError`` with what to pass when it cannot start.

    ``size`` (WIDTHxHEIGHT) is the video size of the portrait and flashhead engines
    (None: 512x512, each one's default); ``wav2vec`` and ``model`` are the flashhead engine's.
    """
    if name == "portrait":
        from engines.portrait import PortraitEngine

        return PortraitEngine(size=parse_size(size)) if size else PortraitEngine()
    if name == "dit":
        try:
            from engines.dit import build_dit_engine
        except ImportError as exc:
            raise ValueError(f"the dit engine is not available in this install: {exc}") from exc
        return build_dit_engine(weights, random_weights=random_weights, device=device,
                                dtype=dtype, backend=dit_backend, trt_engines=trt_engines)
    if name == "flashhead":
        try:
            from engines.dit.flashhead.engine import build_flashhead_engine
        except ImportError as exc:
            raise ValueError(f"the flashhead engine is not available in this install: {exc}") from exc
        return build_flashhead_engine(weights, wav2vec=wav2vec, model=model, random_weights=random_weights,
                                      device=device, dtype=dtype, backend=dit_backend,
                                      trt_engines=trt_engines, size=parse_size(size or "512x512"))
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
