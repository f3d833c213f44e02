"""Glass to glass in a real browser: how soon the lips move after the microphone, A/V as played, first frame.

    python -m bench.browser_latency [--seconds 20] [--json out.json] [--server-arg=...]

Starts ``avatar serve`` as a user would and opens the host console in headless
Chromium (Debian's, driven by playwright) with a fake microphone that plays
Piper speech in bursts with pauses (Chromium loops the file). The page is the
real one; the benchmark only reads what the browser has, on its own clock
(``performance.now()``):

* the microphone as captured: the RMS of the local track (Web Audio, every 5 ms);
* the voice as played: the RMS of the received audio track, after the jitter buffer;
* the lips as shown: for every frame the browser presents
  (``requestVideoFrameCallback``, at its expected display time), the darkness of
  the mouth (the open mouth is a dark cavity), in a box found once by face mesh on
  a received frame.

The lag is where the cross-correlation of two envelopes peaks: microphone to
lips is the glass-to-glass delay (capture, Opus, the network, the server's
placement, sub-clip, render and playout delay, encoding, the jitter buffer,
decoding); voice as played to lips is the A/V offset a viewer sees (positive:
the lips come after the voice). The first frame is from applying the SDP answer
to the first frame shown.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--allow-loopback-in-peer-connection", "--autoplay-policy=no-user-gesture-required",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
GRID_MS = 5.0

PROBE = """
(box) => {
  const st = window.avatarClient;
  const out = {mic: [], voice: [], lips: []};
  window.latencyProbe = out;
  const ctx = new AudioContext();
  const envelope = (stream, into) => {
    const an = ctx.createAnalyser();
    an.fftSize = 256;
    ctx.createMediaStreamSource(stream).connect(an);
    const buf = new Float32Array(an.fftSize);
    setInterval(() => {
      an.getFloatTimeDomainData(buf);
      let s = 0;
      for (const v of buf) s += v * v;
      into.push([performance.now(), Math.sqrt(s / buf.length)]);
    }, 5);
  };
  envelope(st.localStream, out.mic);
  envelope(new MediaStream(st.remoteStream.getAudioTracks()), out.voice);
  const video = document.getElementById("video");
  const canvas = document.createElement("canvas");
  canvas.width = box.w; canvas.height = box.h;
  const g = canvas.getContext("2d", {willReadFrequently: true});
  const onFrame = (now, meta) => {
    g.drawImage(video, box.x, box.y, box.w, box.h, 0, 0, box.w, box.h);
    const px = g.getImageData(0, 0, box.w, box.h).data;
    let lum = 0;
    for (let i = 0; i < px.length; i += 4) lum += 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2];
    out.lips.push([meta.expectedDisplayTime || now, 255 - lum / (px.length / 4)]);
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}
"""

FRAME = """
() => {
  const video = document.getElementById("video");
  const c = document.createElement("canvas");
  c.width = video.videoWidth; c.height = video.videoHeight;
  c.getContext("2d").drawImage(video, 0, 0);
  return c.toDataURL("image/png");
}
"""


def mic_file(path: Path) -> None:
    """Speech bursts with pauses, at 48 kHz (the fake microphone loops it)."""
    from bench.live import LINES
    from tests.helpers import speech, wav_bytes

    rate = 48_000
    parts = []
    for line in LINES:
        parts += [speech(line, rate=rate), np.zeros(int(1.2 * rate), np.float32)]
    path.write_bytes(wav_bytes(np.concatenate(parts), rate))


def mouth_box(png_data_url: str) -> dict[str, int]:
    import cv2

    from engines.face import analyse_face

    raw = base64.b64decode(png_data_url.split(",", 1)[1])
    bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    lm = analyse_face(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).landmarks
    x0, x1 = lm[61, 0], lm[291, 0]
    yc = (lm[13, 1] + lm[14, 1]) / 2
    w = x1 - x0
    return {"x": int(x0 + 0.15 * w), "y": int(yc - 0.2 * w), "w": int(0.7 * w), "h": int(0.4 * w)}


def _grid(samples: list[list[float]], t0: float, t1: float) -> np.ndarray:
    a = np.array(samples, np.float64)
    grid = np.arange(t0, t1, GRID_MS)
    return np.interp(grid, a[:, 0], a[:, 1])


def lag_ms(lead: list[list[float]], follow: list[list[float]], lo: float, hi: float) -> tuple[float, float]:
    """(lag of ``follow`` after ``lead`` where their correlation peaks, in ms; the peak's r)."""
    t0 = max(lead[0][0], follow[0][0]) + 500
    t1 = min(lead[-1][0], follow[-1][0]) - 500
    a, b = _grid(lead, t0, t1), _grid(follow, t0, t1)
    # the envelopes' shape, not their level: smoothed over 40 ms, then standardised
    kernel = np.ones(8) / 8
    a, b = np.convolve(a, kernel, "same"), np.convolve(b, kernel, "same")
    a, b = (a - a.mean()) / (a.std() + 1e-12), (b - b.mean()) / (b.std() + 1e-12)
    best = (-2.0, 0.0)
    for k in range(int(lo / GRID_MS), int(hi / GRID_MS) + 1):
        if k >= 0:
            r = float(np.mean(a[: len(a) - k] * b[k:]))
        else:
            r = float(np.mean(a[-k:] * b[: len(b) + k]))
        best = max(best, (r, k * GRID_MS))
    return best[1], best[0]


async def measure(url: str, seconds: float, workdir: Path) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    mic = workdir / "mic.wav"
    mic_file(mic)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                           args=[*FLAGS, f"--use-file-for-fake-audio-capture={mic}"])
        try:
            page = await browser.new_page()
            await page.goto(url)
            await page.wait_for_function("document.querySelector('#avatar').options.length > 0")
            await page.click("#start")
            await page.wait_for_function("window.avatarClient.connected && "
                                         "window.avatarClient.framesDecoded > 25", timeout=60_000)
            first = await page.evaluate("window.avatarClient.firstFrameAt - window.avatarClient.answeredAt")
            box = mouth_box(await page.evaluate(FRAME))
            await page.evaluate(PROBE, box)
            await asyncio.sleep(seconds)
            probe = await page.evaluate("window.latencyProbe")
            stats = await page.evaluate("window.avatarClient.lastStats")
        finally:
            await browser.close()
    glass, r_glass = lag_ms(probe["mic"], probe["lips"], 0, 800)
    av, r_av = lag_ms(probe["voice"], probe["lips"], -300, 300)
    return {"seconds": seconds, "mic_to_lips_ms": glass, "mic_to_lips_r": r_glass,
            "voice_to_lips_ms": av, "voice_to_lips_r": r_av, "first_frame_ms": first,
            "frames_shown": len(probe["lips"]), "server_stats": stats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for avatar serve (repeatable)")
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        sys.stderr.write("Debian's chromium is not installed (apt-get install chromium)\n")
        return 2
    from server.launch import ServerProcess

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        with ServerProcess(Path(tmp), *args.server_arg) as srv:
            for _ in range(args.runs):
                r = asyncio.run(measure(srv.url, args.seconds, Path(tmp)))
                results.append(r)
                sys.stdout.write(
                    f"lips {r['mic_to_lips_ms']:.0f} ms after the microphone (r {r['mic_to_lips_r']:.2f}); "
                    f"A/V as played {r['voice_to_lips_ms']:+.0f} ms (r {r['voice_to_lips_r']:.2f}); "
                    f"first frame {r['first_frame_ms']:.0f} ms after the answer; "
                    f"{r['frames_shown'] / args.seconds:.1f} fps shown\n")
                sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
