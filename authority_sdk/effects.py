"""Decide, then do (DESIGN.md §10): decisions yield effects, a driver carries them out.

Every decision of the engine is a generator that does no I/O itself. When it
needs the world — a store primitive, an audit append, an executor, the clock
of a lease — it *yields* an effect and receives the result (or has the error
thrown into it). Two drivers run the same decisions:

- :func:`run` (the SDK's transport, the CLI): performs each effect in turn;
- :func:`arun` (the proxy): awaits each one, so its event loop never waits on
  a database or an executor; a local backend runs its reads inline (``store.aio``),
  where that measures faster than a thread hop, and group-commits its writes off the
  loop (``store/batched.py``) unless a request is alone. Audit appends are
  group-committed off the loop (``group_commit.py``): concurrent requests share a sync.
  PostgreSQL group-commits its writes on its async pool (``store/postgres.py``), and
  sends a request's independent writes (``StoreOps``) in one round trip.

The record comes before the effect by construction: a driver performs effects
in exactly the order a decision yields them, and a decision yields the audit
append before the executor call it records.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .executors import ExecutorRegistry

__all__ = ["AuditOp", "Decision", "Effect", "ExecuteOp", "Outcome", "Runtime", "S", "StoreOp",
           "StoreOps", "arun", "run", "run_on_store", "took_effect"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StoreOp:
    """Call one primitive of the state store (``authority_sdk.store.protocol``)."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoreOps:
    """Several store writes that do not depend on one another, performed together: ONE
    round trip and commit where the store groups its writes (PostgreSQL on the async
    driver), one after the other elsewhere. Returns one outcome per write, in order:
    ``(True, result)`` or ``(False, the exception it raised)`` — each write succeeds or
    fails by itself, as it would alone."""

    ops: tuple[StoreOp, ...]


@dataclass(frozen=True, slots=True)
class AuditOp:
    """Append entries to the audit log in one write (and one sync); returns the entries.

    ``first``: store writes that must all take effect before the entries are written (a
    write that raises, or answers False — a claim no longer ours — did not). They are
    performed first, and where the audit sink shares the store's database, in the same
    transaction as the append: one round trip and one commit for both. If one of them did
    not take effect, nothing is appended.

    ``then``: store writes that may be made with the entries, in their transaction, right
    after them — only where the sink shares the store's database (elsewhere they are not
    made, and the caller makes them itself). For a write that must not be seen without the
    entries, yet need not precede the answer: a finished answer for replays.

    With ``first`` or ``then`` the result is ``(outcomes, entries, then_outcomes)``: one
    outcome per write of ``first`` as :class:`StoreOps` gives them, the entries or None
    when nothing was appended, and one outcome per write of ``then`` or None when they
    were not made."""

    items: tuple[tuple[str, dict[str, Any]], ...]
    first: tuple[StoreOp, ...] = ()
    then: tuple[StoreOp, ...] = ()


@dataclass(frozen=True, slots=True)
class ExecuteOp:
    """Run an executor (the one effect outside the gateway); returns its ExecutionResult."""

    executor: str
    action_type: str
    arguments: dict[str, Any]
    action_key: str


Effect = StoreOp | StoreOps | AuditOp | ExecuteOp
Outcome = tuple[bool, Any]
Decision = Generator[Effect, Any, T]


class _StoreOps:
    """``S.idem_claim(key, rec, ttl_s=…)`` builds the effect ``StoreOp("idem_claim", …)``."""

    def __getattr__(self, method: str) -> Any:
        def op(*args: Any, **kwargs: Any) -> StoreOp:
            return StoreOp(method, args, kwargs)
        return op


S = _StoreOps()


class Runtime:
    """What the drivers carry effects out on."""

    def __init__(self, store: Any, audit: Any, executors: ExecutorRegistry) -> None:
        self.store = store
        self.audit = audit
        self.executors = executors
        self.on_audit: Any = None  # called with the entries after each append
        self._group: Any = None
        # Requests in the async driver now (Engine.ahandle, and a gated stream until its
        # end): a lone request's audit append and store writes run inline where the store
        # allows it, since its sync keeps nobody waiting.
        self.in_flight = 0

    def _group_commit(self) -> Any:
        # One per event loop: its futures belong to the loop (an SDK app may run several).
        import asyncio

        from .group_commit import GroupCommit

        loop = asyncio.get_running_loop()
        group = self._group
        if group is None or group.loop is not loop or group.sink is not self.audit:
            self._group = GroupCommit(self.audit, loop)
        return self._group

    def _group_busy(self) -> bool:
        return self._group is not None and self._group.busy

    def perform(self, effect: Effect) -> Any:
        if type(effect) is StoreOp:
            return getattr(self.store, effect.method)(*effect.args, **effect.kwargs)
        if type(effect) is StoreOps:
            out: list[Outcome] = []
            for op in effect.ops:
                try:
                    out.append((True, self.perform(op)))
                except Exception as exc:
                    out.append((False, exc))
            return out
        if type(effect) is AuditOp:
            if effect.first or effect.then:
                outcomes = self.perform(StoreOps(effect.first)) if effect.first else []
                if not took_effect(outcomes):
                    return outcomes, None, None
                return outcomes, self.perform(AuditOp(effect.items)), None
            entries = self.audit.append_many(list(effect.items))
            if self.on_audit is not None:
                self.on_audit(effect.items)
            return entries
        assert type(effect) is ExecuteOp
        executor = self.executors.get(effect.executor)
        return executor.execute(effect.action_type, effect.arguments, effect.action_key)

    async def aperform(self, effect: Effect) -> Any:
        if type(effect) is StoreOp:
            aio = self.store.aio
            if self.in_flight <= 1 and getattr(aio, "inline_when_alone", False):
                return getattr(self.store, effect.method)(*effect.args, **effect.kwargs)
            return await getattr(aio, effect.method)(*effect.args, **effect.kwargs)
        if type(effect) is StoreOps:
            together = getattr(self.store.aio, "together", None)
            if together is not None:
                return await together(effect.ops)
            out: list[Outcome] = []
            for op in effect.ops:
                try:
                    out.append((True, await self.aperform(op)))
                except Exception as exc:
                    out.append((False, exc))
            return out
        if type(effect) is AuditOp:
            if effect.first or effect.then:
                return await self._append_after(effect)
            aio = getattr(self.audit, "aio", None)
            if (aio is None and self.in_flight <= 1 and not self._group_busy()
                    and getattr(self.audit, "inline_when_alone", False)):
                # A local file, alone: its sync keeps nobody waiting, and the hop to the
                # writer thread and back would only add its latency (~0.15 ms). A sink on
                # the network (PostgreSQL) never blocks the loop: it goes through the writer.
                entries = self.audit.append_many(list(effect.items))
            else:
                entries = await (aio or self._group_commit()).append_many(list(effect.items))
            if self.on_audit is not None:
                self.on_audit(effect.items)
            return entries
        assert type(effect) is ExecuteOp
        executor = self.executors.get(effect.executor)
        return await executor.aexecute(effect.action_type, effect.arguments, effect.action_key)


    async def _append_after(self, effect: AuditOp
                            ) -> tuple[list[Outcome], Any, list[Outcome] | None]:
        together = getattr(self.audit, "aappend_after", None)
        if together is not None and not self._group_busy():
            # With no append of this loop in flight: the writes and the append in one
            # transaction (None: that way does not apply now, nothing was sent).
            got = await together(effect.first, list(effect.items), effect.then)
            if got is not None:
                outcomes, entries, after = got
                if entries is None and took_effect(outcomes):
                    # The writes took effect; the chain had moved (another replica
                    # appended): the append takes its full way, without ``then``.
                    entries = await self.aperform(AuditOp(effect.items))
                elif entries is not None and self.on_audit is not None:
                    self.on_audit(effect.items)
                return outcomes, entries, after
        outcomes = await self.aperform(StoreOps(effect.first)) if effect.first else []
        if not took_effect(outcomes):
            return outcomes, None, None
        return outcomes, await self.aperform(AuditOp(effect.items)), None


def took_effect(outcomes: list[Outcome]) -> bool:
    """Every write of ``outcomes`` took effect (see :class:`AuditOp`)."""
    return all(ok and value is not False for ok, value in outcomes)


def _advance(decision: Decision[T], value: Any,
             error: BaseException | None) -> tuple[bool, Any]:
    """One step of a decision: ``(True, result)`` when it ended, else ``(False, effect)``."""
    try:
        return False, (decision.throw(error) if error is not None else decision.send(value))
    except StopIteration as stop:
        return True, stop.value


def run(decision: Decision[T], rt: Runtime) -> T:
    """Drive ``decision`` to its end, performing its effects synchronously."""
    value: Any = None
    error: BaseException | None = None
    while True:
        done, out = _advance(decision, value, error)
        if done:
            return out
        try:  # the decision handles (or re-raises) a failure thrown back into it
            value, error = rt.perform(out), None
        except Exception as exc:
            value, error = None, exc


def run_on_store(decision: Decision[T], store: Any) -> T:
    """Drive a decision that only touches the state store (a rule such as an idempotency
    claim, called directly by tests and tools)."""
    return run(decision, Runtime(store, None, None))  # type: ignore[arg-type]


async def arun(decision: Decision[T], rt: Runtime) -> T:
    """Drive ``decision`` to its end, awaiting its effects."""
    value: Any = None
    error: BaseException | None = None
    while True:
        done, out = _advance(decision, value, error)
        if done:
            return out
        try:
            value, error = await rt.aperform(out), None
        except Exception as exc:
            value, error = None, exc
