"""``avatar trt bench``: latency and throughput per profile shape, per backend.

Backends: ``tensorrt`` (built engines, with and without CUDA graphs),
``compile`` and ``cudagraphs`` (``torch.compile``, the second with CUDA graphs
via ``reduce-overhead``), ``eager``, and ``onnxruntime`` (the exported graphs;
CPU figures for machines without a GPU). Every row is one network at one
profile point (``min``/``opt``/``max``); throughput counts batch items per
second (one item is one denoising step of one clip for the DiTs, one clip or
keyframe for the VAE decoder).
"""

from __future__ import annotations

import functools
import logging
import pathlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from engines.dit.tensorrt.manifest import EngineEntry
from engines.dit.tensorrt.spec import ExportSpec, Profile, variant_name
from trt_build.check import points_of, session, to_numpy
from trt_build.export import ONNX_FILE, find_exports
from trt_build.timing import median, percentile, timer

logger = logging.getLogger(__name__)

TORCH_BACKENDS = ("eager", "compile", "cudagraphs")
BACKENDS = ("tensorrt", *TORCH_BACKENDS, "onnxruntime")


@dataclass(slots=True)
class BenchRow:
    stage: str
    network: str
    profile: str
    point: str
    shapes: str
    backend: str
    cuda_graph: bool
    batch: int
    median_ms: float
    p90_ms: float
    items_per_s: float
    iters: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _measure(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    time_ms = timer(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return [time_ms(fn) for _ in range(iters)]


def _row(
    stage: str,
    network: str,
    profile: str,
    point: str,
    shapes: Mapping[str, Sequence[int]],
    backend: str,
    graph: bool,
    samples: Sequence[float],
    batch: int | None = None,
) -> BenchRow:
    """``batch``: the batch axis' value; by default the first input's first dimension."""
    if batch is None:
        batch = int(next(iter(shapes.values()))[0])
    med = median(samples)
    text = " ".join(f"{n}={'x'.join(map(str, s))}" for n, s in shapes.items())
    row = BenchRow(
        stage,
        network,
        profile,
        point,
        text,
        backend,
        graph,
        batch,
        med,
        percentile(samples, 90),
        batch / (med / 1000) if med > 0 else float("inf"),
        len(samples),
    )
    logger.info(
        "%s %s/%s %s%s: %.2f ms (p90 %.2f)",
        network,
        profile,
        point,
        backend,
        " + CUDA graph" if graph else "",
        med,
        row.p90_ms,
    )
    return row


def bench_tensorrt(
    entries: Sequence[tuple[EngineEntry, pathlib.Path]],
    *,
    warmup: int,
    iters: int,
    cuda_graphs: Sequence[bool] = (False, True),
) -> list[BenchRow]:
    """Every engine at its profile's min/opt/max, with and without CUDA graphs."""
    from trt_build.engine import TrtEngine

    device = torch.device("cuda", torch.cuda.current_device())
    rows: list[BenchRow] = []
    for entry, path in entries:
        engine = TrtEngine(path).load()
        seen: list[dict[str, tuple[int, ...]]] = []
        for i, point in enumerate(("min", "opt", "max")):
            shapes = {n: tuple(entry.shapes[n][i]) for n in engine.inputs}
            if shapes in seen:
                continue
            seen.append(shapes)
            gen = torch.Generator(device="cpu").manual_seed(i)
            feed = {n: torch.rand(s, generator=gen).to(device, engine.dtypes[n]) for n, s in shapes.items()}
            for graph in cuda_graphs:
                call = functools.partial(engine.infer, feed, cuda_graph=graph)
                samples = _measure(call, device, warmup, iters)
                batch = entry.axes["batch"][i] if "batch" in entry.axes else 1  # FlashHead's have none
                what = (entry.stage, entry.variant, entry.profile, point, shapes)
                rows.append(_row(*what, "tensorrt", graph, samples, batch))
        torch.cuda.empty_cache()
    return rows


def bench_torch(
    spec: ExportSpec,
    profiles: Sequence[Profile],
    backends: Sequence[str],
    *,
    warmup: int,
    iters: int,
    network: str | None = None,
) -> list[BenchRow]:
    """The network in PyTorch (eager, ``torch.compile``, with CUDA graphs) at each profile point.

    The compiled module is the export wrapper, so it computes exactly what the
    ONNX graph and the TensorRT engine compute.
    """
    module = spec.export_module()
    device = next(module.parameters()).device
    rows: list[BenchRow] = []
    for backend in backends:
        if backend not in TORCH_BACKENDS:
            raise ValueError(f"unknown PyTorch backend {backend!r}; use {', '.join(TORCH_BACKENDS)}")
        if backend == "cudagraphs" and device.type != "cuda":
            logger.warning("skipping cudagraphs for %s: CUDA graphs need a GPU", spec.stage)
            continue
        fn = _torch_callable(module, backend)
        for profile in profiles:
            for point, axes in points_of(profile):
                feed = spec.sample_inputs(axes, seed=0, device=str(device))
                args = tuple(feed[n] for n in spec.input_names)
                shapes = {n: tuple(t.shape) for n, t in feed.items()}
                with torch.no_grad():
                    samples = _measure(functools.partial(fn, *args), device, warmup, iters)
                rows.append(
                    _row(
                        spec.stage,
                        network or _variant(spec, profile),
                        profile.name,
                        point,
                        shapes,
                        backend,
                        backend == "cudagraphs",
                        samples,
                        axes.get("batch", 1),
                    )
                )
    return rows


def _variant(spec: ExportSpec, profile: Profile) -> str:
    static = sorted((a, profile.axes[a][0]) for a, ax in spec.axes.items() if ax.static)
    return variant_name(spec.stage, static)


def _torch_callable(module: torch.nn.Module, backend: str) -> Callable[..., Any]:
    if backend == "eager":
        return module
    if backend == "compile":
        return torch.compile(module, dynamic=False)  # type: ignore[return-value]
    compiled = torch.compile(module, mode="reduce-overhead", dynamic=False)

    def step(*args: torch.Tensor) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args)

    return step


def bench_onnxruntime(
    onnx_dir: pathlib.Path,
    specs: Mapping[str, ExportSpec],
    profiles: Sequence[Profile],
    *,
    dtype: str,
    warmup: int,
    iters: int,
    threads: int | None = None,
) -> list[BenchRow]:
    """The exported graphs in onnxruntime (CPU unless another provider is installed)."""
    rows: list[BenchRow] = []
    for folder, record in find_exports(onnx_dir, list(specs), dtype):
        spec = specs[record.stage]
        sess: Any = session(folder / ONNX_FILE, threads=threads)
        mine = [
            p
            for p in profiles
            if p.stage == record.stage and all(p.axes[a][0] == v for a, v in record.static.items())
        ]
        for profile in mine:
            for point, axes in points_of(profile):
                feed = {n: to_numpy(t) for n, t in spec.sample_inputs(axes, seed=0).items()}
                shapes = {n: tuple(v.shape) for n, v in feed.items()}
                samples = _measure(
                    functools.partial(sess.run, None, feed), torch.device("cpu"), warmup, iters
                )
                rows.append(
                    _row(
                        record.stage,
                        record.variant,
                        profile.name,
                        point,
                        shapes,
                        "onnxruntime",
                        False,
                        samples,
                        axes.get("batch", 1),
                    )
                )
    return rows


def format_rows(rows: Sequence[BenchRow], header: str = "") -> str:
    lines = [header, ""] if header else []
    lines += [
        "| network | profile | point | backend | CUDA graph | batch | median ms | p90 ms | items/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.network} | {r.profile} | {r.point} | {r.backend} | {'yes' if r.cuda_graph else 'no'} | "
            f"{r.batch} | {r.median_ms:.2f} | {r.p90_ms:.2f} | {r.items_per_s:.1f} |"
        )
    return "\n".join(lines) + "\n"
