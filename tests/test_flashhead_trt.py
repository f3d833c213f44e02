"""``avatar trt`` for SoulX-FlashHead: export and onnxruntime check of its networks at a tiny size (CPU).

One module-scoped export of a random checkpoint in the published layout
(two DiT layers, a narrow Wan VAE, 64x64): the DiT at a chunk's fixed shapes
(33 frames of audio windows, 9 latent frames, 32 audio tokens per latent
frame made inside the graph), the VAE encoder at the 5 motion frames and the
decoder at 2 latent frames (every unrolled frame of the VAE's causal loop
costs export time; serving exports 33 and 9, the same graph repeated).
TensorRT cannot run here: what is tested of serving is the selection (which
engines are refused and why) and the serve-time mapping of a chunk's calls
to a network's named inputs, with the exported graph run by onnxruntime in
place of a TensorRT engine.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from engines.base import AudioSlice, Avatar
from engines.dit.flashhead import ChunkSettings, FlashHead
from engines.dit.flashhead.backend import BackendVAE, TrtNetwork, networks_of, select_flashhead_backends
from engines.dit.flashhead.engine import FlashHeadEngine
from engines.dit.flashhead.sampler import sampling_timesteps
from engines.dit.tensorrt.flashhead import FlashHeadDitExport, flashhead_stage_spec
from engines.dit.tensorrt.manifest import BuildSettings, EngineEntry, Manifest, Target, config_hash
from engines.dit.tensorrt.spec import SPEC_VERSION, load_profiles
from engines.storyline import default_shot
from tests.flashhead_layout import tone, write_published_layout
from tests.helpers import astronaut
from trt_build import cli
from trt_build.build import plan_builds
from trt_build.check import session
from trt_build.export import find_exports, module_weights_hash

H200 = Target("NVIDIA H200", (9, 0), "10.9.0.34")
L40S = Target("NVIDIA L40S", (8, 9), "10.9.0.34")
DIT = "flashhead_dit-frames9-height8-video_frames33-width8"
ENCODER = "flashhead_vae_encoder-height8-video_frames5-width8"
DECODER = "flashhead_vae_decoder-frames2-height8-width8"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(argv: list[str], caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = cli.main(argv)
    return rc, "\n".join(r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """The published layout, a profile file at 64x64 (tiny VAE shapes) and the fp32 exports."""
    root = tmp_path_factory.mktemp("fhtrt")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    weights = write_published_layout(root)
    profiles = root / "profiles.json"
    model = ["--engine", "flashhead", "--weights", str(weights)]
    assert cli.main(["profile", *model, "--sizes", "64x64", "-o", str(profiles)]) == 0
    data = json.loads(profiles.read_text())
    for p in data["profiles"]:  # the VAE at shorter clips than a chunk's: the same graph, fewer frames
        if p["stage"] == "flashhead_vae_decoder":
            p["axes"]["frames"], p["name"] = [2, 2, 2], "64x64-f2"
    data["profiles"] = [p for p in data["profiles"] if not p["name"].endswith("-reference")]
    profiles.write_text(json.dumps(data))
    assert cli.main(["export", *model, "--profiles", str(profiles), "--out", str(root / "onnx")]) == 0
    torch.set_num_threads(n)
    yield root


@pytest.fixture(scope="module")
def fh(work: pathlib.Path) -> FlashHead:
    return FlashHead.from_pretrained(
        work / "SoulX-FlashHead-1_3B", wav2vec=work / "wav2vec2-base-960h", device="cpu",
        dtype=torch.float32, settings=ChunkSettings(height=64, width=64),
    )  # fmt: skip


def test_serving_profiles_are_a_chunks_fixed_shapes(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "p.json"
    assert cli.main(["profile", "--engine", "flashhead", "--random-weights", "-o", str(out)]) == 0
    got = {(p.stage, p.name): p.point("opt") for p in load_profiles(out)}
    assert got == {
        ("flashhead_dit", "512x512"): {"frames": 9, "video_frames": 33, "height": 64, "width": 64},
        ("flashhead_vae_encoder", "512x512-reference"): {"video_frames": 33, "height": 64, "width": 64},
        ("flashhead_vae_encoder", "512x512-motion"): {"video_frames": 5, "height": 64, "width": 64},
        ("flashhead_vae_decoder", "512x512-chunk"): {"frames": 9, "height": 64, "width": 64},
    }
    lite = tmp_path / "lite.json"
    assert (
        cli.main(["profile", "--engine", "flashhead", "--model", "lite", "--random-weights", "-o", str(lite)])
        == 0
    )
    assert [(p.stage, p.point("opt")) for p in load_profiles(lite)] == [
        ("flashhead_dit", {"frames": 5, "video_frames": 33, "height": 16, "width": 16})
    ]


def test_export_writes_fixed_shape_graphs_without_float64(work: pathlib.Path) -> None:
    found = {rec.variant: (folder, rec) for folder, rec in find_exports(work / "onnx")}
    assert set(found) == {DIT, ENCODER, DECODER}
    folder, rec = found[DIT]
    assert {i.name: i.dims for i in rec.inputs} == {
        "x": [1, 16, "frames", "height", "width"],
        "timestep": [1],
        "context": [1, "video_frames", 5, 12, 768],
        "y": [1, 16, "frames", "height", "width"],
    }
    assert rec.static == {"frames": 9, "height": 8, "video_frames": 33, "width": 8} and rec.outputs == [
        "velocity"
    ]
    for folder, _ in found.values():
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert all(v > 0 for v in shape)  # every dimension fixed
        double = onnx.TensorProto.DOUBLE
        assert not [t.name for t in model.graph.initializer if t.data_type == double]
        assert not [v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == double]


def test_check_runs_onnxruntime_against_pytorch(work: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    out = work / "check.json"
    model = ["--engine", "flashhead", "--weights", str(work / "SoulX-FlashHead-1_3B")]
    rc, log = run(["check", *model, "--onnx", str(work / "onnx"), "--json", str(out)], caplog)
    assert rc == 0, log
    rows = json.loads(out.read_text())
    assert {(r["variant"], r["output"]) for r in rows} == {
        (DIT, "velocity"),
        (ENCODER, "latents"),
        (DECODER, "video"),
    }
    assert all(r["ok"] and r["max_rel"] < 1e-4 for r in rows), rows
    rc, log = run(["check", "--engine", "flashhead", "--random-weights", "--config", "tiny", "--onnx",
                   str(work / "onnx"), "--stages", "flashhead_dit"], caplog)  # fmt: skip
    assert rc == 2 and "exported from other weights" in log


def test_the_exported_velocity_is_the_reference_velocity(fh: FlashHead) -> None:
    """The graph computes the timestep table in float32 (no float64 in TensorRT): same velocity."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 16, 9, 8, 8, generator=gen), torch.randn(1, 16, 9, 8, 8, generator=gen)
    ctx = torch.randn(1, 33, 5, 12, 768, generator=gen)
    export = FlashHeadDitExport(fh.transformer)
    for t in sampling_timesteps(4, 5.0)[:-1]:
        ref, got = fh.transformer(x, t, ctx, y), export(x, t, ctx, y)
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


class OrtEngine:
    """An exported graph in onnxruntime with a TensorRT engine's ``infer`` (TensorRT cannot run here)."""

    def __init__(self, folder: pathlib.Path, names: list[str], outputs: list[str]) -> None:
        self.session: Any = session(folder / "model.onnx")
        self.dtypes = {n: torch.float32 for n in names}
        self.outputs = outputs

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        got = self.session.run(None, {n: t.numpy() for n, t in feed.items()})
        return {n: torch.from_numpy(v) for n, v in zip(self.outputs, got, strict=True)}


def entry_for(folder: pathlib.Path, rec: Any, target: Target, weights: str | None = None) -> EngineEntry:
    return EngineEntry(
        key=f"{rec.variant}-{target.sm}", stage=rec.stage, variant=rec.variant, profile="64x64",
        file=f"{rec.variant}-{target.sm}.plan", axes={a: (v, v, v) for a, v in rec.static.items()},
        shapes={}, inputs=[i.name for i in rec.inputs], outputs=rec.outputs, onnx_dtype="fp32",
        config_hash=rec.config_hash, weights_hash=weights or rec.weights_hash, gpu=target.gpu,
        compute_capability=target.compute_capability, tensorrt=target.tensorrt,
        build=BuildSettings(precision="fp32", strongly_typed=True, optimization_level=3, workspace_mb=None),
        size_bytes=4,
    )  # fmt: skip


def test_a_chunk_renders_the_same_through_the_exported_graphs(work: pathlib.Path, fh: FlashHead) -> None:
    """The serve-time path of a TensorRT engine (named inputs, shapes, casts), graphs in onnxruntime."""
    exports = {rec.stage: (folder, rec) for folder, rec in find_exports(work / "onnx")}
    nets = networks_of(fh)

    def no_fallback(*args: torch.Tensor) -> torch.Tensor:
        raise AssertionError(f"a call of shapes {[tuple(a.shape) for a in args]} missed the exported graph")

    runners = {}
    for stage, (folder, rec) in exports.items():
        spec = flashhead_stage_spec(stage, nets)
        ort = OrtEngine(folder, spec.input_names, list(spec.outputs))
        runners[stage] = TrtNetwork(spec, [(entry_for(folder, rec, H200), ort)], no_fallback)
    engine = FlashHeadEngine(fh)
    prepared = engine.prepare(Avatar("astronaut", astronaut()))
    keys = engine.keyframes(prepared, [default_shot(0, 9)], [0.0, 28 / 25, 56 / 25])
    audio = AudioSlice(start=-0.3, samples=tone(3.0, hz=190))
    eager = [engine.subclip(prepared, keys[0], keys[1], [audio], [])]
    eager.append(engine.subclip(prepared, keys[1], keys[2], [audio], []))  # encodes 5 motion frames
    keys[1].state.carry, keys[2].state.carry = None, None
    plain_forward, plain_vae = fh.forward, fh.vae
    fh.forward = runners["flashhead_dit"]  # type: ignore[assignment]
    fh.vae = BackendVAE(
        plain_vae, encoder=runners["flashhead_vae_encoder"]
    )  # the decoder graph is of 2 frames
    try:
        exported = [engine.subclip(prepared, keys[0], keys[1], [audio], [])]
        exported.append(engine.subclip(prepared, keys[1], keys[2], [audio], []))
    finally:
        fh.forward, fh.vae = plain_forward, plain_vae
    for a, b in zip(eager, exported, strict=True):
        assert max(int(np.abs(x.astype(int) - y).max()) for x, y in zip(a, b, strict=True)) <= 1
    latents = torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(runners["flashhead_vae_decoder"](latents), fh.vae.decode(latents), atol=1e-5)


def test_serving_takes_matching_engines_and_says_why_it_falls_back(
    work: pathlib.Path, fh: FlashHead, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    plain = fh.forward, fh.vae
    try:
        with caplog.at_level(logging.INFO, logger="engines.dit.flashhead.backend"):
            choices = select_flashhead_backends(fh)
        assert {n: c.backend for n, c in choices.items()} == dict.fromkeys(
            ("dit", "vae_encoder", "vae_decoder"), "eager"
        )
        assert "no TensorRT engine folder given (--trt-engines)" in choices["dit"].reason
        assert "torch.compile: off on CPU" in choices["dit"].reason
        assert "flashhead dit: eager backend" in caplog.text
        choices = select_flashhead_backends(fh, engines_dir=tmp_path, target=H200)
        assert "has no manifest.json" in choices["dit"].reason
        # engines built elsewhere, or from other weights, are refused with the reason
        manifest = Manifest.load(tmp_path)
        for folder, rec in find_exports(work / "onnx"):
            other = entry_for(folder, rec, L40S)
            manifest.add(other)
            (tmp_path / other.file).write_bytes(b"plan")  # placeholders: no engine can be built here
        manifest.save()
        choices = select_flashhead_backends(fh, engines_dir=tmp_path, target=H200)
        assert "built for NVIDIA L40S (sm_89), this GPU is NVIDIA H200 (sm_90)" in choices["dit"].reason
        assert choices["vae_decoder"].backend == "eager"
        # one that fits this (stated) machine and model is loaded: that fails here (no TensorRT)
        folder, rec = next((f, r) for f, r in find_exports(work / "onnx") if r.stage == "flashhead_dit")
        spec = flashhead_stage_spec("flashhead_dit", networks_of(fh))
        assert rec.config_hash == config_hash(spec.config, "flashhead_dit", rec.static, SPEC_VERSION)
        here = entry_for(folder, rec, H200, weights=module_weights_hash(spec))
        manifest.add(here)
        (tmp_path / here.file).write_bytes(b"plan")
        manifest.save()
        choices = select_flashhead_backends(fh, engines_dir=tmp_path, target=H200)
        assert choices["dit"].backend == "eager" and "failed to load" in choices["dit"].reason
        with pytest.raises(ValueError, match="no usable TensorRT engine for flashhead dit"):
            select_flashhead_backends(fh, backend="tensorrt", engines_dir=tmp_path, target=H200)
    finally:
        fh.forward, fh.vae = plain


def test_build_plans_one_engine_per_shape(work: pathlib.Path, tmp_path: pathlib.Path) -> None:
    profiles = load_profiles(work / "onnx" / "profiles.json")
    jobs = plan_builds(
        profiles, work / "onnx", Manifest.load(tmp_path), H200, precision="fp32", strongly_typed=True
    )
    assert sorted(j.variant for j in jobs) == sorted([DIT, ENCODER, DECODER])
    dit = next(j for j in jobs if j.variant == DIT)
    assert dit.shapes["context"] == [[1, 33, 5, 12, 768]] * 3 and not dit.up_to_date
