"""Every call in an answer is an action: decide it, carry it out, record it (DESIGN.md §3 to §5).

:func:`gate_d` is a decision (:mod:`authority_sdk.effects`): it yields the store
operations, audit appends and executor calls an answer needs, in the order
that keeps the promise:

- the upstream answer is checkpointed in the idempotency claim before anything
  of it takes effect, so a retry after a crash re-gates the same answer with the
  same action keys instead of asking the model again;
- every action is handled in isolation, in the answer's fixed order: whatever
  goes wrong with one becomes that action's outcome, never the answer's;
- the audit queue is flushed before every effect (an approval created, an
  executor started), and an ``executing`` entry precedes each execution, so the
  record comes before the effect; the outcome follows it;
- the kill switch is read again, fresh, immediately before every executor call;
- once anything took effect, an audit log that cannot be written no longer fails
  the request: its entries go to the durable outbox (executions are also kept
  ``audited: false`` in the journal), nothing more runs, and the answer says
  what ran.

Why an action was decided as it was lives in the modules that decide:
:mod:`.modes` (its mode from the policy), :mod:`.limits` (limits over time),
:mod:`.dedupe` (business keys) — and ``decided_by`` names the step.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import dedupe, idempotency, limits, notifications, strictjson
from .audit import redact
from .effects import AuditOp, Decision, Outcome, S, StoreOp, StoreOps
from .errors import AuthorityError, AuthorityUnavailable
from .execution import run_once_d
from .formats.base import Answer, Call
from .modes import resolve_action
from .records import ActionOutcome, ActionStatus, Dispatch, Mode, strictest
from .telemetry import trace_headers
from .wire import canonical_json

if TYPE_CHECKING:
    from .executors import ExecutorRegistry
    from .policy import Policy
    from .telemetry import CallTrace

__all__ = ["AuditQueue", "GateInput", "Ride", "action_hash", "action_key", "claim_lost", "gate_d",
           "kill_engaged"]

MAX_NAME_CHARS = 256


def action_hash(action_type: str, arguments: Any, environment: str) -> str:
    """What an approval is bound to: approving means approving exactly what was shown."""
    return hashlib.sha256(
        canonical_json([action_type, arguments, environment]).encode()).hexdigest()


def action_key(base: str, choice: int, action_type: str, args: Any, nth: int) -> str:
    # Not the tool call id: a retried request gets new ids from the model for the same action.
    raw = canonical_json([base, choice, action_type, args, nth])
    return "act_" + hashlib.sha256(raw.encode()).hexdigest()[:32]


def kill_engaged(state: dict[str, Any], environment: str) -> dict[str, Any] | None:
    for scope in ("*", environment):
        s = state.get(scope)
        if isinstance(s, dict) and s.get("engaged"):
            return {"scope": "global" if scope == "*" else scope, **s}
    return None


class AuditQueue:
    """A request's audit entries, written together at the points an effect needs them."""

    def __init__(self, policy_hash: str, journal_ttl_s: float = 86400.0) -> None:
        self.policy_hash = policy_hash
        self.journal_ttl_s = journal_ttl_s
        self.items: list[tuple[str, dict[str, Any]]] = []
        self.effects = False  # something outside the gateway happened (or may have)
        self.degraded = False  # the log could not be written after an effect
        self.written_keys: list[tuple[str, str]] = []  # (action key, status) to mark audited
        self._pending_keys: list[tuple[str, str]] = []

    def add(self, event: str, **fields: Any) -> None:
        fields.setdefault("policy_hash", self.policy_hash)
        self.items.append((event, fields))

    def add_outcome_of(self, key: str, status: str) -> None:
        """The entry just added records an execution's outcome: mark it audited once written."""
        self._pending_keys.append((key, status))

    def flush_d(self, first: tuple[StoreOp, ...] = (), then: tuple[StoreOp, ...] = ()
                ) -> Decision[tuple[list[Outcome] | None, list[Outcome] | None]]:
        """Write the queued entries, with ``first`` and ``then`` as :class:`AuditOp` takes
        them. Returns the outcomes of ``first`` (if one did not take effect nothing was
        written and the entries stay queued) and of ``then`` (None: not made)."""
        if not self.items:
            return None, None
        items, self.items = self.items, []
        keys, self._pending_keys = self._pending_keys, []
        outcomes: list[Outcome] | None = None
        after: list[Outcome] | None = None
        try:
            if first or then:
                outcomes, entries, after = yield AuditOp(tuple(items), first, then)
                if entries is None:
                    self.items, self._pending_keys = items + self.items, keys
                    return outcomes, None
            else:
                yield AuditOp(tuple(items))
        except AuthorityUnavailable:
            if not self.effects:
                raise  # nothing happened yet: fail closed, the caller answers 503
            self.degraded = True
            parked = True
            for event, fields in items:
                try:
                    yield S.outbox_put("audit", "aud_" + secrets.token_hex(12),
                                       {"event": event, "fields": fields})
                except AuthorityError:
                    parked = False  # the journal still holds the executions themselves
            if not parked:
                return outcomes, after
        for key, status in keys:
            # Left unaudited on failure: recovery writes its entry again, marked as recovered.
            with contextlib.suppress(AuthorityError):
                yield S.journal_update(key, status, {"audited": True}, ttl_s=None
                                       if status == "in_doubt" else self.journal_ttl_s)
        return outcomes, after


@dataclass
class GateInput:
    """What gating needs to know about the request, as plain data."""

    policy: Policy
    executors: ExecutorRegistry
    request_id: str
    environment: str
    model: str
    caller: str
    action_base: str  # the idempotency key's store key, or the request id
    tool_schemas: dict[str, dict[str, Any]]
    idempotency_ttl_s: float
    post_ceiling_reason: str | None = None
    claim: idempotency.Claim | None = None
    lazy_claim: idempotency.LazyClaim | None = None  # claimed (with the answer) if needed
    raw_answer: Any = None  # checkpointed before the first effect
    trace: CallTrace | None = None  # the call's span, when telemetry is on
    outcomes: list[ActionOutcome] = field(default_factory=list)
    # The claim's checkpoint not sent yet (engine.finalize_d): it goes out with the audit
    # entries unless a call needs the answer held before an effect of its own.
    ride: Ride | None = None


@dataclass(frozen=True)
class Ride:
    """A client's claim's checkpoint (last), with the cost's settlement when there is one:
    independent writes that go out together. The answer must be held before anything of it
    takes effect, and before the app sees its calls (a retry that takes over a lapsed
    claim must re-gate this answer, never hand the app new calls as well). Sent with the
    request's audit entries (``AuditOp.first``: one transaction where the store allows),
    so a request whose calls the app dispatches itself makes one write for both; or
    earlier, before the first effect of a call here (``_AnswerHold``)."""

    ops: tuple[StoreOp, ...]
    record: dict[str, Any]

    def held_d(self, claim: idempotency.Claim | None) -> Decision[bool]:
        """Send the writes by themselves; see :meth:`held`."""
        outcomes = yield StoreOps(self.ops)
        return self.held(claim, outcomes)

    def held(self, claim: idempotency.Claim | None, outcomes: list[Outcome]) -> bool:
        """Whether the writes' ``outcomes`` hold the answer (False: the claim is no longer
        ours); raises the error of a write that failed."""
        ok, kept = outcomes[-1]
        if ok and claim is not None:
            idempotency.checkpointed(claim, self.record, kept)
        for ok, value in outcomes:
            if not ok:
                raise value
        return bool(kept)


def _args_for_key(arguments: str) -> Any:
    try:
        return strictjson.loads(arguments)
    except (strictjson.StrictJSONError, TypeError):
        return arguments  # the raw text: still a stable key, never a crash


def _outcome(inp: GateInput, call: Call, key: str, **kw: Any) -> ActionOutcome:
    name = call.name[:MAX_NAME_CHARS]
    base: dict[str, Any] = {
        "tool_call": {"id": call.call_id, "name": name, "arguments": call.arguments},
        "action_type": name, "mode": Mode.DENY, "dispatch": Dispatch.CLIENT,
        "decision": "deny", "status": ActionStatus.DENIED, "reason": None,
        "action_key": key, "decided_by": "validation", "choice_index": call.choice,
        "position": call.position, "call_kind": call.kind}
    base.update(kw)
    return ActionOutcome(**base)


def _deny(o: ActionOutcome, code: str, reason: str, decided_by: str) -> ActionOutcome:
    o.mode, o.decision, o.status = Mode.DENY, "deny", ActionStatus.DENIED
    o.code, o.reason, o.decided_by = code, reason, decided_by
    return o


def action_entry(inp: GateInput, o: ActionOutcome, status: str | None = None) -> dict[str, Any]:
    """The audit entry of one action (redaction applied here and again by the log)."""
    args = redact(_args_for_key(o.tool_call["arguments"]), inp.policy.redact)
    record = None
    if o.status in (ActionStatus.EXECUTED, ActionStatus.FAILED, ActionStatus.IN_DOUBT,
                    ActionStatus.SIMULATED):
        record = {"status": o.status, "result": o.result}
    elif o.code == "duplicate_action":
        record = {"status": "denied", "duplicate_of": (o.result or {}).get("duplicate_of")}
    shown = status or o.status
    return dict(
        request_id=inp.request_id, environment=inp.environment, model=inp.model,
        action_type=o.action_type, decision=o.decision if shown != "executing" else "allow",
        reason=o.reason, approval_status="pending" if shown == "pending_approval" else None,
        execution_result=redact(record, inp.policy.redact) if shown != "executing" else None,
        actor=inp.caller,
        details={"mode": o.mode, "status": shown, "code": o.code, "decided_by": o.decided_by,
                 "dispatch": o.dispatch, "executor": o.executor, "approval_id": o.approval_id,
                 "action_key": o.action_key, "tool_call_id": o.tool_call["id"],
                 "call_kind": o.call_kind, "arguments": args})


class _NotHeld(Exception):
    """The answer could not be held before its first effect: its claim was lost (``error``
    None) or the store failed (``error``). Nothing of the answer has taken effect yet."""

    def __init__(self, error: AuthorityUnavailable | None = None) -> None:
        super().__init__("the answer could not be held")
        self.error = error


class _AnswerHold:
    """The upstream answer kept in the request's idempotency claim, once, before anything
    of it takes effect (a retry after a crash then re-gates this answer, never a new one).

    A client's ``Idempotency-Key`` is held as soon as the answer has calls: a retry that
    takes over a lapsed claim must not hand the app the same calls twice. The SDK's retry
    key (a lazy claim) is held only before a call's first effect here (a limit charged, a
    business key taken, an approval created, an executor run): openai retries only an
    attempt the app got no answer from, so calls it would dispatch itself need no record,
    and a plain tool-calling completion pays for no durable write but its audit entry."""

    def __init__(self, inp: GateInput) -> None:
        self.inp = inp
        self.done = False

    @property
    def deferred(self) -> bool:
        return self.inp.ride is not None or (
            self.inp.claim is None and self.inp.lazy_claim is not None)

    def hold_d(self) -> Decision[None]:
        if self.done:
            return
        self.done = True
        inp = self.inp
        try:
            if inp.ride is not None:
                ride, inp.ride = inp.ride, None
                lost = not (yield from ride.held_d(inp.claim))
            elif inp.claim is not None and inp.claim.record.get("answer") is None:
                lost = not (yield from idempotency.checkpoint_d(inp.claim, inp.raw_answer))
            elif inp.claim is None and inp.lazy_claim is not None:
                lost = (yield from inp.lazy_claim.claim_d(inp.raw_answer)).state != "new"
            else:
                lost = False
        except AuthorityUnavailable as exc:
            raise _NotHeld(exc) from exc
        if lost:
            raise _NotHeld()


def gate_d(inp: GateInput, answer: Answer, queue: AuditQueue) -> Decision[list[ActionOutcome]]:
    """Decide and handle every call of ``answer``; returns their outcomes in order."""
    calls = answer.calls
    if not calls:
        return []
    hold = _AnswerHold(inp)
    mark = len(queue.items)
    try:
        if not hold.deferred:
            yield from hold.hold_d()
        return (yield from _gate_calls_d(inp, calls, queue, hold))
    except _NotHeld as stop:
        # Nothing took effect (the hold precedes the first effect): what was decided so
        # far is dropped, and the answer is treated as a whole, as before any call.
        del queue.items[mark:]
        inp.outcomes.clear()
        if stop.error is not None:
            raise stop.error from None
        return claim_lost(inp, calls)


def claim_lost(inp: GateInput, calls: list[Call]) -> list[ActionOutcome]:
    """Every call denied: our claim was taken over (our lease ran out), or a retry holds
    the key, before the answer could be held. That request gates the answer; running
    anything here too could run it twice."""
    return [_deny(_outcome(inp, c, "act_none"), "idempotency_claim_lost",
                  "this request's idempotency claim was taken over by a retry; "
                  "nothing of it runs here", "idempotency") for c in calls]


def _gate_calls_d(inp: GateInput, calls: list[Call], queue: AuditQueue,
                  hold: _AnswerHold) -> Decision[list[ActionOutcome]]:
    kill = kill_engaged((yield S.kill_switch_state()), inp.environment)
    first_choice = min(c.choice for c in calls)
    tally = limits.LimitTally()
    seen: dict[str, int] = {}
    outcomes = inp.outcomes
    cap = inp.policy.defaults.max_tool_calls_per_answer
    for count, call in enumerate(calls, 1):
        args_for_key = _args_for_key(call.arguments)
        marker = canonical_json([call.choice, call.name, args_for_key])
        seen[marker] = seen.get(marker, 0) + 1
        key = action_key(inp.action_base, call.choice, call.name, args_for_key, seen[marker])
        o = _outcome(inp, call, key)
        # Its span is open while it is decided and run: what it sends carries its context.
        act = inp.trace.action(call) if inp.trace is not None else None
        try:
            yield from _one(inp, call, o, queue, kill=kill, alternative=call.choice != first_choice,
                            over_cap=count > cap, tally=tally, hold=hold)
        except _NotHeld:
            raise
        except AuthorityUnavailable:
            if not queue.effects:
                raise
            _deny(o, "authority_unavailable", "the gateway's state or audit log failed while "
                  "handling this action; it did not run", "runtime")
            o.decision = "error"
        except Exception as exc:  # one bad call never poisons the others
            _deny(o, "action_error", f"the gateway could not handle this action: "
                  f"{type(exc).__name__}: {str(exc)[:200]}", "runtime")
            o.decision = "error"
        finally:
            if act is not None:
                act.end(o)
        outcomes.append(o)
        queue.add("action", **action_entry(inp, o))
        if o.status in (ActionStatus.EXECUTED, ActionStatus.FAILED, ActionStatus.IN_DOUBT) \
                and not o.extra.get("replayed"):
            queue.add_outcome_of(o.action_key, o.status)
    return outcomes


def _one(inp: GateInput, call: Call, o: ActionOutcome, queue: AuditQueue, *,
         kill: dict[str, Any] | None, alternative: bool, over_cap: bool,
         tally: limits.LimitTally, hold: _AnswerHold) -> Decision[None]:
    policy = inp.policy
    if call.problem:
        _deny(o, call.problem_code or "invalid_arguments", call.problem, "validation")
        return
    try:
        strictjson.loads(call.arguments)
    except strictjson.StrictJSONError as exc:
        _deny(o, "invalid_arguments", f"arguments are not valid JSON: {exc}", "validation")
        return
    res = resolve_action(policy, inp.environment, call.name, call.arguments,
                         tool_schema=inp.tool_schemas.get(call.name),
                         kill_switch_engaged=kill is not None)
    o.mode, o.dispatch, o.decision, o.reason = res.mode, res.dispatch, res.decision, res.reason
    o.code, o.executor, o.decided_by = res.code, res.executor, res.decided_by
    if res.decision == "deny":
        o.code = res.code or "denied_by_policy"
        return
    if inp.post_ceiling_reason is not None:
        _deny(o, "post_cost_ceiling_exceeded", inp.post_ceiling_reason, "post_cost_ceiling")
        return
    if over_cap:
        _deny(o, "too_many_tool_calls", f"more than {policy.defaults.max_tool_calls_per_answer} "
              "calls in one answer (defaults.max_tool_calls_per_answer)", "answer_cap")
        return
    if alternative and not (res.mode == Mode.AUTO_EXECUTE and res.dispatch == Dispatch.CLIENT):
        _deny(o, "alternative_choice", "only the first choice's actions run: with n > 1 the "
              "other choices are alternatives", "alternative_choice")
        return
    args = res.arguments or {}
    mode = res.mode
    if mode == Mode.SIMULATION_ONLY:
        o.status = ActionStatus.SIMULATED
        if res.executor is not None:
            o.result = {"would_execute": inp.executors.get(res.executor).describe(
                call.name, args, o.action_key)}
        else:
            o.result = {"would_dispatch": "client", "action_type": call.name,
                        "arguments": args}
        return

    # None for an output tool (the app's structured answer): no limits, no business key.
    action = policy.actions.get(call.name)
    if mode != Mode.AUTO_EXECUTE or res.dispatch != Dispatch.CLIENT or (
            action is not None and (action.limits or action.dedupe_on)):
        # From here on this call may take effect (a limit charged, a business key taken,
        # an approval created, an executor run): the answer is held first.
        yield from hold.hold_d()
    held: list[limits.Charge] = []
    override: list[limits.Charge] = []
    if action is not None and action.limits:
        check = limits.charges_for(action.limits, action_type=call.name, args=args,
                                   environment=inp.environment, caller=inp.caller, tally=tally)
        if not check.exceeded:
            held = yield from limits.reserve_d(check)
        if check.exceeded:
            why = "; ".join(w for _, w in check.exceeded)
            mode = strictest(mode, *(lim.then for lim, _ in check.exceeded))
            o.mode, o.reason, o.decided_by = mode, why, "limit"
            override = [c for _, c in check.charges]  # counted if a person lets it run
            if mode == Mode.DENY:
                _deny(o, "limit_exceeded", why, "limit")
                return

    def give_back() -> Decision[None]:
        yield from limits.release_d([c.to_record() for c in held])

    approval_id = ("apr_" + secrets.token_hex(12)
                   if mode == Mode.REQUIRE_HUMAN_APPROVAL else None)
    dkey = dedupe.key_for(inp.environment, call.name, action.dedupe_on, args) \
        if action is not None else None
    if dkey is not None:
        dup = yield from dedupe.claim_d(dkey, {
            "action_key": o.action_key, "request_id": inp.request_id, "ts": time.time(),
            "approval_id": approval_id, "dispatch": res.dispatch},
            ttl_s=inp.idempotency_ttl_s)
        if dup is not None:
            yield from give_back()
            fields = ", ".join(action.dedupe_on) if action is not None else ""
            _deny(o, "duplicate_action",
                  f"{call.name} already ran on the same {fields} "
                  f"(action {dup.get('action_key')}, request {dup.get('request_id')})",
                  "dedupe")
            o.result = {"duplicate_of": dup}
            return

    def undo() -> Decision[None]:
        yield from give_back()
        if dkey is not None:
            yield S.dedupe_release(dkey, o.action_key)

    if mode == Mode.REQUIRE_HUMAN_APPROVAL:
        yield from queue.flush_d()
        if queue.degraded:
            yield from undo()
            _deny(o, "authority_unavailable", "the audit log cannot be written: no approval "
                  "is created until it can", "audit")
            o.decision = "error"
            return
        pending = yield S.approval_list("pending", limit=policy.defaults.max_pending_approvals)
        if len(pending) >= policy.defaults.max_pending_approvals:
            yield from undo()
            _deny(o, "approval_queue_full", f"{len(pending)} approvals are already pending "
                  "(defaults.max_pending_approvals); this action is refused, not queued",
                  "approval_cap")
            return
        assert approval_id is not None
        o.status, o.approval_id = ActionStatus.PENDING_APPROVAL, approval_id
        o.mode = Mode.REQUIRE_HUMAN_APPROVAL
        queue.effects = True
        created = _approval(inp, o, args, held, override)
        # Whoever must hear of it is queued durably first: a crash between the two leaves a
        # notice of an approval that never came to be (dropped at delivery), never an
        # approval nobody is told about.
        yield from notifications.enqueue_d(policy, created, "held")
        yield S.approval_create(created)
        return
    if res.dispatch == Dispatch.CLIENT:
        o.status = ActionStatus.ALLOWED
        return

    # Gateway dispatch, auto_execute: the record, a fresh kill switch, then the effect.
    assert res.executor is not None
    if not queue.degraded:
        queue.add("action", **action_entry(inp, o, status="executing"))
        yield from queue.flush_d()
    if queue.degraded:  # the record of this effect could not be written: it does not happen
        yield from undo()
        _deny(o, "authority_unavailable", "the audit log cannot be written: nothing more runs "
              "until it can", "audit")
        o.decision = "error"
        return
    now_kill = kill_engaged((yield S.kill_switch_state(fresh=True)), inp.environment)
    if now_kill is not None:
        yield from undo()
        _deny(o, "kill_switch_engaged", f"the {now_kill['scope']} kill switch was engaged "
              "before this action ran", "kill_switch")
        return
    queue.effects = True
    ex = yield from run_once_d(
        action_key=o.action_key, executor_name=res.executor,
        idempotent=inp.executors.get(res.executor).idempotent_downstream,
        action_type=call.name, arguments=args, ttl_s=inp.idempotency_ttl_s,
        info={"request_id": inp.request_id, "environment": inp.environment,
              "requested_by": inp.caller})
    o.status, o.result = ex.status, ex.result
    if ex.error:
        o.reason = ex.error
    if ex.replayed:
        o.extra["replayed"] = True
    if ex.status == "failed":
        o.decision = "allow"
        yield from undo()


def _approval(inp: GateInput, o: ActionOutcome, args: dict[str, Any],
              held: list[limits.Charge], override: list[limits.Charge]) -> dict[str, Any]:
    now = time.time()
    return {
        "id": o.approval_id,
        "status": "pending",
        "created_at": now,
        "expires_at": now + inp.policy.defaults.approval_ttl_s,
        "request_id": inp.request_id,
        "environment": inp.environment,
        "model": inp.model,
        "action_type": o.action_type,
        "arguments": args,
        "arguments_json": o.tool_call["arguments"],
        "tool_call": o.tool_call,
        "tool_schema": inp.tool_schemas.get(o.action_type),
        "action_key": o.action_key,
        "action_hash": action_hash(o.action_type, args, inp.environment),
        "executor": o.executor,
        "dispatch": o.dispatch,
        "reason": o.reason,
        "held_by": o.decided_by,  # the policy step (decided_by is the approver, once decided)
        "requested_by": inp.caller,
        "policy_hash": inp.policy.hash,
        "limit_charges": [c.to_record() for c in held],
        "limit_overrides": [c.to_record() for c in override],
        # The action span's context (telemetry on): its run, once approved, joins the trace.
        **({"trace": trace} if (trace := trace_headers()) else {}),
    }
