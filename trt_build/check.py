"""``avatar trt check``: the ONNX graph against the PyTorch module, on the same inputs.

For every profile of a stage, at its ``min``, ``opt`` and ``max`` shapes, the
graph runs in onnxruntime and the module in PyTorch on the same seeded random
inputs. Per output it reports the largest absolute difference and the
relative error ``max|onnx - torch| / max|torch|`` (relative to the output's
scale, so values near zero do not blow it up), and fails past ``rtol``.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from engines.dit.model import AvatarDiT, DiTOutput
from engines.dit.tensorrt.manifest import config_hash
from engines.dit.tensorrt.runtime import SpecForward
from engines.dit.tensorrt.spec import POINTS, SPEC_VERSION, DitSpec, ExportSpec, Profile, stage_spec
from trt_build.export import ONNX_FILE, ExportRecord, find_exports

logger = logging.getLogger(__name__)

DEFAULT_RTOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}
"""Relative error allowed by default per graph dtype (fp32 graphs agree to ~1e-6 in practice)."""


class CheckError(RuntimeError):
    pass


@dataclass(slots=True)
class CheckRow:
    stage: str
    variant: str
    profile: str
    point: str
    shapes: str
    output: str
    max_abs: float
    max_rel: float
    rtol: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_rel)) and self.max_rel <= self.rtol

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok}


def session(
    onnx_path: pathlib.Path, providers: Sequence[str] | None = None, threads: int | None = None
) -> object:
    """An onnxruntime session, with a clear error when the graph cannot load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(
            str(onnx_path), options, providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as exc:
        raise CheckError(f"onnxruntime cannot load {onnx_path}: {exc}") from exc


BF16_ON_CPU = (
    "onnxruntime's CPU provider cannot run bf16 graphs: check the fp32 export of the same weights "
    "(`avatar trt export --dtype fp32`; the graph is the same), or pass --provider CUDAExecutionProvider "
    "where onnxruntime-gpu is installed"
)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        raise CheckError(BF16_ON_CPU)
    return t.detach().cpu().numpy()


def compare(reference: torch.Tensor, candidate: np.ndarray) -> tuple[float, float]:
    ref = reference.detach().float().cpu().numpy()
    got = candidate.astype(np.float32)
    if ref.shape != got.shape:
        raise CheckError(f"output shapes differ: torch {ref.shape}, onnx {got.shape}")
    diff = float(np.max(np.abs(ref - got))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return diff, diff / max(scale, 1e-12)


def points_of(profile: Profile) -> list[tuple[str, dict[str, int]]]:
    """``min``/``opt``/``max`` of a profile, without repeating identical shapes."""
    seen: list[dict[str, int]] = []
    out = []
    for p in POINTS:
        axes = profile.point(p)
        if axes in seen:
            continue
        seen.append(axes)
        out.append((p, axes))
    return out


def check_export(
    spec: ExportSpec,
    folder: pathlib.Path,
    record: ExportRecord,
    profiles: Sequence[Profile],
    *,
    rtol: float | None = None,
    providers: Sequence[str] | None = None,
    seed: int = 0,
) -> list[CheckRow]:
    """Rows for every output at every profile point (raises ``CheckError`` on unusable input)."""
    if not profiles:
        raise CheckError(f"no profile for {record.variant}: give one in the profile file")
    tol = DEFAULT_RTOL.get(record.dtype, 1e-3) if rtol is None else rtol
    if record.dtype == "bf16" and set(providers or ["CPUExecutionProvider"]) == {"CPUExecutionProvider"}:
        raise CheckError(BF16_ON_CPU)
    sess = session(folder / ONNX_FILE, providers)
    names = [i.name for i in sess.get_inputs()]  # type: ignore[attr-defined]
    if names != spec.input_names:
        raise CheckError(f"{folder}: the graph takes {names}, the spec {spec.input_names}: export again")
    module = spec.export_module()
    device = str(next(module.parameters()).device)
    rows: list[CheckRow] = []
    for profile in profiles:
        spec.validate(profile)
        for point, axes in points_of(profile):
            feed = spec.sample_inputs(axes, seed=seed, device=device)
            with torch.no_grad():
                ref = module(*(feed[n] for n in spec.input_names))
            refs = ref if isinstance(ref, tuple) else (ref,)
            try:
                got = sess.run(None, {n: to_numpy(feed[n]) for n in names})  # type: ignore[attr-defined]
            except CheckError:
                raise
            except Exception as exc:
                raise CheckError(
                    f"onnxruntime failed on {record.variant} at {profile.name}/{point}: {exc}"
                ) from exc
            shapes = " ".join(f"{n}={'x'.join(map(str, feed[n].shape))}" for n in names)
            for name, r, g in zip(spec.outputs, refs, got, strict=True):
                max_abs, max_rel = compare(r, np.asarray(g))
                rows.append(
                    CheckRow(
                        spec.stage, record.variant, profile.name, point, shapes, name, max_abs, max_rel, tol
                    )
                )
                logger.info(
                    "%s %s/%s %s: max abs %.3g, rel %.3g (%s)",
                    record.variant,
                    profile.name,
                    point,
                    name,
                    max_abs,
                    max_rel,
                    "ok" if rows[-1].ok else "FAIL",
                )
    return rows


def format_rows(rows: Sequence[CheckRow]) -> str:
    lines = [
        "| network | profile | point | output | max abs error | max rel error | tolerance | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.profile} | {r.point} | {r.output} | {r.max_abs:.3g} | {r.max_rel:.3g} | "
            f"{r.rtol:.3g} | {'ok' if r.ok else 'FAIL'} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- onnxruntime
class OrtForward(SpecForward):
    """ONNX graphs of one stage in onnxruntime: for validation of the whole path on any machine."""

    name = "onnxruntime"

    def __init__(
        self,
        spec: DitSpec,
        onnx_path: pathlib.Path,
        fallback: Callable[..., DiTOutput],
        providers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(spec, fallback)
        self.session: Any = session(onnx_path, providers)

    def run(self, feed: dict[str, torch.Tensor], axes: dict[str, int]) -> dict[str, torch.Tensor] | None:
        device = feed["hidden_states"].device
        got = self.session.run(None, {n: to_numpy(t) for n, t in feed.items()})
        return {n: torch.from_numpy(v).to(device) for n, v in zip(self.spec.outputs, got, strict=True)}


def onnxruntime_forward(stage: str, components: Any, onnx_dir: pathlib.Path) -> OrtForward:
    """The exported ``stage`` graph of ``onnx_dir`` for these components (checked to match)."""
    spec = stage_spec(stage, components)
    assert isinstance(spec, DitSpec) and isinstance(spec.module, AvatarDiT)
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[spec.dtype]
    found = find_exports(onnx_dir, [stage], dtype)
    if not found:
        raise ValueError(f"no {dtype} export of {stage} in {onnx_dir}: run `avatar trt export`")
    folder, record = found[0]
    if record.config_hash != config_hash(spec.config, stage, {}, SPEC_VERSION):
        raise ValueError(f"{folder} was exported from another model config")
    return OrtForward(spec, folder / ONNX_FILE, spec.module.__call__)
