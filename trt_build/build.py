"""``avatar trt build``: plan the engines a profile file asks for, then build what is missing.

Planning needs no TensorRT and no weights: it matches each profile to an
export (``export.json``), turns the profile's axes into per-input min/opt/max
shapes, and computes the store key for the target machine. A job whose key
is already in the manifest (with its file) is up to date and skipped, so
running the same build twice builds nothing the second time.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from engines.dit.tensorrt.manifest import (
    BuildSettings,
    EngineEntry,
    Manifest,
    Target,
    engine_key,
    file_sha256,
)
from engines.dit.tensorrt.spec import POINTS, Profile, ProfileError
from trt_build.engine import BuildOptions, build_engine
from trt_build.export import ONNX_FILE, ExportRecord, find_exports

logger = logging.getLogger(__name__)

_DIM = re.compile(r"^(?P<axis>[a-z_]+)(?:\*(?P<num>\d+)(?:/(?P<den>\d+))?)?$")


class PlanError(ValueError):
    pass


@dataclass(slots=True)
class BuildJob:
    stage: str
    variant: str
    profile: Profile
    onnx: pathlib.Path
    record: ExportRecord
    shapes: dict[str, list[list[int]]]
    key: str
    path: pathlib.Path
    up_to_date: bool
    precision: str  # what this engine is built in (the VAE decoder stays fp32 in strongly typed builds)


def onnx_dtype_for(precision: str, strongly_typed: bool) -> str:
    """Which export a build reads: strongly typed takes the graph's own types, weak typing the fp32 graph."""
    if not strongly_typed:
        return "fp32"
    return {"fp32": "fp32", "tf32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp8": "fp8"}[precision]


def dim_value(dim: int | str, axes: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    m = _DIM.match(dim)
    if m is None or m["axis"] not in axes:
        raise PlanError(f"cannot evaluate dimension {dim!r} with axes {sorted(axes)}")
    return axes[m["axis"]] * int(m["num"] or 1) // int(m["den"] or 1)


def shapes_from_record(record: ExportRecord, profile: Profile) -> dict[str, list[list[int]]]:
    """Per input of the graph: [min, opt, max] shapes for the profile (checked against the export)."""
    where = f"profile {profile.name!r} ({profile.stage})"
    want = set(record.axes) | set(record.static)
    if set(profile.axes) != want:
        raise ProfileError(f"{where}: axes must be exactly {sorted(want)}, got {sorted(profile.axes)}")
    for axis, value in record.static.items():
        if profile.axes[axis] != (value, value, value):
            raise ProfileError(
                f"{where}: {axis} is fixed at {value} in {record.variant}, got {profile.axes[axis]}"
            )
    for axis, (lo, hi) in record.axes.items():
        a, b, c = profile.axes[axis]
        if not lo <= a <= b <= c <= hi:
            raise ProfileError(
                f"{where}: {axis} {a}..{c} (opt {b}) is outside what {record.variant} accepts "
                f"({lo}..{hi}), or not min <= opt <= max"
            )
    out: dict[str, list[list[int]]] = {}
    for inp in record.inputs:
        out[inp.name] = [[dim_value(d, profile.point(p)) for d in inp.dims] for p in POINTS]
    return out


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def plan_builds(
    profiles: Sequence[Profile],
    onnx_root: pathlib.Path,
    manifest: Manifest,
    target: Target,
    *,
    precision: str,
    strongly_typed: bool,
    stages: Sequence[str] | None = None,
    force: bool = False,
) -> list[BuildJob]:
    """One job per profile; raises ``PlanError`` naming what is missing (an export, a dtype)."""
    dtype = onnx_dtype_for(precision, strongly_typed)
    exports = find_exports(onnx_root)
    if not exports:
        raise PlanError(f"{onnx_root} holds no exports: run `avatar trt export --out {onnx_root}` first")
    jobs: list[BuildJob] = []
    for profile in profiles:
        if stages is not None and profile.stage not in stages:
            continue
        candidates = [
            (folder, rec)
            for folder, rec in exports
            if rec.stage == profile.stage
            and all(profile.axes.get(a) == (v, v, v) for a, v in rec.static.items())
        ]
        if not candidates:
            raise PlanError(
                f"no export of {profile.stage} fits profile {profile.name!r} in {onnx_root}: "
                f"export it (for the vae_decoder, each frame count is its own export)"
            )
        matching = [(f, r) for f, r in candidates if r.dtype == dtype]
        job_precision = precision
        if not matching and profile.stage == "vae_decoder" and strongly_typed:
            # the server runs the VAE in fp32 whatever the DiT dtype; so does its engine
            matching = [(f, r) for f, r in candidates if r.dtype == "fp32"]
            job_precision = "fp32"
        if not matching:
            have = sorted({r.dtype for _, r in candidates})
            hint = (
                "quantize the bf16 export with NVIDIA ModelOpt (FP8) and put it, with a copy of its "
                "export.json, "
                f"in {candidates[0][0].parent / 'fp8'}"
                if dtype == "fp8"
                else f"run `avatar trt export --dtype {dtype}`, or build with --no-strongly-typed from fp32"
            )
            raise PlanError(
                f"{precision} {'strongly typed ' if strongly_typed else ''}builds read the {dtype} "
                f"export of {candidates[0][1].variant}; {onnx_root} has {have}: {hint}"
            )
        folder, record = matching[0]
        shapes = shapes_from_record(record, profile)
        key = engine_key(
            stage=record.stage,
            variant=record.variant,
            config_hash=record.config_hash,
            weights_hash=record.weights_hash,
            axes=profile.axes,
            precision=job_precision,
            strongly_typed=strongly_typed,
            onnx_dtype=record.dtype,
            target=target,
        )
        path = manifest.folder / f"{record.variant}-{_safe(profile.name)}-{job_precision}-{key[:8]}.plan"
        jobs.append(
            BuildJob(
                record.stage,
                record.variant,
                profile,
                folder / ONNX_FILE,
                record,
                shapes,
                key,
                path,
                up_to_date=manifest.is_built(key) and not force,
                precision=job_precision,
            )
        )
    return jobs


def run_build(job: BuildJob, manifest: Manifest, target: Target, options: BuildOptions) -> EngineEntry:
    """Build one job with TensorRT and record it in the manifest (saved at once)."""
    options = dataclasses.replace(options, precision=job.precision)
    seconds = build_engine(job.path, job.onnx, job.shapes, options)
    entry = EngineEntry(
        key=job.key,
        stage=job.stage,
        variant=job.variant,
        profile=job.profile.name,
        file=job.path.name,
        axes=dict(job.profile.axes),
        shapes=job.shapes,
        inputs=[i.name for i in job.record.inputs],
        outputs=list(job.record.outputs),
        onnx_dtype=job.record.dtype,
        config_hash=job.record.config_hash,
        weights_hash=job.record.weights_hash,
        gpu=target.gpu,
        compute_capability=target.compute_capability,
        tensorrt=target.tensorrt,
        build=BuildSettings(
            precision=options.precision,
            strongly_typed=options.strongly_typed,
            optimization_level=options.optimization_level,
            workspace_mb=options.workspace_mb,
            timing_cache=str(options.timing_cache) if options.timing_cache else None,
            seconds=round(seconds, 1),
        ),
        size_bytes=job.path.stat().st_size,
        sha256=file_sha256(job.path),
        source=job.record.source,
    )
    manifest.add(entry)
    manifest.save()
    logger.info("built %s in %.0f s (%.1f MB)", job.path.name, seconds, entry.size_bytes / 1e6)
    return entry
