"""The engine store without TensorRT: keys, the manifest, refusals, build planning, CLI errors.

Nothing here builds or loads an engine. Engine files in these tests are a few
placeholder bytes standing in for a built engine (TensorRT cannot run here);
only the bookkeeping around them is exercised, and it is the real code.
"""

from __future__ import annotations

import json
import logging
import pathlib

import pytest
import torch

from engines.dit.loading import random_components
from engines.dit.tensorrt.manifest import (
    BuildSettings,
    EngineEntry,
    Manifest,
    ManifestError,
    Target,
    engine_key,
    refusal_reason,
    weights_hash,
)
from engines.dit.tensorrt.spec import Profile, ProfileError
from trt_build import cli
from trt_build.build import PlanError, dim_value, plan_builds, shapes_from_record
from trt_build.export import EXPORT_FILE, ExportRecord, InputRecord

H200 = Target("NVIDIA H200", (9, 0), "10.9.0.34")
A100 = Target("NVIDIA A100-SXM4-80GB", (8, 0), "10.9.0.34")


def key_args(**over: object) -> dict[str, object]:
    args: dict[str, object] = dict(
        stage="subclip",
        variant="subclip",
        config_hash="c1",
        weights_hash="w1",
        axes={"batch": (1, 1, 2), "frames": (2, 2, 3)},
        precision="bf16",
        strongly_typed=True,
        onnx_dtype="bf16",
        target=H200,
    )
    args.update(over)
    return args


def test_the_key_changes_with_everything_that_invalidates_an_engine() -> None:
    base = engine_key(**key_args())  # type: ignore[arg-type]
    assert base == engine_key(**key_args())  # type: ignore[arg-type]
    changes = [
        {"config_hash": "c2"},
        {"weights_hash": "w2"},
        {"axes": {"batch": (1, 1, 1), "frames": (2, 2, 3)}},
        {"precision": "fp16"},
        {"strongly_typed": False},
        {"onnx_dtype": "fp32"},
        {"target": Target("NVIDIA H100 80GB HBM3", (9, 0), "10.9.0.34")},
        {"target": Target("NVIDIA H200", (9, 0), "10.8.0.43")},
        {"stage": "sr"},
    ]
    keys = {engine_key(**key_args(**c)) for c in changes}  # type: ignore[arg-type]
    assert base not in keys and len(keys) == len(changes)


def test_weights_hash_ignores_the_load_dtype_but_not_the_values() -> None:
    a = random_components("tiny", dtype=torch.float32, device="cpu").blueprint
    b = random_components("tiny", dtype=torch.bfloat16, device="cpu").blueprint
    assert weights_hash(a) == weights_hash(b)
    with torch.no_grad():
        a.backbone.proj_out.weight[0, 0] += 1.0
    assert weights_hash(a) != weights_hash(b)


def entry(folder: pathlib.Path, target: Target = A100, **over: object) -> EngineEntry:
    fields: dict[str, object] = dict(
        key="k" + target.sm,
        stage="subclip",
        variant="subclip",
        profile="64x64",
        file=f"e-{target.sm}.plan",
        axes={"batch": (1, 1, 2)},
        shapes={"x": [[1], [1], [2]]},
        inputs=["x"],
        outputs=["y"],
        onnx_dtype="bf16",
        config_hash="c1",
        weights_hash="w1",
        gpu=target.gpu,
        compute_capability=target.compute_capability,
        tensorrt=target.tensorrt,
        build=BuildSettings(precision="bf16", strongly_typed=True, optimization_level=3, workspace_mb=None),
        size_bytes=4,
    )
    fields.update(over)
    e = EngineEntry(**fields)  # type: ignore[arg-type]
    (folder / e.file).write_bytes(b"plan")  # placeholder bytes, not an engine
    return e


def test_engines_for_another_gpu_or_tensorrt_version_are_refused_with_the_reason(
    tmp_path: pathlib.Path,
) -> None:
    manifest = Manifest(tmp_path)
    manifest.add(entry(tmp_path, A100))
    manifest.add(entry(tmp_path, H200))
    manifest.save()
    loaded = Manifest.load(tmp_path, missing_ok=False)
    assert set(loaded.entries) == set(manifest.entries)

    sel = loaded.select("subclip", H200, config_hash="c1", weights_hash="w1")
    assert [e.gpu for e in sel.usable] == ["NVIDIA H200"]
    (refused,) = sel.refused
    assert "built for NVIDIA A100-SXM4-80GB (sm_80), this GPU is NVIDIA H200 (sm_90)" in refused.reason
    assert "avatar trt build" in refused.reason

    newer = Target("NVIDIA H200", (9, 0), "10.13.0.35")
    reason = refusal_reason(loaded.entries["ksm_90"], newer, None, None)
    assert (
        reason is not None and "built with TensorRT 10.9.0.34, this machine has TensorRT 10.13.0.35" in reason
    )
    assert "no CUDA GPU" in (refusal_reason(loaded.entries["ksm_90"], None, None, None) or "")
    assert "other weights" in (refusal_reason(loaded.entries["ksm_90"], H200, "c1", "w2") or "")
    assert "another model config" in (refusal_reason(loaded.entries["ksm_90"], H200, "c2", "w1") or "")
    assert loaded.select("blueprint", H200).explain() == "no engine for this stage in the manifest"

    (tmp_path / "e-sm_90.plan").unlink()
    (gone,) = [r for r in loaded.select("subclip", H200).refused if r.entry.gpu == "NVIDIA H200"]
    assert "missing" in gone.reason and not loaded.is_built("ksm_90")


def test_unusable_manifests_say_what_to_do(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ManifestError, match="no manifest.json: build engines into it"):
        Manifest.load(tmp_path, missing_ok=False)
    assert Manifest.load(tmp_path).entries == {}
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 99, "engines": []}))
    with pytest.raises(ManifestError, match="manifest version 99"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path)


def write_export(
    root: pathlib.Path, stage: str, dtype: str, static: dict[str, int] | None = None
) -> ExportRecord:
    """An export.json as `avatar trt export` writes it (the ONNX file itself is not needed to plan)."""
    static = static or {}
    variant = "-".join([stage, *(f"{a}{v}" for a, v in static.items())])
    axes = {"batch": (1, 8), "height": (2, 512), "width": (2, 512), "frames": (1, 128)}
    for a in static:
        axes.pop(a)
    record = ExportRecord(
        stage=stage,
        variant=variant,
        static=static,
        dtype=dtype,
        inputs=[
            InputRecord(name="hidden_states", dims=["batch", 12, "frames", "height", "width"], dtype=dtype),
            InputRecord(
                name="audio_gates", dims=["batch", 1, "frames", "height*1/2", "width*1/2"], dtype=dtype
            ),
        ],
        outputs=["sample"],
        axes=axes,
        config_hash="c1",
        weights_hash="w1",
        parameters=10,
        external_data=False,
        opset=18,
        seconds=1.0,
        size_bytes=10,
        source="test",
    )
    folder = root / variant / dtype
    folder.mkdir(parents=True)
    (folder / EXPORT_FILE).write_text(record.model_dump_json())
    return record


def test_build_plans_shapes_keys_and_skips_what_is_built(tmp_path: pathlib.Path) -> None:
    onnx = tmp_path / "onnx"
    write_export(onnx, "subclip", "bf16")
    write_export(onnx, "subclip", "fp32")
    profile = Profile(
        "subclip", "256", {"batch": (1, 1, 2), "frames": (2, 2, 3), "height": (32,) * 3, "width": (32,) * 3}
    )
    manifest = Manifest(tmp_path / "engines")
    (job,) = plan_builds([profile], onnx, manifest, H200, precision="bf16", strongly_typed=True)
    assert job.record.dtype == "bf16" and not job.up_to_date
    assert job.shapes["hidden_states"] == [[1, 12, 2, 32, 32], [1, 12, 2, 32, 32], [2, 12, 3, 32, 32]]
    assert job.shapes["audio_gates"][2] == [2, 1, 3, 16, 16]
    assert job.path.name.startswith("subclip-256-bf16-") and job.path.suffix == ".plan"
    # weak typing reads the fp32 graph; the key differs
    (weak,) = plan_builds([profile], onnx, manifest, H200, precision="bf16", strongly_typed=False)
    assert weak.record.dtype == "fp32" and weak.key != job.key
    # once the manifest holds the key with its file, the same build is up to date (idempotent)
    manifest.folder.mkdir()
    manifest.add(entry(manifest.folder, H200, key=job.key, file=job.path.name))
    (again,) = plan_builds([profile], onnx, manifest, H200, precision="bf16", strongly_typed=True)
    assert again.up_to_date
    (forced,) = plan_builds(
        [profile], onnx, manifest, H200, precision="bf16", strongly_typed=True, force=True
    )
    assert not forced.up_to_date
    # another GPU: another key, so nothing built elsewhere is taken for up to date
    (other,) = plan_builds([profile], onnx, manifest, A100, precision="bf16", strongly_typed=True)
    assert other.key != job.key and not other.up_to_date


def test_build_planning_errors_name_the_missing_piece(tmp_path: pathlib.Path) -> None:
    onnx = tmp_path / "onnx"
    manifest = Manifest(tmp_path / "engines")
    profile = Profile(
        "subclip", "p", {"batch": (1, 1, 1), "frames": (2, 2, 2), "height": (32,) * 3, "width": (32,) * 3}
    )
    with pytest.raises(PlanError, match="holds no exports"):
        plan_builds([profile], onnx, manifest, H200, precision="bf16", strongly_typed=True)
    write_export(onnx, "subclip", "fp32")
    with pytest.raises(PlanError, match="export --dtype bf16"):
        plan_builds([profile], onnx, manifest, H200, precision="bf16", strongly_typed=True)
    with pytest.raises(PlanError, match="ModelOpt"):
        plan_builds([profile], onnx, manifest, H200, precision="fp8", strongly_typed=True)
    with pytest.raises(PlanError, match="no export of vae_decoder"):
        plan_builds(
            [Profile("vae_decoder", "v", {})], onnx, manifest, H200, precision="fp32", strongly_typed=True
        )
    too_big = Profile("subclip", "big", {**profile.axes, "height": (32, 32, 1024)})
    with pytest.raises(ProfileError, match="outside what subclip accepts"):
        plan_builds([too_big], onnx, manifest, H200, precision="fp32", strongly_typed=True)
    vae = write_export(onnx, "vae_decoder", "fp32", {"frames": 2})
    wrong = Profile(
        "vae_decoder", "v", {"batch": (1, 1, 1), "frames": (3, 3, 3), "height": (8,) * 3, "width": (8,) * 3}
    )
    with pytest.raises(ProfileError, match="frames is fixed at 2"):
        shapes_from_record(vae, wrong)
    # a bf16 build keeps the VAE decoder in fp32, as the server runs it
    right = Profile("vae_decoder", "v", {**wrong.axes, "frames": (2, 2, 2)})
    (job,) = plan_builds([right], onnx, manifest, H200, precision="bf16", strongly_typed=True)
    assert job.precision == "fp32" and job.record.dtype == "fp32" and "-fp32-" in job.path.name
    assert dim_value("height*1/2", {"height": 32}) == 16 and dim_value(7, {}) == 7


def run_cli(argv: list[str], caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = cli.main(argv)
    return rc, "\n".join(r.getMessage() for r in caplog.records)


def test_cli_errors_are_clear_without_tensorrt_or_inputs(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnx")
    trt_missing = True
    try:
        import tensorrt  # noqa: F401

        trt_missing = False
    except ImportError:
        pass
    onnx = tmp_path / "onnx"
    write_export(onnx, "subclip", "bf16")
    (onnx / "profiles.json").write_text(
        json.dumps(
            {
                "profiles": [
                    {
                        "stage": "subclip",
                        "name": "p",
                        "axes": {"batch": 1, "frames": 2, "height": 32, "width": 32},
                    }
                ]
            }
        )
    )
    if trt_missing:
        rc, log = run_cli(["build", "--onnx", str(onnx), "--engines", str(tmp_path / "e")], caplog)
        assert rc == 2 and "TensorRT is not installed" in log and "pypi.nvidia.com" in log
    rc, log = run_cli(["build", "--onnx", str(tmp_path / "nowhere")], caplog)
    assert rc == 2 and "run `avatar trt export" in log
    rc, log = run_cli(["build", "--onnx", str(onnx), "--profiles", str(tmp_path / "none.json")], caplog)
    assert rc == 2 and "does not exist: write one with `avatar trt profile" in log
    rc, log = run_cli(["inspect", "--engines", str(tmp_path / "e")], caplog)
    assert rc == 2 and "no manifest.json" in log
    rc, log = run_cli(["export", "--weights", str(tmp_path / "no-weights"), "--out", str(onnx)], caplog)
    assert rc == 2 and "weights folder" in log and "does not exist" in log
    rc, log = run_cli(["check", "--onnx", str(onnx)], caplog)
    assert rc == 2 and "--weights DIR" in log

    # a manifest from another machine: listed and inspected from the manifest, refused to run here
    engines = tmp_path / "engines"
    engines.mkdir()
    manifest = Manifest(engines)
    manifest.add(entry(engines, A100))
    manifest.save()
    capsys.readouterr()
    rc, log = run_cli(["list", "--engines", str(engines)], caplog)
    out = capsys.readouterr().out
    assert rc == 0 and "NVIDIA A100-SXM4-80GB (sm_80) with TensorRT 10.9.0.34" in out and "| no: " in out
    rc, log = run_cli(["inspect", "--engines", str(engines), "--manifest-only"], caplog)
    out = capsys.readouterr().out
    assert rc == 0 and "## subclip / 64x64" in out and "built for NVIDIA A100-SXM4-80GB" in out
    if trt_missing:
        rc, log = run_cli(["inspect", "--engines", str(engines)], caplog)
        assert rc == 2 and "layer details need TensorRT on a GPU" in log


def test_long_steps_report_progress_with_estimates_from_the_last_run(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    from trt_build.progress import Steps, Timings, task

    timings = Timings(tmp_path / ".timings.json")
    assert timings.estimate("export:subclip:bf16", 1e9) is None
    timings.record("export:subclip:bf16", 1e9, 300.0)
    again = Timings(tmp_path / ".timings.json")  # persisted: the next run estimates from it
    assert again.estimate("export:subclip:bf16", 2e9) == pytest.approx(600.0)
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        with task("export subclip", estimate_s=600.0, log=log):
            pass
        with pytest.raises(RuntimeError), task("build", log=log):
            raise RuntimeError("out of memory")
        steps = Steps("hashing", 4, log=log, min_interval=0.0)
        for _ in range(4):
            steps.step()
    text = caplog.text
    assert "export subclip: started, estimate 10.0 min (from the last run on this machine)" in text
    assert "export subclip: done in" in text
    assert "build: started (no estimate yet" in text and "build: failed after" in text
    assert "hashing: 25% (" in text and "about" in text and "hashing: done in" in text


def test_inspect_summaries_of_layer_records() -> None:
    """Layer records in the engine inspector's JSON format (as TensorRT documents it), summarised."""
    from trt_build.engine import summarise_layers

    def layer(name: str, kind: str, fmt: str, tactic: str = "") -> dict[str, object]:
        return {
            "Name": name,
            "LayerType": kind,
            "Outputs": [{"Name": "o", "Format/Datatype": fmt}],
            "TacticName": tactic,
        }

    fused = summarise_layers(
        [
            layer("blocks.0.attn1 + to_q", "CaskGemmMatrixMultiply", "Row major linear BF16 format"),
            layer(
                "_gemm_mha_v2_myl0_3", "kgen", "Row major linear BF16 format", "fmha_v2_flash_attention_bf16"
            ),
            layer("norm_out", "CaskPooling", "Row major linear FP32 format"),
        ]
    )
    assert fused["attention"]["verdict"] == "fused" and fused["attention"]["fused_count"] == 1
    assert fused["by_precision"] == {"bf16": 2, "fp32": 1} and fused["detailed"]
    unfused = summarise_layers(
        [
            layer("/blocks.0/attn1/MatMul", "CaskGemmMatrixMultiply", "Row major linear FP32 format"),
            layer("/blocks.0/attn1/Softmax", "SoftMax", "Row major linear FP32 format"),
        ]
    )
    assert unfused["attention"]["verdict"] == "not fused" and unfused["attention"]["softmax_count"] == 1
    partly = summarise_layers(
        [layer("_gemm_mha_v2", "kgen", "BF16"), layer("/adapter/Softmax", "SoftMax", "BF16")]
    )
    assert partly["attention"]["verdict"] == "partly fused"
    plain = summarise_layers(
        [layer("/attn1/scaled_dot_product_attention/MatMul", "CaskGemmMatrixMultiply", "FP32")]
    )
    assert plain["attention"]["verdict"] == "unknown"  # an op name alone does not make a fused kernel
    names_only = summarise_layers(["{ForeignNode[/blocks.0/attn1/Softmax...]}"])
    assert names_only["attention"]["verdict"] == "unknown" and not names_only["detailed"]
    dynamic = summarise_layers([layer("x", "Reformat", "N/A due to dynamic shapes")])
    assert dynamic["by_precision"] == {"unknown": 1}
