"""The one background worker (DESIGN.md §10): recovery, parked audit entries, expiry.

It runs inside every ``authority serve`` process (and as ``authority worker`` where
only the SDK runs), but a lease in the state store lets exactly one process do the
work at a time; if it dies, another takes the lease over when it runs out, or at
once when the holder was a process on this host that is gone (a proxy restarted after
``kill -9`` recovers on its first tick, not a lease later). Each tick:

1. writes audit entries parked while the log was unwritable (never dropped);
2. settles interrupted executions — retried or marked ``in_doubt`` — unless the
   kill switch of their environment is engaged, in which case they wait for the
   switch to be released (the next tick after that picks them up);
3. releases business-key claims whose action never started and whose owner died;
4. expires pending approvals past their TTL, even when nobody lists them, with an
   audit entry;
5. delivers the notification outbox (``delivery.py``), retrying with backoff;
6. runs the audit log's lifecycle (``audit/lifecycle.py``): rotation by age, compression,
   retention, and streaming to outside sinks.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

from .effects import AuditOp, Decision, S, run
from .errors import AuthorityError
from .liveness import local_owner_state, process_owner, replica_lease_name

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["LEASE_NAME", "Worker", "expire_approvals_d", "replica_lease_s"]

log = logging.getLogger("authority.worker")

LEASE_NAME = "worker"
DEFAULT_INTERVAL_S = 2.0


def expire_approvals_d(engine: Engine, limit: int = 500) -> Decision[list[str]]:
    """Pending approvals past their TTL become ``expired`` (guarded by the time), audited;
    what they held against limits is given back."""
    from .limits import release_d
    from .notifications import enqueue_d

    now = time.time()
    expired: list[str] = []
    for a in (yield S.approval_list("pending", limit=limit)):
        exp = a.get("expires_at")
        if not isinstance(exp, int | float) or exp > now:
            continue
        moved = yield S.approval_transition(a["id"], "pending", "expired", guard="expired",
                                            now=now, expired_at=now)
        if moved is None:
            continue  # decided (or expired by a reader) meanwhile
        yield from release_d(moved.get("limit_charges") or [])
        yield AuditOp((("approval", dict(
            request_id=moved.get("request_id"), environment=moved.get("environment"),
            model=moved.get("model"), action_type=moved.get("action_type"), decision="deny",
            reason="the approval expired before anyone decided it",
            approval_status="expired", actor="worker", policy_hash=engine.policy.hash,
            details={"approval_id": moved["id"], "action_key": moved.get("action_key")})),))
        yield from enqueue_d(engine.policy, moved, "expired")
        expired.append(moved["id"])
    return expired


def _holder_name() -> str:
    owner = process_owner()
    return f"{owner['host']}/{owner['pid']}/{owner['pid_start']}/{secrets.token_hex(4)}"


def _holder_dead(holder: Any) -> bool:
    if not isinstance(holder, str) or holder.count("/") != 3:
        return False  # not ours to judge: the lease's own expiry decides
    host, pid, start, _ = holder.split("/")
    if not pid.isdigit():
        return False
    owner = {"host": host, "pid": int(pid), "pid_start": None if start == "None" else start}
    return local_owner_state(owner) is False


def _release_if_holder_died(eng: Engine) -> None:
    # Releasing is guarded by the holder's name, so a race with another process doing the
    # same, or with a live process acquiring meanwhile, cannot free a live holder's lease.
    current = eng.store.lease_get(LEASE_NAME)
    if current is not None and _holder_dead(current.get("holder")):
        eng.store.lease_release(LEASE_NAME, current["holder"])


def replica_lease_s(interval_s: float) -> float:
    """How long a heartbeat keeps a replica alive: a few rounds, so one slow round (or a
    database hiccup) does not hand its live claims to another replica."""
    return max(interval_s * 3, 5.0)


class Worker:
    def __init__(self, engine: Engine, *, interval_s: float = DEFAULT_INTERVAL_S,
                 holder: str | None = None, replica: str | None = None) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.holder = holder or _holder_name()
        # On a shared store: this replica's heartbeat, which keeps its claims its own.
        self.replica = replica
        self._stop = threading.Event()
        from .audit.lifecycle import LifecycleState

        self._lifecycle = LifecycleState()
        self._thread: threading.Thread | None = None
        self._beater: threading.Thread | None = None

    def tick(self) -> dict[str, Any]:
        """One round, if this process holds the lease. Never raises for a storage or log
        failure: the next round tries again (what waits is durable)."""
        from .delivery import deliver_round
        from .recovery import drain_audit_d, recover_d

        eng = self.engine
        report: dict[str, Any] = {"leader": False}
        try:
            # The lease outlives a round by a margin, so a slow round keeps it.
            _release_if_holder_died(eng)
            if not eng.store.lease_acquire(LEASE_NAME, self.holder,
                                           ttl_s=max(self.interval_s * 5, 10.0)):
                return report
            report["leader"] = True
            rt = eng.runtime
            report["audited"] = run(drain_audit_d(), rt)
            eng.audit_degraded = False
            report["recovered"] = run(recover_d(eng), rt)
            report["expired"] = run(expire_approvals_d(eng), rt)
            report["notified"] = deliver_round(eng, keep_lease=self._keep_lease)
            report["audit_lifecycle"] = self._audit_lifecycle()
        except AuthorityError as exc:
            report["error"] = exc.message
            log.warning("background worker round failed: %s", exc.message)
        for r in report.get("recovered") or []:
            log.warning("recovered %s", r)
        return report

    def _audit_lifecycle(self) -> dict[str, Any]:
        from .audit.lifecycle import lifecycle_round

        pol = self.engine.policy
        if pol.audit.rotate is None and not pol.audit.retention and not pol.audit.stream:
            return {}
        return lifecycle_round(pol, self.engine.audit, self._lifecycle)

    def _keep_lease(self, ttl_s: float) -> bool:
        return self.engine.store.lease_acquire(
            LEASE_NAME, self.holder, ttl_s=max(ttl_s, self.interval_s * 5, 10.0))

    def beat(self) -> bool:
        """Prove this replica alive (a lease that runs out — a replica killed or cut off —
        frees its claims to the others). Its own thread, so a long round of recovery
        cannot starve it and hand live claims away."""
        if self.replica is None:
            return False
        try:
            return self.engine.store.lease_acquire(
                replica_lease_name(self.replica), self.replica,
                ttl_s=replica_lease_s(self.interval_s))
        except AuthorityError as exc:
            log.warning("replica heartbeat failed: %s", exc.message)
            return False

    def _beat_forever(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def run_forever(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval_s)

    def start(self) -> Worker:
        self._thread = threading.Thread(target=self.run_forever, name="authority-worker",
                                        daemon=True)
        self._thread.start()
        if self.replica is not None:
            self.beat()
            self._beater = threading.Thread(target=self._beat_forever, daemon=True,
                                            name="authority-heartbeat")
            self._beater.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._beater is not None:
            self._beater.join(timeout=30)
        with contextlib.suppress(AuthorityError):
            self.engine.store.lease_release(LEASE_NAME, self.holder)
            if self.replica is not None:  # a clean stop: its claims are settled
                self.engine.store.lease_release(replica_lease_name(self.replica),
                                                self.replica)
