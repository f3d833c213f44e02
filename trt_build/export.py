"""ONNX export of the DiT engine's networks with the dynamo exporter.

Each export writes ``<out>/<variant>/<dtype>/model.onnx`` (plus
``model.onnx.data`` when the weights go to external data, automatically over
2 GB) and ``export.json``: the inputs with their symbolic dimensions, the axis
ranges the graph accepts, and the hashes that tie it to a model config and
its weights. Builds read ``export.json``; they never need the weights.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import pathlib
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from engines.dit.tensorrt.manifest import config_hash, weights_hash
from engines.dit.tensorrt.spec import SPEC_VERSION, ExportSpec, InputSpec, variant_name
from trt_build.progress import Steps, Timings, task

logger = logging.getLogger(__name__)

EXPORT_FILE = "export.json"
ONNX_FILE = "model.onnx"
TWO_GB = 2 * 1024**3
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class ExportError(RuntimeError):
    pass


class InputRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    dims: list[int | str]
    dtype: str


class ExportRecord(BaseModel):
    """``export.json``: what one ONNX file is and what it was made from."""

    model_config = ConfigDict(extra="forbid")
    stage: str
    variant: str
    static: dict[str, int]
    dtype: str
    inputs: list[InputRecord]
    outputs: list[str]
    axes: dict[str, tuple[int, int]]
    config_hash: str
    weights_hash: str
    spec_version: int = SPEC_VERSION
    parameters: int
    external_data: bool
    opset: int | None
    torch: str = Field(default_factory=lambda: torch.__version__)
    seconds: float
    size_bytes: int
    source: str
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))

    def onnx_path(self, folder: pathlib.Path) -> pathlib.Path:
        return folder / ONNX_FILE


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's own INFO logs (one line per rewritten initializer) only at DEBUG."""
    names = ("onnx_ir", "onnxscript", "torch.onnx", "torch._dynamo", "torch.export")
    saved = {n: logging.getLogger(n).level for n in names}
    if not logger.isEnabledFor(logging.DEBUG):
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def export_folder(root: pathlib.Path, variant: str, dtype: str) -> pathlib.Path:
    return pathlib.Path(root) / variant / dtype


def read_export(folder: pathlib.Path) -> ExportRecord:
    path = pathlib.Path(folder) / EXPORT_FILE
    if not path.is_file():
        raise ExportError(f"{folder} holds no export ({EXPORT_FILE} missing): run `avatar trt export` first")
    return ExportRecord.model_validate_json(path.read_text())


def find_exports(
    root: pathlib.Path, stages: Sequence[str] | None = None, dtype: str | None = None
) -> list[tuple[pathlib.Path, ExportRecord]]:
    """Every export under ``root`` (optionally of some stages / one dtype)."""
    found = []
    for path in sorted(pathlib.Path(root).glob(f"*/*/{EXPORT_FILE}")):
        rec = ExportRecord.model_validate_json(path.read_text())
        if path.parent.name == "fp8" and rec.dtype != "fp8":
            # an FP8-quantized copy of an export (ModelOpt), placed beside it with its export.json
            rec = rec.model_copy(update={"dtype": "fp8"})
        if (stages is None or rec.stage in stages) and (dtype is None or rec.dtype == dtype):
            found.append((path.parent, rec))
    return found


def module_weights_hash(spec: ExportSpec, cache: dict[int, str] | None = None) -> str:
    """Weights hash of the spec's module, with progress (cached per module object)."""
    key = id(spec.module)
    if cache is not None and key in cache:
        return cache[key]
    tensors = len(spec.module.state_dict())
    value = weights_hash(spec.module, Steps(f"hashing {spec.stage} weights", tensors, log=logger))
    if cache is not None:
        cache[key] = value
    return value


def _dim_text(dim: Any, spec: ExportSpec) -> int | str:
    if isinstance(dim, int):
        return dim
    coeff = ""
    if dim.den != 1 or dim.num != 1:
        coeff = f"*{dim.num}/{dim.den}" if dim.den != 1 else f"*{dim.num}"
    return f"{dim.axis}{coeff}"


def dynamic_shapes(spec: ExportSpec, static: Mapping[str, int]) -> tuple[dict[int, Any], ...]:
    """``torch.export`` dimensions for each input, in the order of the inputs."""
    from torch.export import Dim as ExportDim

    base: dict[str, Any] = {}
    for name, ax in spec.axes.items():
        if ax.static or name in static or ax.lo == ax.hi:
            continue
        m = ax.multiple_of
        base[name] = (ExportDim(name if m == 1 else f"{name}_{m}", min=-(-ax.lo // m), max=ax.hi // m), m)
    out = []
    for inp in spec.inputs:
        dims: dict[int, Any] = {}
        for i, dim in enumerate(inp.dims):
            if isinstance(dim, int) or dim.axis not in base:
                continue
            d, m = base[dim.axis]
            coeff = m * dim.num // dim.den
            if coeff * dim.den != m * dim.num:
                raise ExportError(
                    f"{spec.stage}: {inp.name} dim {i} is not an integer multiple of {dim.axis}"
                )
            dims[i] = d if coeff == 1 else coeff * d
        out.append(dims)
    return tuple(out)


def _input_record(inp: InputSpec, spec: ExportSpec) -> InputRecord:
    dtype = "fp32" if inp.float32 else DTYPE_NAMES[spec.dtype]
    return InputRecord(name=inp.name, dims=[_dim_text(d, spec) for d in inp.dims], dtype=dtype)


def export(
    spec: ExportSpec,
    root: pathlib.Path,
    *,
    static: Mapping[str, int] | None = None,
    source: str,
    weights: str | None = None,
    external_data: bool | None = None,
    opset: int | None = None,
    timings: Timings | None = None,
    force: bool = False,
) -> tuple[pathlib.Path, ExportRecord]:
    """Export one network (one value per static axis) to ONNX; skip when already exported.

    ``external_data``: ``None`` decides by size (weights over 2 GB go to
    ``model.onnx.data``, as ONNX's protobuf cannot hold them).
    """
    static = dict(static or {})
    need = sorted(a for a, ax in spec.axes.items() if ax.static)
    if sorted(static) != need:
        raise ExportError(f"{spec.stage}: give a value for each fixed axis {need}, got {sorted(static)}")
    for a, v in static.items():
        spec.axes[a].check(v, f"{spec.stage} export")
    variant = variant_name(spec.stage, sorted(static.items()))
    dtype = DTYPE_NAMES[spec.dtype]
    folder = export_folder(root, variant, dtype)
    chash = config_hash(spec.config, spec.stage, static, SPEC_VERSION)
    whash = weights or module_weights_hash(spec)
    if not force and (folder / EXPORT_FILE).is_file() and (folder / ONNX_FILE).is_file():
        old = read_export(folder)
        if old.config_hash == chash and old.weights_hash == whash and old.spec_version == SPEC_VERSION:
            logger.info(
                "%s (%s): up to date in %s (config %s, weights %s)", variant, dtype, folder, chash, whash
            )
            return folder, old
        logger.info("%s (%s): %s holds another model; exporting again", variant, dtype, folder)

    module = spec.export_module()
    params = sum(p.numel() for p in module.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = nbytes > TWO_GB * 0.9 if external_data is None else external_data
    axes = spec.trace_axes(static)
    example = spec.sample_inputs(axes, seed=0, device=str(next(module.parameters()).device))
    args = tuple(example[i.name] for i in spec.inputs)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (folder / ONNX_FILE, folder / f"{ONNX_FILE}.data", folder / EXPORT_FILE):
        stale.unlink(missing_ok=True)
    timings = timings or Timings(None)
    kind = f"export:{spec.stage}:{dtype}"
    what = f"export {variant} ({dtype}, {_count(params)} parameters)"
    start = time.monotonic()
    with (
        task(what, estimate_s=timings.estimate(kind, params), log=logger),
        torch.no_grad(),
        warnings.catch_warnings(),
        _quiet_exporter(),
    ):
        warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))
        try:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                dynamic_shapes=dynamic_shapes(spec, static),
                input_names=spec.input_names,
                output_names=list(spec.outputs),
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; say what failed and where
            raise ExportError(
                f"the dynamo exporter failed on {variant} ({dtype}): {type(exc).__name__}: {str(exc)[:2000]}"
            ) from exc
        if program is None:
            raise ExportError(f"the exporter returned no program for {variant}")
        program.save(str(folder / ONNX_FILE), external_data=external)
    seconds = time.monotonic() - start
    timings.record(kind, params, seconds)
    size = sum(p.stat().st_size for p in folder.glob(f"{ONNX_FILE}*"))
    opset_used = None
    try:
        import onnx

        model = onnx.load(str(folder / ONNX_FILE), load_external_data=False)
        opset_used = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    except Exception as exc:  # informative only
        logger.warning("could not read the opset of %s: %s", folder / ONNX_FILE, exc)
    record = ExportRecord(
        stage=spec.stage,
        variant=variant,
        static=static,
        dtype=dtype,
        inputs=[_input_record(i, spec) for i in spec.inputs],
        outputs=list(spec.outputs),
        axes={a: (ax.lo, ax.hi) for a, ax in spec.axes.items() if not ax.static},
        config_hash=chash,
        weights_hash=whash,
        parameters=params,
        external_data=external,
        opset=opset_used,
        seconds=round(seconds, 2),
        size_bytes=size,
        source=source,
    )
    (folder / EXPORT_FILE).write_text(json.dumps(record.model_dump(mode="json"), indent=2) + "\n")
    logger.info(
        "%s: wrote %s (%.1f MB%s)",
        variant,
        folder / ONNX_FILE,
        size / 1e6,
        ", external data" if external else "",
    )
    return folder, record
