"""``dedupe_on`` values in one canonical spelling (issue 10 G7, first half)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authority_sdk.business_keys import normalise_business_text, normalise_business_value
from authority_sdk.dedupe import key_for

# The ten spellings of the report, and a few more of the same kind.
SPELLINGS = [
    "ORD-1042",
    "ord-1042",                    # case
    "ORD-1042 ",                   # trailing space
    "\tORD-1042\n",                # other white space around it
    "ORD\u200b-1042",              # zero-width space
    "\ufeffORD-1042",              # byte order mark
    "ORD\u200d-10\u200c42",        # zero-width joiner and non-joiner
    "\u00a0ORD-1042\u00a0",        # no-break spaces
    "\uff2f\uff32\uff24-\uff11\uff10\uff14\uff12",  # full-width letters and digits
    "Ord\u20111042",               # non-breaking hyphen
    "ORD\u22121042",               # minus sign
    "\uff2f\uff32\uff24\uff0d1042\u2060",  # full-width hyphen-minus, word joiner
    "ORD-1042\ufe0f",              # variation selector
    "\u202aORD-1042\u202c",        # bidi embedding
]


def test_every_spelling_of_one_order_is_one_key() -> None:
    assert {normalise_business_value(s) for s in SPELLINGS} == {"ord-1042"}
    keys = {key_for("prod", "issue_refund", ["order_id"], {"order_id": s})
            for s in SPELLINGS}
    assert len(keys) == 1


@pytest.mark.parametrize(("a", "b"), [
    ("ORD-1042", "ORD-1043"), ("ORD-1042", "ORD 1042"), ("ORD-1042", "ORD1042"),
    ("42", "042"), ("42", "42.0"), ("1e3", "1000"), (True, "true"), (None, "null"),
    (None, ""), ([1, 2], [2, 1]), ("ab", "a b"),
])
def test_different_things_stay_different(a: Any, b: Any) -> None:
    assert normalise_business_value(a) != normalise_business_value(b)


@pytest.mark.parametrize(("a", "b"), [
    (1, 1.0), (0, -0.0), (42, "42"), (1.5, "1.5"), (10**20, 1e20), ([1, "A"], [1.0, "a"]),
    ({"Id": 1}, {"id": "1"}), ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
    ("  Mary   Ann ", "mary ann"), ("STRASSE", "straße"),
])
def test_same_things_are_one_key(a: Any, b: Any) -> None:
    assert normalise_business_value(a) == normalise_business_value(b)


def test_a_key_is_json_and_colliding_member_names_keep_both_values() -> None:
    got = normalise_business_value({"Id": "B", "id": "a", "x": [None, True]})
    assert got == {"id": ["a", "b"], "x": [None, True]}
    json.dumps(got)


_INVISIBLE = st.sampled_from(["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad",
                              "\u202a", "\u202c", "\u2066", "\u2069", "\ufe0f", "\u034f",
                              "\u180e", "\x00", "\x7f"])
_SPACE = st.sampled_from([" ", "\t", "\n", "\u00a0", "\u2003", "\u3000", "\u202f"])


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=20))
def test_property_idempotent(text: str) -> None:
    once = normalise_business_text(text)
    assert normalise_business_text(once) == once
    assert once == once.strip() and "  " not in once


@settings(max_examples=300, deadline=None)
@given(word=st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1,
                    max_size=12),
       noise=st.lists(st.tuples(st.integers(0, 12), _INVISIBLE), max_size=4),
       pad=st.tuples(st.lists(_SPACE, max_size=2), st.lists(_SPACE, max_size=2)),
       upper=st.booleans(), wide=st.booleans())
def test_property_a_spelling_trick_never_makes_a_new_key(
        word: str, noise: list[tuple[int, str]], pad: tuple[list[str], list[str]],
        upper: bool, wide: bool) -> None:
    """Case, full width, invisible characters anywhere and white space around: one key."""
    spelled = word.upper() if upper else word
    if wide:  # ASCII letters and digits to their full-width forms
        spelled = "".join(chr(ord(c) + 0xFEE0) for c in spelled)
    for index, char in sorted(noise, reverse=True):
        spelled = spelled[:index] + char + spelled[index:]
    spelled = "".join(pad[0]) + spelled + "".join(pad[1])
    assert normalise_business_value(spelled) == normalise_business_value(word)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(-10**12, 10**12))
def test_property_a_number_and_its_integral_float_and_its_text_are_one_key(n: int) -> None:
    assert normalise_business_value(n) == normalise_business_value(float(n)) \
        == normalise_business_value(str(n))
