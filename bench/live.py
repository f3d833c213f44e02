"""Live figures over real WebRTC: latency, first frame, concurrency, CPU per session.

    python -m bench.live [--sessions 1 4 6] [--seconds 20] [--json out.json] [--server-arg=...]

For each session count, starts ``avatar serve`` (portrait engine, embedded
director, its session workers) as a user would, then that many Python
WebRTC clients on 127.0.0.1, **each in its own process** (as separate viewers
are; one Python process cannot decode many streams), that talk (Piper speech
with pauses, paced in real time) for ``--seconds``, and reports:

* first video frame after the SDP answer (client side);
* received fps (client side, steady state), the worst client's and the median;
* added latency from an audio chunk's arrival at the server to the video
  frame of the same pts being handed to the encoder (server side, p50/p95);
* A/V offset at the server's output, and late frames: slots where no fresh
  frame was ready (the previous one was repeated) over frames sent;
* the server's CPU: seconds of CPU its session workers used per second of
  each session (``/v1/workers``), over the measured stretch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

LINES = [
    "Hello everyone and welcome back to the stream.",
    "Today we are looking at how rockets get to orbit, and why it is so hard.",
    "Let me know in the chat what you think about it!",
]


def talk_track(seconds: float) -> np.ndarray:
    from scipy.signal import resample_poly

    from realtime.tts import load_voice

    voice = load_voice()
    parts = []
    for line in LINES:
        x = np.concatenate([c.audio_float_array for c in voice.synthesize(line)])
        parts += [resample_poly(x, 48000, voice.config.sample_rate).astype(np.float32),
                  np.zeros(int(0.7 * 48000), np.float32)]
    one = np.concatenate(parts)
    reps = int(np.ceil(seconds * 48000 / len(one)))
    return np.tile(one, reps)[: int(seconds * 48000)]


# --------------------------------------------------------------------------- one client (its own process)
async def client(url: str, audio_path: str, seconds: float) -> dict[str, Any]:
    from server.peer import AvatarPeer

    peer = AvatarPeer(url, np.load(audio_path), keep_frames=False)
    try:
        await peer.connect()
        await peer.wait_open(60)
        sys.stdout.write("OPEN\n")
        sys.stdout.flush()
        opened = time.perf_counter()
        await asyncio.sleep(seconds)
        async with aiohttp.ClientSession() as http, http.get(peer.session_url) as res:
            stats = await res.json()
        stats["client_seconds"] = round(time.perf_counter() - opened, 2)
        stats["client_url"] = peer.session_url
    finally:
        await peer.close()
    vt = np.array(peer.got.video_times)
    steady = vt[vt > vt[0] + 2.0] if len(vt) else vt
    fps = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 2 else 0.0
    first = (peer.first_frame_at - peer.answered_at) * 1000 if peer.first_frame_at and peer.answered_at \
        else None
    return {"received_fps": fps, "first_frame_ms": first, "server": stats}


def client_main(args: argparse.Namespace) -> int:
    from server.ice import restrict_host_candidates

    restrict_host_candidates(["127.0.0.1"])
    result = asyncio.run(client(args.client, args.audio, args.seconds))
    sys.stdout.write("DONE " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------- the benchmark
def _worker_cpu(url: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{url}/v1/workers", timeout=10) as res:
        return float(json.load(res)["cpu_seconds"])


def run(url: str, sessions: int, seconds: float, audio_path: str) -> dict[str, Any]:
    procs = [subprocess.Popen([sys.executable, "-m", "bench.live", "--client", url, "--audio", audio_path,
                               "--seconds", str(seconds)], stdout=subprocess.PIPE, text=True)
             for _ in range(sessions)]
    for p in procs:  # every client is streaming
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line.startswith("OPEN"):
            raise RuntimeError(f"a client failed to connect (exit {p.wait()})")
    cpu0, t0 = _worker_cpu(url), time.monotonic()
    results = []
    cpu1 = t1 = None
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        if cpu1 is None:  # the first client is done: the measured stretch ends
            cpu1, t1 = _worker_cpu(url), time.monotonic()
        if not line.startswith("DONE "):
            raise RuntimeError(f"a client failed (exit {p.wait()})")
        results.append(json.loads(line[5:]))
        p.wait()
    assert cpu1 is not None and t1 is not None
    broken = [r for r in results if "held_frames" not in r["server"]]
    if broken:
        raise RuntimeError(f"sessions without stats at the end: {broken}")
    server_stats = [r["server"] for r in results]
    late = [s["held_frames"] / max(s["frames_sent"], 1) * 100 for s in server_stats]
    return {
        "sessions": sessions,
        "seconds": seconds,
        "received_fps_min": min(r["received_fps"] for r in results),
        "received_fps_median": statistics.median(r["received_fps"] for r in results),
        "first_frame_ms_median": statistics.median(r["first_frame_ms"] for r in results
                                                   if r["first_frame_ms"] is not None),
        "latency_p50_ms_median": statistics.median(
            s["latency_p50_ms"] for s in server_stats if s["latency_p50_ms"] is not None),
        "latency_p95_ms_max": max(
            s["latency_ms"] for s in server_stats if s["latency_ms"] is not None),
        "av_offset_ms_max_abs": max(abs(s["av_offset_ms"]) for s in server_stats),
        "late_frames_pct_max": max(late),
        "late_frames_pct_median": statistics.median(late),
        "render_ms_median": statistics.median(s["render_ms"] for s in server_stats),
        "clips_skipped_total": sum(s["clips_skipped"] for s in server_stats),
        "server_cpu_s_per_session_s": (cpu1 - cpu0) / ((t1 - t0) * sessions),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for avatar serve (repeatable)")
    ap.add_argument("--client", help=argparse.SUPPRESS)  # one client, in its own process
    ap.add_argument("--audio", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        return client_main(args)
    from server.launch import ServerProcess

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        audio_path = str(Path(tmp) / "talk.npy")
        np.save(audio_path, talk_track(args.seconds + 10))
        for n in args.sessions:
            with ServerProcess(Path(tmp) / f"server{n}", "--max-sessions", str(max(n, 4)),
                               *args.server_arg) as srv:
                try:
                    r = run(srv.url, n, args.seconds, audio_path)
                except RuntimeError:
                    sys.stderr.write(srv.tail(6000))
                    raise
            results.append(r)
            sys.stdout.write(
                f"{n} session(s), {args.seconds:.0f}s: received {r['received_fps_median']:.1f} fps "
                f"(min {r['received_fps_min']:.1f}); first frame {r['first_frame_ms_median']:.0f} ms "
                f"after the answer; latency p50 {r['latency_p50_ms_median']:.0f} ms, p95 (worst "
                f"session) {r['latency_p95_ms_max']:.0f} ms; A/V offset <= "
                f"{r['av_offset_ms_max_abs']:.1f} ms; late frames {r['late_frames_pct_median']:.2f}% "
                f"median, {r['late_frames_pct_max']:.2f}% worst; render {r['render_ms_median']:.1f} ms "
                f"per sub-clip; server {r['server_cpu_s_per_session_s']:.3f} CPU-s per session-s\n")
            sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
