"""Whatever a client or a model puts into an entry, every line is valid UTF-8 JSON that
verifies (issue 9 F1, issue 10 G9/G10): hypothesis generates the values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authority_sdk.audit import FileSink, verify
from authority_sdk.audit.values import MAX_ENTRY_CHARS, MAX_STRING, bound

KEY = b"h" * 32

# Every kind of code point, lone surrogates (category Cs, which hypothesis leaves out unless
# asked) included: JSON text can carry them as \udXXX escapes.
_text = st.text(st.characters(categories=["Cs", "L", "M", "N", "P", "S", "Z", "Cc", "Cf"]),
                max_size=40)
_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10 ** 300)
            | st.floats(allow_nan=True, allow_infinity=True) | _text)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(_text, inner, max_size=6),
    max_leaves=40)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(value=json_values, name=_text)
def test_any_json_value_writes_valid_utf8_lines_that_verify(tmp_path: Path, value: Any,
                                                           name: str) -> None:
    path = tmp_path / "audit.jsonl"
    log = FileSink(path, fsync=False, key=KEY)
    entry = log.append("action", action_type=name, model=name, reason=value,
                       execution_result=value, details={"arguments": value, name: value})
    log.close()
    text = path.read_bytes().decode("utf-8")  # strict: raises on any invalid byte
    lines = [line for line in text.split("\n") if line]
    assert json.loads(lines[-1]) == entry
    assert all(json.loads(line)["seq"] for line in lines)
    result = verify(path, key=KEY)
    assert result.ok, result.reason


@given(value=json_values)
def test_bound_is_json_safe_and_bounded(value: Any) -> None:
    out = bound(value)
    encoded = json.dumps(out, ensure_ascii=False, allow_nan=False).encode("utf-8")
    assert json.loads(encoded) == out
    assert len(encoded) < 6 * (MAX_ENTRY_CHARS + 8 * MAX_STRING)


def test_bound_keeps_small_values_as_they_are() -> None:
    value = {"a": [1, 2.5, None, True, "ü ✓"], "b": {"c": "d"}}
    assert bound(value) == value
    assert bound(("x", 1)) == ["x", 1]
    assert bound({1: "int key"}) == {"1": "int key"}
