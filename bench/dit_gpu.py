"""Per-step latency, FLOPs, MFU and real-time factor of the sub-clip DiT.

On a GPU (default): the Wan2.1-1.3B-sized sub-clip DiT (30 blocks, width 1536,
first-last-frame input channels, audio attention after every block) with
random weights in bf16, at 256x256, 512x512 and 480x832 sub-clips, eager vs.
``torch.compile`` vs. ``torch.compile`` with CUDA graphs (shapes are static
per size). Without a GPU, or with ``--tiny``, the tiny preset runs on CPU so
CI keeps this script working.

    python -m bench.dit_gpu                      # GPU, all sizes and modes
    python -m bench.dit_gpu --tiny               # CPU smoke run
    python -m bench.dit_gpu --modes eager --sizes 480x832 --json out.json

The real-time factor is seconds of video per second of compute for one
sub-clip of ``--frames`` frame intervals at ``--fps``: ``rtf_dit`` counts the
``--steps`` denoising steps (no CFG: a CFG-distilled checkpoint), ``rtf_clip``
adds the VAE encode of the first-last-frame condition and the VAE decode.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from engines.dit.backend import compiled_forward
from engines.dit.config import parse_dtype, preset
from engines.dit.loading import random_components
from engines.dit.model import AudioCondition, AvatarDiT
from engines.dit.video import LatentCodec
from trt_build.timing import timer

logger = logging.getLogger(__name__)

# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' datasheets
PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
    "A10": 125.0,
    "L4": 121.0,
}


@dataclass(slots=True)
class Row:
    size: str
    mode: str
    tokens: int
    latent_frames: int
    step_ms: float
    tflops_per_step: float
    mfu: float | None
    rtf_dit: float
    rtf_clip: float | None
    vae_ms: float | None = None
    step_samples_ms: list[float] = field(default_factory=list)


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--sizes: {text!r} is not HEIGHTxWIDTH") from None
    if h % 16 or w % 16:
        raise SystemExit(f"--sizes: {text} must be multiples of 16")
    return h, w


def measure(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)
    components = random_components(args.config, dtype=dtype, device=str(device), seed=0)
    dit = components.subclip
    adapter = dit.adapter
    if adapter is None:
        raise SystemExit("the sub-clip DiT has no audio adapter")
    gen = torch.Generator(device="cpu").manual_seed(1)
    for proj in adapter.out_projections():  # non-zero, like a trained adapter (same cost)
        weight = proj.weight
        weight.data = (torch.randn(weight.shape, generator=gen) * 0.02).to(device, weight.dtype)
    codec = LatentCodec(components.vae)
    text_len = preset(args.config).text_length
    text_dim = int(dit.backbone.config.text_dim)
    time_ms = timer(device)
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    peak = args.peak_tflops or peak
    rows: list[Row] = []
    n = args.frames
    video_frames = 1 + codec.temporal * math.ceil(n / codec.temporal)
    latent_frames = (video_frames - 1) // codec.temporal + 1
    video_seconds = n / args.fps
    for size in args.sizes:
        h, w = _parse_size(size)
        lh, lw = h // codec.spatial, w // codec.spatial
        x = torch.randn(1, dit.in_channels, latent_frames, lh, lw, generator=gen).to(device, dtype)
        t = torch.full((1,), 700.0, device=device)
        text = torch.randn(1, text_len, text_dim, generator=gen).to(device, dtype)
        window = int(adapter.config.audio_window)
        feats = torch.randn(
            1, 1, latent_frames, window, int(adapter.config.audio_dim), generator=gen
        )
        with torch.no_grad():
            audio = dit.project_audio(feats.to(device))
        tokens = latent_frames * (lh // dit.patch_size[1]) * (lw // dit.patch_size[2])

        # FLOPs of one forward (eager)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            dit(x, t, text, audio=audio)
        tflops = counter.get_total_flops() / 1e12

        # VAE: encode the first-last-frame condition and decode the clip, once per clip
        vae_ms = None
        if not args.no_vae:
            video = torch.zeros(1, 3, video_frames, h, w, device=device)
            latents = torch.randn(1, codec.z_dim, latent_frames, lh, lw, generator=gen).to(device)

            def vae_pass(video: torch.Tensor = video, latents: torch.Tensor = latents) -> None:
                codec.encode(video)
                codec.decode(latents)

            codec.encode(video)  # warm-up
            vae_ms = statistics.median(time_ms(vae_pass) for _ in range(max(1, args.iters // 4)))

        for mode in args.modes:
            step = _compiled(dit, mode)
            with torch.no_grad():
                for _ in range(args.warmup):
                    step(x, t, text, audio)
                call = functools.partial(step, x, t, text, audio)
                samples = [time_ms(call) for _ in range(args.iters)]
            step_ms = statistics.median(samples)
            dit_s = args.steps * step_ms / 1000
            rows.append(
                Row(
                    size=f"{h}x{w}",
                    mode=mode,
                    tokens=tokens,
                    latent_frames=latent_frames,
                    step_ms=step_ms,
                    tflops_per_step=tflops,
                    mfu=(tflops / (step_ms / 1000) / peak) if peak else None,
                    rtf_dit=video_seconds / dit_s,
                    rtf_clip=None if vae_ms is None else video_seconds / (dit_s + vae_ms / 1000),
                    vae_ms=vae_ms,
                    step_samples_ms=samples,
                )
            )
            logger.info("%s %s: %.2f ms/step", size, mode, step_ms)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _compiled(
    dit: AvatarDiT, mode: str
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AudioCondition], torch.Tensor]:
    # cudagraphs: inductor + CUDA graphs, static shapes per size
    modes = {"eager": None, "compile": "default", "cudagraphs": "reduce-overhead"}
    if mode not in modes:
        raise SystemExit(f"--modes: unknown mode {mode!r} (eager, compile, cudagraphs)")
    compile_mode = modes[mode]
    forward = dit.__call__ if compile_mode is None else compiled_forward(dit, compile_mode, dynamic=False)

    def step(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, audio: AudioCondition) -> torch.Tensor:
        return forward(x, t, text, audio=audio).sample

    return step


def format_table(rows: Sequence[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| size | mode | tokens | ms/step | TFLOP/step | MFU | RTF (DiT, 4 steps) | RTF (+VAE) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        clip = f"{r.rtf_clip:.2f}" if r.rtf_clip is not None else "n/a"
        lines.append(
            f"| {r.size} | {r.mode} | {r.tokens} | {r.step_ms:.2f} | {r.tflops_per_step:.4g} | "
            f"{mfu} | {r.rtf_dit:.2f} | {clip} |"
        )
    return "\n".join(lines) + "\n"


def count_only(args: argparse.Namespace) -> list[Row]:
    """FLOPs per step of the 1.3B sub-clip DiT, counted on the meta device (no GPU needed)."""
    sizes = args.sizes if args.sizes_given else "256x256,512x512,480x832".split(",")
    components = random_components("1.3b", dtype=torch.bfloat16, device="meta")
    dit = components.subclip
    adapter = dit.adapter
    if adapter is None:
        raise SystemExit("the sub-clip DiT has no audio adapter")
    codec = LatentCodec(components.vae)
    video_frames = 1 + codec.temporal * math.ceil(args.frames / codec.temporal)
    latent_frames = (video_frames - 1) // codec.temporal + 1
    lines = [f"1.3B sub-clip DiT, FLOPs of one step (counted), {args.frames} frame intervals", ""]
    lines += [
        "| size | latent frames | tokens | TFLOP/step | TFLOP/sub-clip |",
        "|---|---|---|---|---|",
    ]
    for size in sizes:
        h, w = _parse_size(size)
        lh, lw = h // codec.spatial, w // codec.spatial
        with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
            x = torch.empty(1, dit.in_channels, latent_frames, lh, lw, dtype=torch.bfloat16)
            text = torch.empty(1, preset("1.3b").text_length, 4096, dtype=torch.bfloat16)
            feats = torch.empty(
                1, 1, latent_frames, adapter.config.audio_window, adapter.config.audio_dim
            )
            dit(x, torch.full((1,), 700.0), text, audio=dit.project_audio(feats))
        tokens = latent_frames * (lh // 2) * (lw // 2)
        tflops = counter.get_total_flops() / 1e12
        lines.append(
            f"| {h}x{w} | {latent_frames} | {tokens} | {tflops:.2f} | {args.steps * tflops:.2f} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return []


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="tiny preset on CPU (CI smoke run)")
    p.add_argument("--sizes", default=None, help="comma-separated HEIGHTxWIDTH sub-clip sizes")
    p.add_argument("--modes", default=None, help="comma-separated: eager, compile, cudagraphs")
    p.add_argument("--frames", type=int, default=25, help="frame intervals per sub-clip")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--steps", type=int, default=4, help="denoising steps per sub-clip")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--no-vae", action="store_true", help="skip the VAE timing")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's bf16 peak")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--count-only", action="store_true", help="count 1.3B FLOPs on meta; no timing")
    args = p.parse_args(argv)
    args.sizes_given = args.sizes is not None
    gpu = torch.cuda.is_available() and not args.tiny
    if not gpu and not args.tiny and not args.count_only:
        logger.warning("no CUDA GPU: running the tiny configuration on CPU")
    args.tiny = not gpu
    args.device = "cuda" if gpu else "cpu"
    args.config = "1.3b" if gpu else "tiny"
    args.dtype = "bf16" if gpu else "fp32"
    args.sizes = (args.sizes or ("256x256,512x512,480x832" if gpu else "64x64,64x96")).split(",")
    args.modes = (args.modes or ("eager,compile,cudagraphs" if gpu else "eager")).split(",")
    args.iters = args.iters or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if args.frames < 1 or args.steps < 1 or args.iters < 1:
        raise SystemExit("--frames, --steps and --iters must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.count_only:
        return count_only(args)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    threads = torch.get_num_threads()
    if args.tiny:  # tiny CPU kernels run slower with more threads on a shared machine
        torch.set_num_threads(1)
    try:
        rows = measure(args)
    finally:
        torch.set_num_threads(threads)
    header = (
        f"sub-clip DiT ({args.config}, {args.dtype}, random weights) on {device_name}; "
        f"{args.frames} frame intervals at {args.fps} fps, {args.steps} steps, "
        f"median of {args.iters}"
    )
    sys.stdout.write(format_table(rows, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"header": header, "device": device_name, "rows": [asdict(r) for r in rows]},
                f,
                indent=2,
            )
    return rows


if __name__ == "__main__":
    main()
