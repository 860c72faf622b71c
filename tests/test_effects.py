"""The runtime's audit append with writes before and after it (``effects.AuditOp``) where
the store and the log cannot share a transaction (diskcache and a file): ``first`` goes
first, the entries next, and ``then`` is left to the caller — never made by itself."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from authority_sdk.audit import FileSink
from authority_sdk.effects import AuditOp, Runtime, S, arun, run
from authority_sdk.store import DiskStore

KEY = "idem:app:prod:k-1"
ENTRY = ("request", {"request_id": "req_1", "environment": "prod", "decision": "allow"})


@pytest.mark.parametrize("driver", ["sync", "async"])
@pytest.mark.parametrize("ours", [True, False])
def test_then_is_left_to_the_caller_and_first_decides(tmp_path: Path, driver: str,
                                                      ours: bool) -> None:
    store = DiskStore(tmp_path / "state")
    sink = FileSink(tmp_path / "audit.jsonl", fsync=True).open()
    rt = Runtime(store, sink, None)  # type: ignore[arg-type]
    try:
        record = {"claim_id": "req_mine" if ours else "req_theirs", "status": "in_flight"}
        assert store.idem_claim(KEY, record, ttl_s=600) is None
        effect = AuditOp(
            (ENTRY,), (S.idem_replace(KEY, "req_mine", {**record, "answer": {}}, ttl_s=600),),
            (S.idem_replace(KEY, "req_mine", {"claim_id": "req_mine", "status": "done"},
                            ttl_s=600, flush=False),))

        def once() -> Any:
            got = []

            def decision() -> Any:
                got.append((yield effect))
            if driver == "sync":
                run(decision(), rt)
            else:
                asyncio.run(arun(decision(), rt))
            return got[0]

        outcomes, entries, after = once()
        assert after is None and store.idem_get(KEY)["status"] == "in_flight"
        if ours:
            assert outcomes == [(True, True)] and len(entries) == 1
            assert store.idem_get(KEY)["answer"] == {}
        else:
            assert outcomes == [(True, False)] and entries is None
            assert not (tmp_path / "audit.jsonl").read_text()  # nothing appended
    finally:
        sink.close()
        store.close()
