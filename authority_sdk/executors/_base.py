"""What every executor shares: the result type, the protocol, small helpers.

No I/O library is imported here, so the engine can depend on these types
without pulling in httpx or smtplib.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = ["MASK", "ExecutionResult", "Executor", "ExecutorKind", "redact_names", "redacted",
           "redacted_values", "scrub"]

ExecutorKind = Literal["webhook", "smtp", "python", "log"]

# What a secret (an executor credential, a URL token) is shown as.
MASK = "***"


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one execution attempt. Executors never retry on their own; an error
    says whether anything reached the downstream system ("nothing was sent")."""

    ok: bool
    result: Any
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "result": self.result, "error": self.error}


@runtime_checkable
class Executor(Protocol):
    name: str
    kind: str
    # True when a second delivery of the same action key is harmless downstream,
    # which lets the engine retry a ``started`` record left by a crash.
    idempotent_downstream: bool

    def describe(self, action_type: str, arguments: dict[str, Any],
                 action_key: str) -> dict[str, Any]:
        """Exactly what ``execute`` would send, with secrets masked (simulation_only)."""
        ...

    def execute(self, action_type: str, arguments: dict[str, Any],
                action_key: str) -> ExecutionResult:
        """Run the action; downstream failures come back as ``ok=False``, never raised."""
        ...

    async def aexecute(self, action_type: str, arguments: dict[str, Any],
                       action_key: str) -> ExecutionResult:
        ...


def redact_names(names: Iterable[str]) -> tuple[str, ...]:
    """The policy's ``redact`` list as an executor keeps it (order kept, for a stable repr)."""
    return tuple(dict.fromkeys(n for n in names if isinstance(n, str) and n))


def redacted(value: Any, names: tuple[str, ...]) -> Any:
    """``value`` with the policy's redacted fields masked, as the audit log masks them."""
    if not names:
        return value
    from ..audit import redact

    return redact(value, names)


# Shorter values would mask half of any text and protect nothing.
_MIN_SCRUB_CHARS = 4


def redacted_values(arguments: Any, names: tuple[str, ...]) -> set[str]:
    """The text of every value the policy redacts in ``arguments`` (at any depth), so an
    error or a result that quotes one (a receiver echoing the request) can be masked."""
    wanted = {n.lower() for n in names}
    found: set[str] = set()

    def walk(value: Any, hidden: bool, depth: int) -> None:
        if depth > 64:
            return
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, hidden or (isinstance(k, str) and k.lower() in wanted), depth + 1)
        elif isinstance(value, list):
            for v in value:
                walk(v, hidden, depth + 1)
        elif hidden and value is not None and not isinstance(value, bool):
            found.add(str(value))

    if wanted:
        walk(arguments, False, 0)
    return {v for v in found if len(v) >= _MIN_SCRUB_CHARS}


def scrub(result: ExecutionResult, masks: dict[str, str]) -> ExecutionResult:
    """``result`` with every occurrence of each key of ``masks`` replaced by its value, in the
    error text and anywhere in the result. Only what is reported changes, never what was sent."""
    masks = {k: v for k, v in masks.items() if len(k) >= _MIN_SCRUB_CHARS}
    if not masks:
        return result
    order = sorted(masks, key=len, reverse=True)

    def text(t: str) -> str:
        for secret in order:
            t = t.replace(secret, masks[secret])
        return t

    def value(v: Any) -> Any:
        if isinstance(v, str):
            return text(v)
        if isinstance(v, dict):
            return {k: value(x) for k, x in v.items()}
        if isinstance(v, list):
            return [value(x) for x in v]
        return v

    error = text(result.error) if result.error else result.error
    body = value(result.result)
    if error == result.error and body == result.result:
        return result
    return ExecutionResult(result.ok, body, error)


def to_jsonable(value: Any) -> Any:
    """``value`` as it will be stored: a JSON round trip, or ``str(value)`` if that fails."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        return str(value)


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def shorten(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fmt_seconds(s: float) -> str:
    return f"{int(s)}s" if math.isfinite(s) and s == int(s) else f"{s:g}s"


def exc_text(exc: BaseException) -> str:
    msg = str(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def check_action_key(action_key: str) -> str | None:
    """Action keys travel in headers: refuse anything that could break or inject one."""
    if not isinstance(action_key, str) or not action_key:
        return "action_key must be a non-empty string"
    if not action_key.isascii() or not action_key.isprintable() or len(action_key) > 512:
        return "action_key must be printable ASCII of at most 512 characters"
    return None
