"""The typed array parameters (store/pg_arrays.py) against a real PostgreSQL: whatever a
list holds, the server reads back exactly what psycopg's own list binding gives it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from helpers import PG_DSN, requires_postgres
from hypothesis import given, settings
from hypothesis import strategies as st

from authority_sdk.store.pg_arrays import FloatArray, Int4Array, Int8Array, TextArray

pytestmark = requires_postgres()

# Text PostgreSQL can hold: no NUL, no lone surrogate (neither ever reaches a statement: the
# records are ASCII JSON and keys printable).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))


@pytest.fixture(scope="module")
def conn() -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(PG_DSN, autocommit=True) as c:
        yield c


def _both(conn: psycopg.Connection[Any], cast: str, typed: list[Any]) -> tuple[Any, Any]:
    sql = f"SELECT %b::{cast}, %s::{cast}"
    row = conn.execute(sql, (typed, list(typed))).fetchone()
    assert row is not None
    return row[0], row[1]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.none() | TEXT, max_size=12))
def test_text_arrays_read_back_as_sent(conn: psycopg.Connection[Any],
                                       values: list[str | None]) -> None:
    ours, theirs = _both(conn, "text[]", TextArray(values))
    assert ours == theirs == values


@settings(max_examples=150, deadline=None)
@given(st.lists(st.none() | st.floats(allow_nan=False), max_size=12))
def test_float_arrays_read_back_as_sent(conn: psycopg.Connection[Any],
                                        values: list[float | None]) -> None:
    ours, theirs = _both(conn, "float8[]", FloatArray(values))
    assert ours == theirs == values


def test_nan_and_the_infinities(conn: psycopg.Connection[Any]) -> None:
    ours, _ = _both(conn, "float8[]", FloatArray([math.nan, math.inf, -math.inf, -0.0]))
    assert math.isnan(ours[0]) and ours[1:3] == [math.inf, -math.inf]
    assert math.copysign(1.0, ours[3]) == -1.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-2**31, 2**31 - 1), max_size=12),
       st.lists(st.integers(-2**63, 2**63 - 1), max_size=12))
def test_integer_arrays_read_back_as_sent(conn: psycopg.Connection[Any], small: list[int],
                                          big: list[int]) -> None:
    assert _both(conn, "int4[]", Int4Array(small)) == (small, small)
    assert _both(conn, "int8[]", Int8Array(big)) == (big, big)


def test_an_integer_out_of_range_is_refused_before_anything_is_sent(
        conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.DataError):
        conn.execute("SELECT %b::int4[]", (Int4Array([2**31]),))
    assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection is still usable
