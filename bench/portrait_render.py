"""Portrait engine render speed at 512x512 on one core.

    python -m bench.portrait_render [--frames 500] [--repeats 5] [--photo astronaut|hopper|two]
                                    [--json out.json]

Renders talking frames (jaw, rounding, smile, head motion all moving) through
the engine's sub-clip stage, with OpenCV on one thread, and reports the median
over repeats of frames per wall-clock second and per CPU second of this process
(the CPU figure is robust to other jobs on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import cv2
import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--subclip-frames", type=int, default=2)
    ap.add_argument("--photo", default="astronaut", choices=["astronaut", "hopper", "two"],
                    help="scikit-image's astronaut, matplotlib's Grace Hopper, or both side by "
                         "side (two characters, both talking)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    from skimage import data

    from engines.base import AUDIO_RATE, AudioSlice, Avatar
    from engines.portrait import PortraitEngine
    from engines.storyline import Gesture, Shot

    engine = PortraitEngine()
    prep = engine.prepare(Avatar(args.photo, _photo(args.photo, data.astronaut())))
    n = args.subclip_frames
    seconds = args.frames / engine.fps + 1
    t = np.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
    # a voiced, syllable-rate modulated signal: the mouth moves on every frame
    samples = (0.3 * np.sin(2 * np.pi * 160 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
               ).astype(np.float32)
    audio = AudioSlice(start=0.0, samples=samples, vad=np.ones(int(seconds / 0.032) + 2, np.float32))
    shot = Shot(start=0.0, end=seconds, head_motion=1.0,
                gestures=[Gesture(kind="nod", at=1.0, duration=1.0)])
    times = [k * n / engine.fps for k in range(args.frames // n + 1)]
    chars = engine.characters(prep)
    kfs = engine.keyframes(prep, [shot.model_copy(update={"character": c}) for c in range(chars)],
                           times)
    wall, cpu = [], []
    for _ in range(args.repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        count = 0
        for a, b in zip(kfs, kfs[1:], strict=False):
            count += len(engine.subclip(prep, a, b, [audio] * chars, [shot] * chars)) - 1
        wall.append(count / (time.perf_counter() - w0))
        cpu.append(count / (time.process_time() - c0))
    result = {"frames_per_repeat": count, "size": list(engine.size), "photo": args.photo,
              "characters": chars,
              "fps_wall_median": statistics.median(wall), "fps_cpu_median": statistics.median(cpu),
              "fps_wall_all": wall, "fps_cpu_all": cpu}
    sys.stdout.write(f"portrait render 512x512 ({args.photo}, {chars} talking), one OpenCV thread, "
                     f"{count} frames x {args.repeats}: "
                     f"median {result['fps_wall_median']:.0f} fps (wall), "
                     f"{result['fps_cpu_median']:.0f} fps per CPU-second\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _photo(name: str, astronaut: np.ndarray) -> np.ndarray:
    from PIL import Image

    if name == "astronaut":
        return np.ascontiguousarray(astronaut)
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8)
    if name == "hopper":
        return hopper
    small = np.asarray(Image.fromarray(hopper).resize((437, 512), Image.LANCZOS))
    return np.ascontiguousarray(np.hstack([astronaut, small]))


if __name__ == "__main__":
    sys.exit(main())
