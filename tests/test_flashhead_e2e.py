"""``avatar serve --engine flashhead`` end to end on CPU: a random checkpoint in the published layout.

The server runs as a user starts it, with a two-layer FlashHead Pro written
in the published layout (``tests.flashhead_layout``) at 64x64, and a Python
WebRTC peer (``server.peer.AvatarPeer``) talks to it over loopback. Random
weights make no face, so what is checked is what the stream carries:

* frames arrive at the chunk size (64x64) at the playout rate, whether or not
  the CPU keeps up (this tiny model renders a 28-frame chunk in about two
  seconds on one core, slower than real time: playout holds frames, the
  scheduler skips what is already due, the stream never stalls);
* rendered frames (not the idle photo) arrive;
* they are audio-driven: two sessions get the same plan (static director),
  the same noise (seeded by frame index) and the same silence for the first
  chunk, then one speaks and the other stays silent. Their first chunks match;
  their second chunks differ, far more than the codec's own noise.

Without the published files ``avatar serve`` refuses to start, naming what is
missing and where it is published.

The playout delay (10 s) lets the first two chunks, rendered one after the
other at well under real time, arrive before they are due on a loaded CPU.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from server.launch import ROOT, ServerProcess, free_port
from server.peer import RATE, AvatarPeer
from tests.flashhead_layout import write_published_layout
from tests.helpers import speech

pytestmark = pytest.mark.slow

SIZE = 64
CHUNK = 28  # new frames per Pro chunk: the sub-clip length the engine declares
DELAY_S = 10.0
VIDEO_CLOCK = 90_000


class PtsPeer(AvatarPeer):
    """An AvatarPeer that also keeps each frame's RTP timestamp (its pts), to line frames up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frames: list[tuple[int, np.ndarray]] = []

    async def _read_video(self, track: Any) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.got.video_times.append(time.perf_counter())
            self.frames.append((int(frame.pts), frame.to_ndarray(format="rgb24")))
            self._changed.set()

    def by_index(self) -> dict[int, np.ndarray]:
        """Frames by stream index (the first frame sent is index 0)."""
        first = self.frames[0][0]
        return {round((pts - first) * 25 / VIDEO_CLOCK): f for pts, f in self.frames}


@pytest.fixture(scope="module")
def flashhead_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from server.ice import restrict_host_candidates

    restrict_host_candidates(["127.0.0.1"])
    root = tmp_path_factory.mktemp("flashhead")
    weights = write_published_layout(root / "published")
    proc = ServerProcess(
        root, "--engine", "flashhead", "--weights", str(weights),
        "--wav2vec", str(root / "published" / "wav2vec2-base-960h"), "--device", "cpu",
        "--dtype", "fp32", "--flashhead-size", f"{SIZE}x{SIZE}", "--director", "static",
        "--delay-ms", str(int(DELAY_S * 1000)), "--max-sessions", "1",
        "--consent-interval", "0.5", "--consent-failures", "3", ready_within=240.0,
    )  # fmt: skip
    with proc:
        yield proc


async def stream(url: str, audio: np.ndarray, until_index: int) -> tuple[PtsPeer, dict[str, Any]]:
    peer = PtsPeer(url, audio)
    try:
        await peer.connect()
        await peer.wait_open()
        await peer.wait_until(lambda: len(peer.frames) > until_index, DELAY_S + until_index / 25 + 20,
                              f"{until_index} frames")  # fmt: skip
        await peer.wait_until(lambda: bool(peer.messages("stats")), 3, "stats")
    finally:
        await peer.close()
    return peer, peer.messages("stats")[-1]


async def test_random_checkpoint_streams_over_webrtc_driven_by_its_audio(
    flashhead_server: ServerProcess,
) -> None:
    chunk_s = CHUNK / 25
    voice = speech("Hello everyone, welcome to the show.", rate=RATE)[: int(2 * chunk_s * RATE)]
    spoken = np.concatenate([np.zeros(int(chunk_s * RATE), np.float32), voice])  # silent first chunk
    silent = np.zeros_like(spoken)
    a, stats_a = await stream(flashhead_server.url, spoken, 2 * CHUNK + 4)
    b, stats_b = await stream(flashhead_server.url, silent, 2 * CHUNK + 4)

    # frames at the chunk size, at the playout rate although the CPU is slower than real time
    for peer in (a, b):
        assert all(f.shape == (SIZE, SIZE, 3) for _, f in peer.frames)
        t = np.array(peer.got.video_times)
        steady = t[t > t[0] + 1.0]
        assert (len(steady) - 1) / (steady[-1] - steady[0]) > 18, "the stream stalled"

    # rendered frames arrived in both sessions: a fresh frame differs from the one before it
    # (the idle photo and held frames repeat, up to the codec's noise)
    fa, fb = a.by_index(), b.by_index()

    def fresh(frames: dict[int, np.ndarray], lo: int, hi: int) -> set[int]:
        return {
            k for k in range(lo, hi)
            if k in frames and k - 1 in frames and np.abs(frames[k].astype(float) - frames[k - 1]).mean() > 6
        }  # fmt: skip

    first = sorted(fresh(fa, 1, CHUNK) & fresh(fb, 1, CHUNK))
    second = sorted(fresh(fa, CHUNK, 2 * CHUNK) & fresh(fb, CHUNK, 2 * CHUNK))
    assert len(first) >= 10 and len(second) >= 10, (first, second, stats_a, stats_b)

    def diff(ks: list[int]) -> float:
        return float(np.mean([np.abs(fa[k].astype(float) - fb[k]).mean() for k in ks]))

    same, different = diff(first), diff(second)
    assert different > 8.0 and different > 3 * same, (
        f"first chunks differ by {same:.1f}, second by {different:.1f}"
    )
    print(  # the figures of this run (pytest -s shows them)
        f"\nflashhead e2e: render {stats_a['render_ms']:.0f} / {stats_b['render_ms']:.0f} ms per "
        f"{CHUNK}-frame chunk, held {stats_a['held_frames']} / {stats_b['held_frames']}, skipped "
        f"{stats_a['clips_skipped']} / {stats_b['clips_skipped']}; |A-B| first chunk {same:.2f}, "
        f"second {different:.2f}"
    )


def test_serve_without_the_published_files_refuses_to_start_and_says_what_is_missing(
    tmp_path: pathlib.Path,
) -> None:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--engine", "flashhead", "--device", "cpu",
           "--port", str(free_port()), "--data-dir", str(tmp_path / "data"),
           "--weights", str(tmp_path / "nowhere"), "--wav2vec", str(tmp_path / "nowhere")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert "the weights folder" in out and "huggingface.co/Soul-AILab/SoulX-FlashHead-1_3B" in out
    assert "huggingface.co/facebook/wav2vec2-base-960h" in out
