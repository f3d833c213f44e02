"""Live figures over real WebRTC: latency, first frame, concurrency.

    python -m bench.live [--sessions 1 4] [--seconds 20] [--json out.json]

For each session count, starts ``avatar serve`` (portrait engine) as a user
would, connects that many Python WebRTC peers on 127.0.0.1 that talk (Piper
speech with pauses, paced in real time) for ``--seconds``, and reports:

* first video frame after the SDP answer (client side);
* received fps (client side, steady state);
* added latency from an audio chunk's arrival at the server to the video
  frame of the same pts being handed to the encoder (server side, p50/p95);
* A/V offset at the server's output, and late frames: slots where no fresh
  frame was ready (the previous one was repeated) over frames sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
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


async def run(url: str, sessions: int, seconds: float, audio: np.ndarray) -> dict[str, Any]:
    from server.peer import AvatarPeer

    peers = [AvatarPeer(url, audio, keep_frames=False) for _ in range(sessions)]
    for p in peers:
        await p.connect()
    await asyncio.gather(*(p.wait_open(30) for p in peers))
    await asyncio.sleep(seconds)
    async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/sessions") as res:
        server_stats = (await res.json())["sessions"]
    for p in peers:
        await p.close()
    per = []
    for p in peers:
        vt = np.array(p.got.video_times)
        steady = vt[vt > vt[0] + 2.0] if len(vt) else vt
        fps = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 2 else 0.0
        first = (p.first_frame_at - p.answered_at) * 1000 if p.first_frame_at and p.answered_at \
            else None
        per.append({"received_fps": fps, "first_frame_ms": first})
    late = [s["held_frames"] / max(s["frames_sent"], 1) * 100 for s in server_stats]
    return {
        "sessions": sessions,
        "seconds": seconds,
        "received_fps_min": min(x["received_fps"] for x in per),
        "received_fps_median": statistics.median(x["received_fps"] for x in per),
        "first_frame_ms_median": statistics.median(x["first_frame_ms"] for x in per
                                                   if x["first_frame_ms"] is not None),
        "latency_p50_ms_median": statistics.median(
            s["latency_p50_ms"] for s in server_stats if s["latency_p50_ms"] is not None),
        "latency_p95_ms_max": max(
            s["latency_ms"] for s in server_stats if s["latency_ms"] is not None),
        "av_offset_ms_max_abs": max(abs(s["av_offset_ms"]) for s in server_stats),
        "late_frames_pct_max": max(late),
        "late_frames_pct_median": statistics.median(late),
        "render_ms_median": statistics.median(s["render_ms"] for s in server_stats),
        "clips_skipped_total": sum(s["clips_skipped"] for s in server_stats),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for avatar serve (repeatable)")
    args = ap.parse_args(argv)
    from server.ice import restrict_host_candidates
    from server.launch import ServerProcess

    restrict_host_candidates(["127.0.0.1"])
    audio = talk_track(args.seconds + 5)
    results = []
    for n in args.sessions:
        with tempfile.TemporaryDirectory() as tmp, ServerProcess(
                Path(tmp), "--max-sessions", str(max(n, 4)), *args.server_arg) as srv:
            r = asyncio.run(run(srv.url, n, args.seconds, audio))
        results.append(r)
        sys.stdout.write(
            f"{n} session(s), {args.seconds:.0f}s: received {r['received_fps_median']:.1f} fps "
            f"(min {r['received_fps_min']:.1f}); first frame {r['first_frame_ms_median']:.0f} ms "
            f"after the answer; latency p50 {r['latency_p50_ms_median']:.0f} ms, p95 (worst "
            f"session) {r['latency_p95_ms_max']:.0f} ms; A/V offset <= "
            f"{r['av_offset_ms_max_abs']:.1f} ms; late frames {r['late_frames_pct_median']:.2f}% "
            f"median, {r['late_frames_pct_max']:.2f}% worst; render {r['render_ms_median']:.1f} ms "
            f"per sub-clip\n")
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
