"""Run the proxy under uvicorn, and start/stop it as a child process (tests, demo).

``run`` is what ``authority serve`` calls. One worker serves the app object
itself; several workers are uvicorn's multi-process mode, each worker building
its app from the policy path passed in the environment. Everything shared
lives in the state store and the file-locked audit log, so N workers behave as
one. Interrupted executions are recovered once, before any worker answers.
"""

from __future__ import annotations

import copy
import logging
import logging.config
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any

__all__ = ["ProxyProcess", "log_config", "run"]

log = logging.getLogger("authority.proxy")

# Slack on top of the upstream timeout for in-flight requests to finish on SIGTERM.
_SHUTDOWN_MARGIN_S = 10.0


def log_config(level: str = "info") -> dict[str, Any]:
    """uvicorn's logging config plus the proxy's access log, applied in every worker."""
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["formatters"]["authority"] = {
        "format": "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"}
    cfg["handlers"]["authority"] = {"class": "logging.StreamHandler",
                                    "formatter": "authority", "stream": "ext://sys.stderr"}
    cfg["loggers"]["authority"] = {"handlers": ["authority"], "level": level.upper(),
                                   "propagate": False}
    return cfg


def _recover(gateway: Any) -> None:
    from authority_sdk import control

    done = control.recover(gateway)
    for r in done:
        log.warning("recovered interrupted action %s: %s", r["action_key"], r["status"])


def run(policy_path: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8787,
        workers: int = 1, log_level: str = "info") -> int:
    """Serve until SIGTERM/SIGINT; in-flight requests finish first. Returns the exit code."""
    import uvicorn

    from authority_sdk.engine import Gateway
    from authority_sdk.policy import load_policy

    from .app import POLICY_ENV, create_app

    logging.config.dictConfig(log_config(log_level))
    path = Path(policy_path).resolve()
    policy = load_policy(path)
    common: dict[str, Any] = {
        "host": host, "port": port, "log_config": log_config(log_level),
        "log_level": log_level, "access_log": False, "lifespan": "on",
        "timeout_graceful_shutdown": int(policy.upstream.timeout_s + _SHUTDOWN_MARGIN_S),
    }
    # uvicorn re-raises the signal it shut down on; with a Python handler in place that
    # lands here instead of killing the process, so a requested stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    if workers <= 1:
        app = create_app(policy)
        _recover(app.state.gateway)
        uvicorn.run(app, **common)
        return 0
    gw = Gateway(policy)
    try:
        _recover(gw)
    finally:
        gw.close()
    os.environ[POLICY_ENV] = str(path)
    metrics_dir = tempfile.mkdtemp(prefix="authority-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run("proxy.app:create_app_from_env", factory=True, workers=workers, **common)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _stopped(signum: int, frame: FrameType | None) -> None:
    """Reached only after uvicorn has shut down gracefully; nothing left to do."""


class ProxyProcess:
    """``authority serve`` as a child process on loopback, for tests and the demo.

    ``env`` is added to the current environment. Output goes to ``log_path``
    (a temporary file by default), readable with ``output()``.
    """

    def __init__(self, policy_path: str | os.PathLike[str], *, port: int | None = None,
                 workers: int = 1, env: dict[str, str] | None = None,
                 log_path: str | os.PathLike[str] | None = None,
                 host: str = "127.0.0.1") -> None:
        self.policy_path = str(policy_path)
        self.host = host
        self.port = port or _free_port()
        self.workers = workers
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
                "--workers", str(self.workers)]

    def start(self, timeout_s: float = 60.0) -> ProxyProcess:
        import httpx

        root = str(Path(__file__).resolve().parent.parent)
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
