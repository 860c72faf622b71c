"""A keyed request's claim and budget reservation in one statement (schema version 5,
``authority_claim_reserve``) on a real PostgreSQL: the claim's every rule, a reservation
only for a claim taken, never a limit passed, on the sync driver, on the async one alone
(one statement) and under load (the group commit's two items)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from helpers import PostgresBackend, pg_dsn, requires_postgres, schema_at

from authority_sdk.errors import AuthorityUnavailable
from authority_sdk.store.postgres import PgStore

pytestmark = requires_postgres()

DAY = 86400.0
BUDGET = [("budget:env:prod:day:x", 1.0), ("budget:key:app:hour:x", 0.5)]


def _claim(i: int | str = 0) -> dict[str, Any]:
    return {"claim_id": f"req_{i}", "status": "in_flight", "fingerprint": "f",
            "lease_until": time.time() + 60, "owner": "me"}


def _ask(**kw: Any) -> dict[str, Any]:
    return {"ttl_s": DAY, "counters": BUDGET, "min_usd": 0.01, "max_usd": 0.2,
            "budget_ttl_s": DAY, **kw}


def _used(store: PgStore) -> list[float]:
    return [store.budget_used(name) for name, _ in BUDGET]


def test_a_new_key_is_claimed_and_reserved_in_one_statement(pg_store: PgStore) -> None:
    assert pg_store.idem_claim_reserve("k", _claim(1), **_ask()) == (None, (True, 0.2))
    assert (pg_store.idem_get("k") or {}).get("claim_id") == "req_1"
    assert _used(pg_store) == [0.2, 0.2]


def test_a_held_key_reserves_nothing(pg_store: PgStore) -> None:
    pg_store.idem_claim_reserve("k", _claim(1), **_ask())
    existing, grant = pg_store.idem_claim_reserve("k", _claim(2), **_ask())
    assert existing is not None and existing["claim_id"] == "req_1" and grant is None
    assert _used(pg_store) == [0.2, 0.2]  # the second request holds no budget


def test_an_expired_claim_is_taken_and_reserved(pg_store: PgStore) -> None:
    pg_store.idem_claim_reserve("k", _claim(1), **_ask(ttl_s=0.2))
    time.sleep(0.3)
    assert pg_store.idem_claim_reserve("k", _claim(2), **_ask()) == (None, (True, 0.2))
    assert (pg_store.idem_get("k") or {}).get("claim_id") == "req_2"
    assert _used(pg_store) == [0.4, 0.4]


def test_a_budget_that_cannot_pay_refuses_the_grant_but_the_claim_stands(
        pg_store: PgStore) -> None:
    assert pg_store.idem_claim_reserve("k", _claim(1), **_ask(min_usd=0.6, max_usd=0.6)) \
        == (None, (True, None))
    assert pg_store.idem_get("k") is not None
    assert _used(pg_store) == [0.0, 0.0]


def test_bad_arguments_are_refused_before_anything_is_sent(pg_store: PgStore) -> None:
    with pytest.raises(ValueError):
        pg_store.idem_claim_reserve("k", _claim(1), **_ask(min_usd=0.5, max_usd=0.1))
    with pytest.raises(ValueError):
        pg_store.idem_claim_reserve("k", _claim(1), **_ask(counters=[]))
    assert pg_store.idem_get("k") is None


def _on_replicas(pg: PostgresBackend, n: int, work: Any) -> tuple[list[Any], list[float]]:
    """``work(store, i)`` on ``n`` stores of their own (each its own pool, as replicas),
    released together; their results (an exception in one fails the test), and the
    counters' values after."""
    stores = [pg.open() for _ in range(n)]
    barrier = threading.Barrier(n)

    def one(i: int) -> Any:
        barrier.wait()
        return work(stores[i], i)

    try:
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n))), _used(stores[0])
    finally:
        for s in stores:
            s.close()


def test_replicas_on_one_key_make_one_claim_and_one_charge(pg: PostgresBackend) -> None:
    out, used = _on_replicas(pg, 6, lambda store, i: store.idem_claim_reserve(
        "same", _claim(i), **_ask()))
    won = [r for r in out if r[0] is None]
    assert len(won) == 1 and won[0][1] == (True, 0.2)
    assert all(r[1] is None for r in out if r[0] is not None)
    assert used == [0.2, 0.2]


def test_replicas_on_distinct_keys_never_pass_the_limit(pg: PostgresBackend) -> None:
    def ten(store: PgStore, i: int) -> list[Any]:
        return [store.idem_claim_reserve(f"k{i}-{j}", _claim(f"{i}{j}"), **_ask(max_usd=0.05))
                for j in range(10)]

    out, used = _on_replicas(pg, 4, ten)
    results = [r for per in out for r in per]
    assert all(existing is None and grant is not None and grant[0]
               for existing, grant in results)  # every claim taken, every reservation asked
    grants = [grant[1] for _, grant in results if grant[1] is not None]
    # The key's budget (0.5) bounds it: ten grants of 0.05, the rest refused.
    assert sum(grants) == pytest.approx(0.5) and len(grants) == 10
    assert used[0] <= 1.0 and used[1] <= 0.5 + 1e-9


def test_the_async_driver_alone_and_under_load_keeps_the_same_rules(
        pg_store: PgStore) -> None:
    aio = pg_store.aio

    async def main() -> tuple[Any, Any, list[Any]]:
        alone = await aio.idem_claim_reserve("a", _claim("a"), **_ask())
        held = await aio.idem_claim_reserve("a", _claim("b"), **_ask())
        # Under load the group commit carries the claim, then the reservation.
        crowd = await asyncio.gather(*(
            aio.idem_claim_reserve(f"c{i % 5}", _claim(f"c{i}"), **_ask(max_usd=0.01))
            for i in range(20)))
        await aio.aclose()
        return alone, held, crowd

    alone, held, crowd = asyncio.run(main())
    assert alone == (None, (True, 0.2))
    assert held[0]["claim_id"] == "req_a" and held[1] is None
    won = [r for r in crowd if r[0] is None]
    assert len(won) == 5 and all(r[1] == (True, 0.01) for r in won)  # one per key
    assert all(r[1] is None for r in crowd if r[0] is not None)
    assert _used(pg_store) == [pytest.approx(0.25), pytest.approx(0.25)]


def test_migrate_upgrades_version_4_and_serve_refuses_it_before() -> None:
    import psycopg

    from authority_sdk.store.pg_schema import SCHEMA_VERSION, migrate

    assert SCHEMA_VERSION >= 5
    with schema_at(4, "INSERT INTO authority_idem (key, claim_id, record, expires_at) VALUES "
                      "('open', 'c', '{\"claim_id\":\"c\",\"status\":\"in_flight\"}', "
                      "extract(epoch from clock_timestamp()) + 3600)") as name:
        with pytest.raises(AuthorityUnavailable,
                           match=rf"version 4, this gateway needs {SCHEMA_VERSION}"):
            PgStore(pg_dsn(name))
        with psycopg.connect(pg_dsn(name), autocommit=True) as conn:
            assert migrate(conn) == (4, SCHEMA_VERSION)
            assert migrate(conn) == (SCHEMA_VERSION, SCHEMA_VERSION)
        store = PgStore(pg_dsn(name))
        try:
            existing, grant = store.idem_claim_reserve("open", _claim(1), **_ask())
            assert existing == {"claim_id": "c", "status": "in_flight"} and grant is None
            assert _used(store) == [0.0, 0.0]
        finally:
            store.close()
