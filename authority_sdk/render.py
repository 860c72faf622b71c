"""Stored data made safe to show: no lone surrogates, no unbounded strings.

What the gateway stores came from clients and models (a model name, tool-call
arguments, a reason). JSON lets a string hold a lone UTF-16 surrogate
(``"\\ud800"``); Python keeps it, but it cannot be encoded as UTF-8, so a
response, a terminal or a validator that meets one fails. Everything the
management API, the console and the CLI show passes through :func:`printable`
first, which writes each lone surrogate as the six characters ``\\udXXX``:
visible, lossless for a reader, and valid Unicode.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["clip", "clip_strings", "escape_surrogates", "printable"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def escape_surrogates(text: str) -> str:
    """``text`` with every lone surrogate written as ``\\udXXX`` (unchanged when none)."""
    if _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub(_escape, text)


def printable(obj: Any) -> Any:
    """A copy of a JSON-like value whose strings (and keys) all encode as UTF-8.

    Returns ``obj`` itself when nothing needed escaping, so the common case copies nothing.
    """
    if isinstance(obj, str):
        return escape_surrogates(obj)
    if isinstance(obj, dict):
        out: dict[Any, Any] | None = None
        for i, (k, v) in enumerate(obj.items()):
            k2 = escape_surrogates(k) if isinstance(k, str) else k
            v2 = printable(v)
            if out is None and (k2 is not k or v2 is not v):
                out = dict(list(obj.items())[:i])
            if out is not None:
                out[k2] = v2
        return obj if out is None else out
    if isinstance(obj, list | tuple):
        items = [printable(v) for v in obj]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return items
    return obj


def clip(text: str, limit: int) -> str:
    """At most ``limit`` characters of ``text``, saying how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[+{len(text) - limit} chars]"


def clip_strings(obj: Any, limit: int) -> Any:
    """A copy of a JSON-like value with every string (and key) longer than ``limit`` clipped."""
    if isinstance(obj, str):
        return clip(obj, limit)
    if isinstance(obj, dict):
        return {(clip(k, limit) if isinstance(k, str) else k): clip_strings(v, limit)
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clip_strings(v, limit) for v in obj]
    return obj
