"""``GET /models`` as the policy sees it: only the models an environment allows.

Shared by both front doors (the proxy's route and the SDK transport), so a caller
sees the same list whichever door it uses. Pure functions, no I/O.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any

__all__ = ["allowed_models", "model_entries", "models_body"]

_GLOB_CHARS = "*?["


def model_entries(payload: Any) -> list[dict[str, Any]] | None:
    """The model objects of an upstream's list answer, or None if it is not one."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return None
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def allowed_models(listed: list[dict[str, Any]] | None,
                   patterns: list[str]) -> list[dict[str, Any]]:
    """Models matching the environment's globs: from the upstream's list when it answered,
    else the patterns that name one model literally."""
    if listed is not None:
        return [m for m in listed if any(fnmatch.fnmatchcase(m["id"], p) for p in patterns)]
    return [{"id": p, "object": "model", "created": 0, "owned_by": "authority"}
            for p in patterns if not any(c in p for c in _GLOB_CHARS)]


def models_body(status_code: int, body: bytes, patterns: list[str]) -> bytes:
    """The JSON answer for ``GET /models`` given the upstream's raw answer."""
    listed: list[dict[str, Any]] | None = None
    if status_code == 200:
        try:
            listed = model_entries(json.loads(body))
        except (ValueError, RecursionError):
            listed = None
    return json.dumps({"object": "list", "data": allowed_models(listed, patterns)}).encode()
