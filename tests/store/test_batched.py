"""Group commit of the local store's writes on the async driver (store/batched.py):
concurrent writes of one database share one transaction and one sync, and keep every
promise they had alone."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import diskcache
import pytest

from authority_sdk.errors import AuthorityUnavailable
from authority_sdk.store import DiskStore

TTL = 3600.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DiskStore]:
    s = DiskStore(tmp_path / "state")
    yield s
    s.close()


def test_concurrent_claims_of_one_key_have_one_winner_in_few_commits(store: DiskStore) -> None:
    async def main() -> list[object]:
        return await asyncio.gather(*(
            store.aio.idem_claim("k", {"claim_id": f"c{i}", "status": "in_progress"},
                                 ttl_s=TTL) for i in range(32)))

    results = asyncio.run(main())
    winners = [r for r in results if r is None]
    assert len(winners) == 1
    owner = store.idem_get("k")
    assert owner is not None
    assert all(r == owner for r in results if r is not None)
    assert store.aio.group_batches() < 32  # they shared transactions


def test_concurrent_reservations_never_pass_the_limit(store: DiskStore) -> None:
    async def main() -> list[float | None]:
        return await asyncio.gather(*(
            store.aio.budget_reserve([("env", 10.0), ("key", 100.0)], min_usd=1.0,
                                     max_usd=1.0, ttl_s=TTL) for _ in range(50)))

    grants = asyncio.run(main())
    assert sum(1 for g in grants if g) == 10
    assert store.budget_used("env") == pytest.approx(10.0)
    assert store.budget_used("key") == pytest.approx(10.0)


def test_a_failing_write_fails_only_its_own_caller(store: DiskStore, tmp_path: Path) -> None:
    raw = diskcache.Cache(str(tmp_path / "state" / "idempotency"))
    raw.set("bad", "{not json")
    raw.close()

    async def main() -> list[object]:
        return await asyncio.gather(
            store.aio.idem_claim("a", {"claim_id": "1"}, ttl_s=TTL),
            store.aio.idem_replace("bad", "1", {"claim_id": "1"}, ttl_s=TTL),
            store.aio.idem_claim("b", {"claim_id": "2"}, ttl_s=TTL),
            return_exceptions=True)

    a, bad, b = asyncio.run(main())
    assert a is None and b is None
    assert isinstance(bad, AuthorityUnavailable)
    assert store.idem_get("a") == {"claim_id": "1"}
    assert store.idem_get("b") == {"claim_id": "2"}


def test_a_batch_that_cannot_commit_fails_every_caller_and_writes_nothing(
        tmp_path: Path) -> None:
    s = DiskStore(tmp_path / "state", timeout_s=0.2)
    holder = sqlite3.connect(tmp_path / "state" / "idempotency" / "cache.db",
                             isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        async def main() -> list[object]:
            return await asyncio.gather(*(
                s.aio.idem_claim(f"k{i}", {"claim_id": str(i)}, ttl_s=TTL) for i in range(5)),
                return_exceptions=True)

        results = asyncio.run(main())
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert all(isinstance(r, AuthorityUnavailable) for r in results)
    assert all(s.idem_get(f"k{i}") is None for i in range(5))
    s.close()


def test_successive_event_loops_each_get_their_batches(store: DiskStore) -> None:
    for i in range(3):
        assert asyncio.run(store.aio.idem_claim(f"k{i}", {"claim_id": "x"}, ttl_s=TTL)) is None
    assert [store.idem_get(f"k{i}") for i in range(3)] == [{"claim_id": "x"}] * 3


def test_a_caller_cancelled_mid_write_ends_only_once_its_write_landed(
        store: DiskStore) -> None:
    """As with an inline write: the cleanup that follows a cancellation sees the write."""
    async def main() -> tuple[object, object, list[object]]:
        first = asyncio.ensure_future(store.aio.idem_claim("a", {"claim_id": "1"}, ttl_s=TTL))
        rest = [asyncio.ensure_future(
            store.aio.idem_claim(f"k{i}", {"claim_id": "2"}, ttl_s=TTL)) for i in range(4)]
        await asyncio.sleep(0)
        first.cancel()
        done = (await asyncio.gather(first, return_exceptions=True))[0]
        seen = store.idem_get("a")  # at the moment the cancelled caller ended
        return done, seen, await asyncio.gather(*rest)

    done, seen, rest = asyncio.run(main())
    assert isinstance(done, asyncio.CancelledError)
    assert seen == {"claim_id": "1"}
    assert rest == [None] * 4
    assert all(store.idem_get(f"k{i}") == {"claim_id": "2"} for i in range(4))
