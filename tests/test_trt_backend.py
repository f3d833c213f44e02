"""The DiT engine's backend per stage: TensorRT from the manifest, else torch.compile, else eager.

TensorRT cannot run here, so engines in these manifests are placeholder bytes
and the target machine (GPU model, TensorRT version) is given as data. What is
tested is the real selection code: which entries are refused and why, what
the engine falls back to, and what it logs.
"""

from __future__ import annotations

import logging
import pathlib

import pytest
import torch

from engines.dit import build_dit_engine, random_components
from engines.dit.backend import select_backends
from engines.dit.loading import DitComponents
from engines.dit.tensorrt.manifest import BuildSettings, EngineEntry, Manifest, Target, config_hash
from engines.dit.tensorrt.spec import SPEC_VERSION, stage_spec
from trt_build.export import module_weights_hash

H200 = Target("NVIDIA H200", (9, 0), "10.9.0.34")
L40S = Target("NVIDIA L40S", (8, 9), "10.9.0.34")


@pytest.fixture(scope="module")
def tiny() -> DitComponents:
    return random_components("tiny", dtype=torch.float32, device="cpu")


def add_engine(
    folder: pathlib.Path, components: DitComponents, stage: str, target: Target, weights: str | None = None
) -> EngineEntry:
    spec = stage_spec(stage, components)
    entry = EngineEntry(
        key=f"{stage}-{target.sm}-{weights or 'w'}",
        stage=stage,
        variant=stage,
        profile="64x64",
        file=f"{stage}-{target.sm}.plan",
        axes={"batch": (1, 1, 2)},
        shapes={},
        inputs=spec.input_names,
        outputs=list(spec.outputs),
        onnx_dtype="fp32",
        config_hash=config_hash(spec.config, stage, {}, SPEC_VERSION),
        weights_hash=weights or module_weights_hash(spec),
        gpu=target.gpu,
        compute_capability=target.compute_capability,
        tensorrt=target.tensorrt,
        build=BuildSettings(precision="fp32", strongly_typed=True, optimization_level=3, workspace_mb=None),
        size_bytes=4,
    )
    (folder / entry.file).write_bytes(b"plan")  # placeholder: no engine can be built here
    manifest = Manifest.load(folder)
    manifest.add(entry)
    manifest.save()
    return entry


def test_without_engines_the_cpu_runs_eager_and_says_why(
    tiny: DitComponents, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="engines.dit.backend"):
        choices = select_backends(tiny, device="cpu")
    assert {s: c.backend for s, c in choices.items()} == {
        "blueprint": "eager",
        "subclip": "eager",
        "sr": "eager",
        "vae_decoder": "eager",
    }
    assert "no TensorRT engine folder given (--trt-engines)" in choices["subclip"].reason
    assert "torch.compile: off on CPU" in choices["subclip"].reason
    assert "dit subclip: eager backend" in caplog.text
    compiled = select_backends(tiny, backend="compile", device="cpu")
    assert compiled["subclip"].backend == "torch.compile"  # compiles lazily, on the first call
    on_gpu = select_backends(tiny, device="cuda")  # the choice only; nothing runs
    assert (
        on_gpu["blueprint"].backend == "torch.compile"
        and "TensorRT: no TensorRT" in on_gpu["blueprint"].reason
    )


def test_an_engine_folder_without_manifest_falls_back(tiny: DitComponents, tmp_path: pathlib.Path) -> None:
    choices = select_backends(tiny, engines_dir=tmp_path, device="cpu", target=H200)
    assert choices["subclip"].backend == "eager"
    assert "has no manifest.json" in choices["subclip"].reason


def test_engines_for_another_gpu_or_tensorrt_version_are_refused(
    tiny: DitComponents, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_engine(tmp_path, tiny, "subclip", L40S)
    with caplog.at_level(logging.INFO, logger="engines.dit.backend"):
        choices = select_backends(tiny, engines_dir=tmp_path, device="cpu", target=H200)
    sub = choices["subclip"]
    assert sub.backend == "eager"
    assert "built for NVIDIA L40S (sm_89), this GPU is NVIDIA H200 (sm_90)" in sub.reason
    assert "built for NVIDIA L40S" in caplog.text
    assert "no blueprint engine" in choices["blueprint"].reason
    newer = Target("NVIDIA L40S", (8, 9), "10.13.0.35")
    choices = select_backends(tiny, engines_dir=tmp_path, device="cpu", target=newer)
    assert "built with TensorRT 10.9.0.34, this machine has TensorRT 10.13.0.35" in choices["subclip"].reason
    with pytest.raises(ValueError, match="no usable TensorRT engine for blueprint"):
        select_backends(tiny, backend="tensorrt", engines_dir=tmp_path, device="cpu", target=H200)


def test_engines_of_other_weights_are_refused(tiny: DitComponents, tmp_path: pathlib.Path) -> None:
    add_engine(tmp_path, tiny, "blueprint", H200, weights="0123456789abcdef")
    choices = select_backends(tiny, engines_dir=tmp_path, device="cpu", target=H200)
    assert "built from other weights (0123456789abcdef" in choices["blueprint"].reason
    assert choices["blueprint"].backend == "eager"


def test_a_matching_engine_is_loaded_and_a_failed_load_falls_back(
    tiny: DitComponents, tmp_path: pathlib.Path
) -> None:
    # the entry fits this (stated) machine and model, so the engine is loaded: here that fails, since
    # TensorRT is absent (or the placeholder is no engine), and the stage falls back with the reason
    add_engine(tmp_path, tiny, "subclip", H200)
    choices = select_backends(tiny, engines_dir=tmp_path, device="cpu", target=H200)
    reason = choices["subclip"].reason
    assert choices["subclip"].backend == "eager"
    assert "failed to load" in reason
    assert "TensorRT is not installed" in reason or "could not load" in reason


def test_the_engine_reports_its_backends(tmp_path: pathlib.Path) -> None:
    engine = build_dit_engine(None, random_weights=True, dtype="fp32", config="tiny", trt_engines=tmp_path)
    assert engine.backends == {
        "blueprint": "eager",
        "subclip": "eager",
        "sr": "eager",
        "vae_decoder": "eager",
    }
    assert engine.codec.decoder is None
    with pytest.raises(ValueError, match="--dit-backend 'fast'"):
        build_dit_engine(None, random_weights=True, dtype="fp32", config="tiny", backend="fast")
