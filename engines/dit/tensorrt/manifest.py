"""The engine store: keys, the manifest, and which engine may run on this machine.

A TensorRT engine only runs on the GPU model and TensorRT version it was
built with, and only computes the right thing for the model config, weights
and shapes it was built from. Every built engine is stored under a key of all
of these (:func:`engine_key`) and described by an :class:`EngineEntry` in
``manifest.json`` beside it. :meth:`Manifest.select` picks the entries that
fit a stage on a :class:`Target` and says, for every entry it refuses, why.

Nothing here imports TensorRT: this is plain bookkeeping, tested on any machine.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import pathlib
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """A manifest or engine store that cannot be used."""


# --------------------------------------------------------------------------- hashes
def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: Mapping[str, Any], stage: str, static: Mapping[str, int], spec_version: int) -> str:
    """What the network computes, shape-wise: its model configs, stage, fixed axes and export spec."""
    payload = {"stage": stage, "config": config, "static": dict(static), "spec": spec_version}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def weights_hash(module: torch.nn.Module, progress: Any = None) -> str:
    """SHA-256 over the module's state (names, shapes, values rounded to bf16).

    Rounding to bf16 makes the hash independent of the dtype the weights were
    loaded in (a bf16 server and an fp32 export of one checkpoint agree).
    ``progress`` is optional: anything with ``step()`` (``trt_build.progress.Steps`` logs them).
    """
    h = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name]
        h.update(name.encode())
        h.update(repr(tuple(tensor.shape)).encode())
        if tensor.is_floating_point():
            tensor = tensor.to(torch.bfloat16)
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        h.update(memoryview(data.numpy()))
        if progress is not None:
            progress.step()
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- the machine
@dataclass(frozen=True, slots=True)
class Target:
    """What an engine is tied to: the GPU model, its compute capability, the TensorRT version."""

    gpu: str
    compute_capability: tuple[int, int]
    tensorrt: str

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    def describe(self) -> str:
        return f"{self.gpu} ({self.sm}) with TensorRT {self.tensorrt}"


def cuda_device() -> tuple[str, tuple[int, int]] | None:
    """This machine's first CUDA GPU: (name, compute capability), or ``None``."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), (int(major), int(minor))


def current_target(tensorrt_version: str) -> Target | None:
    device = cuda_device()
    if device is None:
        return None
    return Target(gpu=device[0], compute_capability=device[1], tensorrt=tensorrt_version)


# --------------------------------------------------------------------------- entries
class BuildSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    precision: str
    strongly_typed: bool
    optimization_level: int
    workspace_mb: int | None
    timing_cache: str | None = None
    seconds: float | None = None


class EngineEntry(BaseModel):
    """One built engine, as ``manifest.json`` describes it."""

    model_config = ConfigDict(extra="forbid")
    key: str
    stage: str
    variant: str
    profile: str
    file: str
    axes: dict[str, tuple[int, int, int]]
    shapes: dict[str, list[list[int]]]
    inputs: list[str]
    outputs: list[str]
    onnx_dtype: str
    config_hash: str
    weights_hash: str
    gpu: str
    compute_capability: tuple[int, int]
    tensorrt: str
    build: BuildSettings
    size_bytes: int = 0
    sha256: str = ""
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    source: str = ""

    @property
    def target(self) -> Target:
        return Target(self.gpu, self.compute_capability, self.tensorrt)

    def contains(self, axes: Mapping[str, int]) -> bool:
        return all(a in axes and lo <= axes[a] <= hi for a, (lo, _, hi) in self.axes.items())


def engine_key(
    *,
    stage: str,
    variant: str,
    config_hash: str,
    weights_hash: str,
    axes: Mapping[str, Sequence[int]],
    precision: str,
    strongly_typed: bool,
    onnx_dtype: str,
    target: Target,
) -> str:
    """The store key: everything that makes an engine invalid when it changes."""
    payload = {
        "stage": stage,
        "variant": variant,
        "config": config_hash,
        "weights": weights_hash,
        "axes": {a: list(v) for a, v in sorted(axes.items())},
        "precision": precision,
        "strongly_typed": strongly_typed,
        "onnx_dtype": onnx_dtype,
        "gpu": target.gpu,
        "cc": list(target.compute_capability),
        "tensorrt": target.tensorrt,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:20]


def file_sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- the manifest
@dataclass(slots=True)
class Refusal:
    entry: EngineEntry
    reason: str


@dataclass(slots=True)
class Selection:
    """Entries that fit, and why each other entry of the stage does not."""

    usable: list[EngineEntry]
    refused: list[Refusal]

    def explain(self) -> str:
        if not self.refused:
            return "no engine for this stage in the manifest"
        return "; ".join(f"engine {r.entry.key} ({r.entry.profile}): {r.reason}" for r in self.refused)


class Manifest:
    """``manifest.json`` of an engine folder: entries by key, written atomically."""

    def __init__(self, folder: pathlib.Path, entries: Iterable[EngineEntry] = ()) -> None:
        self.folder = pathlib.Path(folder)
        self.entries: dict[str, EngineEntry] = {e.key: e for e in entries}

    @property
    def path(self) -> pathlib.Path:
        return self.folder / MANIFEST

    @classmethod
    def load(cls, folder: pathlib.Path, *, missing_ok: bool = True) -> Manifest:
        folder = pathlib.Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            if missing_ok:
                return cls(folder)
            raise ManifestError(
                f"{folder} has no {MANIFEST}: build engines into it with "
                f"`avatar trt build --engines {folder}`"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path} is not valid JSON ({exc}); rebuild or restore it") from None
        if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
            raise ManifestError(
                f"{path} has manifest version {data.get('version') if isinstance(data, dict) else None!r}; "
                f"this release reads version {MANIFEST_VERSION}: rebuild the engines"
            )
        try:
            entries = [EngineEntry.model_validate(e) for e in data.get("engines", [])]
        except ValueError as exc:
            raise ManifestError(f"{path} has a malformed entry: {exc}") from None
        return cls(folder, entries)

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {
            "version": MANIFEST_VERSION,
            "engines": [e.model_dump(mode="json") for e in sorted(self.entries.values(), key=_order)],
        }
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".manifest-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, self.path)

    def add(self, entry: EngineEntry) -> None:
        self.entries[entry.key] = entry

    def engine_path(self, entry: EngineEntry) -> pathlib.Path:
        return self.folder / entry.file

    def is_built(self, key: str) -> bool:
        """An entry with this key whose engine file is present and unchanged (size; sha256 if cheap)."""
        entry = self.entries.get(key)
        if entry is None:
            return False
        path = self.engine_path(entry)
        return path.is_file() and path.stat().st_size == entry.size_bytes

    def select(
        self,
        stage: str,
        target: Target | None,
        *,
        config_hash: str | None = None,
        weights_hash: str | None = None,
    ) -> Selection:
        """Entries of ``stage`` that run here and match the model; reasons for the rest.

        ``config_hash``/``weights_hash`` of ``None`` are not checked (the caller
        checks them later, e.g. to avoid hashing weights when nothing else fits).
        """
        usable: list[EngineEntry] = []
        refused: list[Refusal] = []
        for entry in sorted(self.entries.values(), key=_order):
            if entry.stage != stage:
                continue
            reason = refusal_reason(entry, target, config_hash, weights_hash)
            if reason is None and not self.engine_path(entry).is_file():
                reason = f"its file {self.engine_path(entry)} is missing: rebuild with `avatar trt build`"
            if reason is None:
                usable.append(entry)
            else:
                refused.append(Refusal(entry, reason))
        return Selection(usable, refused)


def refusal_reason(
    entry: EngineEntry, target: Target | None, config_hash: str | None, weights_hash: str | None
) -> str | None:
    """Why ``entry`` cannot run on ``target`` for this model, or ``None`` when it can."""
    rebuild = "rebuild it here with `avatar trt build`"
    if target is None:
        return "no CUDA GPU on this machine"
    if entry.compute_capability != target.compute_capability or entry.gpu != target.gpu:
        return (
            f"built for {entry.gpu} (sm_{entry.compute_capability[0]}{entry.compute_capability[1]}), "
            f"this GPU is {target.gpu} ({target.sm}): TensorRT engines do not move between GPU models; "
            f"{rebuild}"
        )
    if entry.tensorrt != target.tensorrt:
        return (
            f"built with TensorRT {entry.tensorrt}, this machine has TensorRT {target.tensorrt}: "
            f"engines only load in the TensorRT version that built them; {rebuild}"
        )
    if config_hash is not None and entry.config_hash != config_hash:
        return (
            f"built for another model config ({entry.config_hash}, loaded model {config_hash}): "
            f"export and build again for these weights"
        )
    if weights_hash is not None and entry.weights_hash != weights_hash:
        return (
            f"built from other weights ({entry.weights_hash}, loaded weights {weights_hash}): "
            f"export and build again for these weights"
        )
    return None


def _order(entry: EngineEntry) -> tuple[str, str, str]:
    return (entry.stage, entry.variant, entry.profile)
