"""Offline render speed: ``avatar render`` as a user runs it, in x real time.

    python -m bench.render_speed [--repeats 3] [--seconds 60] [--size 512x512]
                                 [--render-arg=--director --render-arg=static] [--json out.json]

Each run renders the same speech (Piper lines, about ``--seconds`` long, given
as a WAV so every run gets the same audio) by the astronaut photo to an MP4,
with the command's defaults (portrait engine, embedded director, libx264
``medium``, CRF 20). Speed is what the command reports: seconds of video over
the seconds the render took (the models load before it starts); the CPU time
of the whole command is given too (robust to other jobs on a shared machine).
The median over the repeats is printed last.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server.launch import ROOT

LINES = ["Hello everyone, and welcome back to the stream.",
         "Today we talk about rockets, and the people who build them.",
         "It takes years of work to make an engine that does not shake itself apart.",
         "Fuel, oxygen, and a spark: that is all there is to it, in theory."]
WROTE = re.compile(r"wrote .*: ([\d.]+) s, \d+ frames .* rendered in ([\d.]+) s: ([\d.]+)x real time")


def make_inputs(folder: Path, seconds: float) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image
    from skimage import data

    from tests.helpers import speech, wav_bytes

    photo = folder / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    parts, n, k = [], 0, 0
    while n < seconds * 48_000:
        line = speech(LINES[k % len(LINES)], rate=48_000)
        parts += [line, np.zeros(19_200, np.float32)]
        n, k = n + len(line) + 19_200, k + 1
    wav = folder / "speech.wav"
    wav.write_bytes(wav_bytes(np.concatenate(parts), 48_000))
    return photo, wav


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--render-arg", action="append", default=[], help="passed on to avatar render")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        photo, wav = make_inputs(Path(tmp), args.seconds)
        for i in range(args.repeats):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            cmd = [sys.executable, "-m", "server.cli", "render", "--avatar", str(photo), "--audio", str(wav),
                   "--size", args.size, "--out", str(Path(tmp) / "out.mp4"), *args.render_arg]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            m = WROTE.search(done.stderr)
            if done.returncode or m is None:
                sys.stderr.write(done.stderr[-3000:])
                return 1
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            run = {"video_s": float(m[1]), "render_s": float(m[2]), "speed": float(m[3]),
                   "command_s": round(wall, 1), "command_cpu_s": round(cpu, 1)}
            runs.append(run)
            print(f"run {i + 1}: {run['video_s']:.1f} s of video rendered in {run['render_s']:.1f} s: "
                  f"{run['speed']:.1f}x real time (the whole command {wall:.1f} s, {cpu:.1f} CPU-s)")
    median = statistics.median(r["speed"] for r in runs)
    how = " ".join(args.render_arg) or "defaults"
    print(f"median of {len(runs)}: {median:.1f}x real time ({args.size}, {how})")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "median_speed": median}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
