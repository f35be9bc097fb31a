"""A `streamlit run app.py` server for the load test: started on 127.0.0.1 only, watched, and stopped.

The server runs in its own process group so stopping it stops the script runner threads' children too,
and nothing else. Memory is sampled as the resident set size of the server and its children, CPU time read
from the same process tree (psutil).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[psutil.Process]:
    """The process `pid` and all its descendants; empty once it is gone."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds the processes have used so far (one that has exited counts nothing)."""
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def _die_with_parent() -> None:
    """Run in the server's process before exec: SIGTERM it when the bench dies, so a bench killed by a timeout
    leaves no server computing behind (Linux prctl PR_SET_PDEATHSIG; elsewhere nothing happens)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Server:
    def __init__(self, port: int | None = None, log_path: Path | None = None, env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(f"/tmp/lmcompress-loadtest-{self.port}.log")
        self.env = env or {}              # extra environment for the server (the browser bench's LMCOMPRESS_SPANS)
        self.process: subprocess.Popen | None = None
        self.samples: list[tuple[float, int]] = []   # (seconds since start, RSS bytes)
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._t0 = 0.0

    def start(self, timeout_s: float = 120) -> None:
        command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                   "--server.address", "127.0.0.1", "--server.port", str(self.port),
                   "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **self.env}
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        self._t0 = time.perf_counter()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.healthy():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.process.returncode}; see {self.log_path}")
            time.sleep(0.5)
        raise TimeoutError(f"streamlit did not answer /_stcore/health within {timeout_s:.0f} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss(self) -> int:
        """Resident bytes of the server and every child it started."""
        total = 0
        for proc in process_tree(self.process.pid):
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.is_set() and self.alive():
            self.samples.append((time.perf_counter() - self._t0, self.rss()))
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)   # our own session: the server we started, nothing else
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
