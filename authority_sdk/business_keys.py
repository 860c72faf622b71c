"""Business keys (``dedupe_on`` values) in one canonical spelling.

``dedupe_on: [order_id]`` means "one refund per order". A model — or whoever
injected its prompt — can spell one order many ways that a person and the
downstream system read as the same: ``"ORD-1042"``, ``"ord-1042 "``, and the
same with a zero-width space or a no-break space in it, or in full-width
letters. Each spelling must dedupe as one, so the key is built from
``normalise_business_value`` of each field. Deliberate choices, all towards
"treat as the same" (a false duplicate is refused and visible; a missed one
pays twice):

- text: Unicode NFKC (full-width and compatibility forms fold to their plain
  form), case folding, every invisible character removed (format characters
  such as zero-width spaces and joiners, bidi marks and the BOM; variation
  selectors; the combining grapheme joiner; Hangul fillers; control characters),
  every dash (Unicode dash punctuation, and minus signs) read as ``-``, runs of
  whitespace (NBSP and the other Unicode spaces included) collapsed to one space
  and trimmed;
- numbers: one value, one key — ``1``, ``1.0`` and ``-0.0``/``0`` are the same;
  a number is keyed by its shortest decimal text, so the JSON number ``42`` and
  the string ``"42"`` are the same key. A string is never parsed as a number:
  ``"42.0"``, ``"042"`` and ``"4.2e1"`` stay themselves, not ``42``;
- ``true``/``false``/``null`` stay themselves (``true`` is not ``"true"``);
- arrays keep their order; objects are keyed by their normalised member names
  (two names that meet in one spelling keep both values, as a sorted list).

Pure, and idempotent on text and numbers: ``normalise_business_text(t)`` is a
fixed point of itself.
"""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Any

__all__ = ["normalise_business_text", "normalise_business_value"]

# Invisible characters that are not Unicode format characters (category Cf, removed
# wholesale): variation selectors, the combining grapheme joiner, Mongolian free
# variation selectors and the Hangul fillers, which render as nothing.
_INVISIBLE = frozenset(
    [chr(c) for c in range(0xFE00, 0xFE10)]
    + [chr(c) for c in range(0xE0100, 0xE01F0)]
    + ["\u034f", "\u180b", "\u180c", "\u180d", "\u180f", "\u115f", "\u1160", "\u3164",
       "\uffa0"]
)
_DASHES = frozenset({"\u2212", "\u2796", "\ufe63", "\uff0d"})  # minus signs, not category Pd


def _clean(text: str) -> str:
    out: list[str] = []
    for ch in text:
        if ch.isspace():
            out.append(" ")
            continue
        category = unicodedata.category(ch)
        if category in ("Cf", "Cc") or ch in _INVISIBLE:
            continue
        out.append("-" if category == "Pd" or ch in _DASHES else ch)
    return " ".join("".join(out).split())


def normalise_business_text(text: str) -> str:
    """One spelling of a text key (module docstring has the rules)."""
    if text.isascii():  # the common case: NFKC changes nothing, case folding is lower()
        return _clean(text.lower())
    previous = None
    # NFKC and case folding can each undo the other's normal form on rare characters;
    # a few rounds reach the fixed point, which is what makes the function idempotent.
    for _ in range(4):
        if text == previous:
            break
        previous = text
        text = _clean(unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text)
                                            .casefold()))
    return text


def _number_text(value: int | float) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)  # not JSON; kept distinct rather than guessed
        if value.is_integer():
            return str(int(value))
        return repr(value)
    return str(value)


def normalise_business_value(value: Any) -> Any:
    """A JSON value in the canonical form its dedupe key is built from."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return _number_text(value)
    if isinstance(value, str):
        return normalise_business_text(value)
    if isinstance(value, list | tuple):
        return [normalise_business_value(v) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        met: dict[str, list[Any]] = {}
        for k, v in value.items():
            name = normalise_business_text(str(k))
            met.setdefault(name, []).append(normalise_business_value(v))
        for name, values in met.items():
            # Two member names in one spelling ("Id" and "id"): keep both values, in an
            # order that does not depend on how the object was written.
            out[name] = values[0] if len(values) == 1 else sorted(
                values, key=lambda v: json.dumps(v, sort_keys=True, ensure_ascii=False))
        return out
    return normalise_business_text(str(value))
