"""What may be written into an entry: bounded, plain JSON that encodes as strict UTF-8.

Clients and models choose most of what the log records (a model name, tool-call
arguments, a reason), so :func:`bound` makes every value safe before it is hashed:

- a lone UTF-16 surrogate is written as the six characters ``\\udXXX`` (as the
  console shows it), so every line is valid UTF-8 that ``jq`` and a SIEM read;
- a string longer than ``MAX_STRING`` characters keeps its start and says how many
  characters were cut (``…[+N chars]``); keys are clipped at ``MAX_KEY``;
- one entry's values share a budget of about ``MAX_ENTRY_CHARS`` characters: past it,
  the remaining items of a list or object are replaced by one marker saying how many;
- nesting deeper than ``MAX_DEPTH`` is replaced by a marker (no ``RecursionError``);
- ``NaN``/``Infinity`` (not JSON) and integers too large to print become strings;
  tuples become lists, other objects their ``str``.

The result is a fresh value, so the entry that is hashed is exactly what a reader
parses back. The caps are sized so one entry stays under ~100 KB whatever it is given.
"""

from __future__ import annotations

import math
from typing import Any

from ..render import clip, escape_surrogates

__all__ = ["MAX_DEPTH", "MAX_ENTRY_CHARS", "MAX_KEY", "MAX_STRING", "bound"]

MAX_STRING = 4096
MAX_KEY = 256
MAX_DEPTH = 32
MAX_ENTRY_CHARS = 64 * 1024
# An int of more bits has more than ~300 digits: no reader needs it exactly, and
# printing one of millions of digits is itself the attack (Python refuses past 4300).
_MAX_INT_BITS = 1024


class _Budget:
    __slots__ = ("left",)

    def __init__(self, chars: int) -> None:
        self.left = chars


def bound(value: Any, budget: int = MAX_ENTRY_CHARS) -> Any:
    """A JSON-safe, size-capped copy of ``value`` (see the module docstring)."""
    return _bound(value, _Budget(budget), 0)


def _bound(value: Any, budget: _Budget, depth: int) -> Any:
    # Exact types first, in the order entries hold them, and short ASCII strings (most
    # leaves) settled in the loops without a call: two entries a request pass here.
    t = type(value)
    if t is str:
        return _string(value, budget, MAX_STRING)
    if t is dict or t is list:
        if depth >= MAX_DEPTH:
            budget.left -= 40
            return f"…[nested deeper than {MAX_DEPTH} levels]"
        budget.left -= 2
        if t is dict:
            out: dict[str, Any] = {}
            for i, (k, v) in enumerate(value.items()):
                if budget.left <= 0:
                    out["…"] = f"[+{len(value) - i} more keys]"
                    break
                if type(k) is str and len(k) <= 64 and k.isascii():
                    budget.left -= len(k) + 2
                else:
                    k = _string(k if isinstance(k, str) else str(k), budget, MAX_KEY)
                tv = type(v)
                if tv is str and len(v) <= 64 and v.isascii():
                    budget.left -= len(v) + 2
                    out[k] = v
                elif v is None or tv is bool:
                    budget.left -= 5
                    out[k] = v
                else:
                    out[k] = _bound(v, budget, depth + 1)
            return out
        items: list[Any] = []
        for i, v in enumerate(value):
            if budget.left <= 0:
                items.append(f"…[+{len(value) - i} more items]")
                break
            if type(v) is str and len(v) <= 64 and v.isascii():
                budget.left -= len(v) + 2
                items.append(v)
            else:
                items.append(_bound(v, budget, depth + 1))
        return items
    if value is None or isinstance(value, bool):
        budget.left -= 5
        return value
    if isinstance(value, int):
        if value.bit_length() > _MAX_INT_BITS:
            budget.left -= 40
            return f"[integer of {value.bit_length()} bits]"
        budget.left -= 20
        return value
    if isinstance(value, float):
        budget.left -= 24
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _string(value, budget, MAX_STRING)
    if depth >= MAX_DEPTH:
        budget.left -= 40
        return f"…[nested deeper than {MAX_DEPTH} levels]"
    if isinstance(value, dict):
        sub: dict[str, Any] = {}
        budget.left -= 2
        for i, (k, v) in enumerate(value.items()):
            if budget.left <= 0:
                sub["…"] = f"[+{len(value) - i} more keys]"
                break
            key = _string(k if isinstance(k, str) else str(k), budget, MAX_KEY)
            sub[key] = _bound(v, budget, depth + 1)
        return sub
    if isinstance(value, list | tuple):
        seq: list[Any] = []
        budget.left -= 2
        for i, v in enumerate(value):
            if budget.left <= 0:
                seq.append(f"…[+{len(value) - i} more items]")
                break
            seq.append(_bound(v, budget, depth + 1))
        return seq
    return _string(str(value), budget, MAX_STRING)


def _string(text: str, budget: _Budget, cap: int) -> str:
    n = len(text)
    # The common case: nothing to cut or escape.
    if (n <= 64 or (n <= cap and n <= budget.left)) and text.isascii():
        budget.left -= n + 2
        return text
    limit = max(min(cap, budget.left), 64)
    out = escape_surrogates(clip(text, limit))
    budget.left -= len(out) + 2
    return out
