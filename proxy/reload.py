"""Policy changes without a restart (issue 17, point 2): on SIGHUP, and when the file
changes on disk, in every worker.

The new file is validated first; a bad one is refused — logged and audited — and the
policy in force stays. A good one becomes a new engine that shares the running one's
state store, audit sink and token counter, and takes over for requests that start from
then on; a request in flight keeps the engine (so the policy) it started with, because
the proxy resolves the engine once per request (``LiveGateway.current``). Keys are
re-read at the same moment, so an approver key can be added, rotated or revoked without a
restart. Every change is audited with the old and the new ``policy_hash``.

Settings that name resources the running process holds open — the state store, the audit
log, body limits, the worker's interval — cannot change in place: such a file is refused
with that reason (restart to apply it). The upstreams can: the new engine gets pools of
its own (``attach``), and the old engine's are retired once it is out of force
(``retire``), to close when the requests still using them are done.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from authority_sdk.errors import AuthorityError
from authority_sdk.policy import Policy, load_policy

if TYPE_CHECKING:
    from .auth import KeyRing
    from .observe import ObservedGateway

__all__ = ["LiveGateway", "Reloader"]

log = logging.getLogger("authority.proxy")

# What the running process holds open: a change here needs a restart.
_FIXED = ("state", "audit", "proxy", "worker")


class LiveGateway:
    """The engine in force. ``current`` is the engine itself — what a caller keeps from
    start to end (a request, a management call); other attribute reads go to the engine in
    force at the time (the background worker follows reloads this way)."""

    def __init__(self, engine: ObservedGateway) -> None:
        self._engine = engine

    @property
    def current(self) -> ObservedGateway:
        return self._engine

    def swap(self, engine: ObservedGateway) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class Reloader:
    def __init__(self, path: Path, live: LiveGateway, keyring: KeyRing, *,
                 attach: Callable[[ObservedGateway], None] | None = None,
                 retire: Callable[[ObservedGateway], None] | None = None) -> None:
        self.path = path
        self.attach = attach
        self.retire = retire
        self.live = live
        self.keyring = keyring
        self._lock = threading.Lock()
        self._seen = _digest(path)

    def changed_on_disk(self) -> bool:
        return _digest(self.path) != self._seen

    def reload(self, trigger: str) -> bool:
        """Try the file now. True when a new policy took over."""
        from .observe import ObservedGateway

        with self._lock:
            seen = _digest(self.path)
            if trigger == "file" and seen != self._seen and seen is not None:
                time.sleep(0.2)  # an editor may still be writing it: read it once it holds
                if _digest(self.path) != seen:
                    return False  # still changing: the next round tries again
            self._seen = seen
            old: ObservedGateway = self.live.current
            try:
                new_policy = load_policy(self.path)
            except AuthorityError as exc:
                return self._refuse(old, trigger, exc.message)
            if new_policy.hash == old.policy.hash:
                return False
            fixed = [name for name in _FIXED if _section(new_policy, name)
                     != _section(old.policy, name)]
            if fixed:
                return self._refuse(old, trigger, f"{', '.join(fixed)} changed: these settings "
                                    "hold open resources; restart to apply them")
            try:  # telemetry the new policy turns on may be missing its extra
                engine = ObservedGateway(new_policy, store=old.store, audit=old.audit,
                                         counter=old.counter)
            except AuthorityError as exc:
                return self._refuse(old, trigger, exc.message)
            engine.metrics = old.metrics
            engine.audit_degraded = old.audit_degraded
            try:
                engine.audit_event("policy", decision="allow", actor=f"reload:{trigger}",
                                   policy_hash=new_policy.hash,
                                   reason="the policy file changed; new requests use it",
                                   details={"old_policy_hash": old.policy.hash,
                                            "new_policy_hash": new_policy.hash})
            except AuthorityError as exc:  # not on the record: not in force
                log.error("policy reload not applied: the audit log refused it: %s",
                          exc.message)
                return False
            if self.attach is not None:
                self.attach(engine)
            self.keyring.replace(new_policy)
            self.live.swap(engine)
            if self.retire is not None:
                self.retire(old)  # after the swap: no new request can take its pools
            log.warning("policy reloaded (%s): %s -> %s", trigger, old.policy.hash[:12],
                        new_policy.hash[:12])
            return True

    def _refuse(self, engine: ObservedGateway, trigger: str, why: str) -> bool:
        log.error("policy reload refused (%s); the policy in force stays: %s", trigger, why)
        try:
            engine.audit_event("policy", decision="deny", actor=f"reload:{trigger}",
                               policy_hash=engine.policy.hash,
                               reason=f"policy reload refused: {why}"[:2000],
                               details={"old_policy_hash": engine.policy.hash,
                                        "file": str(self.path)})
        except AuthorityError:
            log.exception("the refused reload could not be audited")
        return False


def _section(policy: Policy, name: str) -> Any:
    return getattr(policy, name).model_dump(mode="json")
