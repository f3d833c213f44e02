"""A serialised TensorRT engine at serve time: load, allocate, infer.

Written against the TensorRT 10 Python API (``tensorrt``), imported lazily:
this module imports on any machine, and every entry point that needs
TensorRT or a GPU raises :class:`TensorRTUnavailable` with what to do.
Buffers are torch tensors on the current CUDA device; inference is enqueued
on a torch CUDA stream, optionally replayed from a CUDA graph captured per
input shape. Building and inspecting engines is ``trt_build``'s
(``trt_build.engine``), which uses this class to load what it built.
"""

from __future__ import annotations

import logging
import pathlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from engines.shared import SharedModel

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "fp8")
NVIDIA_INSTALL = (
    "install TensorRT from NVIDIA's index (`pip install tensorrt-cu12 --extra-index-url "
    "https://pypi.nvidia.com`, or the TensorRT container); the PyPI `tensorrt` package alone is a stub"
)


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing: the message says which and what to do."""


class EngineLoadError(RuntimeError):
    """An engine file that TensorRT cannot deserialise here (other TensorRT version or GPU)."""


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


_TRT_LOGGER = SharedModel("TensorRT logger", lambda: _logger_class(import_tensorrt()))


def trt_logger() -> Any:
    return _TRT_LOGGER.get()


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
        raise EngineLoadError(f"engine I/O of TensorRT type {dtype} has no torch equivalent") from None


@dataclass
class TrtEngine:
    """A serialised engine file: load it and run it."""

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
            raise EngineLoadError(
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

    def bind_shapes(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Allocate fresh buffers for these input shapes (what an inspector reads)."""
        self.load()
        with self._lock:
            self._shapes = None
            self._set_shapes(shapes)

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
