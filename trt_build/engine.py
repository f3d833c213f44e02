"""Building and inspecting TensorRT engines (the serve-time runtime is ``engines.dit.tensorrt``).

Written against the TensorRT 10 Python API (``tensorrt``), imported lazily:
this module imports on any machine, and every entry point that needs
TensorRT or a GPU raises :class:`TensorRTUnavailable` with what to do.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from engines.dit.tensorrt.engine import (
    PRECISIONS,
    EngineLoadError,
    TensorRTUnavailable,
    TrtEngine,
    import_tensorrt,
    require_gpu,
    tensorrt_version,
    trt_logger,
)
from trt_build.progress import fmt_seconds, task

logger = logging.getLogger(__name__)

__all__ = [
    "PRECISIONS",
    "BuildError",
    "BuildOptions",
    "EngineLoadError",
    "TensorRTUnavailable",
    "TrtEngine",
    "build_engine",
    "describe_engine",
    "import_tensorrt",
    "require_gpu",
    "summarise_layers",
    "tensorrt_version",
]


class BuildError(RuntimeError):
    pass


def _progress_monitor(trt: ModuleType, what: str) -> Any:
    """Logs TensorRT's build phases and their steps (``IProgressMonitor``)."""

    class _Monitor(trt.IProgressMonitor):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.lock = threading.Lock()
            self.phases: dict[str, tuple[int, int, float]] = {}  # name -> (done, total, start)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self.lock:
                self.phases[phase_name] = (0, int(num_steps), time.monotonic())
            logger.info(
                "%s: %s%s (%d steps)",
                what,
                f"{parent_phase} / " if parent_phase else "",
                phase_name,
                num_steps,
            )

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self.lock:
                _, total, start = self.phases.get(phase_name, (0, 1, time.monotonic()))
                self.phases[phase_name] = (step + 1, total, start)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self.lock:
                _, _, start = self.phases.pop(phase_name, (0, 0, time.monotonic()))
            logger.info("%s: %s done in %s", what, phase_name, fmt_seconds(time.monotonic() - start))

        def status(self) -> str:
            with self.lock:
                parts = []
                for name, (done, total, start) in self.phases.items():
                    rate = (time.monotonic() - start) / done if done else None
                    left = f", about {fmt_seconds(rate * (total - done))} left" if rate else ""
                    parts.append(f"{name} {done}/{total}{left}")
            return "; ".join(parts) or "preparing"

    return _Monitor()


@dataclass(slots=True)
class BuildOptions:
    precision: str = "bf16"
    strongly_typed: bool = True
    optimization_level: int = 3
    workspace_mb: int | None = None
    timing_cache: pathlib.Path | None = None
    verbose_layers: bool = True  # ProfilingVerbosity.DETAILED, so `inspect` can show per-layer precision


def fp8_supported(cc: tuple[int, int]) -> bool:
    return cc >= (8, 9)


def onnx_has_fp8(onnx_path: pathlib.Path) -> bool:
    """Whether the graph carries FP8 quantize/dequantize nodes (explicit quantization)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    fp8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2}
    for node in model.graph.node:
        if node.op_type == "TRT_FP8QuantizeLinear":  # ModelOpt's custom op
            return True
        if node.op_type == "QuantizeLinear" and any(
            a.name == "output_dtype" and a.i in fp8 for a in node.attribute
        ):
            return True
    inits = {i.name: i.data_type for i in model.graph.initializer}
    return any(
        node.op_type == "QuantizeLinear" and len(node.input) > 2 and inits.get(node.input[2]) in fp8
        for node in model.graph.node
    )


def _parser_error(err: Any) -> str:
    desc = err.desc() if hasattr(err, "desc") else str(err)
    node = f" (node {err.node_name()})" if hasattr(err, "node_name") else ""
    return f"{desc}{node}"


def build_engine(
    path: pathlib.Path,
    onnx_path: pathlib.Path,
    shapes: Mapping[str, Sequence[Sequence[int]]],
    options: BuildOptions,
) -> float:
    """Build ``path`` from ``onnx_path`` with one optimisation profile; returns the build seconds."""
    trt = import_tensorrt()
    require_gpu()
    major = int(str(trt.__version__).split(".")[0])
    cc = torch.cuda.get_device_capability(0)
    if options.precision == "fp8":
        if not fp8_supported(cc):
            raise BuildError(
                f"fp8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); this GPU is "
                f"sm_{cc[0]}{cc[1]}: use bf16 or fp16"
            )
        if not onnx_has_fp8(onnx_path):
            raise BuildError(
                f"{onnx_path} has no FP8 quantize/dequantize nodes: TensorRT builds fp8 from explicitly "
                "quantized graphs. Quantize the bf16 export with NVIDIA ModelOpt (FP8, with calibration "
                "data) into <onnx>/<network>/fp8/ (see docs/ops.md), or build bf16"
            )
    if options.precision == "bf16" and cc < (8, 0):
        raise BuildError(
            f"bf16 needs compute capability 8.0 or newer; this GPU is sm_{cc[0]}{cc[1]}: use fp16"
        )
    if not options.strongly_typed and major >= 11:
        raise BuildError(
            f"TensorRT {trt.__version__} always builds strongly typed networks: drop --no-strongly-typed "
            "and export the ONNX in the precision you want (--dtype bf16)"
        )
    log = trt_logger()
    builder = trt.Builder(log)
    flags = 0
    if options.strongly_typed and major < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors))
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(shapes):
        raise BuildError(f"the graph takes inputs {names}, the profile gives {sorted(shapes)}")
    config = builder.create_builder_config()
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    config.builder_optimization_level = int(options.optimization_level)
    if options.verbose_layers:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if not options.strongly_typed:  # weak typing: the flags allow lower precision per layer
        if options.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif options.precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        elif options.precision == "fp8":
            config.set_flag(trt.BuilderFlag.FP8)
            config.set_flag(trt.BuilderFlag.BF16)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:  # on by default: fp32 means fp32 matmuls
        (config.clear_flag if options.precision == "fp32" else config.set_flag)(tf32)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(profile)
    cache_bytes = b""
    if options.timing_cache is not None and options.timing_cache.is_file():
        cache_bytes = options.timing_cache.read_bytes()
        logger.info("timing cache: %s (%.1f MB)", options.timing_cache, len(cache_bytes) / 1e6)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    monitor = _progress_monitor(trt, f"build {path.name}")
    config.progress_monitor = monitor
    start = time.monotonic()
    with task(f"TensorRT build of {path.name}", detail=monitor.status, log=logger, every=30.0):
        serialized = builder.build_serialized_network(network, config)
    seconds = time.monotonic() - start
    if serialized is None:
        raise BuildError(
            f"TensorRT could not build {onnx_path} (see its errors above). Common causes: not enough GPU "
            "memory for the max shapes (lower them or --workspace-mb), an op TensorRT does not support "
            "in this precision, or a profile outside what the graph allows"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(memoryview(serialized))
    tmp.replace(path)
    if options.timing_cache is not None:
        options.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        options.timing_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return seconds


def describe_engine(engine: TrtEngine, shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """Inputs, profile, layers (type, precision), attention fusion, memory; see summarise_layers."""
    trt = import_tensorrt()
    engine.load()
    profile = engine.profile_shapes()
    opt = shapes or {n: s[1] for n, s in profile.items()}
    engine.bind_shapes(opt)
    inspector = engine.engine.create_engine_inspector()
    if hasattr(inspector, "execution_context"):
        inspector.execution_context = engine.context
    else:  # TensorRT < 10.?: the attribute was called context
        inspector.context = engine.context
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    memory: Any = getattr(engine.engine, "device_memory_size_v2", None)
    if memory is None:
        memory = getattr(engine.engine, "device_memory_size", 0)
    return {
        "file": str(engine.path),
        "size_bytes": engine.path.stat().st_size,
        "tensorrt": str(trt.__version__),
        "inputs": {
            n: {"dtype": str(engine.dtypes[n]).replace("torch.", ""), "profile": profile[n]}
            for n in engine.inputs
        },
        "outputs": {n: {"dtype": str(engine.dtypes[n]).replace("torch.", "")} for n in engine.outputs},
        "activation_memory_bytes": int(memory),
        "layers": summarise_layers(layers),
    }


# ---------------------------------------------------------------- layer summaries (no TensorRT needed)
_PRECISION_PATTERNS = (
    ("fp8", re.compile(r"fp8|e4m3|e5m2", re.I)),
    ("bf16", re.compile(r"bf16|bfloat16", re.I)),
    ("fp16", re.compile(r"fp16|half", re.I)),
    ("int8", re.compile(r"int8", re.I)),
    ("fp32", re.compile(r"fp32|float|tf32", re.I)),
)
_FUSED_ATTENTION = re.compile(r"mha|fmha|flash", re.I)  # fused attention kernels (names, tactics)
_ATTENTION_LAYER = re.compile(r"attention", re.I)  # the IAttention layer type
_SOFTMAX = re.compile(r"softmax", re.I)


def layer_precision(layer: Mapping[str, Any]) -> str:
    """Precision of a layer from its output formats (``Format/Datatype`` in the inspector's JSON)."""
    tensors = [*layer.get("Outputs", []), *layer.get("Inputs", [])]
    for tensor in tensors:
        text = str(tensor.get("Format/Datatype", "")) if isinstance(tensor, Mapping) else str(tensor)
        if "N/A" in text:
            continue
        for name, pattern in _PRECISION_PATTERNS:
            if pattern.search(text):
                return name
    return "unknown"


def summarise_layers(layers: Sequence[Any]) -> dict[str, Any]:
    """Counts by layer type and precision, and what became of attention.

    ``attention``: ``fused`` when layers run fused attention kernels (names or
    tactics mentioning MHA/FMHA/flash, or an attention layer type) and no
    Softmax is left on its own; ``not fused`` when only standalone Softmax
    layers show (attention runs as MatMul + Softmax + MatMul); ``partly
    fused`` when both do; ``unknown`` when neither shows (names only, or one
    opaque Myelin region).
    """
    by_type: dict[str, int] = {}
    by_precision: dict[str, int] = {}
    fused, softmax = [], []
    detailed = False
    rows = []
    for layer in layers:
        if isinstance(layer, str):  # LAYER_NAMES_ONLY verbosity
            name, kind, precision, tactic = layer, "?", "unknown", ""
        else:
            detailed = True
            name = str(layer.get("Name", ""))
            kind = str(layer.get("LayerType", "?"))
            precision = layer_precision(layer)
            tactic = str(layer.get("TacticName", layer.get("TacticValue", "")))
        by_type[kind] = by_type.get(kind, 0) + 1
        by_precision[precision] = by_precision.get(precision, 0) + 1
        if (_FUSED_ATTENTION.search(f"{name} {kind} {tactic}") or _ATTENTION_LAYER.search(kind)) and not (
            _SOFTMAX.search(kind)
        ):
            fused.append(name)
        elif _SOFTMAX.search(kind) or (
            _SOFTMAX.search(name) and kind != "Myelin" and not name.startswith("{ForeignNode")
        ):
            softmax.append(name)  # a Softmax kernel of its own: attention was not fused there
        rows.append({"name": name, "type": kind, "precision": precision, "tactic": tactic})
    if softmax and fused:
        verdict = "partly fused"
    elif softmax:
        verdict = "not fused"
    elif fused:
        verdict = "fused"
    else:
        verdict = "unknown"
    return {
        "count": len(rows),
        "detailed": detailed,
        "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "by_precision": dict(sorted(by_precision.items(), key=lambda kv: -kv[1])),
        "attention": {
            "verdict": verdict,
            "fused_layers": fused[:20],
            "fused_count": len(fused),
            "softmax_layers": softmax[:20],
            "softmax_count": len(softmax),
        },
        "rows": rows,
    }
