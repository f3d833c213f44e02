"""Exported networks as drop-in forwards for the DiT engine (TensorRT engines at serve time).

A forward takes the arguments of an :class:`~engines.dit.model.AvatarDiT`
call and returns a :class:`~engines.dit.model.DiTOutput`: the stage's export
spec maps the call to named inputs and the outputs back. A call whose shapes
no engine covers runs in PyTorch instead (logged once per shape), so a
profile that is too narrow costs speed, never a failed request.
"""

from __future__ import annotations

import logging
import pathlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engines.dit.model import AudioCondition, DiTOutput
from engines.dit.tensorrt.engine import EngineLoadError, TensorRTUnavailable, TrtEngine, tensorrt_version
from engines.dit.tensorrt.manifest import (
    EngineEntry,
    Manifest,
    ManifestError,
    Target,
    config_hash,
    current_target,
)
from engines.dit.tensorrt.spec import SPEC_VERSION, DitSpec, ExportSpec

logger = logging.getLogger(__name__)


@dataclass
class _Fallbacks:
    """Logs once per shape that a call fell back to PyTorch."""

    stage: str
    seen: set[tuple[tuple[str, int], ...]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, axes: dict[str, int], why: str) -> None:
        key = tuple(sorted(axes.items()))
        with self.lock:
            if key in self.seen:
                return
            self.seen.add(key)
        logger.warning("%s: %s for shapes %s; this call runs in PyTorch", self.stage, why, axes)


class SpecForward:
    """Common part: AvatarDiT call -> named inputs -> runner -> DiTOutput (PyTorch when no runner fits)."""

    name = "spec"

    def __init__(self, spec: DitSpec, fallback: Callable[..., DiTOutput]) -> None:
        self.spec = spec
        self.fallback = fallback
        self._fallbacks = _Fallbacks(spec.stage)

    def run(self, feed: dict[str, torch.Tensor], axes: dict[str, int]) -> dict[str, torch.Tensor] | None:
        raise NotImplementedError

    def __call__(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        audio: AudioCondition | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        predict_masks: bool = False,
    ) -> DiTOutput:
        feed = self.spec.feed(
            hidden_states,
            timestep,
            encoder_hidden_states,
            audio=audio,
            image=encoder_hidden_states_image,
            predict_masks=predict_masks,
        )
        axes = self.spec.axes_of(feed)
        outputs = self.run(feed, axes)
        if outputs is None:
            return self.fallback(
                hidden_states,
                timestep,
                encoder_hidden_states,
                audio=audio,
                encoder_hidden_states_image=encoder_hidden_states_image,
                predict_masks=predict_masks,
            )
        out = self.spec.result(outputs, predict_masks)
        dtype = hidden_states.dtype
        return DiTOutput(
            sample=out.sample.to(dtype),
            mask_logits=None if out.mask_logits is None else out.mask_logits.to(dtype),
        )


# ---------------------------------------------------------------------------- TensorRT
class TrtForward(SpecForward):
    """TensorRT engines of one stage (one per profile); the first whose profile covers the call runs."""

    name = "tensorrt"

    def __init__(
        self,
        spec: DitSpec,
        engines: Sequence[tuple[EngineEntry, Any]],
        fallback: Callable[..., DiTOutput],
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__(spec, fallback)
        self.engines = list(engines)
        self.cuda_graphs = cuda_graphs

    def run(self, feed: dict[str, torch.Tensor], axes: dict[str, int]) -> dict[str, torch.Tensor] | None:
        for entry, engine in self.engines:
            if entry.contains(axes):
                cast = {n: t.to(engine.dtypes[n]) for n, t in feed.items()}
                return engine.infer(cast, cuda_graph=self.cuda_graphs)  # type: ignore[no-any-return]
        self._fallbacks.note(
            axes, f"no engine profile covers it (profiles: {[e.profile for e, _ in self.engines]})"
        )
        return None


class TrtDecoder:
    """The VAE decoder from engines of fixed frame counts; other shapes decode in PyTorch."""

    name = "tensorrt"

    def __init__(
        self, engines: Sequence[tuple[EngineEntry, Any]], fallback: Callable[[torch.Tensor], torch.Tensor]
    ):
        self.engines = list(engines)
        self.fallback = fallback
        self._fallbacks = _Fallbacks("vae_decoder")

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, f, h, w = latents.shape
        axes = {"batch": b, "frames": f, "height": h, "width": w}
        for entry, engine in self.engines:
            if entry.contains(axes):
                out = engine.infer({"latents": latents.to(engine.dtypes["latents"])})
                return out["video"].to(latents.dtype)  # type: ignore[no-any-return]
        self._fallbacks.note(axes, "no engine profile covers it")
        return self.fallback(latents)


def _describe_usable(entries: Sequence[EngineEntry]) -> str:
    return ", ".join(f"{e.key} ({e.profile}, {e.build.precision})" for e in entries)


def tensorrt_engines(
    stage: str,
    spec: ExportSpec,
    engines_dir: pathlib.Path,
    *,
    target: Target | None = None,
    weights_hash: Callable[[], str],
) -> tuple[list[tuple[EngineEntry, Any]], str]:
    """Loaded engines of ``stage`` that fit this machine and model, and why (or why not).

    The weights hash is only computed when an entry passes every cheaper check.
    ``target`` defaults to this machine (TensorRT version and GPU).
    """

    try:
        manifest = Manifest.load(engines_dir, missing_ok=False)
    except ManifestError as exc:
        return [], str(exc)
    if target is None:
        version = tensorrt_version()
        if version is None:
            entries = [e for e in manifest.entries.values() if e.stage == stage]
            if not entries:
                return [], f"no {stage} engine in {manifest.path}"
            return [], "TensorRT is not installed here, so its engines cannot run"
        target = current_target(version)
    statics = {e.variant for e in manifest.entries.values() if e.stage == stage}
    usable: list[EngineEntry] = []
    reasons: list[str] = []
    for variant in sorted(statics):
        static = _static_of(variant, stage)
        chash = config_hash(spec.config, stage, static, SPEC_VERSION)
        sel = manifest.select(stage, target, config_hash=chash)
        usable += [e for e in sel.usable if e.variant == variant]
        reasons += [
            f"engine {r.entry.key} ({r.entry.profile}): {r.reason}"
            for r in sel.refused
            if r.entry.variant == variant
        ]
    if usable:
        whash = weights_hash()
        good = [e for e in usable if e.weights_hash == whash]
        reasons += [
            f"engine {e.key} ({e.profile}): built from other weights ({e.weights_hash}, loaded weights "
            f"{whash}): export and build again for these weights"
            for e in usable
            if e not in good
        ]
        usable = good
    if not usable:
        return [], "; ".join(reasons) or f"no {stage} engine in {manifest.path}"
    loaded = []
    for entry in usable:
        try:
            loaded.append((entry, TrtEngine(manifest.engine_path(entry)).load()))
        except (TensorRTUnavailable, EngineLoadError, FileNotFoundError) as exc:
            reasons.append(f"engine {entry.key} ({entry.profile}) failed to load: {exc}")
    if not loaded:
        return [], "; ".join(reasons)
    note = (
        f"engines {_describe_usable([e for e, _ in loaded])} built for {target.describe() if target else '?'}"
    )
    if reasons:
        note += f" (refused: {'; '.join(reasons)})"
    return loaded, note


def _static_of(variant: str, stage: str) -> dict[str, int]:
    """``vae_decoder-frames2`` -> ``{"frames": 2}``."""
    out: dict[str, int] = {}
    for part in variant[len(stage) :].split("-"):
        if not part:
            continue
        name = part.rstrip("0123456789")
        out[name] = int(part[len(name) :])
    return out
