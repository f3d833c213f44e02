"""One generic TensorRT engine class: build, load, allocate, infer, inspect.

Written against the TensorRT 10 Python API (``tensorrt``), imported lazily:
this module imports on any machine, and every entry point that needs
TensorRT or a GPU raises :class:`TensorRTUnavailable` with what to do.
Buffers are torch tensors on the current CUDA device; inference is enqueued
on a torch CUDA stream, optionally replayed from a CUDA graph captured per
input shape.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from trt_build.progress import fmt_seconds, task

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "fp8")
NVIDIA_INSTALL = (
    "install TensorRT from NVIDIA's index (`pip install tensorrt-cu12 --extra-index-url "
    "https://pypi.nvidia.com`, or the TensorRT container); the PyPI `tensorrt` package alone is a stub"
)


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing: the message says which and what to do."""


class BuildError(RuntimeError):
    pass


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT is not installed ({exc}): {NVIDIA_INSTALL}") from None
    if not hasattr(trt, "Builder"):
        raise TensorRTUnavailable(
            f"the installed `tensorrt` package has no Builder (a stub?): {NVIDIA_INSTALL}"
        )
    return trt


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or ``None`` (no exception) where it is absent."""
    try:
        return str(import_tensorrt().__version__)
    except TensorRTUnavailable:
        return None


def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False): TensorRT engines are "
            "built and run on the GPU they serve; run this on that machine"
        )


def _logger_class(trt: ModuleType) -> Any:
    class _Logger(trt.ILogger):  # type: ignore[name-defined,misc]
        """TensorRT's messages into Python logging (its INFO is chatty: logged at DEBUG)."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            sev = trt.ILogger.Severity
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                logger.error("TensorRT: %s", msg)
            elif severity == sev.WARNING:
                logger.warning("TensorRT: %s", msg)
            else:
                logger.debug("TensorRT: %s", msg)

    return _Logger()


_TRT_LOGGER: Any = None


def trt_logger() -> Any:
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        _TRT_LOGGER = _logger_class(import_tensorrt())
    return _TRT_LOGGER


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


def _torch_dtype(trt: ModuleType, dtype: Any) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
        trt.DataType.UINT8: torch.uint8,
    }
    try:
        return table[dtype]
    except KeyError:
        raise BuildError(f"engine I/O of TensorRT type {dtype} has no torch equivalent") from None


@dataclass
class TrtEngine:
    """A serialised engine file: build it, load it, run it, describe it."""

    path: pathlib.Path
    engine: Any = None
    context: Any = None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    _buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    _shapes: tuple[tuple[int, ...], ...] | None = None
    _graphs: dict[tuple[tuple[int, ...], ...], tuple[Any, dict[str, torch.Tensor]]] = field(
        default_factory=dict
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ build
    def build(
        self, onnx_path: pathlib.Path, shapes: Mapping[str, Sequence[Sequence[int]]], options: BuildOptions
    ) -> float:
        """Build from ``onnx_path`` with one optimisation profile; returns the build seconds."""
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
        monitor = _progress_monitor(trt, f"build {self.path.name}")
        config.progress_monitor = monitor
        start = time.monotonic()
        with task(f"TensorRT build of {self.path.name}", detail=monitor.status, log=logger, every=30.0):
            serialized = builder.build_serialized_network(network, config)
        seconds = time.monotonic() - start
        if serialized is None:
            raise BuildError(
                f"TensorRT could not build {onnx_path} (see its errors above). Common causes: not enough GPU "
                "memory for the max shapes (lower them or --workspace-mb), an op TensorRT does not support "
                "in this precision, or a profile outside what the graph allows"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".partial")
        with open(tmp, "wb") as f:
            f.write(memoryview(serialized))
        tmp.replace(self.path)
        if options.timing_cache is not None:
            options.timing_cache.parent.mkdir(parents=True, exist_ok=True)
            options.timing_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
        return seconds

    # ------------------------------------------------------------------ load / run
    def load(self) -> TrtEngine:
        if self.engine is not None:
            return self
        trt = import_tensorrt()
        require_gpu()
        if not self.path.is_file():
            raise FileNotFoundError(f"engine file {self.path} is missing: rebuild with `avatar trt build`")
        runtime = trt.Runtime(trt_logger())
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise BuildError(
                f"TensorRT could not load {self.path} (see its errors above): an engine only loads with the "
                "TensorRT version and GPU model that built it; rebuild it here"
            )
        self.engine = engine
        self.context = engine.create_execution_context()
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            (self.inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(
                name
            )
            self.dtypes[name] = _torch_dtype(trt, engine.get_tensor_dtype(name))
        return self

    def profile_shapes(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        self.load()
        return {
            n: tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(n, 0))
            for n in self.inputs
        }

    def _set_shapes(self, shapes: Mapping[str, Sequence[int]]) -> None:
        key = tuple(tuple(shapes[n]) for n in self.inputs)
        if key == self._shapes:
            return
        for name in self.inputs:
            if not self.context.set_input_shape(name, tuple(shapes[name])):
                raise ValueError(
                    f"{self.path.name}: shape {tuple(shapes[name])} of {name} is outside its profile"
                )
        device = torch.device("cuda", torch.cuda.current_device())
        self._buffers = {}
        for name in [*self.inputs, *self.outputs]:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            self._buffers[name] = torch.empty(shape, dtype=self.dtypes[name], device=device)
            self.context.set_tensor_address(name, self._buffers[name].data_ptr())
        self._shapes = key

    def infer(
        self,
        feed: Mapping[str, torch.Tensor],
        *,
        cuda_graph: bool = False,
        stream: torch.cuda.Stream | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run once; returns fresh output tensors (the engine's buffers are reused)."""
        self.load()
        missing = [n for n in self.inputs if n not in feed]
        if missing:
            raise ValueError(f"{self.path.name}: missing inputs {missing}")
        with self._lock:  # one execution context: calls from several threads take turns
            stream = stream or torch.cuda.current_stream()
            shapes = {n: tuple(feed[n].shape) for n in self.inputs}
            if cuda_graph:
                return self._infer_graph(feed, shapes, stream)
            self._set_shapes(shapes)
            for name in self.inputs:
                self._buffers[name].copy_(feed[name])
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT inference of {self.path.name} failed (see its errors above)")
            return {n: self._buffers[n].clone() for n in self.outputs}

    def _infer_graph(
        self, feed: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]], stream: torch.cuda.Stream
    ) -> dict[str, torch.Tensor]:
        key = tuple(tuple(shapes[n]) for n in self.inputs)
        entry = self._graphs.get(key)
        if entry is None:
            # dedicated buffers per shape: a captured graph keeps the addresses it was captured with
            self._shapes = None
            self._set_shapes(shapes)
            buffers = dict(self._buffers)
            for name in self.inputs:
                buffers[name].copy_(feed[name])
            side = torch.cuda.Stream()
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                # one plain run first: TensorRT finishes shape-dependent setup outside the capture
                if not self.context.execute_async_v3(side.cuda_stream):
                    raise RuntimeError(f"TensorRT inference of {self.path.name} failed")
                side.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):
                    self.context.execute_async_v3(side.cuda_stream)
            stream.wait_stream(side)
            self._graphs[key] = entry = (graph, buffers)
            self._shapes = None  # the next plain call re-binds its own buffers
        graph, buffers = entry
        with torch.cuda.stream(stream):
            for name in self.inputs:
                buffers[name].copy_(feed[name])
            graph.replay()
            return {n: buffers[n].clone() for n in self.outputs}

    # ------------------------------------------------------------------ inspect
    def describe(self, shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
        """Inputs, profile, layers (type, precision), attention fusion, memory; see summarise_layers."""
        trt = import_tensorrt()
        self.load()
        profile = self.profile_shapes()
        opt = shapes or {n: s[1] for n, s in profile.items()}
        self._shapes = None
        self._set_shapes(opt)
        inspector = self.engine.create_engine_inspector()
        if hasattr(inspector, "execution_context"):
            inspector.execution_context = self.context
        else:  # TensorRT < 10.?: the attribute was called context
            inspector.context = self.context
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        layers = info.get("Layers", []) if isinstance(info, dict) else []
        memory: Any = getattr(self.engine, "device_memory_size_v2", None)
        if memory is None:
            memory = getattr(self.engine, "device_memory_size", 0)
        return {
            "file": str(self.path),
            "size_bytes": self.path.stat().st_size,
            "tensorrt": str(trt.__version__),
            "inputs": {
                n: {"dtype": str(self.dtypes[n]).replace("torch.", ""), "profile": profile[n]}
                for n in self.inputs
            },
            "outputs": {n: {"dtype": str(self.dtypes[n]).replace("torch.", "")} for n in self.outputs},
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
