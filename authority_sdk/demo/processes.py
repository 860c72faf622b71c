"""The demo's children: local servers on free loopback ports, each logging to a file.

A port is picked free and handed to the child; if another process takes it in
between, the child exits at once and is started again on another port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx

__all__ = ["Child", "ProxyProcess", "free_port", "start_child", "start_demo_model"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """One server process: ``url`` is its base, ``log_path`` holds its output."""

    def __init__(self, name: str, command: list[str], port: int, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.command = command
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, ready_path: str, timeout_s: float) -> bool:
        """Start and wait until ``GET ready_path`` answers; False if it exited first."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                return False
            try:
                if httpx.get(self.url + ready_path, timeout=0.5,
                             trust_env=False).status_code < 500:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start within {timeout_s:g}s:\n" + self.output())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def output(self, last: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-last:]
        except OSError:
            return ""


def start_demo_model(folder: Path) -> Child:
    """The demo's scripted model (``python -m authority_sdk.demo.model``), logging to
    ``folder/model.log``."""
    return start_child("scripted model",
                       lambda p: [sys.executable, "-m", "authority_sdk.demo.model",
                                  "--port", str(p)],
                       folder / "model.log", ready_path="/v1/models")


def start_child(name: str, make_command: Callable[[int], list[str]], log_path: Path, *,
                ready_path: str, env: dict[str, str] | None = None,
                timeout_s: float = 20.0, attempts: int = 3) -> Child:
    """Start ``make_command(port)`` on a free port and wait until it answers."""
    child: Child | None = None
    for _ in range(attempts):
        port = free_port()
        child = Child(name, make_command(port), port, log_path, env)
        if child.start(ready_path, timeout_s):
            return child
    raise RuntimeError(f"{name} exited at start ({attempts} attempts):\n"
                       + (child.output() if child else ""))


class ProxyProcess:
    """``authority serve`` as a child process on loopback, for tests and the demo.

    ``env`` is added to the current environment. Output goes to ``log_path``
    (a temporary file by default), readable with ``output()``.
    """

    def __init__(self, policy_path: str | os.PathLike[str], *, port: int | None = None,
                 workers: int = 1, env: dict[str, str] | None = None,
                 log_path: str | os.PathLike[str] | None = None,
                 host: str = "127.0.0.1", extra_args: list[str] | None = None) -> None:
        self.policy_path = str(policy_path)
        self.host = host
        self.port = port or free_port()
        self.workers = workers
        self.extra_args = list(extra_args or [])
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path else Path(
            tempfile.mkstemp(prefix="authority-proxy-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "authority_sdk.cli", "serve",
                "--policy", self.policy_path, "--host", self.host, "--port", str(self.port),
                "--workers", str(self.workers), *self.extra_args]

    def start(self, timeout_s: float = 60.0) -> ProxyProcess:
        import httpx

        root = str(Path(__file__).resolve().parents[2])
        env = dict(self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=root)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the proxy exited with {self.proc.returncode}:\n"
                                   + self.output())
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("the proxy did not become healthy in time:\n" + self.output())

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, then wait; returns the exit code (SIGKILL if it will not stop)."""
        rc = 0
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                rc = -9
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
