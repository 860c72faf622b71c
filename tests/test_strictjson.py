"""The strict parse every client body and upstream answer goes through (strictjson.py):
a repeated key, a lone surrogate escape, NaN and deep nesting are refused, whatever the
shape; everything else parses exactly as ``json.loads`` does."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authority_sdk import strictjson
from authority_sdk.strictjson import StrictJSONError

_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8) \
    | st.floats(allow_nan=False, allow_infinity=False)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=4), inner, max_size=4), max_leaves=20)


@given(_values)
def test_valid_json_parses_as_json_loads_does(value: Any) -> None:
    text = json.dumps(value)
    assert strictjson.loads(text.encode()) == json.loads(text)


@given(st.lists(st.text(max_size=3), min_size=2, max_size=6), st.data())
def test_a_repeated_key_is_refused_wherever_it_is(keys: list[str], data: Any) -> None:
    pairs = ", ".join(f"{json.dumps(k)}: {i}" for i, k in enumerate(keys))
    body = data.draw(st.sampled_from(["{%s}", '{"a": [{%s}]}', '[1, {"x": {%s}}]'])) % pairs
    if len(set(keys)) == len(keys):
        assert isinstance(strictjson.loads(body.encode()), dict | list)
    else:
        with pytest.raises(StrictJSONError, match="duplicate key"):
            strictjson.loads(body.encode())


@pytest.mark.parametrize("body", [
    rb'{"a": "\ud800"}', rb'{"a": "x\uDFFF"}', rb'{"a": "\ud83d"}', rb'["\udc00\ud800"]',
    b'{"a": NaN}', b'{"a": 1e999}', b"[" * 100 + b"]" * 100,
])
def test_what_no_json_reader_could_carry_is_refused(body: bytes) -> None:
    with pytest.raises(StrictJSONError):
        strictjson.loads(body)


def test_a_valid_surrogate_pair_and_plain_escapes_pass() -> None:
    assert strictjson.loads(rb'{"a": "\ud83d\ude00 \u00e9 \\ud800"}') == {"a": "😀 é \\ud800"}
