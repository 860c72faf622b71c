"""``--log-format json``: one JSON object per line, for log pipelines.

Every record becomes ``{"ts", "level", "logger", "pid", "message"}`` plus the structured
fields its caller attached (``extra={"fields": {...}}``): the access log's request id,
trace id, key, decision and timings, an action's type and outcome. Client-chosen values
(paths, model names) are data in a JSON string, so they cannot forge a line.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "TextFormatter", "lean_records"]


def lean_records() -> None:
    """Records without what no line of the proxy prints: the caller's frame (a stack walk
    per record), thread and multiprocessing names (logging HOWTO, "Optimization")."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False


class TextFormatter(logging.Formatter):
    """The text line, with its timestamp's seconds formatted once per second, not once
    per line (two lines a request)."""

    _second: int = -1
    _prefix: str = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = second
        return f"{self._prefix},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)
