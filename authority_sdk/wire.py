"""Plain data that crosses the engine's boundary: who calls, what they sent, what goes back.

No I/O and no HTTP library here: the SDK transport and the proxy translate their
own request/response objects into these, so both front doors feed the engine
the same bytes and get the same bytes back.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import AuthorityError

__all__ = ["MAX_TOKENS", "Caller", "GatewayRequest", "GatewayResponse", "canonical_json",
           "copy_json", "error_response", "token_count"]

# More tokens than any request may ask for or any answer may report: a count above it is
# hostile, and float arithmetic on it would overflow (10**400 is valid JSON).
MAX_TOKENS = 2**53


def token_count(value: Any) -> int | None:
    """``value`` as a count of tokens (an int from 0 to :data:`MAX_TOKENS`), else None."""
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    return None


def canonical_json(obj: Any, *, ascii_only: bool = True) -> str:
    """The one canonical JSON text for hashing: sorted keys, no spaces.

    Keys and fingerprints use the ASCII-escaped spelling, so a lone surrogate a model
    slipped into a value hashes instead of failing to encode. The audit chain hashes the
    UTF-8 spelling (``ascii_only=False``) — the bytes a reader of the log sees — and must
    keep it: a changed spelling would break every chain already written."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=ascii_only,
                      default=str)


def copy_json(value: Any) -> Any:
    """A deep copy of parsed JSON (dicts, lists, scalars), several times the speed of
    ``copy.deepcopy``, which serves any object graph; anything else is deep-copied."""
    t = type(value)
    if t is dict:
        return {k: copy_json(v) for k, v in value.items()}
    if t is list:
        return [copy_json(v) for v in value]
    if t is str or t is int or t is float or t is bool or value is None:
        return value
    import copy

    return copy.deepcopy(value)


@dataclass(frozen=True)
class Caller:
    """The identity a request runs under. The proxy derives it from the API key only."""

    name: str
    environment: str
    roles: frozenset[str] = frozenset({"agent"})


@dataclass
class GatewayRequest:
    caller: Caller
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    # The API path (e.g. ``/v1/chat/completions``): the engine picks the wire format by it.
    path: str = "/chat/completions"
    method: str = "POST"

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class GatewayResponse:
    status_code: int
    headers: dict[str, str]
    body: bytes = b""
    # Set for streamed answers instead of body; exactly one of the two is consumed.
    stream: Iterator[bytes] | None = None
    astream: AsyncIterator[bytes] | None = None
    # For the proxy's access log and metrics.
    request_id: str | None = None
    decision: str | None = None
    code: str | None = None

    def json(self) -> Any:
        return json.loads(self.body)


def error_response(exc: AuthorityError, *, request_id: str | None = None) -> GatewayResponse:
    headers = {"content-type": "application/json"}
    if not exc.retryable:
        # openai retries 408/409/429/5xx by default; a policy answer will not change on retry.
        headers["x-should-retry"] = "false"
    if request_id:
        headers["x-request-id"] = request_id
    retry_after = exc.details.get("retry_after_s")
    if isinstance(retry_after, int):
        headers["retry-after"] = str(retry_after)
    body = exc.to_body()
    if request_id:
        body["error"].setdefault("authority", {})["request_id"] = request_id
    return GatewayResponse(
        exc.status_code,
        headers,
        json.dumps(body).encode(),
        request_id=request_id,
        decision="error" if exc.status_code >= 500 else "deny",
        code=exc.code,
    )
