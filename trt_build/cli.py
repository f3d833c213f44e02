"""``avatar trt ...`` (``python -m trt_build.cli``): export, check, build, inspect, benchmark DiT engines.

From a checkpoint folder to validated engines and a latency table::

    avatar trt profile --weights W --sizes 256x256 --subclip-frames 2,4 -o profiles.json
    avatar trt export  --weights W --profiles profiles.json --out onnx --dtype bf16
    avatar trt export  --weights W --profiles profiles.json --out onnx --dtype fp32   # for check
    avatar trt check   --weights W --onnx onnx
    avatar trt build   --onnx onnx --profiles profiles.json --engines engines --precision bf16
    avatar trt inspect --engines engines
    avatar trt bench   --engines engines --json bench.json
    avatar serve --engine dit --weights W --trt-engines engines

SoulX-FlashHead (``--engine flashhead``, the published folder as ``--weights``;
its DiT and the Wan VAE encoder and decoder, at the fixed shapes of a chunk)::

    avatar trt export --engine flashhead --weights FH --out onnx --dtype bf16
    avatar trt export --engine flashhead --weights FH --out onnx --dtype fp32   # for check
    avatar trt check  --engine flashhead --weights FH --onnx onnx
    avatar trt build  --onnx onnx --engines engines --precision bf16
    avatar serve --engine flashhead --weights FH --wav2vec W2V --trt-engines engines

Exit codes: 0 ok, 1 a check failed, 2 a usage or environment error (the
message says what is missing and what to do).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger("avatar.trt")


class CliError(Exception):
    """A clear, actionable error: printed without a traceback, exit code 2."""


# --------------------------------------------------------------------------- shared options
def _model_args(p: argparse.ArgumentParser, dtype_default: str | None = "fp32") -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--engine",
        default="dit",
        choices=["dit", "flashhead"],
        help="whose networks: the dit engine's (default) or SoulX-FlashHead's",
    )
    g.add_argument(
        "--weights",
        type=pathlib.Path,
        help="local checkpoint folder (dit: see engines/dit/loading.py; flashhead: the published "
        "SoulX-FlashHead-1_3B folder)",
    )
    g.add_argument(
        "--model", default="pro", choices=["pro", "lite"], help="flashhead: Model_Pro or Model_Lite"
    )
    g.add_argument(
        "--random-weights", action="store_true", help="random weights of a preset (tests, throughput)"
    )
    g.add_argument(
        "--config",
        default="1.3b",
        help="preset for --random-weights: tiny or 1.3b (flashhead: 1.3b is its published sizes)",
    )
    g.add_argument(
        "--dtype",
        default=dtype_default,
        choices=["fp32", "bf16", "fp16"],
        help="dtype the model is loaded (and exported) in (default: "
        + (dtype_default or "bf16 on a GPU, else fp32")
        + ")",
    )
    g.add_argument(
        "--device", default=None, help="where the model runs (default: cpu; bench: cuda when present)"
    )


def _stages_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stages", default="all", help="comma-separated: blueprint, subclip, sr, vae_decoder (default: all)"
    )


def _load_components(args: argparse.Namespace, timings_dir: pathlib.Path | None) -> tuple[Any, str]:
    """The model parts, with progress; returns them and a description of their source."""
    from engines.dit.config import parse_dtype
    from engines.dit.loading import CheckpointError, load_components, random_components
    from trt_build.progress import Timings, task

    if args.weights is not None and args.random_weights:
        raise CliError("pass either --weights DIR or --random-weights, not both")
    gpu_default = args.command == "bench" and torch.cuda.is_available()
    args.device = args.device or ("cuda" if gpu_default else "cpu")
    args.dtype = args.dtype or ("bf16" if gpu_default else "fp32")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {args.device}: no CUDA GPU here; use --device cpu")
    dtype = parse_dtype(args.dtype)
    if getattr(args, "engine", "dit") == "flashhead":
        return _load_flashhead(args, dtype)
    if args.random_weights:
        with task(f"random {args.config} weights", log=logger):
            try:
                return random_components(
                    args.config, dtype=dtype, device=args.device
                ), f"random:{args.config}"
            except ValueError as exc:
                raise CliError(str(exc)) from None
    if args.weights is None:
        raise CliError(
            "give the model: --weights DIR (a local checkpoint folder), or --random-weights "
            "--config tiny|1.3b for tests"
        )
    folder = pathlib.Path(args.weights)
    if not folder.is_dir():
        raise CliError(f"weights folder {folder} does not exist")
    size = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    timings = Timings(timings_dir / ".timings.json" if timings_dir else None)
    kind = f"load:{args.device}:{args.dtype}"
    import time

    start = time.monotonic()
    with task(
        f"loading weights from {folder} ({size / 1e9:.1f} GB)",
        estimate_s=timings.estimate(kind, size),
        log=logger,
    ):
        try:
            components = load_components(folder, dtype=dtype, device=args.device)
        except (CheckpointError, ValueError, OSError) as exc:
            raise CliError(f"cannot load weights from {folder}: {exc}") from None
    timings.record(kind, size, time.monotonic() - start)
    return components, str(folder.resolve())


def _load_flashhead(args: argparse.Namespace, dtype: torch.dtype) -> tuple[Any, str]:
    """FlashHead's DiT and VAE (no audio encoder: it is not exported)."""
    from engines.dit.flashhead.networks import load_networks, random_networks
    from engines.dit.loading import CheckpointError
    from trt_build.progress import task

    if args.random_weights:
        if args.config not in ("tiny", "1.3b"):
            raise CliError(f"--config {args.config!r}: flashhead has tiny or 1.3b (the published sizes)")
        tiny = args.config == "tiny"
        with task(f"random FlashHead {args.model} networks ({args.config})", log=logger):
            nets = random_networks(
                args.model, dtype=dtype, device=args.device, num_layers=2 if tiny else None,
                ffn_dim=64 if tiny else None, vae_base=8 if tiny else 96,
            )  # fmt: skip
        return nets, f"random:flashhead-{args.model}:{args.config}"
    if args.weights is None:
        raise CliError(
            "give the model: --weights DIR (the published SoulX-FlashHead-1_3B folder), or "
            "--random-weights --config tiny|1.3b"
        )
    folder = pathlib.Path(args.weights)
    with task(f"loading FlashHead {args.model} from {folder}", log=logger):
        try:
            nets = load_networks(folder, args.model, dtype=dtype, device=args.device)
        except (CheckpointError, ValueError, OSError) as exc:
            raise CliError(f"cannot load FlashHead weights from {folder}: {exc}") from None
    return nets, f"{folder.resolve()}:{args.model}"


def _profiles(
    args: argparse.Namespace, components: Any, fallback_dir: pathlib.Path | None
) -> tuple[list[Any], str]:
    from engines.dit.tensorrt.spec import load_profiles, serving_profiles

    if getattr(args, "profiles", None):
        return load_profiles(args.profiles), str(args.profiles)
    if fallback_dir is not None and (fallback_dir / "profiles.json").is_file():
        path = fallback_dir / "profiles.json"
        logger.info("using the profiles the export was made for: %s", path)
        return load_profiles(path), str(path)
    if components is None:
        raise CliError("give --profiles FILE (write one with `avatar trt profile`)")
    logger.info("no --profiles: using the serving defaults of the engine config (see `avatar trt profile`)")
    return serving_profiles(components), "serving defaults"


def _write_json(path: pathlib.Path | None, data: Any) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    logger.info("wrote %s", path)


def _parse_sizes(text: str | None) -> list[tuple[int, int]] | None:
    if not text:
        return None
    out = []
    for item in text.split(","):
        try:
            w, h = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise CliError(f"--sizes: {item!r} is not WIDTHxHEIGHT") from None
        out.append((w, h))
    return out


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"{flag}: {text!r} is not a comma-separated list of integers") from None


# --------------------------------------------------------------------------- profile
def cmd_profile(args: argparse.Namespace) -> int:
    from engines.dit.tensorrt.spec import save_profiles, serving_profiles

    if args.engine == "flashhead":
        return _flashhead_profile(args)
    components = _config_only(args)
    try:
        profiles = serving_profiles(
            components,
            sizes=_parse_sizes(args.sizes),
            subclip_frames=_int_list(args.subclip_frames, "--subclip-frames"),
            keyframes_per_batch=args.keyframes,
            characters=args.characters,
            cfg=args.cfg,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    save_profiles(profiles, args.output)
    sys.stdout.write(_profile_table(profiles))
    logger.info("wrote %d profiles to %s", len(profiles), args.output)
    return 0


def _flashhead_profile(args: argparse.Namespace) -> int:
    """FlashHead's fixed chunk shapes at ``--sizes`` (strides from the config, not the weights)."""
    from engines.dit.flashhead.loading import LayoutError, model_files, read_transformer_config
    from engines.dit.flashhead.networks import PUBLISHED_CONFIGS
    from engines.dit.tensorrt.flashhead import flashhead_profiles
    from engines.dit.tensorrt.spec import save_profiles

    if args.random_weights:
        config = PUBLISHED_CONFIGS["pro" if args.model == "pro" else "lite"]
    elif args.weights is None:
        raise CliError("give --weights DIR (its config is read, not its weights) or --random-weights")
    else:
        try:
            _, dit, _ = model_files(args.weights, args.model)
            config = read_transformer_config(dit / "config.json")
        except (LayoutError, ValueError) as exc:
            raise CliError(str(exc)) from None
    stride = [int(v) for v in config["vae_stride"]]
    try:
        profiles = flashhead_profiles(
            args.model, spatial_stride=stride[1], temporal_stride=stride[0],
            sizes=_parse_sizes(args.sizes) or [(512, 512)],
        )  # fmt: skip
    except ValueError as exc:
        raise CliError(str(exc)) from None
    save_profiles(profiles, args.output)
    sys.stdout.write(_profile_table(profiles))
    logger.info("wrote %d profiles to %s", len(profiles), args.output)
    return 0


def _profile_table(profiles: Sequence[Any]) -> str:
    lines = ["| stage | profile | axes (min/opt/max) |", "|---|---|---|"]
    for p in profiles:
        axes = ", ".join(
            f"{a} {lo}" if lo == hi else f"{a} {lo}/{opt}/{hi}" for a, (lo, opt, hi) in p.axes.items()
        )
        lines.append(f"| {p.stage} | {p.name} | {axes} |")
    return "\n".join(lines) + "\n"


def _config_only(args: argparse.Namespace) -> Any:
    """What profiles depend on (configs, not weights): cheap even for large checkpoints."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from engines.dit.config import DitEngineConfig

    if args.weights is None and not args.random_weights:
        raise CliError("give --weights DIR (configs are read, not weights) or --random-weights --config C")
    if args.random_weights:
        from engines.dit.loading import random_components

        try:  # on the meta device: configs and shapes, no memory
            return random_components(args.config, dtype=torch.float32, device="meta")
        except ValueError as exc:
            raise CliError(str(exc)) from None
    folder = pathlib.Path(args.weights)
    if not folder.is_dir():
        raise CliError(f"weights folder {folder} does not exist")
    engine_file = folder / "engine.json"
    config = (
        DitEngineConfig.model_validate_json(engine_file.read_text())
        if engine_file.is_file()
        else DitEngineConfig()
    )
    try:
        vcfg = AutoencoderKLWan.load_config(folder / "vae")
        bcfg = WanTransformer3DModel.load_config(folder / "blueprint")
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the model configs in {folder}: {exc}") from None
    vae = SimpleNamespace(
        config=SimpleNamespace(
            scale_factor_spatial=vcfg.get("scale_factor_spatial", 8),
            scale_factor_temporal=vcfg.get("scale_factor_temporal", 4),
        )
    )
    backbone = SimpleNamespace(config=SimpleNamespace(image_dim=bcfg.get("image_dim")))
    sr = True if (folder / "sr").is_dir() else None
    return SimpleNamespace(config=config, vae=vae, blueprint=SimpleNamespace(backbone=backbone), sr=sr)


# --------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from engines.dit.tensorrt.spec import (
        ProfileError,
        parse_stages,
        profiles_for,
        save_profiles,
        stage_spec,
        static_groups,
    )
    from trt_build.export import ExportError, export, module_weights_hash
    from trt_build.progress import Timings

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    components, source = _load_components(args, out)
    try:
        stages = parse_stages(args.stages, components)
        profiles, origin = _profiles(args, components, None)
    except (ValueError, ProfileError) as exc:
        raise CliError(str(exc)) from None
    timings = Timings(out / ".timings.json")
    external = {"auto": None, "on": True, "off": False}[args.external_data]
    rows = []
    hashes: dict[int, str] = {}
    for stage in stages:
        try:
            spec = stage_spec(stage, components)
            mine = profiles_for(spec, profiles)
        except (ValueError, ProfileError) as exc:
            raise CliError(str(exc)) from None
        if not mine:
            raise CliError(
                f"no {stage} profile in {origin}: add one (`avatar trt profile`) or leave "
                f"{stage} out (--stages)"
            )
        whash = module_weights_hash(spec, hashes)
        for static, _group in static_groups(spec, mine).items():
            try:
                folder, rec = export(
                    spec,
                    out,
                    static=dict(static),
                    source=source,
                    weights=whash,
                    external_data=external,
                    opset=args.opset,
                    timings=timings,
                    force=args.force,
                )
            except ExportError as exc:
                raise CliError(str(exc)) from None
            rows.append(rec)
    if not args.profiles or pathlib.Path(args.profiles).resolve() != (out / "profiles.json").resolve():
        save_profiles(profiles, out / "profiles.json")
    lines = [
        "| network | dtype | parameters | export s | size MB | config | weights |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.dtype} | {r.parameters:,} | {r.seconds:.1f} | "
            f"{r.size_bytes / 1e6:.1f} | {r.config_hash} | {r.weights_hash} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


# --------------------------------------------------------------------------- check
def cmd_check(args: argparse.Namespace) -> int:
    from engines.dit.tensorrt.manifest import config_hash
    from engines.dit.tensorrt.spec import SPEC_VERSION, ProfileError, parse_stages, stage_spec
    from trt_build.check import CheckError, check_export, format_rows
    from trt_build.export import find_exports

    onnx_dir = pathlib.Path(args.onnx)
    if not onnx_dir.is_dir():
        raise CliError(
            f"ONNX folder {onnx_dir} does not exist: run `avatar trt export --out {onnx_dir}` first"
        )
    components, _ = _load_components(args, onnx_dir)
    try:
        stages = parse_stages(args.stages, components)
        profiles, _origin = _profiles(args, components, onnx_dir)
    except (ValueError, ProfileError) as exc:
        raise CliError(str(exc)) from None
    found = find_exports(onnx_dir, stages, args.dtype)
    if not found:
        raise CliError(
            f"no {args.dtype} export of {', '.join(stages)} in {onnx_dir}: export with --dtype {args.dtype}"
            " (onnxruntime on CPU checks fp32 graphs)"
        )
    from trt_build.export import module_weights_hash

    rows = []
    hashes: dict[int, str] = {}
    for folder, record in found:
        spec = stage_spec(record.stage, components)
        if record.config_hash != config_hash(spec.config, record.stage, record.static, SPEC_VERSION):
            raise CliError(
                f"{folder} was exported from another model config than the one loaded: export again"
            )
        whash = module_weights_hash(spec, hashes)
        if record.weights_hash != whash:
            raise CliError(
                f"{folder} was exported from other weights ({record.weights_hash}; loaded {whash}): "
                "check with the weights it was exported from, or export again"
            )
        mine = [
            p
            for p in profiles
            if p.stage == record.stage and all(p.axes.get(a) == (v, v, v) for a, v in record.static.items())
        ]
        try:
            rows += check_export(spec, folder, record, mine, rtol=args.rtol, providers=args.provider)
        except (CheckError, ProfileError) as exc:
            raise CliError(str(exc)) from None
    sys.stdout.write(format_rows(rows))
    _write_json(args.json, [r.as_dict() for r in rows])
    failed = [r for r in rows if not r.ok]
    if failed:
        worst = max(failed, key=lambda r: r.max_rel)
        logger.error(
            "%d of %d outputs differ past the tolerance; worst: %s %s/%s %s rel %.3g > %.3g. The graph "
            "does not compute what the module does: look for ops the exporter translated differently "
            "(run with -v), or raise --rtol only if the difference is expected for this dtype",
            len(failed),
            len(rows),
            worst.variant,
            worst.profile,
            worst.point,
            worst.output,
            worst.max_rel,
            worst.rtol,
        )
        return 1
    logger.info("all %d outputs within tolerance", len(rows))
    return 0


# --------------------------------------------------------------------------- build
def _trt_target() -> Any:
    from engines.dit.tensorrt.manifest import current_target
    from trt_build.engine import TensorRTUnavailable, import_tensorrt, require_gpu

    try:
        trt = import_tensorrt()
        require_gpu()
    except TensorRTUnavailable as exc:
        raise CliError(str(exc)) from None
    target = current_target(str(trt.__version__))
    assert target is not None
    return target


def cmd_build(args: argparse.Namespace) -> int:
    from engines.dit.tensorrt.manifest import Manifest, ManifestError
    from engines.dit.tensorrt.spec import ProfileError, parse_stages
    from trt_build.build import PlanError, plan_builds, run_build
    from trt_build.engine import BuildError, BuildOptions, TensorRTUnavailable

    onnx_dir = pathlib.Path(args.onnx)
    if not onnx_dir.is_dir():
        raise CliError(
            f"ONNX folder {onnx_dir} does not exist: run `avatar trt export --out {onnx_dir}` first"
        )
    try:
        profiles, _ = _profiles(args, None, onnx_dir)
        stages = None if args.stages == "all" else parse_stages(args.stages)  # all: every profile
        manifest = Manifest.load(args.engines)
    except (ProfileError, ValueError, ManifestError) as exc:
        raise CliError(str(exc)) from None
    target = _trt_target()
    strongly_typed = not args.no_strongly_typed
    try:
        jobs = plan_builds(
            profiles,
            onnx_dir,
            manifest,
            target,
            precision=args.precision,
            strongly_typed=strongly_typed,
            stages=stages,
            force=args.force,
        )
    except (PlanError, ProfileError) as exc:
        raise CliError(str(exc)) from None
    options = BuildOptions(
        precision=args.precision,
        strongly_typed=strongly_typed,
        optimization_level=args.opt_level,
        workspace_mb=args.workspace_mb,
        timing_cache=pathlib.Path(args.timing_cache)
        if args.timing_cache
        else manifest.folder / "timing.cache",
    )
    todo = [j for j in jobs if not j.up_to_date]
    logger.info(
        "%d engines for %s: %d up to date, %d to build",
        len(jobs),
        target.describe(),
        len(jobs) - len(todo),
        len(todo),
    )
    lines = ["| network | profile | precision | key | result |", "|---|---|---|---|---|"]
    for job in jobs:
        if job.up_to_date:
            lines.append(f"| {job.variant} | {job.profile.name} | {job.precision} | {job.key} | up to date |")
            continue
        try:
            entry = run_build(job, manifest, target, options)
        except (BuildError, TensorRTUnavailable) as exc:
            raise CliError(f"build of {job.variant} / {job.profile.name} failed: {exc}") from None
        lines.append(
            f"| {job.variant} | {job.profile.name} | {job.precision} | {job.key} | built in "
            f"{entry.build.seconds:.0f} s, {entry.size_bytes / 1e6:.0f} MB |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


# --------------------------------------------------------------------------- inspect / list
def cmd_list(args: argparse.Namespace) -> int:
    from engines.dit.tensorrt.manifest import Manifest, ManifestError, current_target, refusal_reason
    from trt_build.engine import tensorrt_version

    try:
        manifest = Manifest.load(args.engines, missing_ok=False)
    except ManifestError as exc:
        raise CliError(str(exc)) from None
    version = tensorrt_version()
    target = current_target(version) if version else None
    here = target.describe() if target else ("no CUDA GPU" if version else "no TensorRT") + " on this machine"
    lines = [
        f"engines in {manifest.folder} (this machine: {here})",
        "",
        "| key | stage | profile | precision | built for | size MB | runs here |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in sorted(manifest.entries.values(), key=lambda e: (e.stage, e.profile)):
        if version is None:
            why: str | None = "TensorRT is not installed here"
        else:
            why = refusal_reason(e, target, None, None)
        lines.append(
            f"| {e.key} | {e.stage} | {e.profile} | {e.build.precision} | {e.target.describe()} | "
            f"{e.size_bytes / 1e6:.1f} | {'yes' if why is None else 'no: ' + why} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from engines.dit.tensorrt.manifest import Manifest, ManifestError
    from trt_build.engine import EngineLoadError, TensorRTUnavailable, TrtEngine, describe_engine

    try:
        manifest = Manifest.load(args.engines, missing_ok=False)
    except ManifestError as exc:
        raise CliError(str(exc)) from None
    stages = None if args.stages == "all" else set(args.stages.split(","))
    entries = [
        e
        for e in manifest.entries.values()
        if (stages is None or e.stage in stages) and (args.key is None or e.key.startswith(args.key))
    ]
    if not entries:
        raise CliError(f"no engine in {manifest.path} matches (stages {args.stages}, key {args.key})")
    report: list[dict[str, Any]] = []
    unavailable: str | None = None
    for e in sorted(entries, key=lambda e: (e.stage, e.profile)):
        item: dict[str, Any] = {"manifest": e.model_dump(mode="json")}
        out = [
            f"## {e.variant} / {e.profile} ({e.key})",
            f"- built for {e.target.describe()}, {e.build.precision}"
            f"{' strongly typed' if e.build.strongly_typed else ' (weak typing)'}, optimisation level "
            f"{e.build.optimization_level}, workspace {e.build.workspace_mb or 'unlimited'} MB, "
            f"{e.build.seconds or 0:.0f} s to build, {e.size_bytes / 1e6:.1f} MB",
            f"- from ONNX {e.onnx_dtype} (config {e.config_hash}, weights {e.weights_hash}, {e.source})",
            "- inputs (min / opt / max): "
            + "; ".join(f"{n} {' / '.join('x'.join(map(str, s)) for s in e.shapes[n])}" for n in e.inputs),
        ]
        if not args.manifest_only and unavailable is None:
            try:
                desc = describe_engine(TrtEngine(manifest.engine_path(e)))
            except TensorRTUnavailable as exc:
                unavailable = str(exc)
            except (EngineLoadError, RuntimeError, FileNotFoundError) as exc:
                out.append(f"- cannot load: {exc}")
            else:
                item["engine"] = desc
                layers = desc["layers"]
                att = layers["attention"]
                prec = ", ".join(f"{k} {v}" for k, v in layers["by_precision"].items())
                kinds = ", ".join(f"{k} {v}" for k, v in list(layers["by_type"].items())[:8])
                out += [
                    f"- activation memory {desc['activation_memory_bytes'] / 1e6:.1f} MB; {layers['count']} "
                    f"layers by precision: {prec}",
                    f"- layer types: {kinds}",
                    f"- attention: {att['verdict']} ({att['fused_count']} fused attention layers, "
                    f"{att['softmax_count']} standalone softmax)"
                    + ("" if layers["detailed"] else " - built without detailed profiling verbosity"),
                ]
                if args.layers:
                    out += [f"  - {r['type']} {r['precision']} {r['name']}" for r in layers["rows"]]
        report.append(item)
        sys.stdout.write("\n".join(out) + "\n\n")
    _write_json(args.json, report)
    if unavailable is not None:
        logger.error(
            "layer details need TensorRT on a GPU: %s (--manifest-only shows the manifest alone)", unavailable
        )
        return 2
    return 0


# --------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from trt_build.bench import BACKENDS
    from trt_build.engine import tensorrt_version

    backends = [b for b in (args.backends or "").split(",") if b]
    gpu = torch.cuda.is_available()
    version = tensorrt_version()
    if not backends:
        if gpu and version and args.engines:
            backends = ["tensorrt"]
        elif gpu:
            backends = ["compile", "cudagraphs"]
            logger.info("no TensorRT%s: measuring torch.compile instead", "" if version else " installed")
        else:
            backends = ["eager"] + (["onnxruntime"] if args.onnx else [])
            logger.info("no CUDA GPU: measuring on CPU (%s)", ", ".join(backends))
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise CliError(f"--backends: unknown {bad}; choose from {', '.join(BACKENDS)}")
    device_name = torch.cuda.get_device_name(0) if gpu else "CPU"
    threads = args.threads or (torch.get_num_threads() if gpu else 1)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # small CPU kernels slow down badly with more threads than free cores
    try:
        return _bench(args, backends, gpu, version, device_name, threads)
    finally:
        torch.set_num_threads(saved_threads)


def _bench(
    args: argparse.Namespace,
    backends: list[str],
    gpu: bool,
    version: str | None,
    device_name: str,
    threads: int,
) -> int:
    from engines.dit.tensorrt.spec import ProfileError, parse_stages, profiles_for, stage_spec
    from trt_build.bench import bench_onnxruntime, bench_torch, format_rows

    rows = []
    iters = args.iters or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if "tensorrt" in backends:
        rows += _bench_tensorrt(args, warmup, iters)
    torch_backends = [b for b in backends if b in ("eager", "compile", "cudagraphs")]
    if torch_backends or "onnxruntime" in backends:
        components, _ = _load_components(args, None)
        try:
            stages = parse_stages(args.stages, components)
            profiles, _ = _profiles(args, components, pathlib.Path(args.onnx) if args.onnx else None)
            specs = {s: stage_spec(s, components) for s in stages}
            for spec in specs.values():
                mine = profiles_for(spec, profiles)
                if torch_backends:
                    rows += bench_torch(spec, mine, torch_backends, warmup=warmup, iters=iters)
        except (ValueError, ProfileError) as exc:
            raise CliError(str(exc)) from None
        if "onnxruntime" in backends:
            if not args.onnx:
                raise CliError("--backends onnxruntime needs --onnx DIR (the exports)")
            rows += bench_onnxruntime(
                pathlib.Path(args.onnx),
                specs,
                profiles,
                dtype=args.dtype,
                warmup=warmup,
                iters=iters,
                threads=threads,
            )
    header = (
        f"{device_name} ({threads} CPU thread{'s' if threads > 1 else ''}); "
        f"TensorRT {version or 'not installed'}; torch {torch.__version__}; median of {iters}"
    )
    sys.stdout.write(format_rows(rows, header))
    _write_json(
        args.json,
        {"header": header, "device": device_name, "tensorrt": version, "rows": [r.as_dict() for r in rows]},
    )
    return 0


def _bench_tensorrt(args: argparse.Namespace, warmup: int, iters: int) -> list[Any]:
    from engines.dit.tensorrt.manifest import Manifest, ManifestError
    from trt_build.bench import bench_tensorrt

    if not args.engines:
        raise CliError("--backends tensorrt needs --engines DIR")
    target = _trt_target()
    try:
        manifest = Manifest.load(args.engines, missing_ok=False)
    except ManifestError as exc:
        raise CliError(str(exc)) from None
    stages = None if args.stages == "all" else set(args.stages.split(","))
    sel = [e for e in manifest.entries.values() if stages is None or e.stage in stages]
    runnable = []
    for e in sel:
        from engines.dit.tensorrt.manifest import refusal_reason

        why = refusal_reason(e, target, None, None)
        if why is None:
            runnable.append((e, manifest.engine_path(e)))
        else:
            logger.warning("skipping engine %s (%s): %s", e.key, e.profile, why)
    if not runnable:
        raise CliError(f"no engine in {manifest.path} runs on {target.describe()}: build them here")
    graphs = (False,) if args.no_cuda_graphs else (False, True)
    return bench_tensorrt(runnable, warmup=warmup, iters=iters, cuda_graphs=graphs)


# --------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avatar trt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (TensorRT's own messages too)")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("profile", help="write a profile file for the sizes and sub-clip lengths you serve")
    _model_args(q)
    q.add_argument(
        "--sizes",
        help="keyframe sizes WIDTHxHEIGHT, comma-separated (default: engine.json's; flashhead: the "
        "chunk size, 512x512)",
    )
    q.add_argument(
        "--subclip-frames", default="2", help="sub-clip lengths served (--subclip-frames), e.g. 2,4,8"
    )
    q.add_argument(
        "--keyframes", type=int, help="keyframes per blueprint batch (default max(2, ceil(fps / n)))"
    )
    q.add_argument(
        "--characters", type=int, default=1, help="audio tracks (characters) per sub-clip, at most"
    )
    q.add_argument(
        "--cfg",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="classifier-free guidance doubles the batch (default: from engine.json)",
    )
    q.add_argument("-o", "--output", type=pathlib.Path, default=pathlib.Path("profiles.json"))
    q.set_defaults(func=cmd_profile)

    q = sub.add_parser("export", help="export each stage to ONNX (dynamo exporter)")
    _model_args(q)
    _stages_arg(q)
    q.add_argument("--out", type=pathlib.Path, default=pathlib.Path("onnx"))
    q.add_argument("--profiles", type=pathlib.Path, help="profile file (default: the serving defaults)")
    q.add_argument(
        "--external-data",
        default="auto",
        choices=["auto", "on", "off"],
        help="weights in model.onnx.data (auto: over 2 GB)",
    )
    q.add_argument("--opset", type=int, default=None)
    q.add_argument("--force", action="store_true", help="export again even when up to date")
    q.set_defaults(func=cmd_export)

    q = sub.add_parser("check", help="onnxruntime vs PyTorch at each profile's min/opt/max shapes")
    _model_args(q)
    _stages_arg(q)
    q.add_argument("--onnx", type=pathlib.Path, default=pathlib.Path("onnx"))
    q.add_argument("--profiles", type=pathlib.Path, help="default: the export's profiles.json")
    q.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="max |onnx - torch| / max |torch| per output (default 1e-3 fp32, 2e-2 fp16, 5e-2 bf16)",
    )
    q.add_argument("--provider", action="append", help="onnxruntime execution provider (default CPU)")
    q.add_argument("--json", type=pathlib.Path)
    q.set_defaults(func=cmd_check)

    q = sub.add_parser("build", help="build TensorRT engines from the exports and a profile file")
    _stages_arg(q)
    q.add_argument("--onnx", type=pathlib.Path, default=pathlib.Path("onnx"))
    q.add_argument("--engines", type=pathlib.Path, default=pathlib.Path("engines"))
    q.add_argument("--profiles", type=pathlib.Path, help="default: the export's profiles.json")
    q.add_argument("--precision", default="bf16", choices=["fp32", "tf32", "fp16", "bf16", "fp8"])
    q.add_argument(
        "--no-strongly-typed",
        action="store_true",
        help="weak typing: build from the fp32 export and let TensorRT pick layer precisions",
    )
    q.add_argument(
        "--opt-level",
        type=int,
        default=3,
        choices=range(0, 6),
        help="builder optimisation level 0-5 (higher: longer builds, maybe faster engines)",
    )
    q.add_argument("--workspace-mb", type=int, default=None, help="cap on TensorRT's scratch memory")
    q.add_argument("--timing-cache", type=pathlib.Path, help="default: ENGINES/timing.cache")
    q.add_argument("--force", action="store_true", help="build again even when up to date")
    q.set_defaults(func=cmd_build)

    q = sub.add_parser(
        "inspect", help="what engines hold: inputs, profiles, layer precisions, attention fusion"
    )
    _stages_arg(q)
    q.add_argument("--engines", type=pathlib.Path, default=pathlib.Path("engines"))
    q.add_argument("--key", help="only engines whose key starts with this")
    q.add_argument("--layers", action="store_true", help="list every layer")
    q.add_argument("--manifest-only", action="store_true", help="what the manifest says (no TensorRT needed)")
    q.add_argument("--json", type=pathlib.Path)
    q.set_defaults(func=cmd_inspect)

    q = sub.add_parser("list", help="the manifest, and which engines run on this machine")
    q.add_argument("--engines", type=pathlib.Path, default=pathlib.Path("engines"))
    q.set_defaults(func=cmd_list)

    q = sub.add_parser("bench", help="latency and throughput per profile shape, with and without CUDA graphs")
    _model_args(q, dtype_default=None)
    _stages_arg(q)
    q.add_argument("--engines", type=pathlib.Path, help="TensorRT engine folder")
    q.add_argument("--onnx", type=pathlib.Path, help="exports (onnxruntime backend; their profiles.json)")
    q.add_argument("--profiles", type=pathlib.Path)
    q.add_argument(
        "--backends",
        help="comma-separated: tensorrt, eager, compile, cudagraphs, onnxruntime "
        "(default: tensorrt; without TensorRT compile,cudagraphs; on CPU eager)",
    )
    q.add_argument("--iters", type=int)
    q.add_argument("--warmup", type=int)
    q.add_argument("--no-cuda-graphs", action="store_true", help="tensorrt: skip the CUDA graph rows")
    q.add_argument(
        "--threads", type=int, help="CPU threads for PyTorch and onnxruntime (default 1 without a GPU)"
    )
    q.add_argument("--json", type=pathlib.Path)
    q.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        return int(args.func(args))
    except CliError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
