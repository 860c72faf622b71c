"""Server-sent events: an incremental decoder, and one event encoded."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["DONE", "SSEDecoder", "event_json", "sse"]

# An event larger than this is not a model's stream chunk: refuse it rather than buffer
# without end (a hostile or broken upstream).
MAX_EVENT_BYTES = 16 << 20


class SSEDecoder:
    """Incremental ``text/event-stream`` decoder: bytes in, ``data`` payloads out."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        out: list[str] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line = self._buf[:nl].rstrip(b"\r").decode("utf-8", "replace")
            self._buf = self._buf[nl + 1:]
            if not line:
                if self._data:
                    out.append("\n".join(self._data))
                    self._data, self._size = [], 0
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)
                self._size += len(value)
        if len(self._buf) + self._size > MAX_EVENT_BYTES:
            raise ValueError("a stream event passed the size limit")
        return out

    def close(self) -> list[str]:
        return self.feed(b"\n\n") if self._buf or self._data else []


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


DONE: Any = object()  # what event_json returns for the stream's "[DONE]" (not JSON null)


def event_json(payload: str, what: str) -> Any:
    """One event's data parsed, ``DONE`` for "[DONE]"; ``ValueError`` naming ``what``
    when it is not JSON (the caller turns that into its own upstream error)."""
    if payload.strip() == "[DONE]":
        return DONE
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        raise ValueError(f"{what} is not JSON") from None
