"""TensorRT builds, inspection, benchmarks and serving on a GPU (tiny preset).

Runs only where TensorRT and a CUDA GPU are present (NVIDIA's index or
container); elsewhere every test here is skipped with the reason.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

pytest.importorskip(
    "tensorrt", reason="TensorRT is not installed (it is not on PyPI alone: NVIDIA's index or container)"
)
pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU"),
]

from engines.base import AUDIO_RATE, AudioSlice, Avatar  # noqa: E402
from engines.dit import build_dit_engine, random_components, save_components  # noqa: E402
from engines.dit.conditioning import PrecomputedTextEmbeddings  # noqa: E402
from engines.dit.tensorrt.manifest import Manifest  # noqa: E402
from engines.dit.tensorrt.spec import load_profiles, stage_spec  # noqa: E402
from engines.storyline import default_shot  # noqa: E402
from trt_build import cli  # noqa: E402
from trt_build.engine import TrtEngine  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    root = tmp_path_factory.mktemp("trt-gpu")
    components = random_components("tiny", dtype=torch.float32, device="cpu", seed=0)
    gen = torch.Generator().manual_seed(5)
    assert components.subclip.adapter is not None
    for block in components.subclip.adapter.blocks:
        block.to_out.weight.data = torch.randn(block.to_out.weight.shape, generator=gen) * 0.3
    save_components(components, root / "weights")
    PrecomputedTextEmbeddings.save(
        root / "weights" / "prompt_embeds.safetensors", {"": torch.randn(8, 16, generator=gen)}
    )
    w = str(root / "weights")
    assert (
        cli.main(["profile", "--weights", w, "--subclip-frames", "2", "-o", str(root / "profiles.json")]) == 0
    )
    assert (
        cli.main(
            [
                "export",
                "--weights",
                w,
                "--out",
                str(root / "onnx"),
                "--profiles",
                str(root / "profiles.json"),
                "--stages",
                "blueprint,subclip,vae_decoder",
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "build",
                "--onnx",
                str(root / "onnx"),
                "--engines",
                str(root / "engines"),
                "--precision",
                "fp32",
                "--stages",
                "blueprint,subclip,vae_decoder",
            ]
        )
        == 0
    )
    yield root


def test_builds_are_recorded_and_idempotent(built: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = Manifest.load(built / "engines", missing_ok=False)
    stages = {e.stage for e in manifest.entries.values()}
    assert stages == {"blueprint", "subclip", "vae_decoder"}
    assert (built / "engines" / "timing.cache").is_file()
    mtimes = {k: manifest.engine_path(e).stat().st_mtime_ns for k, e in manifest.entries.items()}
    with caplog.at_level(logging.INFO):
        assert (
            cli.main(
                [
                    "build",
                    "--onnx",
                    str(built / "onnx"),
                    "--engines",
                    str(built / "engines"),
                    "--precision",
                    "fp32",
                    "--stages",
                    "blueprint,subclip,vae_decoder",
                ]
            )
            == 0
        )
    assert "0 to build" in caplog.text
    again = Manifest.load(built / "engines")
    assert {k: again.engine_path(e).stat().st_mtime_ns for k, e in again.entries.items()} == mtimes


def test_engine_outputs_match_pytorch(built: pathlib.Path) -> None:
    from engines.dit import load_components

    components = load_components(built / "weights", dtype=torch.float32, device="cuda")
    manifest = Manifest.load(built / "engines")
    (entry,) = [e for e in manifest.entries.values() if e.stage == "subclip"]
    spec = stage_spec("subclip", components)
    (profile,) = [p for p in load_profiles(built / "profiles.json") if p.stage == "subclip"]
    feed = spec.sample_inputs(profile.point("max"), seed=3, device="cuda")
    with torch.no_grad():
        ref = spec.export_module()(*(feed[n] for n in spec.input_names))
    engine = TrtEngine(manifest.engine_path(entry)).load()
    for graph in (False, True):
        out = engine.infer(feed, cuda_graph=graph)
        for name, r in zip(spec.outputs, ref, strict=True):
            rel = float((out[name].float() - r.float()).abs().max() / r.float().abs().max())
            assert rel < 1e-2, (name, graph, rel)  # fp32 engine (TF32 matmuls allowed)


def test_inspect_reports_layers_precision_and_attention(built: pathlib.Path) -> None:
    out = built / "inspect.json"
    assert (
        cli.main(["inspect", "--engines", str(built / "engines"), "--stages", "subclip", "--json", str(out)])
        == 0
    )
    (report,) = json.loads(out.read_text())
    layers = report["engine"]["layers"]
    assert layers["count"] > 0 and layers["detailed"]
    assert sum(layers["by_precision"].values()) == layers["count"]
    assert layers["attention"]["verdict"] in ("fused", "not fused", "unknown")
    assert report["engine"]["inputs"]["hidden_states"]["profile"]


def test_bench_times_each_engine_with_and_without_cuda_graphs(built: pathlib.Path) -> None:
    out = built / "bench.json"
    assert (
        cli.main(
            [
                "bench",
                "--engines",
                str(built / "engines"),
                "--stages",
                "subclip",
                "--iters",
                "3",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert {r["cuda_graph"] for r in rows} == {False, True}
    assert all(r["backend"] == "tensorrt" and r["median_ms"] > 0 for r in rows)


def test_the_server_engine_picks_the_engines_up(built: pathlib.Path) -> None:
    engine = build_dit_engine(built / "weights", dtype="fp32", device="cuda", trt_engines=built / "engines")
    assert engine.backends["subclip"] == "tensorrt" and engine.backends["blueprint"] == "tensorrt"
    eager = build_dit_engine(built / "weights", dtype="fp32", device="cuda", backend="eager")
    rng = np.random.default_rng(0)
    avatar = Avatar("a", (rng.random((64, 64, 3)) * 255).astype(np.uint8))
    t = np.arange(AUDIO_RATE) / AUDIO_RATE
    audio = AudioSlice(0.0, (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
    shot = default_shot(0, 1)
    frames = []
    for e in (engine, eager):
        prepared = e.prepare(avatar)
        keys = e.keyframes(prepared, [shot], [0.0, 0.08])
        frames.append(e.subclip(prepared, keys[0], keys[1], [audio], [shot]))
    for a, b in zip(*frames, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 8
