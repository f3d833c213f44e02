"""Which backend runs each DiT stage: a TensorRT engine, ``torch.compile``, or eager PyTorch.

Per stage, in order: a TensorRT engine from the engine folder's manifest when
one was built for this GPU, this TensorRT version, this model config and these
weights; else ``torch.compile`` (on CUDA); else eager. Every choice is logged
with the reason the better backends were passed over. Asking for a backend
explicitly (``tensorrt`` or ``compile``) makes its absence an error instead.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engines.dit.model import AudioCondition, AvatarDiT, DiTOutput
from engines.dit.tensorrt.manifest import weights_hash
from engines.dit.tensorrt.runtime import TrtDecoder, TrtForward, tensorrt_engines
from engines.dit.tensorrt.spec import DitSpec, stage_spec

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "compile", "eager")
DIT_STAGES = ("blueprint", "subclip", "sr")

Forward = Callable[..., DiTOutput]


@dataclass(slots=True)
class BackendChoice:
    stage: str
    backend: str  # "tensorrt", "torch.compile" or "eager"
    reason: str
    forward: Callable[..., Any]


def compiled_forward(dit: AvatarDiT, mode: str = "default", dynamic: bool | None = None) -> Forward:
    """``torch.compile`` of a DiT's forward (compiles on the first call of each new shape)."""

    def eager(
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        audio: AudioCondition | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        predict_masks: bool = False,
    ) -> DiTOutput:
        return dit(
            hidden_states,
            timestep,
            encoder_hidden_states,
            audio=audio,
            encoder_hidden_states_image=encoder_hidden_states_image,
            predict_masks=predict_masks,
        )

    if mode == "default":
        return torch.compile(eager, fullgraph=False, dynamic=dynamic)  # type: ignore[return-value]
    compiled = torch.compile(eager, mode=mode, fullgraph=False, dynamic=dynamic)

    def step(*args: Any, **kwargs: Any) -> DiTOutput:
        torch.compiler.cudagraph_mark_step_begin()  # CUDA-graph trees: outputs of the last step are done
        return compiled(*args, **kwargs)  # type: ignore[no-any-return]

    return step


def _tensorrt(
    stage: str, components: Any, engines_dir: pathlib.Path | None, hashes: dict[str, str], target: Any
) -> tuple[Callable[..., Any] | None, str]:
    """A TensorRT forward for ``stage`` (or the VAE decoder), or ``None`` and why not."""
    if engines_dir is None:
        return None, "no TensorRT engine folder given (--trt-engines)"
    spec = stage_spec(stage, components)

    def whash() -> str:
        if stage not in hashes:
            logger.info("dit %s: hashing the weights to match them against the engines", stage)
            hashes[stage] = weights_hash(spec.module)
        return hashes[stage]

    engines, note = tensorrt_engines(
        stage, spec, pathlib.Path(engines_dir), weights_hash=whash, target=target
    )
    if not engines:
        return None, note
    if stage == "vae_decoder":
        vae = components.vae
        return TrtDecoder(engines, lambda z: vae.decode(z).sample), note
    assert isinstance(spec, DitSpec)
    dit = getattr(components, stage)
    return TrtForward(spec, engines, dit.__call__), note


def select_backends(
    components: Any,
    *,
    backend: str = "auto",
    engines_dir: pathlib.Path | None = None,
    device: str | torch.device = "cpu",
    target: Any = None,
) -> dict[str, BackendChoice]:
    """One :class:`BackendChoice` per DiT stage, and one for the VAE decoder.

    ``target`` (a :class:`engines.dit.tensorrt.manifest.Target`) stands for this machine's
    GPU and TensorRT version; ``None`` asks TensorRT and CUDA.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    cuda = torch.device(device).type == "cuda"
    hashes: dict[str, str] = {}
    choices: dict[str, BackendChoice] = {}
    stages = [s for s in DIT_STAGES if getattr(components, s) is not None]
    for stage in stages:
        dit = getattr(components, stage)
        passed: list[str] = []
        if backend in ("auto", "tensorrt"):
            forward, why = _tensorrt(stage, components, engines_dir, hashes, target)
            if forward is not None:
                choices[stage] = BackendChoice(stage, "tensorrt", why, forward)
                continue
            if backend == "tensorrt":
                raise ValueError(f"--dit-backend tensorrt: no usable TensorRT engine for {stage}: {why}")
            passed.append(f"TensorRT: {why}")
        if backend == "compile" or (backend == "auto" and cuda):
            choices[stage] = BackendChoice(
                stage, "torch.compile", "; ".join(passed) or "requested", compiled_forward(dit)
            )
            continue
        if backend == "auto":
            passed.append(
                "torch.compile: off on CPU (compile time outweighs the gain; --dit-backend compile forces it)"
            )
        choices[stage] = BackendChoice(stage, "eager", "; ".join(passed) or "requested", dit.__call__)
    if backend in ("auto", "tensorrt"):
        decoder, why = _tensorrt("vae_decoder", components, engines_dir, hashes, target)
        if decoder is not None:
            choices["vae_decoder"] = BackendChoice("vae_decoder", "tensorrt", why, decoder)
        else:
            choices["vae_decoder"] = BackendChoice(
                "vae_decoder", "eager", f"TensorRT: {why}", lambda z: components.vae.decode(z).sample
            )
    for choice in choices.values():
        logger.info("dit %s: %s backend (%s)", choice.stage, choice.backend, choice.reason)
    return choices
