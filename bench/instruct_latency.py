"""How soon an instruction shows in the video, end to end over WebRTC.

    python -m bench.instruct_latency [--runs 5] [--mode mic say] [--text "be cheerful"] [--json out.json]

Starts ``avatar serve`` (portrait engine, embedded director) as a user would and,
for each run, connects a Python WebRTC peer on 127.0.0.1 whose avatar is
speaking: either live (``mic``: the peer's microphone plays Piper speech, so
sub-clips render as the audio arrives) or from Say text (``say``: the whole
utterance is known and rendered ahead, so an instruction must redo what was
rendered). Three seconds in, it sends ``instruct`` on the control channel and
records the client's clock.

The latency is read off the received frames with the face mesh: the
mouth-corner lift of each frame (``engines.face.mouth_corner_lift``), less
the part the mouth opening explains (speech moves the lips every frame and an
open jaw pulls the corners down: the lift is regressed on the opening over
the two seconds before the message), median-filtered over three frames, from
the baseline (the median over the second before the message) towards the
level it settles at (the median 0.8-1.5 s after). Two figures, from sending
the message to the arrival of the first frame whose filtered lift is past a
fraction of that change: the **onset** (a fifth of the change: when it shows)
and the **half-rise** (half of it). It includes the data channel,
planning, rendering, the playout delay, encoding, the network and decoding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ONSET = 0.2  # the change "shows" once a fifth of it is there (well above the measure's frame-to-frame noise)
SAY = ("Hello everyone, and welcome back to the stream. Today we talk about rockets, the people "
       "who build them, and where they will take us in the next few years. Stay with me.")


def corrected_lift(times: np.ndarray, lift: np.ndarray, opening: np.ndarray, t0: float) -> np.ndarray:
    """Mouth-corner lift with the part that follows the mouth opening taken out.

    Speech moves the lips every frame and an open jaw pulls the corners down,
    so the lift is regressed on the opening over the frames before ``t0`` and
    each frame's residual is what the opening does not explain.
    """
    before = (times < t0) & ~np.isnan(lift) & ~np.isnan(opening)
    slope, intercept = np.polyfit(opening[before], lift[before], 1) if before.sum() > 5 else (0.0, 0.0)
    return np.asarray(lift - (slope * opening + intercept))


def rise_time(times: np.ndarray, values: np.ndarray, t0: float, fraction: float = 0.5
              ) -> tuple[float | None, float, float]:
    """(time after ``t0`` until ``fraction`` of the change, or None; baseline; settled level)."""
    ok = ~np.isnan(values)
    times, values = times[ok], values[ok]
    smooth = np.array([np.median(values[max(0, i - 1): i + 2]) for i in range(len(values))])
    base = float(np.median(values[(times >= t0 - 1.0) & (times < t0)]))
    settled_at = (times >= t0 + 0.8) & (times < t0 + 1.5)
    if not settled_at.any():
        return None, base, float("nan")
    final = float(np.median(values[settled_at]))
    half = base + (final - base) * fraction
    after = times >= t0
    above = np.nonzero(after & ((smooth - half) * np.sign(final - base) > 0))[0]
    if final == base or not len(above):
        return None, base, final
    return float(times[above[0]] - t0), base, final


async def one_run(url: str, mode: str, text: str, mic: np.ndarray) -> dict[str, Any]:
    from engines.face import NoFaceError, analyse_face, mouth_corner_lift, mouth_opening
    from server.peer import AvatarPeer

    peer = AvatarPeer(url, mic if mode == "mic" else None)
    try:
        await peer.connect()
        await peer.wait_open(30)
        await peer.wait_until(lambda: len(peer.got.video) > 10, 10, "video")
        if mode == "say":
            peer.send({"type": "say", "text": SAY})
        await asyncio.sleep(3.0)
        sent = time.perf_counter()
        peer.send({"type": "instruct", "text": text})
        before = peer.messages("stats")[-1]
        await peer.wait_until(lambda: peer.got.video[-1][0] > sent + 1.6, 10, "video after the message")
        acks = peer.messages("ack")
        after = peer.messages("stats")[-1]
    finally:
        await peer.close()
    frames = [(t, f) for t, f in peer.got.video if sent - 2.0 <= t <= sent + 1.6]
    times, lifts, openings = [], [], []
    for t, f in frames:
        try:
            lm = analyse_face(f).landmarks
            lifts.append(mouth_corner_lift(lm))
            openings.append(mouth_opening(lm))
        except NoFaceError:
            lifts.append(np.nan)
            openings.append(np.nan)
        times.append(t)
    tt = np.array(times)
    lift = corrected_lift(tt, np.array(lifts), np.array(openings), sent)
    onset, _, _ = rise_time(tt, lift, sent, ONSET)
    latency, base, final = rise_time(tt, lift, sent, 0.5)
    return {"mode": mode, "latency_ms": None if latency is None else latency * 1000,
            "onset_ms": None if onset is None else onset * 1000,
            "lift_before": base, "lift_after": final, "acked": bool(acks),
            "plan_ms": after["plan_ms"],
            "forced_keyframes": after["forced_keyframes"] - before["forced_keyframes"],
            "held_frames": after["held_frames"] - before["held_frames"]}


async def run(url: str, modes: list[str], runs: int, text: str) -> list[dict[str, Any]]:
    from bench.live import talk_track

    mic = talk_track(12.0)
    out = []
    for mode in modes:
        for _ in range(runs):
            out.append(await one_run(url, mode, text, mic))
            r = out[-1]
            ms = "no change" if r["latency_ms"] is None else f"{r['latency_ms']:.0f} ms"
            on = "-" if r["onset_ms"] is None else f"{r['onset_ms']:.0f} ms"
            sys.stdout.write(f"  {mode}: onset {on}, half-rise {ms} "
                             f"(lift {r['lift_before']:.4f} -> {r['lift_after']:.4f}; "
                             f"director {r['plan_ms']} ms per window, {r['forced_keyframes']} keyframes "
                             f"made before the new plan, {r['held_frames']} frames held)\n")
            sys.stdout.flush()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mode", nargs="+", default=["mic", "say"], choices=["mic", "say"])
    ap.add_argument("--text", default="be cheerful")
    ap.add_argument("--json")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for avatar serve (repeatable)")
    args = ap.parse_args(argv)
    from server.ice import restrict_host_candidates
    from server.launch import ServerProcess

    restrict_host_candidates(["127.0.0.1"])
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp), *args.server_arg) as srv:
        results = asyncio.run(run(srv.url, args.mode, args.runs, args.text))
    for mode in args.mode:
        got = [r["latency_ms"] for r in results if r["mode"] == mode]
        measured = [x for x in got if x is not None]
        onsets = [r["onset_ms"] for r in results if r["mode"] == mode and r["onset_ms"] is not None]
        if measured and onsets:
            sys.stdout.write(
                f"{mode}: instruction '{args.text}' shows (onset) after {statistics.median(onsets):.0f} ms "
                f"median, {max(onsets):.0f} ms worst; half-rise after {statistics.median(measured):.0f} ms "
                f"median, {max(measured):.0f} ms worst; {len(measured)} of {len(got)} runs\n")
        else:
            sys.stdout.write(f"{mode}: no change measured in {len(got)} runs\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
