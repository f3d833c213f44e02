"""Which backend runs each FlashHead network: a TensorRT engine, ``torch.compile``, or eager PyTorch.

As for the dit engine (:mod:`engines.dit.backend`), per network and in order:
a TensorRT engine from the engine folder's manifest when one was built for
this GPU, this TensorRT version, this model config and these weights; else
``torch.compile`` (the DiT, on CUDA); else eager. Every choice is logged with
the reason the better backends were passed over; asking for ``tensorrt`` or
``compile`` explicitly makes their absence an error. A call whose shape no
engine was built for runs in PyTorch (logged once per shape).

Networks: ``flashhead_dit`` (the velocity), and for Pro the Wan VAE's
``flashhead_vae_encoder`` (reference and motion frames) and
``flashhead_vae_decoder``. Lite's LTX VAE always runs in PyTorch.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engines.dit.backend import BACKENDS, BackendChoice
from engines.dit.flashhead.networks import FlashHeadNetworks, VideoVAE
from engines.dit.flashhead.pipeline import FlashHead
from engines.dit.tensorrt.manifest import EngineEntry, weights_hash
from engines.dit.tensorrt.runtime import _Fallbacks, tensorrt_engines
from engines.dit.tensorrt.spec import ExportSpec

logger = logging.getLogger(__name__)

NETWORKS = {
    "flashhead_dit": "dit",
    "flashhead_vae_encoder": "vae_encoder",
    "flashhead_vae_decoder": "vae_decoder",
}
"""Export stage -> the engine's name for the network."""


class TrtNetwork:
    """One network's TensorRT engines (one per fixed shape); other shapes run ``fallback``."""

    name = "tensorrt"

    def __init__(
        self,
        spec: ExportSpec,
        engines: Sequence[tuple[EngineEntry, Any]],
        fallback: Callable[..., torch.Tensor],
    ) -> None:
        self.spec = spec
        self.engines = list(engines)
        self.fallback = fallback
        self._fallbacks = _Fallbacks(spec.stage)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        feed = dict(zip(self.spec.input_names, args, strict=True))
        axes = self.spec.axes_of(feed)
        for entry, engine in self.engines:
            if entry.contains(axes):
                out = engine.infer({n: t.to(engine.dtypes[n]) for n, t in feed.items()})
                return out[self.spec.outputs[0]].to(args[0].dtype)  # type: ignore[no-any-return]
        self._fallbacks.note(
            axes, f"no engine was built for these shapes ({[e.profile for e, _ in self.engines]})"
        )
        return self.fallback(*args)


@dataclass
class BackendVAE:
    """A :class:`VideoVAE` whose seams may run elsewhere (TensorRT); PyTorch otherwise."""

    inner: Any
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def z_dim(self) -> int:
        return int(self.inner.z_dim)

    @property
    def temporal_stride(self) -> int:
        return int(self.inner.temporal_stride)

    @property
    def spatial_stride(self) -> int:
        return int(self.inner.spatial_stride)

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype  # type: ignore[no-any-return]

    @property
    def device(self) -> torch.device:
        return self.inner.device  # type: ignore[no-any-return]

    @property
    def model(self) -> Any:
        return self.inner.model

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.encoder(video) if self.encoder is not None else self.inner.encode(video)  # type: ignore[no-any-return]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents) if self.decoder is not None else self.inner.decode(latents)  # type: ignore[no-any-return]


def _pytorch_vae(vae: VideoVAE) -> Any:
    return vae.inner if isinstance(vae, BackendVAE) else vae


def networks_of(fh: FlashHead) -> FlashHeadNetworks:
    """The model's networks as exported (the PyTorch VAE underneath any backend)."""
    return FlashHeadNetworks(fh.model, fh.transformer, _pytorch_vae(fh.vae))


def _tensorrt(
    stage: str, nets: FlashHeadNetworks, engines_dir: pathlib.Path | None, target: Any, hashes: dict[int, str]
) -> tuple[list[tuple[EngineEntry, Any]], ExportSpec | None, str]:
    from engines.dit.tensorrt.flashhead import flashhead_stage_spec

    if engines_dir is None:
        return [], None, "no TensorRT engine folder given (--trt-engines)"
    spec = flashhead_stage_spec(stage, nets)

    def whash() -> str:  # the VAE's encoder and decoder share one hash of its weights
        key = id(spec.module)
        if key not in hashes:
            logger.info("flashhead %s: hashing the weights to match them against the engines", stage)
            hashes[key] = weights_hash(spec.module)
        return hashes[key]

    engines, note = tensorrt_engines(
        stage, spec, pathlib.Path(engines_dir), weights_hash=whash, target=target
    )
    return engines, spec, note


def select_flashhead_backends(
    fh: FlashHead,
    *,
    backend: str = "auto",
    engines_dir: pathlib.Path | None = None,
    target: Any = None,
) -> dict[str, BackendChoice]:
    """Choose and install a backend per network of ``fh``; returns the choices by network name.

    ``target`` (a :class:`engines.dit.tensorrt.manifest.Target`) stands for this
    machine's GPU and TensorRT version; ``None`` asks TensorRT and CUDA.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    cuda = fh.device.type == "cuda"
    nets = networks_of(fh)
    stages = ["flashhead_dit"] + (
        ["flashhead_vae_encoder", "flashhead_vae_decoder"] if fh.model == "pro" else []
    )
    choices: dict[str, BackendChoice] = {}
    hashes: dict[int, str] = {}
    vae = BackendVAE(nets.vae)
    for stage in stages:
        name = NETWORKS[stage]
        passed: list[str] = []
        if backend in ("auto", "tensorrt"):
            engines, spec, why = _tensorrt(stage, nets, engines_dir, target, hashes)
            if engines and spec is not None:
                if stage == "flashhead_dit":
                    forward = TrtNetwork(spec, engines, fh.transformer.__call__)
                elif stage == "flashhead_vae_encoder":
                    forward = vae.encoder = TrtNetwork(spec, engines, nets.vae.encode)
                else:
                    forward = vae.decoder = TrtNetwork(spec, engines, nets.vae.decode)
                choices[name] = BackendChoice(name, "tensorrt", why, forward)
                continue
            if backend == "tensorrt":
                raise ValueError(
                    f"--dit-backend tensorrt: no usable TensorRT engine for flashhead {name}: {why}"
                )
            passed.append(f"TensorRT: {why}")
        if stage == "flashhead_dit" and (backend == "compile" or (backend == "auto" and cuda)):
            compiled = torch.compile(fh.transformer, fullgraph=False, dynamic=False)
            choices[name] = BackendChoice(name, "torch.compile", "; ".join(passed) or "requested", compiled)
            continue
        if stage == "flashhead_dit" and backend == "auto":
            passed.append("torch.compile: off on CPU (--dit-backend compile forces it)")
        elif stage != "flashhead_dit" and backend == "compile":
            passed.append("torch.compile: the DiT only (the VAE's causal frame loop is left to TensorRT)")
        fallback = {
            "dit": fh.transformer.__call__,
            "vae_encoder": nets.vae.encode,
            "vae_decoder": nets.vae.decode,
        }
        choices[name] = BackendChoice(name, "eager", "; ".join(passed) or "requested", fallback[name])
    fh.forward = choices["dit"].forward
    if vae.encoder is not None or vae.decoder is not None:
        fh.vae = vae
    else:
        fh.vae = nets.vae
    for choice in choices.values():
        logger.info("flashhead %s: %s backend (%s)", choice.stage, choice.backend, choice.reason)
    return choices
