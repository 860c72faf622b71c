"""Schema version 6 (fewer statements in the counters' functions) on a real PostgreSQL:
the functions it replaces answer and write exactly as version 5's did, on arbitrary
sequences of claims, reservations and settlements (hypothesis, version 5's schema beside
as the reference), and a version-5 database upgrades with what is open kept."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import pg_dsn, requires_postgres, schema_at

from authority_sdk.store import pg_plans
from authority_sdk.store.postgres import PgStore

pytestmark = requires_postgres()

NAMES = ["a", "b", "c"]
LIMITS = [0.1, 0.25, 1.0]
# 1 µs: the row lapses at once (the next statement starts a new period from 0).
TTLS = [3600.0, 1e-6]


@contextlib.contextmanager
def _connections(*versions: int) -> Iterator[list[Any]]:
    import psycopg

    with contextlib.ExitStack() as stack:
        conns = []
        for version in versions:
            name = stack.enter_context(schema_at(version))
            conns.append(stack.enter_context(psycopg.connect(pg_dsn(name), autocommit=True)))
        yield conns


def _state(conn: Any) -> tuple[Any, ...]:
    counters = conn.execute("SELECT name, used, expires_at > extract(epoch from "
                            "clock_timestamp()) FROM authority_counters ORDER BY name")
    idem = conn.execute("SELECT key, claim_id, record FROM authority_idem ORDER BY key")
    return tuple(counters.fetchall()), tuple(idem.fetchall())


def _statement(op: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
    kind = op[0]
    if kind == "claim_reserve":
        _, key, counters, lo, hi, ttl = op
        return ("SELECT authority_claim_reserve(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (key, f"c-{key}", json.dumps({"claim_id": f"c-{key}"}), ttl,
                 [n for n, _ in counters], [lim for _, lim in counters], lo, hi, ttl))
    if kind == "reserve":
        _, counters, lo, hi, ttl = op
        return ("SELECT authority_budget_reserve(%s, %s, %s, %s, %s)",
                ([n for n, _ in counters], [lim for _, lim in counters], lo, hi, ttl))
    if kind == "settle":
        _, names, delta, ttl = op
        return "SELECT authority_budget_settle(%s, %s, %s)", (names, delta, ttl)
    items = []
    for sub in op[1]:
        if sub[0] == "reserve":
            _, counters, lo, hi, ttl = sub
            item = pg_plans.batch_item("budget_reserve", (counters,),
                                       {"min_usd": lo, "max_usd": hi, "ttl_s": ttl})
        elif sub[0] == "settle":
            _, names, delta, ttl = sub
            item = pg_plans.batch_item("budget_settle", (names,),
                                       {"reserved": 0.0, "actual": delta, "ttl_s": ttl})
        else:
            _, key, ttl = sub
            item = pg_plans.batch_item("idem_claim", (key, {"claim_id": f"c-{key}"}),
                                       {"ttl_s": ttl})
        if isinstance(item, pg_plans.BatchItem):
            items.append(item)
    if not items:
        return "SELECT 1", ()
    return pg_plans.state_batch(items)[1]


def test_version_6_answers_and_writes_as_version_5_did() -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    counters = st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(LIMITS)),
                        min_size=0, max_size=4)  # a name may come twice, with two limits
    grant = st.tuples(st.sampled_from([0.0, 0.05, 0.1]), st.sampled_from([0.1, 0.2, 0.5]))
    ttl = st.sampled_from(TTLS)
    key = st.sampled_from(["k1", "k2"])
    reserve = st.builds(lambda c, g, t: ("reserve", c, g[0], g[1], t), counters, grant, ttl)
    settle = st.builds(lambda n, d, t: ("settle", n, d, t),
                       st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
                       st.sampled_from([-0.3, -0.05, 0.0, 0.07]), ttl)
    claim = st.builds(lambda k, t: ("claim", k, t), key, ttl)
    op = st.one_of(
        st.builds(lambda k, c, g, t: ("claim_reserve", k, c, g[0], g[1], t),
                  key, counters, grant, ttl),
        reserve, settle,
        st.builds(lambda items: ("batch", items),
                  st.lists(st.one_of(reserve, settle, claim), min_size=1, max_size=4)))

    with _connections(5, 6) as (old, new):
        @settings(max_examples=60, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(ops=st.lists(op, min_size=1, max_size=8))
        def check(ops: list[tuple[Any, ...]]) -> None:
            for conn in (old, new):
                conn.execute("TRUNCATE authority_counters, authority_idem")
            for one in ops:
                sql, params = _statement(one)
                answers = [conn.execute(sql, params).fetchone() for conn in (old, new)]
                assert answers[1] == answers[0], one
                assert _state(new) == _state(old), one

        check()


def test_a_version_5_database_upgrades_with_what_is_open_kept() -> None:
    import psycopg

    from authority_sdk.store.pg_schema import SCHEMA_VERSION, migrate

    assert SCHEMA_VERSION == 6
    held = json.dumps({"claim_id": "c", "status": "in_flight"})
    with schema_at(5, "INSERT INTO authority_idem (key, claim_id, record, expires_at) VALUES "
                      f"('open', 'c', '{held}', extract(epoch from clock_timestamp()) + 3600)",
                   "INSERT INTO authority_counters (name, used, expires_at) VALUES "
                   "('budget:env:prod:day:x', 0.9, extract(epoch from clock_timestamp()) "
                   "+ 3600)") as name:
        with psycopg.connect(pg_dsn(name), autocommit=True) as conn:
            assert migrate(conn) == (5, 6)
            assert migrate(conn) == (6, 6)
        store = PgStore(pg_dsn(name))
        try:
            ask: dict[str, Any] = {"ttl_s": 3600.0, "counters": [("budget:env:prod:day:x", 1.0)],
                                   "min_usd": 0.01, "max_usd": 0.2, "budget_ttl_s": 3600.0}
            existing, grant = store.idem_claim_reserve(
                "open", {"claim_id": "d", "status": "in_flight"}, **ask)
            assert existing == {"claim_id": "c", "status": "in_flight"} and grant is None
            # The period's spend is kept: 0.1 left of the day's 1.0.
            assert store.idem_claim_reserve(
                "new", {"claim_id": "e", "status": "in_flight"}, **ask) == (
                    None, (True, pytest.approx(0.1)))
            assert store.budget_used("budget:env:prod:day:x") == pytest.approx(1.0)
        finally:
            store.close()
