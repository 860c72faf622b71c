"""Parse a client's JSON body strictly, so the gateway decides on exactly what goes upstream.

- a repeated key is refused: the gateway and the upstream's parser could otherwise
  each pick a different copy (``{"model": "cheap", "model": "costly"}``);
- ``NaN``/``Infinity`` are refused (not JSON), and so is a number too large for a float;
- nesting deeper than :data:`MAX_DEPTH` is refused before anything recurses on it;
- a lone surrogate escape (``"\\ud800"``) is refused: it cannot be encoded as UTF-8,
  so nothing downstream (hashing, the audit log, the upstream) could carry it.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["MAX_DEPTH", "StrictJSONError", "depth_ok", "loads", "no_constant", "unique_pairs"]

MAX_DEPTH = 64

# A high surrogate escape not followed by a low one, or a low one not preceded by a high one.
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD]")


class StrictJSONError(ValueError):
    pass


def unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a repeated key (every strict parse in the gateway)."""
    out = dict(pairs)  # built in C; a repeated key shows as a shorter dict
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise StrictJSONError(f"duplicate key {key[:64]!r}")
            seen.add(key)
    return out


def no_constant(name: str) -> Any:
    """``parse_constant`` refusing NaN and the infinities."""
    raise StrictJSONError(f"{name} is not valid JSON")


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        # 1e999 parses to infinity, which no JSON text (the audit log, the upstream) can carry.
        raise StrictJSONError(f"the number {text[:32]} is out of range")
    return value


def depth_ok(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether parsed JSON nests at most ``limit`` containers deep. An upstream's answer is
    read by plain ``json.loads``, which takes ~1,000 levels: code that walks it recursively
    (copies, rewrites) must not meet them."""
    # Recursion visits only containers, and json.loads has already refused anything deep
    # enough to exhaust the interpreter's stack; this is ~4x the speed of an explicit stack.
    if limit <= 0:
        return False
    kind = type(value)
    if kind is not dict and kind is not list:
        return True
    for node in value.values() if kind is dict else value:
        t = type(node)
        if (t is dict or t is list) and not depth_ok(node, limit - 1):
            return False
    return True


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if type(node) is str:
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif type(node) is dict:
            stack.extend(node.keys())
            stack.extend(node.values())
        elif type(node) is list:
            stack.extend(node)
    return False


# Built once: json.loads with hooks builds a new decoder on every call (~4 us a parse).
_DECODER = json.JSONDecoder(object_pairs_hook=unique_pairs, parse_constant=no_constant,
                            parse_float=_float)


def loads(body: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """The parsed body, or ``StrictJSONError`` saying precisely what is wrong."""
    try:
        # As json.loads reads bytes: UTF-8/16/32 by the first bytes, surrogatepass.
        text = (body.decode(json.detect_encoding(body), "surrogatepass")
                if isinstance(body, bytes | bytearray) else body)
        if text.startswith("\ufeff"):
            raise StrictJSONError("a byte order mark before the JSON text")
        value = _DECODER.decode(text)
    except StrictJSONError:
        raise
    except RecursionError:
        raise StrictJSONError(f"nested more than {max_depth} levels deep") from None
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:
        raise StrictJSONError(str(exc)[:200]) from None
    if not depth_ok(value, max_depth):
        raise StrictJSONError(f"nested more than {max_depth} levels deep")
    raw = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
    # Only bodies with a suspicious escape pay for the walk that confirms it.
    # (json.loads decodes bytes with surrogatepass, so a raw 0xED lead byte can hide one too.)
    # Cheapest test first: a backslash (memchr), then "\\u[dD]" in one short scan; the full
    # regex (a lookbehind at every escape) costs ~60 us on a 5 KB body.
    suspicious = ((b"\\" in raw and _SURROGATE_ESCAPE.search(raw) is not None
                   and _LONE_SURROGATE.search(raw) is not None) or b"\xed" in raw
                  or (isinstance(body, str) and not body.isascii()))
    if suspicious and _has_lone_surrogate(value):
        raise StrictJSONError("a string holds a lone UTF-16 surrogate (not valid Unicode)")
    return value
