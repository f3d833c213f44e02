"""A real RTMP server for tests: Debian's nginx with its RTMP module, on loopback, recording every publish.

``make test`` installs ``nginx`` and ``libnginx-mod-rtmp`` when they are
missing and it can; where they are absent the tests that need them skip.
Each publish is recorded to its own FLV file (``record_unique``), so a test
reads back exactly what a platform received, one file per connection; nginx
marks a recording it has closed with a ``.done`` file beside it (and a stopped
server's recordings are marked when it has exited).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from server.launch import free_port

NGINX = "/usr/sbin/nginx"
MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")


def missing() -> str | None:
    """Why no RTMP server can run here, or None."""
    if not Path(NGINX).exists() and shutil.which("nginx") is None:
        return "nginx is not installed (Debian: apt-get install nginx libnginx-mod-rtmp)"
    if not MODULE.exists():
        return f"nginx's RTMP module is not installed ({MODULE}; Debian: apt-get install libnginx-mod-rtmp)"
    return None


class RtmpServer:
    """nginx in the foreground, one process, accepting ``rtmp://127.0.0.1:PORT/live/<key>``."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.records = root / "records"
        self.records.mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        self.conf = root / "nginx.conf"
        self.conf.write_text(f"""
load_module {MODULE};
daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/logs/error.log info;
events {{ worker_connections 64; }}
rtmp {{
    server {{
        listen 127.0.0.1:{self.port};
        chunk_size 4096;
        application live {{
            live on;
            record all;
            record_path {self.records};
            record_unique on;
            exec_record_done /bin/touch $path.done;
        }}
    }}
}}
""")
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, key: str = "stream-key") -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{key}"

    def start(self) -> None:
        self.process = subprocess.Popen([NGINX, "-p", str(self.root), "-c", str(self.conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"nginx exited with {self.process.returncode}: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen on {self.port} within 10 s")

    def stop(self) -> None:
        """Stop at once, as a server that goes away does (connections drop; recordings are closed)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            for path in self.records.glob("*.flv"):  # nginx is gone: what it wrote is final
                path.with_suffix(".flv.done").touch()
        self.process = None

    def recordings(self, prefix: str = "") -> list[Path]:
        """The finished recordings (nginx closed them: it marks each with ``.done``), oldest first."""
        done = [p for p in self.records.glob(f"{prefix}*.flv") if p.with_suffix(".flv.done").exists()]
        return sorted(done, key=lambda p: p.stat().st_mtime)
