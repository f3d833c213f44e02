"""From a checkpoint folder to checked ONNX graphs with ``avatar trt`` (tiny preset, CPU, onnxruntime).

One module-scoped export (blueprint, sub-clip, VAE decoder: about a minute on
two cores) serves every test; the exports are the dynamo exporter's real output.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from collections.abc import Iterator

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from engines.base import AUDIO_RATE, AudioSlice, Avatar
from engines.dit import DitEngine, load_components, random_components, save_components
from engines.dit.backend import BackendChoice
from engines.dit.conditioning import PrecomputedTextEmbeddings
from engines.storyline import default_shot
from trt_build import cli
from trt_build.check import onnxruntime_forward

STAGES = "blueprint,subclip,vae_decoder"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels crawl with two threads on a loaded two-core machine
    yield
    torch.set_num_threads(n)


def run(argv: list[str], caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = cli.main(argv)
    return rc, "\n".join(r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """A tiny checkpoint folder (audio adapter as if trained), a profile file, and its ONNX exports."""
    root = tmp_path_factory.mktemp("trt")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    components = random_components("tiny", dtype=torch.float32, device="cpu", seed=0)
    gen = torch.Generator().manual_seed(5)
    assert components.subclip.adapter is not None
    for block in components.subclip.adapter.blocks:  # non-zero output projections: audio reaches the output
        block.to_out.weight.data = torch.randn(block.to_out.weight.shape, generator=gen) * 0.3
    weights = root / "weights"
    save_components(components, weights)
    PrecomputedTextEmbeddings.save(
        weights / "prompt_embeds.safetensors", {"": torch.randn(8, 16, generator=gen)}
    )
    profiles = root / "profiles.json"
    assert (
        cli.main(
            [
                "profile",
                "--weights",
                str(weights),
                "--subclip-frames",
                "2,8",
                "--characters",
                "2",
                "--cfg",
                "--keyframes",
                "3",
                "-o",
                str(profiles),
            ]
        )
        == 0
    )
    data = json.loads(profiles.read_text())
    # keep the VAE's keyframe profile (one frame): each further frame count is another export
    data["profiles"] = [
        p for p in data["profiles"] if p["stage"] != "vae_decoder" or p["name"].endswith("keyframes")
    ]
    profiles.write_text(json.dumps(data))
    export = ["export", "--weights", str(weights), "--profiles", str(profiles), "--out", str(root / "onnx")]
    assert cli.main([*export, "--stages", "subclip,vae_decoder"]) == 0
    # the blueprint with its weights in external data, as models over 2 GB are written
    assert cli.main([*export, "--stages", "blueprint", "--external-data", "on"]) == 0
    torch.set_num_threads(n)
    yield root


def test_export_writes_graphs_with_the_declared_dynamic_axes(
    work: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    onnx_dir = work / "onnx"
    record = json.loads((onnx_dir / "subclip" / "fp32" / "export.json").read_text())
    dims = {i["name"]: i["dims"] for i in record["inputs"]}
    assert dims["hidden_states"] == ["batch", 12, "frames", "height", "width"]
    assert dims["audio_gates"] == ["batch", "chars", "frames", "height*1/2", "width*1/2"]
    assert record["outputs"] == ["sample", "mask_logits"] and not record["external_data"]
    model = onnx.load(str(onnx_dir / "subclip" / "fp32" / "model.onnx"))
    shape = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert (
        shape[0] == "batch"
        and shape[1] == 12
        and all(isinstance(d, str) for d in (shape[2], shape[3], shape[4]))
    )
    assert (onnx_dir / "vae_decoder-frames1" / "fp32" / "model.onnx").is_file()
    blueprint = json.loads((onnx_dir / "blueprint" / "fp32" / "export.json").read_text())
    assert blueprint["external_data"] and (onnx_dir / "blueprint" / "fp32" / "model.onnx.data").is_file()
    assert (onnx_dir / "profiles.json").is_file()
    # exporting again is a no-op: same config and weights
    before = (onnx_dir / "subclip" / "fp32" / "model.onnx").stat().st_mtime_ns
    rc, log = run(
        [
            "export",
            "--weights",
            str(work / "weights"),
            "--out",
            str(onnx_dir),
            "--stages",
            "subclip",
            "--profiles",
            str(work / "profiles.json"),
        ],
        caplog,
    )
    assert rc == 0 and "up to date" in log
    assert (onnx_dir / "subclip" / "fp32" / "model.onnx").stat().st_mtime_ns == before


def test_check_runs_onnxruntime_against_pytorch_at_min_opt_max(
    work: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = work / "check.json"
    rc, log = run(
        [
            "check",
            "--weights",
            str(work / "weights"),
            "--onnx",
            str(work / "onnx"),
            "--stages",
            STAGES,
            "--json",
            str(out),
        ],
        caplog,
    )
    assert rc == 0, log
    rows = json.loads(out.read_text())
    points = {(r["variant"], r["point"], r["output"]) for r in rows}
    assert {("blueprint", p, "sample") for p in ("min", "opt", "max")} <= points
    assert {("subclip", p, o) for p in ("min", "max") for o in ("sample", "mask_logits")} <= points
    assert ("vae_decoder-frames1", "opt", "video") in points
    assert all(r["ok"] and r["max_rel"] < 1e-4 for r in rows), rows
    assert "all" in log and "within tolerance" in log


def test_check_fails_when_the_graph_computes_something_else(
    work: pathlib.Path, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "onnx"
    shutil.copytree(work / "onnx" / "subclip", broken / "subclip")
    path = broken / "subclip" / "fp32" / "model.onnx"
    model = onnx.load(str(path))
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # a weight matrix
    array = numpy_helper.to_array(biggest).copy()
    array += 0.05
    biggest.CopyFrom(numpy_helper.from_array(array, biggest.name))
    onnx.save(model, str(path))
    rc, log = run(
        [
            "check",
            "--weights",
            str(work / "weights"),
            "--onnx",
            str(broken),
            "--stages",
            "subclip",
            "--profiles",
            str(work / "profiles.json"),
        ],
        caplog,
    )
    assert rc == 1 and "differ past the tolerance" in log


def test_check_refuses_graphs_of_other_weights(work: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    rc, log = run(
        [
            "check",
            "--random-weights",
            "--config",
            "tiny",
            "--onnx",
            str(work / "onnx"),
            "--stages",
            "subclip",
        ],
        caplog,
    )
    assert rc == 2 and "exported from other weights" in log


def speech(seconds: float, freq: float) -> AudioSlice:
    t = np.arange(round(seconds * AUDIO_RATE)) / AUDIO_RATE
    return AudioSlice(start=0.0, samples=(0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32))


def test_the_engine_renders_the_same_through_the_exported_graphs(work: pathlib.Path) -> None:
    """The DiT engine with blueprint and sub-clip run by onnxruntime (the path a TensorRT engine takes)."""
    components = load_components(work / "weights", dtype=torch.float32, device="cpu")
    eager = DitEngine(components)
    exported = DitEngine(components)
    choices = {
        stage: BackendChoice(
            stage, "onnxruntime", "test", onnxruntime_forward(stage, components, work / "onnx")
        )
        for stage in ("blueprint", "subclip")
    }
    exported.use_backends(choices)
    assert exported.backends == {"blueprint": "onnxruntime", "subclip": "onnxruntime"}
    rng = np.random.default_rng(0)
    avatar = Avatar("a", (rng.random((64, 64, 3)) * 255).astype(np.uint8))
    shot = default_shot(0, 1)
    results = []
    for engine in (eager, exported):
        prepared = engine.prepare(avatar)
        keys = engine.keyframes(prepared, [shot], [0.0, 0.16])
        # two characters, masks predicted by the mask head (the zero-gate probe pass runs first)
        clip = engine.subclip_multi(prepared, keys[0], keys[1], [speech(1, 180), speech(1, 320)], shot)
        results.append((keys, clip))
    (keys_a, clip_a), (keys_b, clip_b) = results
    for a, b in zip(keys_a, keys_b, strict=True):
        assert a.image is not None and b.image is not None
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1
    assert len(clip_a.frames) == len(clip_b.frames) == 5
    for fa, fb in zip(clip_a.frames, clip_b.frames, strict=True):
        assert np.abs(fa.astype(int) - fb.astype(int)).max() <= 1
    assert clip_a.masks is not None and clip_b.masks is not None
    np.testing.assert_allclose(clip_a.masks, clip_b.masks, atol=1e-4)


def test_bench_measures_each_profile_point_on_cpu(
    work: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = work / "bench.json"
    rc = cli.main(
        [
            "bench",
            "--weights",
            str(work / "weights"),
            "--onnx",
            str(work / "onnx"),
            "--stages",
            "subclip",
            "--backends",
            "eager,onnxruntime",
            "--iters",
            "2",
            "--warmup",
            "0",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["backend"], r["point"]) for r in rows} == {
        (b, p) for b in ("eager", "onnxruntime") for p in ("min", "max")
    }
    assert all(r["median_ms"] > 0 and r["iters"] == 2 and r["items_per_s"] > 0 for r in rows)
    assert [r["batch"] for r in rows if r["point"] == "max"] == [2, 2]  # CFG doubles the batch
    assert "| subclip | 64x64-n2-8 | max | onnxruntime | no | 2 |" in capsys.readouterr().out
