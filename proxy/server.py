"""Run the proxy under uvicorn (``authority serve``).

``run`` is what ``authority serve`` calls. One worker serves the app object
itself; several workers are uvicorn's multi-process mode, each worker building
its app from the policy path passed in the environment. Everything shared
lives in the state store and the file-locked audit log, so N workers behave as
one. Each worker runs the background worker; a lease lets one of them do its work.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import logging.config
import os
import shutil
import signal
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["log_config", "run"]

log = logging.getLogger("authority.proxy")

# Slack on top of the upstream timeout for in-flight requests to finish on SIGTERM.
_SHUTDOWN_MARGIN_S = 10.0


LOG_FORMATS = ("text", "json")


def log_config(level: str = "info", fmt: str = "text") -> dict[str, Any]:
    """uvicorn's logging config plus the proxy's access log, applied in every worker.
    With ``fmt="json"`` every line, uvicorn's own included, is one JSON object."""
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    if fmt == "json":
        json_formatter = {"()": "proxy.logformat.JsonFormatter"}
        for name in list(cfg["formatters"]):
            cfg["formatters"][name] = dict(json_formatter)
        cfg["formatters"]["authority"] = dict(json_formatter)
    else:
        cfg["formatters"]["authority"] = {
            "()": "proxy.logformat.TextFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"}
    cfg["handlers"]["authority"] = {"class": "logging.StreamHandler",
                                    "formatter": "authority", "stream": "ext://sys.stderr"}
    cfg["loggers"]["authority"] = {"handlers": ["authority"], "level": level.upper(),
                                   "propagate": False}
    return cfg


def run(policy_path: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8787,
        workers: int = 1, log_level: str = "info", log_format: str = "text") -> int:
    """Serve until SIGTERM/SIGINT; in-flight requests finish first. Returns the exit code."""
    import uvicorn

    from authority_sdk.policy import load_policy

    from .app import POLICY_ENV, create_app
    from .logformat import lean_records

    logging.config.dictConfig(log_config(log_level, log_format))
    lean_records()
    path = Path(policy_path).resolve()
    policy = load_policy(path)
    common: dict[str, Any] = {
        "host": host, "port": port, "log_config": log_config(log_level, log_format),
        "log_level": log_level, "access_log": False, "lifespan": "on",
        "timeout_graceful_shutdown": int(policy.max_call_s + _SHUTDOWN_MARGIN_S),
    }
    # uvicorn re-raises the signal it shut down on; with a Python handler in place that
    # lands here instead of killing the process, so a requested stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    if workers <= 1:
        uvicorn.run(create_app(path), **common)
        return 0
    _forward_sighup_to_workers()
    os.environ[POLICY_ENV] = str(path)
    metrics_dir = tempfile.mkdtemp(prefix="authority-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run("proxy.app:create_app_from_env", factory=True, workers=workers, **common)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _forward_sighup_to_workers() -> None:
    """uvicorn's supervisor restarts every worker on SIGHUP, dropping requests in flight and
    starting workers on a file nobody validated. Each worker reloads the policy itself
    (``proxy/reload.py``): the supervisor only passes the signal on."""
    from uvicorn.supervisors import multiprocess

    def handle_hup(self: Any) -> None:
        for proc in getattr(self, "processes", []):
            pid = getattr(getattr(proc, "process", None), "pid", None)
            if isinstance(pid, int):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)

    multiprocess.Multiprocess.handle_hup = handle_hup  # type: ignore[method-assign]


def _stopped(signum: int, frame: FrameType | None) -> None:
    """Reached only after uvicorn has shut down gracefully; nothing left to do."""
