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


# -- which commits are synced -----------------------------------------------------------
# SQLite is told per connection: the statements every connection of the store sends are
# recorded, and each COMMIT is read under the synchronous mode set last on its connection
# (2 = FULL, fsynced; 1 = NORMAL, on disk with the next FULL commit of that database).


@pytest.fixture
def commits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """(database folder name, synchronous mode) of each COMMIT, in order."""
    out: list[tuple[str, int]] = []
    original = diskcache.Cache._con
    traced: set[int] = set()

    def con(self: diskcache.Cache) -> sqlite3.Connection:
        c = original.fget(self)  # type: ignore[attr-defined]
        if id(c) not in traced:
            traced.add(id(c))
            mode = [2]  # the store opens its idempotency and budget databases FULL
            db = Path(self.directory).name

            def trace(sql: str) -> None:
                text = sql.strip().upper()
                if text.startswith("PRAGMA SYNCHRONOUS ="):
                    mode[0] = int(text.rsplit("=", 1)[1])
                elif text == "COMMIT":
                    out.append((db, mode[0]))

            c.set_trace_callback(trace)
        return c

    monkeypatch.setattr(diskcache.Cache, "_con", property(con))
    yield out


def test_each_write_alone_is_synced_unless_nothing_rests_on_it(
        tmp_path: Path, commits: list[tuple[str, int]]) -> None:
    s = DiskStore(tmp_path / "state")
    s.idem_claim("k", {"claim_id": "1"}, ttl_s=TTL)
    assert commits[-1] == ("idempotency", 1)  # a claim: the checkpoint will flush it
    s.idem_replace("k", "1", {"claim_id": "1", "answer": {}}, ttl_s=TTL)
    assert commits[-1] == ("idempotency", 2)  # the checkpoint, before anything takes effect
    s.idem_replace("k", "1", {"claim_id": "1", "status": "done"}, ttl_s=TTL, flush=False)
    assert commits[-1] == ("idempotency", 1)  # the finished answer
    s.idem_put("p", {"claim_id": "2"}, ttl_s=TTL)
    assert commits[-1] == ("idempotency", 2)  # after an unflushed write, FULL again
    assert s.idem_delete("p", "2")
    assert commits[-1] == ("idempotency", 1)
    s.budget_reserve([("env", 10.0)], min_usd=1.0, max_usd=1.0, ttl_s=TTL)
    assert commits[-1] == ("budget", 2)  # a reservation: the limit holds after a power cut
    s.budget_settle(["env"], reserved=1.0, actual=0.5, ttl_s=TTL)
    assert commits[-1] == ("budget", 1)  # a settlement lost only over-counts
    s.budget_reserve([("env", 10.0)], min_usd=1.0, max_usd=1.0, ttl_s=TTL)
    assert commits[-1] == ("budget", 2)
    for db in ("idempotency", "budget"):
        mode = getattr(s, "_idem" if db == "idempotency" else "_budget")._con.execute(
            "PRAGMA synchronous").fetchone()[0]
        assert mode == 2
    s.close()


def test_an_unflushed_write_that_fails_leaves_its_connection_full(
        tmp_path: Path, commits: list[tuple[str, int]]) -> None:
    s = DiskStore(tmp_path / "state")
    raw = diskcache.Cache(str(tmp_path / "state" / "idempotency"))
    raw.set("bad", "{not json")
    raw.close()
    with pytest.raises(AuthorityUnavailable):
        s.idem_delete("bad", "1")
    assert s._idem._con.execute("PRAGMA synchronous").fetchone()[0] == 2
    s.idem_put("p", {"claim_id": "2"}, ttl_s=TTL)
    assert commits[-1] == ("idempotency", 2)
    s.close()


def test_a_batch_is_synced_when_any_write_it_carries_must_be(
        store: DiskStore, commits: list[tuple[str, int]]) -> None:
    async def claims_only() -> None:
        await asyncio.gather(*(store.aio.idem_claim(f"a{i}", {"claim_id": "x"}, ttl_s=TTL)
                               for i in range(8)))

    asyncio.run(claims_only())
    idem = [mode for db, mode in commits if db == "idempotency"]
    assert idem and set(idem) == {1}
    commits.clear()

    async def with_a_checkpoint() -> None:
        await asyncio.gather(
            *(store.aio.idem_claim(f"b{i}", {"claim_id": "x"}, ttl_s=TTL) for i in range(4)),
            store.aio.idem_replace("a0", "x", {"claim_id": "x", "answer": {}}, ttl_s=TTL),
            *(store.aio.idem_claim(f"c{i}", {"claim_id": "x"}, ttl_s=TTL) for i in range(4)))

    asyncio.run(with_a_checkpoint())
    idem = [mode for db, mode in commits if db == "idempotency"]
    # The first claim may go alone; the batch that carried the checkpoint was synced.
    assert 2 in idem
    assert store.idem_get("a0") == {"claim_id": "x", "answer": {}}
    assert all(store.idem_get(f"{p}{i}") == {"claim_id": "x"} for p in "bc" for i in range(4))


def test_a_store_without_durability_never_switches(
        tmp_path: Path, commits: list[tuple[str, int]]) -> None:
    s = DiskStore(tmp_path / "state", durable=False)
    s.idem_claim("k", {"claim_id": "1"}, ttl_s=TTL)
    s.budget_reserve([("env", 10.0)], min_usd=1.0, max_usd=1.0, ttl_s=TTL)
    assert s._idem._con.execute("PRAGMA synchronous").fetchone()[0] == 1
    s.close()


def test_a_connection_that_cannot_be_set_back_to_full_is_dropped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never a connection that skips syncs left for the writes that need them."""
    s = DiskStore(tmp_path / "state")
    real = s._idem._con

    class Refusing:
        def execute(self, sql: str, *args: object) -> object:
            if sql.strip() == "PRAGMA synchronous = 2":
                raise sqlite3.OperationalError("disk I/O error")
            return real.execute(sql, *args)

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    original = diskcache.Cache._con
    monkeypatch.setattr(diskcache.Cache, "_con", property(
        lambda self: Refusing() if self is s._idem
        else original.fget(self)))  # type: ignore[attr-defined]
    assert s.idem_claim("k", {"claim_id": "1"}, ttl_s=TTL) is None  # the write stands
    monkeypatch.undo()
    fresh = s._idem._con
    assert fresh is not real  # the old connection was closed and dropped
    assert fresh.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert s.idem_get("k") == {"claim_id": "1"}
    s.close()


# -- effects.StoreOps: independent writes of one request sent together (one round trip on
# PostgreSQL, tests/store/test_pg_batch.py; one after the other here) ------------------


def test_writes_sent_together_each_succeed_or_fail_by_themselves(store: DiskStore) -> None:
    """``effects.StoreOps`` on a store that does not group them: one after the other, on
    both drivers, each with its own outcome."""
    from authority_sdk.effects import Runtime, S, StoreOps

    rt = Runtime(store, None, None)  # type: ignore[arg-type]
    store.idem_claim("k", {"claim_id": "1"}, ttl_s=TTL)
    ops = StoreOps((S.idem_replace("k", "1", {"claim_id": "1", "a": 1}, ttl_s=TTL),
                    S.idem_claim("j", {"claim_id": "2"}, ttl_s=-1.0),  # a bad argument
                    S.idem_replace("k", "nope", {"claim_id": "x"}, ttl_s=TTL)))
    out = rt.perform(ops)
    assert out[0] == (True, True) and out[2] == (True, False)
    assert out[1][0] is False and isinstance(out[1][1], ValueError)
    out = asyncio.run(rt.aperform(StoreOps((
        S.budget_reserve([("e", 1.0)], min_usd=0.5, max_usd=0.5, ttl_s=TTL),
        S.idem_delete("k", "1")))))
    assert out == [(True, 0.5), (True, True)]
    assert store.idem_get("k") is None and store.budget_used("e") == 0.5
