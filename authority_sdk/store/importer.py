"""Move what is still open from a local diskcache store to a shared one
(``authority db import-local``), so an operator switches backends without dropping a
promise: pending and approved approvals, journal entries (in-doubt ones and those an
action key still needs to stay unique), idempotency records and dedupe claims within
their TTL, the counters of the current budget and limit periods, parked audit entries,
the kill switch, and the audit chain's head.

Only the target's public primitives are used, each of which refuses to overwrite what
is there: running the import twice adds nothing the second time (counters already
present on the target are left alone for the same reason).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from .disk import DiskStore

__all__ = ["import_local"]

_OPEN_APPROVALS = ("pending", "approved")


def import_local(source: DiskStore, target: Any) -> dict[str, int]:
    """Copy ``source``'s open records into ``target``; returns counts per kind (and
    ``skipped`` for records the target already had)."""
    done: Counter[str] = Counter()

    for status in _OPEN_APPROVALS:
        for approval in source.approval_list(status):
            try:
                target.approval_create(approval)
                done["approvals"] += 1
            except ValueError:
                done["skipped"] += 1

    for key, entry, left in source.export_live("journal"):
        ttl = left if left is not None else None
        if target.journal_begin(key, entry, ttl_s=ttl or 86400.0) is not None:
            done["skipped"] += 1
            continue
        if entry.get("status") != "started":
            target.journal_update(key, "started", entry, ttl_s=ttl)
        done["journal"] += 1

    for key, record, left in source.export_live("idempotency"):
        if target.idem_claim(key, record, ttl_s=left or 86400.0) is None:
            done["idempotency"] += 1
        else:
            done["skipped"] += 1

    for key, owner, left in source.export_live("dedupe"):
        if target.dedupe_claim(key, owner, ttl_s=left or 86400.0) is None:
            done["dedupe"] += 1
        else:
            done["skipped"] += 1

    for name, used, left in source.export_live("budget"):
        if used <= 0:
            continue
        if target.budget_used(name) > 0:
            done["skipped"] += 1
            continue
        target.budget_reserve([(name, math.inf)], min_usd=0.0, max_usd=float(used),
                              ttl_s=left or 86400.0)
        done["counters"] += 1

    for item_id, payload in source.outbox_list("audit"):
        target.outbox_put("audit", item_id, payload)
        done["outbox"] += 1

    for scope, entry in source.kill_switch_state(fresh=True).items():
        target.set_kill_switch(scope, bool(entry.get("engaged")), reason=entry.get("reason"),
                               actor=entry.get("actor"))
        done["kill_switch"] += 1

    head = source.get_audit_head()
    if head is not None:
        target.set_audit_head(*head)  # forward-only: never moves a newer head back
        done["audit_head"] += 1
    return dict(done)
