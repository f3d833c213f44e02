"""Test helpers: speech made in code (Piper), portraits, face measurements."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import numpy as np
from scipy.signal import resample_poly

from engines.base import AUDIO_RATE

# Debian's Chromium, driven by playwright (never a downloaded browser), on loopback, sound allowed
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--allow-loopback-in-peer-connection", "--autoplay-policy=no-user-gesture-required"]
FAKE_MIC_ARGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
NO_CHROMIUM = "Debian's chromium is not installed (make test installs it as root)"


@functools.cache
def speech(text: str = "Hello there. Welcome to the show, it is great to see you all today.",
           rate: int = AUDIO_RATE) -> np.ndarray:
    """Real speech for ``text`` from the packaged Piper voice, float32 mono at ``rate``."""
    from realtime.tts import load_voice

    voice = load_voice()
    chunks = [c.audio_float_array for c in voice.synthesize(text)]
    x = np.concatenate(chunks).astype(np.float32)
    return resample_poly(x, rate, voice.config.sample_rate).astype(np.float32)


def wav_bytes(x: np.ndarray, rate: int) -> bytes:
    """Mono float audio as a 16-bit WAV file."""
    import io
    import wave

    pcm = np.clip(x * 32767, -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def envelope(x: np.ndarray, rate: int, hop_s: float) -> np.ndarray:
    """RMS per hop."""
    hop = round(rate * hop_s)
    n = len(x) // hop
    return np.sqrt((x[: n * hop].astype(np.float64).reshape(n, hop) ** 2).mean(axis=1))


def returned_envelope(peer: Any, hop: float = 0.04) -> tuple[np.ndarray, np.ndarray]:
    """Envelope (RMS) of the voice that came back to a ``server.peer.AvatarPeer``, on the
    client's arrival clock."""
    t = np.array([a for a, _ in peer.got.audio])
    chunks = [x.astype(np.float32) / 32768 for _, x in peer.got.audio]
    rms = np.array([np.sqrt(np.mean(c ** 2)) for c in chunks])
    grid = np.arange(t[0], t[-1], hop)
    return grid, np.interp(grid, t, rms)


async def until(cond: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Poll ``await cond()`` (what only a request can tell, e.g. the server's figures) until it holds."""
    deadline = time.monotonic() + within
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.1)


LAGS = np.arange(-0.2, 0.2001, 0.02)  # how far apart lips and voice may be searched


def follow(times: np.ndarray, gap: np.ndarray, grid: np.ndarray, env: np.ndarray,
           lags: np.ndarray = LAGS) -> tuple[float, float]:
    """The best correlation of a lip gap (at ``times``) with a voice's envelope (``env`` at
    ``grid``) over ``lags``, and its lag: the voice at ``t + lag`` goes with the lips at ``t``."""
    return max((float(np.corrcoef(np.interp(times + lag, grid, env), gap)[0, 1]), float(lag))
               for lag in lags)


@functools.cache
def astronaut() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


@contextlib.asynccontextmanager
async def running(coro: Coroutine[Any, Any, Any]) -> AsyncIterator[asyncio.Future[Any]]:
    """``coro`` as a task for the body of a ``with`` (e.g. a peer pulling frames), cancelled after it."""
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
