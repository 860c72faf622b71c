"""``effects.StoreOps``: independent store writes of one request sent together — one round
trip on a store that groups them (PostgreSQL: tests/store/test_pg_batch.py), one after the
other elsewhere, each with its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from authority_sdk.store import DiskStore

TTL = 3600.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DiskStore]:
    s = DiskStore(tmp_path / "state")
    yield s
    s.close()


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
