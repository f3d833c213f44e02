"""How soon an instruction shows in the video, end to end over WebRTC.

    python -m bench.instruct_latency [--runs 5] [--text "be cheerful"] [--json out.json]

Starts ``avatar serve`` (portrait engine, embedded director) as a user would and,
for each run, connects a Python WebRTC peer on 127.0.0.1 whose avatar is
speaking live: the peer's microphone plays Piper speech, so sub-clips render
as the audio arrives. Three seconds into the speech, it sends ``instruct`` on
the control channel and records the client's clock.

Known speech (Say text, uploads), which is rendered ahead and must be redone,
is measured on the fake clock instead (``tests/test_session.py``): there the
paired sessions are exactly alike, where over the network the two sessions'
idle motion (which follows each session's own clock) and the director's other
choices differ by more than the instruction's effect.

The latency is read off the received frames with the face mesh: the
mouth-corner lift of each frame (``engines.face.mouth_corner_lift``). Speech
moves the lips every frame, so each run is a pair of sessions with the same
speech, one without the instruction and one with it, aligned on the start of
the speech (the first microphone packet, or the first loud packet of the
avatar's voice for Say); their difference is what the instruction did. An
eased step (smoothstep from a start over a duration) is fitted to that
difference by least squares, so that no single jittery frame decides: the
**onset** is when the fitted change starts, from sending the message (when
the change shows), and the **half-rise** when it is half done. Both include
the data channel, planning, rendering, the playout delay, encoding, the
network and decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SENT_AT_S = 3.0  # the instruction goes this long after the avatar starts speaking
FIT_AFTER_S = 0.8  # the first change is fitted over this long after the message


@dataclass(slots=True)
class Step:
    """A fitted change: ``base`` until ``start``, then an ease over ``duration`` to ``base + amount``."""

    start: float  # seconds after the message
    duration: float
    base: float
    amount: float

    @property
    def half(self) -> float:
        return self.start + self.duration / 2


def _ease(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def fit_step(times: np.ndarray, values: np.ndarray, t0: float) -> Step:
    """The eased step that best fits a noisy per-frame measure around ``t0`` (least squares).

    Every frame from a second before ``t0`` to ``FIT_AFTER_S`` after it counts, so speech
    jitter on single frames barely moves the estimate, and later changes (the next
    windows of the new plan) do not; a search over start (0-0.6 s after ``t0``, 10 ms
    steps) and duration (40 ms-1 s), with base and amount solved exactly for each.
    """
    ok = ~np.isnan(values) & (times >= t0 - 1.0) & (times <= t0 + FIT_AFTER_S)
    t, y = times[ok] - t0, values[ok]
    best: tuple[float, Step] | None = None
    for start in np.arange(0.0, 0.6, 0.01):
        for duration in (0.04, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0):
            basis = np.stack([np.ones_like(t), _ease((t - start) / duration)], 1)
            coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
            err = float(np.sum((basis @ coef - y) ** 2))
            if best is None or err < best[0]:
                best = (err, Step(float(start), duration, float(coef[0]), float(coef[1])))
    assert best is not None
    return best[1]


def lift_series(frames: list[tuple[float, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(times, mouth-corner lift) of received frames, by face mesh."""
    from engines.face import NoFaceError, analyse_face, mouth_corner_lift

    times, lifts = [], []
    for t, f in frames:
        try:
            lifts.append(mouth_corner_lift(analyse_face(f).landmarks))
        except NoFaceError:
            lifts.append(np.nan)
        times.append(t)
    return np.array(times), np.array(lifts)


def instruction_effect(with_: tuple[np.ndarray, np.ndarray], without: tuple[np.ndarray, np.ndarray],
                       t0: float) -> Step:
    """The step the instruction made: the run with it less the same speech without it."""
    t, y = with_
    tc, yc = without
    ok = ~np.isnan(yc)
    return fit_step(t, y - np.interp(t, tc[ok], yc[ok]), t0)


async def one_session(url: str, text: str | None, mic: np.ndarray
                      ) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, Any]]:
    """One session speaking; ``text`` (if any) sent 3 s into its speech. Times are from its speech start."""
    from server.peer import AvatarPeer

    peer = AvatarPeer(url, mic)
    try:
        await peer.connect()
        await peer.wait_open(30)
        # the same in both sessions of a pair: head motion follows the session clock, which the
        # two do not share, so it is kept small to leave the mouth to speech and the instruction
        peer.send({"type": "instruct", "text": "keep your head still"})
        await peer.wait_until(lambda: len(peer.got.video) > 10, 10, "video")
        await peer.wait_until(lambda: bool(peer.mic.sent_at), 10, "the microphone")
        start = peer.mic.sent_at[0]
        await asyncio.sleep(max(0.0, start + SENT_AT_S - time.perf_counter()))
        before = peer.messages("stats")[-1]
        if text is not None:
            peer.send({"type": "instruct", "text": text})
        await peer.wait_until(lambda: peer.got.video[-1][0] > start + SENT_AT_S + 1.6, 10, "video")
        after = peer.messages("stats")[-1]
        acked = len(peer.messages("ack")) == (2 if text is not None else 1)
    finally:
        await peer.close()
    frames = [(t - start, f) for t, f in peer.got.video
              if start + SENT_AT_S - 2.0 <= t <= start + SENT_AT_S + 1.6]
    stats = {"plan_ms": after["plan_ms"], "acked": acked,
             "forced_keyframes": after["forced_keyframes"] - before["forced_keyframes"],
             "held_frames": after["held_frames"] - before["held_frames"]}
    return lift_series(frames), stats


async def one_run(url: str, text: str, mic: np.ndarray) -> dict[str, Any]:
    """A session without the instruction, then one with it: same speech, the difference is its effect."""
    control, _ = await one_session(url, None, mic)
    instructed, stats = await one_session(url, text, mic)
    step = instruction_effect(instructed, control, SENT_AT_S)
    return {"onset_ms": step.start * 1000, "half_ms": step.half * 1000,
            "ease_ms": step.duration * 1000, "lift_change": step.amount, **stats}


async def run(url: str, runs: int, text: str) -> list[dict[str, Any]]:
    from bench.live import talk_track

    mic = talk_track(12.0)
    out = []
    for _ in range(runs):
        out.append(await one_run(url, text, mic))
        r = out[-1]
        sys.stdout.write(f"  onset {r['onset_ms']:.0f} ms, half-rise {r['half_ms']:.0f} ms, "
                         f"lift {r['lift_change']:+.4f}; director {r['plan_ms']} ms per window, "
                         f"{r['forced_keyframes']} keyframes made before the new plan, "
                         f"{r['held_frames']} frames held\n")
        sys.stdout.flush()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--text", default="be cheerful")
    ap.add_argument("--json")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for avatar serve (repeatable)")
    args = ap.parse_args(argv)
    from server.ice import restrict_host_candidates
    from server.launch import ServerProcess

    restrict_host_candidates(["127.0.0.1"])
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp), *args.server_arg) as srv:
        results = asyncio.run(run(srv.url, args.runs, args.text))
    shown = [r for r in results if r["lift_change"] > 0.002]  # the smile is there
    if shown:
        on, half = [r["onset_ms"] for r in shown], [r["half_ms"] for r in shown]
        sys.stdout.write(
            f"'{args.text}' shows {statistics.median(on):.0f} ms after the message (median; "
            f"worst {max(on):.0f} ms), half-rise {statistics.median(half):.0f} ms "
            f"(worst {max(half):.0f} ms); {len(shown)} of {len(results)} runs\n")
    else:
        sys.stdout.write(f"no change measured in {len(results)} runs\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
