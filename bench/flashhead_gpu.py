"""SoulX-FlashHead streaming speed: per-chunk stages, fps, first frame, MFU, backends, concurrent streams.

On a GPU (default): Pro and Lite at the published sizes with random weights
(random weights measure speed honestly), one bf16 copy of the DiT and VAE
weights on the GPU (wav2vec2 in float32, as the reference runs it), 512x512,
chunks of 33 frames made as a stream makes them (:meth:`FlashHead.next_chunk`:
8 s of audio embedded, 4 DiT steps, VAE decode, colour correction, the 5 (Lite:
9) motion frames re-encoded by the next chunk). For each backend:

* ``eager``; ``compile`` (``torch.compile`` of the DiT and the VAE);
  ``cudagraphs`` (the DiT through ``torch.compile(mode="reduce-overhead")``,
  CUDA graphs; the VAE compiled); ``tensorrt`` (engines from ``--trt-engines``,
  built with ``avatar trt build``; skipped with the reason when absent);
* per-chunk latency split into audio encoding, the DiT steps, VAE decode,
  colour correction and the motion re-encode (stages synchronised, medians);
* sustained fps of one stream (chunks back to back, no stage syncs): new
  frames per second of wall time;
* first video frame after the first audio: the chunk's audio (28 frames =
  1.12 s for Pro, 24 = 0.96 s for Lite) plus one chunk's latency, as the server
  sees it (the playout delay must be at least this);
* the DiT's MFU (its FLOPs per step over step time and the GPU's bf16 peak);
* concurrent streams: 1, 2, ... streams on threads (as the server's render
  threads run sessions), each on its own CUDA stream, until one drops below
  25 fps; the most that hold 25 fps is reported.

Targets on one H100/H200: Pro >= 25 fps for one stream with the first frame
within 1.5 s of the first speech; Lite >= 6 streams of 25 fps.

    python -m bench.flashhead_gpu                                  # GPU: pro and lite, all backends
    python -m bench.flashhead_gpu --models pro --trt-engines engines --json fh.json
    python -m bench.flashhead_gpu --tiny                           # CPU smoke run (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import pathlib
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from bench.dit_gpu import peak_tflops
from engines.base import AUDIO_RATE
from engines.dit.flashhead import ChunkSettings, FlashHead, Reference, video_to_frames
from engines.dit.flashhead.engine import HISTORY_S
from engines.dit.flashhead.transformer import transformer_flops

logger = logging.getLogger(__name__)

MODES = ("eager", "compile", "cudagraphs", "tensorrt")
STAGES = ("audio_encode", "motion_encode", "dit_step", "vae_decode", "color_correct", "to_frames")
TARGET_FPS = 25.0


@dataclass(slots=True)
class Row:
    model: str
    mode: str
    size: str
    new_frames: int
    stage_ms: dict[str, float] = field(default_factory=dict)  # per chunk (dit_step: all steps)
    step_ms: float | None = None  # one DiT step
    chunk_ms: float | None = None  # sustained, one stream
    fps: float | None = None
    first_frame_s: float | None = None
    tflops_per_step: float | None = None
    mfu: float | None = None
    streams_at_25: int | None = None
    stream_fps: dict[int, float] = field(default_factory=dict)  # streams -> slowest stream's fps
    reference_encode_ms: float | None = None
    weights_gb: float | None = None
    gpu_memory_gb: float | None = None
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """A ``FlashHead`` stage timer: synchronises around each stage and sums its time per chunk."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.current: dict[str, float] = defaultdict(float)
        self.chunks: list[dict[str, float]] = []

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        _sync(self.device)
        t = time.perf_counter()
        yield
        _sync(self.device)
        self.current[stage] += (time.perf_counter() - t) * 1000

    def end_chunk(self) -> None:
        self.chunks.append(dict(self.current))
        self.current = defaultdict(float)

    def medians(self) -> dict[str, float]:
        return {s: statistics.median(c.get(s, 0.0) for c in self.chunks) for s in STAGES}


class Stream:
    """One stream's state between chunks, as the engine keeps it (motion frames, audio history)."""

    def __init__(self, fh: FlashHead, reference: Reference, seed: int) -> None:
        self.fh = fh
        self.reference = reference
        self.history = np.zeros(HISTORY_S * AUDIO_RATE, np.float32)
        self.motion: torch.Tensor | None = None
        self.gen = torch.Generator(device=fh.device).manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.new = fh.settings.frames - fh.motion_frames

    def chunk(self, timer: StageClock | None = None) -> np.ndarray:
        n = self.new * AUDIO_RATE // self.fh.settings.fps
        speech = (0.1 * self.rng.standard_normal(n)).astype(np.float32)  # any audio costs the same
        self.history = np.concatenate([self.history, speech])[-len(self.history) :]
        chunk = self.fh.next_chunk(self.reference, self.history, self.motion, generator=self.gen, timer=timer)
        self.motion = chunk.motion_frames
        with timer("to_frames") if timer is not None else contextlib.nullcontext():
            frames = video_to_frames(chunk.video[:, :, self.fh.motion_frames :])
        return frames


def _photo() -> np.ndarray:
    from skimage.data import astronaut

    return np.ascontiguousarray(astronaut())


def install(fh: FlashHead, mode: str, engines: str | None) -> str:
    """Put ``mode``'s backend in place on ``fh``; a note on what runs otherwise than asked.

    ``RuntimeError`` or ``ValueError`` says why the mode cannot run at all.
    """
    from engines.dit.flashhead.backend import BackendVAE, networks_of, select_flashhead_backends

    vae = networks_of(fh).vae
    fh.forward, fh.vae = fh.transformer.__call__, vae
    if mode == "eager":
        return ""
    if mode == "tensorrt":
        if engines is None:
            raise RuntimeError("no --trt-engines folder (build engines with `avatar trt build`)")
        choices = select_flashhead_backends(fh, engines_dir=pathlib.Path(engines))
        if choices["dit"].backend != "tensorrt":
            raise RuntimeError(f"no usable TensorRT engine for the DiT: {choices['dit'].reason}")
        return "; ".join(f"{n} {c.backend}" for n, c in choices.items() if c.backend != "tensorrt")
    if fh.device.type != "cuda" and mode == "cudagraphs":
        raise RuntimeError("CUDA graphs need a GPU")
    if mode == "cudagraphs":
        compiled = torch.compile(fh.transformer, mode="reduce-overhead", dynamic=False)

        def step(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(x, t, c, y).clone()  # type: ignore[no-any-return]

        fh.forward = step
    else:
        fh.forward = torch.compile(fh.transformer, dynamic=False)
    # the reference compiles its VAE's encode and decode too
    encode = torch.compile(vae.encode, dynamic=False)
    decode = torch.compile(vae.decode, dynamic=False)
    fh.vae = BackendVAE(vae, encoder=encode, decoder=decode)
    return ""


def measure_mode(fh: FlashHead, reference: Reference, mode: str, args: argparse.Namespace, row: Row) -> None:
    device = fh.device
    new = fh.settings.frames - fh.motion_frames
    # warm-up (compiles), then the stages of a stream's chunks
    stream = Stream(fh, reference, seed=1)
    with torch.no_grad():
        for _ in range(args.warmup):
            stream.chunk()
        clock = StageClock(device)
        for _ in range(args.chunks):
            stream.chunk(clock)
            clock.end_chunk()
        row.stage_ms = clock.medians()
        steps = fh.settings.steps
        row.step_ms = row.stage_ms["dit_step"] / steps
        # sustained: chunks back to back, synchronised only at the ends
        _sync(device)
        t = time.perf_counter()
        for _ in range(args.chunks):
            stream.chunk()
        _sync(device)
    row.chunk_ms = (time.perf_counter() - t) * 1000 / args.chunks
    row.fps = new / (row.chunk_ms / 1000)
    row.first_frame_s = new / fh.settings.fps + row.chunk_ms / 1000
    if row.tflops_per_step is not None and row.step_ms:
        peak = args.peak_tflops or (
            peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        )
        row.mfu = row.tflops_per_step / (row.step_ms / 1000) / peak if peak else None
    if device.type == "cuda":
        row.gpu_memory_gb = torch.cuda.max_memory_allocated(device) / 1e9
    if args.max_streams > 0 and mode != "cudagraphs":
        row.streams_at_25, row.stream_fps = concurrent(fh, reference, args)
    elif mode == "cudagraphs":
        row.note = (
            row.note + "; " if row.note else ""
        ) + "streams: CUDA-graph trees are per thread, not measured"


def _run_stream(
    stream: Stream,
    chunks: int,
    barrier: threading.Barrier,
    out: list[float],
    i: int,
    errors: list[BaseException],
) -> None:
    """One stream's thread: a chunk off the clock, then ``chunks`` timed on its own CUDA stream."""
    try:
        device = stream.fh.device
        cuda = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.no_grad(), torch.cuda.stream(cuda) if cuda is not None else contextlib.nullcontext():
            stream.chunk()
            barrier.wait()
            t = time.perf_counter()
            for _ in range(chunks):
                stream.chunk()
            if cuda is not None:
                cuda.synchronize()
        out[i] = stream.new * chunks / (time.perf_counter() - t)
    except BaseException as exc:  # reported on the main thread
        errors.append(exc)
        barrier.abort()


def concurrent(fh: FlashHead, reference: Reference, args: argparse.Namespace) -> tuple[int, dict[int, float]]:
    """The most streams (threads, one CUDA stream each) that all hold the target fps (25), and each
    count's slowest fps."""
    results: dict[int, float] = {}
    best = 0
    for count in range(1, args.max_streams + 1):
        fps = [0.0] * count
        errors: list[BaseException] = []
        barrier = threading.Barrier(count)
        streams = [Stream(fh, reference, seed=10 + i) for i in range(count)]
        threads = [
            threading.Thread(
                target=_run_stream, args=(st, args.chunks, barrier, fps, i, errors), name=f"stream-{i}"
            )
            for i, st in enumerate(streams)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        results[count] = min(fps)
        logger.info("%d stream(s): slowest %.1f fps", count, results[count])
        if results[count] < args.target_fps:
            break
        best = count
    return best, results


def measure(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    w, h = args.size
    rows: list[Row] = []
    for model in args.models:
        fh = FlashHead.random(
            model, device=device, dtype=dtype, settings=ChunkSettings(width=w, height=h), tiny=args.tiny
        )
        params = [*fh.transformer.parameters(), *fh.vae.model.parameters()]  # type: ignore[attr-defined]
        if {p.dtype for p in params} != {dtype}:
            raise SystemExit(f"weights are not all {dtype}: {sorted({str(p.dtype) for p in params})}")
        weights_gb = sum(p.numel() * p.element_size() for p in params) / 1e9
        cfg = dict(fh.transformer.config)
        latent = (fh.latent_frames, h // fh.vae.spatial_stride, w // fh.vae.spatial_stride)
        tflops = transformer_flops(cfg, latent) / 1e12
        photo = _photo()
        clock = StageClock(device)
        with clock("reference"):
            reference = fh.prepare_reference(photo)
        with clock("reference"):  # the second, warm
            reference = fh.prepare_reference(photo)
        ref_ms = clock.current["reference"] / 2
        for mode in args.modes:
            new = fh.settings.frames - fh.motion_frames
            row = Row(model=model, mode=mode, size=f"{w}x{h}", new_frames=new, tflops_per_step=tflops,
                      reference_encode_ms=ref_ms, weights_gb=weights_gb)  # fmt: skip
            try:
                row.note = install(fh, mode, args.trt_engines)
                measure_mode(fh, reference, mode, args, row)
            except (RuntimeError, ValueError) as exc:
                row.note = f"skipped: {exc}"
                logger.warning("%s %s: %s", model, mode, row.note)
            rows.append(row)
            logger.info("%s %s: %s", model, mode, row)
            if device.type == "cuda":
                torch.compiler.reset()
                torch.cuda.empty_cache()
        del fh
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _f(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_table(rows: Sequence[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| model | backend | audio ms | motion enc ms | DiT ms (per step) | VAE dec ms | colour ms "
        "| chunk ms | fps (1 stream) | first frame s | MFU | streams at 25 fps | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.stage_ms
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        streams = "n/a" if r.streams_at_25 is None else str(r.streams_at_25)
        if r.stream_fps:
            streams += " (" + ", ".join(f"{n}: {v:.1f}" for n, v in sorted(r.stream_fps.items())) + ")"
        dit = f"{s['dit_step']:.1f} ({_f(r.step_ms, '.1f')})" if s else "n/a"
        cells = [
            r.model, r.mode, _f(s.get("audio_encode"), ".1f"), _f(s.get("motion_encode"), ".1f"), dit,
            _f(s.get("vae_decode"), ".1f"), _f(s.get("color_correct"), ".1f"), _f(r.chunk_ms, ".1f"),
            _f(r.fps, ".1f"), _f(r.first_frame_s, ".2f"), mfu, streams, r.note,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for model in dict.fromkeys(r.model for r in rows):
        r = next(r for r in rows if r.model == model)
        lines.append(
            f"{model}: {r.new_frames} new frames per chunk, DiT {_f(r.tflops_per_step, '.2f')} TFLOP per "
            f"step, reference encode {_f(r.reference_encode_ms, '.1f')} ms (once per plan change), "
            f"DiT + VAE weights {_f(r.weights_gb, '.2f')} GB"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2-layer random model at 64x64 on CPU (CI smoke run)")
    p.add_argument("--models", default=None, help="comma-separated: pro, lite (default: both)")
    p.add_argument("--modes", default=None, help=f"comma-separated: {', '.join(MODES)}")
    p.add_argument("--trt-engines", default=None, help="TensorRT engine folder for the tensorrt backend")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default 512x512; 64x64 with --tiny)")
    p.add_argument("--chunks", type=int, default=None, help="chunks measured per stream (default 8; tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="chunks before measuring (default 3; tiny 1)")
    p.add_argument(
        "--max-streams", type=int, default=None, help="concurrent streams to try (default 12; tiny 2)"
    )
    p.add_argument("--target-fps", type=float, default=TARGET_FPS, help="fps each stream must hold (25)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's bf16 peak")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.tiny
    if not gpu and not args.tiny:
        logger.warning("no CUDA GPU: running the tiny configuration on CPU")
    args.tiny = not gpu
    args.device = "cuda" if gpu else "cpu"
    args.models = (args.models or ("pro,lite" if gpu else "pro")).split(",")
    if bad := [m for m in args.models if m not in ("pro", "lite")]:
        raise SystemExit(f"--models: unknown {bad} (pro, lite)")
    args.modes = (args.modes or ("eager,compile,cudagraphs,tensorrt" if gpu else "eager")).split(",")
    if bad := [m for m in args.modes if m not in MODES]:
        raise SystemExit(f"--modes: unknown {bad} ({', '.join(MODES)})")
    try:
        w, h = (int(v) for v in (args.size or ("512x512" if gpu else "64x64")).lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size: {args.size!r} is not WIDTHxHEIGHT") from None
    args.size = (w, h)
    args.chunks = args.chunks or (8 if gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.max_streams = args.max_streams if args.max_streams is not None else (12 if gpu else 2)
    if args.chunks < 1:
        raise SystemExit("--chunks must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    threads = torch.get_num_threads()
    if args.tiny:  # tiny CPU kernels run slower with more threads on a shared machine
        torch.set_num_threads(1)
    try:
        rows = measure(args)
    finally:
        torch.set_num_threads(threads)
    header = (
        f"SoulX-FlashHead ({'tiny, ' if args.tiny else ''}random weights, "
        f"{'bf16' if args.device == 'cuda' else 'fp32'}) on {device_name}, {args.size[0]}x{args.size[1]}, "
        f"chunks of 33 frames, median of {args.chunks} chunks; torch {torch.__version__}"
    )
    sys.stdout.write(format_table(rows, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"header": header, "device": device_name, "rows": [asdict(r) for r in rows]}, f, indent=2
            )
    return rows


if __name__ == "__main__":
    main()
