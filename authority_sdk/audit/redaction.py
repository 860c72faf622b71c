"""Fields named in the policy's ``redact`` list never reach the log, or anything shown."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = ["REDACTED", "redact"]

REDACTED = "[REDACTED]"



def redact(obj: Any, names: Iterable[str]) -> Any:
    """A copy of ``obj`` with the value of every dict key named in ``names`` replaced.

    Keys match case-insensitively at any depth, inside lists and tuples too. A string
    holding a JSON object or array (tool-call ``arguments`` travel that way) is
    searched as well and re-encoded only when something in it was redacted.
    """
    wanted = frozenset(n.lower() for n in names)
    if not wanted:
        return obj
    return _redact(obj, wanted)


def _redact(obj: Any, wanted: frozenset[str]) -> Any:
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(k, str) and k.lower() in wanted else _redact(v, wanted))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v, wanted) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_redact(v, wanted) for v in obj)
    if isinstance(obj, str) and obj[:1] in ("{", "[") and any(w in obj.lower() for w in wanted):
        try:
            parsed = json.loads(obj)
        except ValueError:
            return obj
        cleaned = _redact(parsed, wanted)
        return obj if cleaned == parsed else json.dumps(cleaned, ensure_ascii=False)
    return obj


