"""Start a real `tokenmill serve` process (tests, benchmarks) and talk to it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`tokenmill serve --model MODEL_DIR --served-model-name NAME EXTRA...` on a free port, healthy on return.
    model_dir None: no --model (the default model); name None: no --served-model-name."""

    def __init__(self, model_dir: Path | None, *extra: str, startup_timeout: float = 120.0, name: str | None = "tiny",
                 log_path: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir = Path(model_dir).parent if model_dir is not None else Path(tempfile.gettempdir())
        self.log_path = Path(log_path) if log_path else log_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.started = time.monotonic()
        model = ["--model", str(model_dir)] if model_dir is not None else []
        served = ["--served-model-name", name] if name is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill", "serve", *model, "--port", str(self.port), *served, *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    self.startup_s = time.monotonic() - self.started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {startup_timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        match = re.search(rf"^tokenmill:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        if match is None:
            raise KeyError(f"metric {name} not in /metrics")
        return float(match.group(1))

    def engine_core_pid(self) -> int:
        """The engine-core child process (spawned by multiprocessing)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and "multiprocessing" in cmdline and "resource_tracker" not in cmdline:
                return int(entry.name)
        raise RuntimeError("engine core process not found")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
