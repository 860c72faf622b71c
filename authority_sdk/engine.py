"""The engine: the one place where execution decisions are made.

Both front doors (the SDK transport and the proxy) hand it the same bytes.
Its work is split into decisions with the upstream call in between; each is a
generator that yields the effects it needs (:mod:`authority_sdk.effects`), so
the sync and async front doors share every decision and differ only in how
they wait:

    begin_d()     parse, idempotency, kill switch, model allowlist, cost, budget
    (upstream)    the front door sends ``ctx.upstream_body`` its own way
    complete_d()  validate the answer, settle cost, gate every call, audit, store
    fail_d()      the upstream failed: release, audit, answer 502/504

``handle``/``ahandle`` drive them around a ``send`` callable. Which decision
refused a request is named in the error (``error.authority.decided_by``) and in
its audit entry; request-level rules are in :mod:`.admission` and
:mod:`.costs`, action-level ones in :mod:`.actions` and what it calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from . import admission, idempotency, rate_limits, served
from .actions import AuditQueue, GateInput, Ride, claim_lost, gate_d, kill_engaged
from .audit import AuditSink, open_sink
from .audit.crashpoints import crash_point
from .costs import CostPlan, PlanDraft, draft_plan, finish_plan, release_d, settle_d, settle_op
from .effects import AuditOp, Decision, Outcome, Runtime, S, StoreOp, StoreOps, arun, run
from .errors import (
    AuthorityError,
    AuthorityUnavailable,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InvalidRequest,
    KillSwitchEngaged,
    ModelNotRouted,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)
from .executors import ExecutorRegistry
from .formats import format_for_path
from .formats.base import Answer, ParsedRequest, WireFormat
from .policy import KeyConfig, NamedUpstream, Policy, load_policy
from .pricing import PriceBook, actual_usd
from .rate_limits import RateHold
from .store import Store, open_store
from .tokens import TokenCounter, default_counter
from .wire import Caller, GatewayRequest, GatewayResponse, canonical_json, error_response

if TYPE_CHECKING:
    from .telemetry import CallTrace, Telemetry

__all__ = ["AuditBacklog", "CallContext", "Engine", "Gateway", "UpstreamReply"]

# An in-flight idempotency claim outlives the slowest upstream call by this much;
# after that a crashed holder's claim is taken over.
_LEASE_MARGIN_S = 30.0
_T = TypeVar("_T")
log = logging.getLogger("authority.engine")
MAX_KEY_CHARS = 255


@dataclass
class UpstreamReply:
    """What a front door got from the upstream, without any HTTP library's types."""

    status_code: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: Iterator[bytes] | None = None
    achunks: AsyncIterator[bytes] | None = None
    close: Callable[[], Any] | None = None


@dataclass
class CallContext:
    request_id: str
    caller: Caller
    environment: str
    queue: AuditQueue
    fmt: WireFormat | None = None
    parsed: ParsedRequest | None = None
    model: str = ""
    started: float = field(default_factory=time.perf_counter)
    idem_key: str | None = None
    key_kind: str | None = None  # client | retry (the SDK's) | auto (a keyless retry)
    claim: idempotency.Claim | None = None
    lazy_claim: idempotency.LazyClaim | None = None
    plan: CostPlan | None = None
    rate: RateHold | None = None
    upstream_body: bytes = b""
    # The upstream serving the model, then its fallbacks; ``upstream`` is the one asked now.
    route: tuple[NamedUpstream, ...] = ()
    upstream: NamedUpstream | None = None
    done: bool = False
    # An answer without calls settles its cost after its audit, with its finished answer
    # (``store_answer_d``): nothing of it takes effect, and the two writes share one.
    settle_after: StoreOp | None = None
    takeover_answer: Any = None  # a dead attempt's answer, re-gated instead of asked again
    trace: CallTrace | None = None  # its span, when telemetry is on (authority_sdk.telemetry)
    # Set by a caller that runs ``finish`` once the response is on its way (the proxy):
    # the finished answer of a held answer is then written meanwhile (``respond_d``).
    finish_later: bool = False
    finish: Decision[None] | None = None
    # The response ``finalize_d`` built before its audit entries were written, so that its
    # finished answer could go in their transaction: headers, body, whether it went, and
    # the finishing writes (``Engine._finish_ops``) when it did not.
    built: tuple[dict[str, str], bytes, bool, tuple[StoreOp, ...]] | None = None

    @property
    def stream(self) -> bool:
        return bool(self.parsed and self.parsed.stream)

    @property
    def upstream_name(self) -> str | None:
        return self.upstream.name if self.upstream is not None else None

    @property
    def client_wants_usage(self) -> bool:
        return bool(self.parsed and self.parsed.client_wants_usage)

    @property
    def action_base(self) -> str:
        if self.claim is not None:
            return self.claim.key
        return self.lazy_claim.key if self.lazy_claim is not None else self.request_id


class _Wait:
    """A retry the gateway recognised while its first attempt is still running."""


WAIT = _Wait()


class AuditBacklog:
    """Whether the audit log refused entries after an effect (they wait in the state
    store): while set, no new request runs until they are on the record. It belongs to the
    log, not to one engine: every engine writing to the same log shares it (a reloaded
    policy's engine takes the old one's), so a request still finishing on the old engine
    stops the new one too, and a reload cannot lift the refusal."""

    __slots__ = ("degraded",)

    def __init__(self) -> None:
        self.degraded = False


class Engine:
    """Policy + state + audit + executors. One per process is plenty; it is thread-safe."""

    def __init__(self, policy: Policy | str | Path | None = None, *, store: Store | None = None,
                 audit: AuditSink | None = None, executors: ExecutorRegistry | None = None,
                 counter: TokenCounter | None = None,
                 telemetry: Telemetry | None = None) -> None:
        self.policy = load_policy(policy) if not isinstance(policy, Policy) else policy
        self._store = store
        self._audit = audit
        self._executors = executors
        self._runtime: Runtime | None = None
        self.prices = PriceBook(self.policy.pricing)
        self.counter = counter or default_counter
        self.idempotency_ttl = self.policy.defaults.idempotency_ttl_s
        self._lock = threading.Lock()
        self._keys: dict[str, KeyConfig] = {k.name: k for k in self.policy.keys}
        self._backlog = AuditBacklog()
        # Finished answers being written after their response went out (``finish_later``),
        # by the claim's store key: a retry of one waits for it here rather than answer 409.
        self._finishing: dict[str, asyncio.Task[None]] = {}
        if telemetry is None:
            from .telemetry import telemetry_for

            telemetry = telemetry_for(self.policy)
        # None while off: the one check per request that telemetry costs then.
        self.telemetry = telemetry

    @property
    def audit_degraded(self) -> bool:
        """Set when the log refused entries after an effect: no new request until they are
        in (:class:`AuditBacklog`)."""
        return self._backlog.degraded

    @audit_degraded.setter
    def audit_degraded(self, value: bool) -> None:
        self._backlog.degraded = value

    def share_audit_backlog(self, other: Engine) -> None:
        """This engine writes to ``other``'s audit log: a refusal either meets holds for
        both (a policy reload's new engine, before it takes any request)."""
        self._backlog = other._backlog

    # -- lazily opened resources (a CLI command that only reads the policy opens nothing) --

    @property
    def store(self) -> Store:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = open_store(self.policy)
        return self._store

    @property
    def _claims_reserving(self) -> bool:
        """The store takes a claim and its reservation in one write (PostgreSQL)."""
        return hasattr(self.store, "idem_claim_reserve")

    @property
    def audit(self) -> AuditSink:
        if self._audit is None:
            store = self.store
            with self._lock:
                if self._audit is None:
                    log = open_sink(self.policy, head=store)
                    if log.checkpoints is not None:
                        # An SDK process rarely closes its engine: its last checkpoint is
                        # still written when the engine goes or the interpreter exits.
                        weakref.finalize(self, log.close)
                    # Open (and recover a torn line) before the first call is let through:
                    # an unwritable log must stop requests before they reach the upstream.
                    log.open()
                    self._audit = log
        return self._audit

    @property
    def executors(self) -> ExecutorRegistry:
        if self._executors is None:
            with self._lock:
                if self._executors is None:
                    self._executors = ExecutorRegistry.from_policy(self.policy)
        return self._executors

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            rt = Runtime(self.store, self.audit, self.executors)
            rt.on_audit = self._observe_items
            self._runtime = rt
        return self._runtime

    def close(self) -> None:
        if self._executors is not None:
            self._executors.close()
        if self._audit is not None:
            self._audit.close()  # a last checkpoint covers everything this process wrote
        if self._store is not None:
            self._store.close()

    async def aclose(self) -> None:
        """Release what the running event loop holds — the store's async pool, the
        executors' clients — and nothing else: the engine stays usable (another loop, or
        this one later, opens its own). An async app's client calls it when closed (its
        transport's ``aclose``), so a loop that ends leaves no connection behind it. A call
        of another client still using one finishes first: a pooled connection or an HTTP
        client in use closes when that call is done, never under it."""
        await self.finished()
        if self._executors is not None:
            await self._executors.aclose()
        aclose = getattr(getattr(self._store, "aio", None), "aclose", None)
        if aclose is not None:
            await aclose()

    # -- hooks and helpers for the control plane -----------------------------------------

    def on_audit(self, event: str, fields: dict[str, Any]) -> None:
        """Called after every entry is on the record (the proxy's log line and metrics)."""

    def on_trace(self, trace_id: str) -> None:
        """Called when a model call's span starts (the proxy's log lines carry its id)."""

    def _observe_items(self, items: tuple[tuple[str, dict[str, Any]], ...]) -> None:
        for event, fields in items:
            self.on_audit(event, fields)

    def kill_state(self, environment: str, *, fresh: bool = True) -> dict[str, Any] | None:
        return kill_engaged(self.store.kill_switch_state(fresh=fresh), environment)

    def kill_engaged(self, environment: str) -> bool:
        return self.kill_state(environment) is not None

    def audit_event(self, event: str, **fields: Any) -> dict[str, Any]:
        fields.setdefault("policy_hash", self.policy.hash)
        entries = run(_append_d(((event, fields),)), self.runtime)
        return entries[0]

    def may_execute(self, body: bytes | None = None) -> bool:
        """Could gating this answer run an executor? (kept for callers that pick a thread)"""
        return bool(self.policy.executors) and (body is None or b"tool_calls" in body
                                                or b"function_call" in body)

    # -- phase 1 -----------------------------------------------------------------------

    def begin_d(self, req: GatewayRequest, *, may_wait: bool = False,
                usable: Callable[[NamedUpstream], bool] | None = None,
                trace: CallTrace | None = None,
                ) -> Decision[CallContext | GatewayResponse | _Wait]:
        """``usable`` tells which fallbacks this front door can reach (the SDK only those
        whose credentials are set); the upstream serving the model is always asked."""
        ctx = CallContext(request_id="req_" + secrets.token_hex(12), caller=req.caller,
                          environment=req.caller.environment,
                          queue=AuditQueue(self.policy.hash, self.idempotency_ttl), trace=trace)
        try:
            fmt = format_for_path(req.path)
            if fmt is None:
                raise InvalidRequest(f"{req.method} {req.path[:200]} is not governed by the "
                                     "gateway", code="endpoint_not_allowed")
            ctx.fmt = fmt
            ctx.parsed = parsed = fmt.parse(req.body)
            ctx.model = parsed.model
            if trace is not None:
                trace.request(ctx)
            self.audit  # noqa: B018 -- fail closed before anything is decided or sent
            if self.audit_degraded:
                yield from self._drain_parked_d()
            if ctx.environment not in self.policy.environments:
                raise InvalidRequest(f"unknown environment {ctx.environment!r}",
                                     decided_by="environment")
            key_cfg = self._keys.get(ctx.caller.name)
            draft: PlanDraft | None = None
            refused: AuthorityError | None = None
            if req.header("idempotency-key") and (
                    self.policy.environments[ctx.environment].budget is not None
                    or (key_cfg is not None and key_cfg.budget is not None)):
                # A client's key and a budget: admit first, so the reservation goes with
                # the claim (one write where the store offers it). A refusal waits for the
                # claim, as before: a replay is answered whatever admission says now.
                try:
                    draft = yield from self._admit_d(ctx, key_cfg, usable)
                except AuthorityError as exc:
                    refused = exc
            ask = draft.reservation if draft is not None else None
            replay = yield from self._claim_d(ctx, req, may_wait=may_wait,
                                              reserve=None if ask is None else ask.op())
            if replay is not None:
                return replay
            if ctx.takeover_answer is not None:
                return ctx  # already paid for and admitted: re-gate it, ask no one again
            if refused is not None:
                raise refused
            if draft is None:
                draft = yield from self._admit_d(ctx, key_cfg, usable)
                ask = draft.reservation
            grant = ctx.claim.grant if ctx.claim is not None else None
            if grant is None:
                granted = None if ask is None else (yield ask.op())
            elif not grant[0]:
                raise grant[1]
            else:
                granted = grant[1]
            ctx.plan = finish_plan(draft, granted)
            if key_cfg is not None and key_cfg.rate_limit is not None:
                try:
                    ctx.rate = yield from rate_limits.admit_d(
                        key_cfg.rate_limit, ctx.caller.name, ctx.request_id, ctx.plan,
                        slot_ttl_s=self.policy.max_call_s + _LEASE_MARGIN_S)
                except RateLimited:
                    yield from release_d(ctx.plan)
                    ctx.plan = None
                    raise
            ctx.upstream_body = fmt.upstream_body(
                parsed, req.body, changed=ctx.plan.injected_limit or parsed.rewritten)
            return ctx
        except AuthorityError as exc:
            return (yield from self._deny_early_d(ctx, exc))

    def _admit_d(self, ctx: CallContext, key_cfg: KeyConfig | None,
                 usable: Callable[[NamedUpstream], bool] | None) -> Decision[PlanDraft]:
        """Admission up to the budget's reservation: the kill switch, the model, the route,
        hosted tools and MCP servers, the format's own preparation, the cost plan."""
        assert ctx.fmt is not None and ctx.parsed is not None
        kill = kill_engaged((yield S.kill_switch_state()), ctx.environment)
        if kill is not None:
            why = f": {kill['reason']}" if kill.get("reason") else ""
            raise KillSwitchEngaged(f"the {kill['scope']} kill switch is engaged{why}",
                                    decided_by=f"kill_switch:{kill['scope']}")
        parsed = ctx.parsed
        admission.check_model(self.policy, ctx.environment, ctx.model)
        ctx.route = self._route(ctx.model, usable)
        admission.check_hosted_tools(self.policy, ctx.environment, parsed.hosted_tools)
        admission.check_mcp_servers(self.policy, ctx.environment, parsed.mcp_servers)
        yield from ctx.fmt.prepare_d(parsed, caller=ctx.caller.name,
                                     environment=ctx.environment)
        return draft_plan(self.policy, ctx.environment, key_cfg.budget if key_cfg else None,
                          ctx.caller.name, parsed, prices=self.prices, counter=self.counter,
                          attempts=len(ctx.route))

    def _route(self, model: str, usable: Callable[[NamedUpstream], bool] | None
               ) -> tuple[NamedUpstream, ...]:
        chain = self.policy.route(model)
        if chain is None:
            raise ModelNotRouted(
                f"no upstream serves model {model!r} (upstreams: "
                + "; ".join(f"{u.name}: {', '.join(u.models)}" for u in self.policy.routes)
                + ")", decided_by="upstreams")
        return (chain[0], *(u for u in chain[1:] if usable is None or usable(u)))

    def _claim_d(self, ctx: CallContext, req: GatewayRequest, *, may_wait: bool,
                 reserve: StoreOp | None = None) -> Decision[GatewayResponse | _Wait | None]:
        """Idempotency: the client's key, the SDK's retry key, or a keyless openai retry.
        ``reserve``: the budget's reservation, made with a client key's claim (its outcome
        in the claim's ``grant``); any other kind of key leaves it to the caller."""
        assert ctx.parsed is not None
        key = req.header("idempotency-key")
        kind = "client"
        if not key:
            key, kind = req.header("x-authority-retry-key"), "retry"
        retry_count = req.header("x-stainless-retry-count")
        if not key and retry_count is None:
            return None
        if kind == "retry" and key:
            fingerprint = _sent_fingerprint(req, ctx.caller.name, ctx.environment)
        else:
            fingerprint = hashlib.sha256(canonical_json(
                [ctx.parsed.data, req.path.rsplit("/v1", 1)[-1], ctx.caller.name,
                 ctx.environment]).encode()).hexdigest()
        if key:
            if len(key) > MAX_KEY_CHARS or not key.isprintable():
                raise InvalidRequest(f"an idempotency key must be printable and at most "
                                     f"{MAX_KEY_CHARS} characters", decided_by="idempotency")
            ctx.idem_key = key if kind == "client" else None
            store_key = f"{'idem' if kind == 'client' else 'retry'}:{ctx.caller.name}:" \
                        f"{ctx.environment}:{key}"
        else:
            kind = "auto"
            store_key = f"auto:{ctx.caller.name}:{ctx.environment}:{fingerprint}"
        ctx.key_kind = kind
        ttl = self.idempotency_ttl if kind == "client" else self.policy.defaults.retry_window_s
        lease = self.policy.max_call_s + _LEASE_MARGIN_S
        if kind == "retry" and (yield S.idem_get(store_key)) is None:
            ctx.lazy_claim = idempotency.LazyClaim(store_key, fingerprint, ctx.request_id,
                                                   ttl, lease)
            return None
        if kind == "auto" and not _is_retry(retry_count):
            ctx.claim = yield from idempotency.claim_fresh_d(
                store_key, fingerprint, claim_id=ctx.request_id, ttl_s=ttl, lease_s=lease)
            return None
        got = yield from idempotency.begin_d(
            store_key, fingerprint, claim_id=ctx.request_id, ttl_s=ttl, lease_s=lease,
            reserve=reserve if kind == "client" else None, together=self._claims_reserving)
        if got.state in ("new", "takeover"):
            ctx.claim = got
            ctx.takeover_answer = got.answer
            return None
        shown = key if kind != "auto" else "(this retried request)"
        if got.state == "conflict":
            raise IdempotencyKeyReused(
                f"Idempotency-Key {shown!r} was already used with a different request body",
                decided_by="idempotency")
        if got.state == "in_progress":
            if may_wait and (kind != "client" or store_key in self._finishing):
                return WAIT
            raise IdempotencyInProgress(
                f"a request with idempotency key {shown!r} is still in progress; retry later",
                decided_by="idempotency")
        return (yield from self._replay_d(ctx, got.record))

    def _replay_d(self, ctx: CallContext, record: dict[str, Any]) -> Decision[GatewayResponse]:
        stored = record["response"]
        if ctx.trace is not None:
            ctx.trace.replayed(stored.get("request_id"))
        yield from _append_d((("replay", dict(
            request_id=ctx.request_id, environment=ctx.environment, model=ctx.model,
            decision="allow", reason="idempotent replay", actor=ctx.caller.name,
            policy_hash=self.policy.hash,
            details={"idempotency_key": ctx.idem_key, "key_kind": ctx.key_kind,
                     "original_request_id": stored.get("request_id")})),))
        headers = dict(stored.get("headers") or {})
        headers["idempotent-replayed"] = "true"
        body = stored["body"].encode() if isinstance(stored["body"], str) else stored["body"]
        body = _mark_replayed(body, stored.get("request_id"),
                              "event-stream" in headers.get("content-type", ""))
        return GatewayResponse(stored["status_code"], headers, body,
                               request_id=stored.get("request_id"), decision="replay")

    def _deny_early_d(self, ctx: CallContext, exc: AuthorityError) -> Decision[GatewayResponse]:
        """A request that never reached the upstream: audit it, release any claim, answer."""
        yield from self._abandon_d(ctx)
        decision = "error" if exc.status_code >= 500 or exc.status_code == 400 else "deny"
        if ctx.trace is not None:
            ctx.trace.refused(exc, decision)
        try:
            yield from _append_d((("request", dict(
                request_id=ctx.request_id, environment=ctx.environment,
                model=ctx.model or None, decision=decision, reason=exc.message,
                cost_estimate_usd=exc.details.get("estimate_usd"), actor=ctx.caller.name,
                policy_hash=self.policy.hash,
                details={"code": exc.code, "status_code": exc.status_code,
                         "decided_by": exc.details.get("decided_by"),
                         "idempotency_key": ctx.idem_key})),))
        except AuthorityError as audit_exc:
            return error_response(audit_exc, request_id=ctx.request_id)
        return error_response(exc, request_id=ctx.request_id)

    def _abandon_d(self, ctx: CallContext) -> Decision[None]:
        yield from self._settle_after_d(ctx)
        if ctx.claim is not None:
            claim, ctx.claim = ctx.claim, None
            # On failure the lease expires; the answer already says what went wrong.
            with contextlib.suppress(AuthorityError):
                yield from idempotency.abandon_d(claim)

    def _drain_parked_d(self) -> Decision[None]:
        """Entries the log refused after an effect must be on the record before more runs."""
        from .recovery import drain_audit_d

        yield from drain_audit_d()
        self.audit_degraded = False

    # -- phase 3 -----------------------------------------------------------------------

    def fail_d(self, ctx: CallContext, exc: AuthorityError,
               upstream: tuple[int, bytes] | None = None) -> Decision[GatewayResponse]:
        """The upstream did not give a usable answer: nothing was spent, nothing executes."""
        if ctx.plan is not None and not ctx.done:
            with contextlib.suppress(AuthorityError):
                yield from release_d(ctx.plan)
                yield from rate_limits.release_d(ctx.rate)
        yield from self._abandon_d(ctx)
        ctx.done = True
        if ctx.trace is not None:
            ctx.trace.refused(exc, "error")
        status = upstream[0] if upstream else exc.status_code
        try:
            yield from _append_d((("request", dict(
                request_id=ctx.request_id, environment=ctx.environment, model=ctx.model,
                decision="error", reason=exc.message,
                cost_estimate_usd=ctx.plan.estimate_usd if ctx.plan else None,
                cost_actual_usd=ctx.plan.billed_usd if ctx.plan else 0.0,
                actor=ctx.caller.name, policy_hash=self.policy.hash,
                details={"code": exc.code, "status_code": status,
                         "idempotency_key": ctx.idem_key, "upstream": ctx.upstream_name})),))
        except AuthorityError as audit_exc:
            return error_response(audit_exc, request_id=ctx.request_id)
        if upstream is not None:  # an upstream 4xx passes through as it came
            return GatewayResponse(upstream[0], {"content-type": "application/json",
                                                 "x-request-id": ctx.request_id}, upstream[1],
                                   request_id=ctx.request_id, decision="error", code=exc.code)
        return error_response(exc, request_id=ctx.request_id)

    def complete_d(self, ctx: CallContext, status: int, body: bytes) -> Decision[GatewayResponse]:
        assert ctx.fmt is not None
        if status >= 400:
            if status >= 500:
                return (yield from self.fail_d(ctx, UpstreamError(
                    f"the upstream answered {status}")))
            return (yield from self.fail_d(ctx, UpstreamError(
                f"the upstream refused the request ({status})", code="upstream_rejected"),
                upstream=(status, body)))
        try:
            answer = ctx.fmt.read_answer(body, ctx.parsed)
        except UpstreamError as exc:
            return (yield from self.fail_d(ctx, exc))
        return (yield from self.respond_d(ctx, answer))

    def respond_d(self, ctx: CallContext, answer: Answer) -> Decision[GatewayResponse]:
        """Gate a readable answer and build the response (plain, or a synthesised stream
        when a takeover re-gates a stored answer for a streaming client)."""
        try:
            authority = yield from self.finalize_d(ctx, answer, respond=True)
        except AuthorityUnavailable as exc:
            # Nothing took effect (else gating parks the record instead): withhold the
            # answer, free the key for a retry.
            yield from self._abandon_d(ctx)
            return error_response(exc, request_id=ctx.request_id)
        built, ctx.built = ctx.built, None
        ops: tuple[StoreOp, ...] | None = None
        if built is not None:
            headers, out, finished, ops = built
        else:
            (headers, out), finished = self._encode(ctx, answer, authority), False
        claim = ctx.claim
        if finished:  # written with the audit entries, in their transaction
            crash_point("respond:finished")  # the crash tests' kill -9, nothing sent yet
        elif (ctx.finish_later and ctx.settle_after is None and claim is not None
                and claim.record.get("answer") is not None):
            # The answer is held (kept in the claim before the app sees it): until the
            # finished answer is written, a retry that takes over re-gates that same answer,
            # so nothing is lost by sending the response first.
            ctx.finish = self.store_answer_d(ctx, 200, headers, out, ops)
        else:
            yield from self.store_answer_d(ctx, 200, headers, out, ops)
        return GatewayResponse(200, headers, out, request_id=ctx.request_id,
                               decision=authority["decision"])

    def finalize_d(self, ctx: CallContext, answer: Answer, *,
                   respond: bool = False) -> Decision[dict[str, Any]]:
        """Settle cost, audit the request, gate every call, rewrite the answer. Returns the
        ``authority`` field. Shared by the plain and the streamed path.

        ``respond`` (``respond_d``): the response is built before the audit entries are
        written, so its finished answer (with a settlement waiting for it) can be written
        in their transaction where the store allows (``AuditOp.then``): the response waits
        for one write instead of two. It is left in ``ctx.built``."""
        assert ctx.fmt is not None and ctx.parsed is not None
        started = time.perf_counter()
        ctx.done = True
        usage = answer.usage
        reason = None
        early = self._first_hold(ctx, answer)
        ride: Ride | None = None
        if early is not None:
            ride = Ride((early[0],), early[1])
        if ctx.plan is not None:
            actual, settle = settle_op(ctx.plan, usage)
            if ride is not None and settle is not None:
                # The settlement rides with the checkpoint: independent writes, sent with
                # the audit entries unless a call needs the answer held earlier.
                ride = Ride((settle, *ride.ops), ride.record)
            elif settle is not None and not answer.calls:
                # The reservation (never less than the cost) holds until then: the budget
                # over-counts for a moment, never under-counts.
                ctx.settle_after = settle
            elif settle is not None:
                yield settle
            with contextlib.suppress(AuthorityError):  # a slot left behind ends with its lease
                yield from rate_limits.settle_d(ctx.rate, usage)
            ceiling = ctx.plan.ceiling_usd
            # The ceiling bounds one answer; attempts given up on are on the budget only.
            served_usd = actual - ctx.plan.billed_usd
            if ceiling is not None and served_usd > ceiling:
                reason = (f"actual cost ${served_usd:.6f} exceeded the ceiling ${ceiling}; "
                          "no action of this completion runs")
        else:  # a takeover: its cost was settled by the attempt that died
            pricing = self.prices.lookup(ctx.model)
            actual = actual_usd(pricing, usage) if pricing and usage else 0.0
        queue = ctx.queue
        # Queued first: the request is on the record before any action can run.
        queue.add("request", request_id=ctx.request_id, environment=ctx.environment,
                  model=ctx.model, decision="allow", reason=reason,
                  cost_estimate_usd=ctx.plan.estimate_usd if ctx.plan else None,
                  cost_actual_usd=actual, actor=ctx.caller.name,
                  details={"upstream": ctx.upstream_name,
                           "tool_calls": len(answer.calls), "idempotency_key": ctx.idem_key,
                           "key_kind": ctx.key_kind, "stream": ctx.stream,
                           "format": ctx.fmt.name,
                           "takeover_of": (ctx.claim.record.get("takeover_of")
                                           if ctx.takeover_answer is not None and ctx.claim
                                           else None),
                           "max_output_tokens_set_by_gateway":
                               ctx.plan.output_limit if ctx.plan and ctx.plan.injected_limit
                               else None,
                           **({"code": "post_cost_ceiling_exceeded"} if reason else {})})
        inp = GateInput(
            policy=self.policy, executors=self.executors, request_id=ctx.request_id,
            environment=ctx.environment, model=ctx.model, caller=ctx.caller.name,
            action_base=ctx.action_base, tool_schemas=ctx.parsed.tool_schemas,
            idempotency_ttl_s=self.idempotency_ttl, post_ceiling_reason=reason,
            claim=ctx.claim if ctx.takeover_answer is None else None,
            lazy_claim=ctx.lazy_claim, raw_answer=answer.body, trace=ctx.trace, ride=ride)
        mark = len(queue.items)
        gated = False
        firsts: list[Outcome] | None = None
        pre: _Prebuilt | None = None
        then: tuple[StoreOp, ...] = ()
        after: list[Outcome] | None = None
        try:
            outcomes = yield from gate_d(inp, answer, queue)
            gated = True
        finally:
            if ctx.lazy_claim is not None and ctx.lazy_claim.claim is not None:
                ctx.claim = ctx.lazy_claim.claim
            ride, inp.ride = inp.ride, None  # None: a call needed it held, it was sent
            if gated and respond and not queue.degraded and (
                    ctx.claim is not None or ctx.settle_after is not None):
                try:
                    # A copy while the held answer (this very body) is still to be written.
                    pre = self._prebuild(ctx, answer, outcomes, reason, actual,
                                         copy=ride is not None)
                    then = self._finish_ops(ctx, 200, pre.headers, pre.body)
                except Exception:
                    # Never at the cost of the record: the entries go first, the response
                    # is built after them (and fails there, if it must).
                    log.exception("request %s: its response could not be built before its "
                                  "audit entries", ctx.request_id)
                    pre, then = None, ()
            # Whatever happened to the calls, what was decided and done goes on the record.
            with _suppress_after_effects(queue):
                if ride is not None and not gated:
                    yield StoreOps(ride.ops)  # gating failed: the cost is known all the same
                    ride = None
                firsts, after = yield from queue.flush_d(
                    ride.ops if ride is not None else (), then)
        if ride is not None:
            # The request's entry was queued to carry it, and with the ride pending nothing
            # took effect, so a failed append raised rather than parked the entries.
            assert firsts is not None
            if not ride.held(ctx.claim, firsts):
                # The claim went to a retry before the answer was held: nothing was written,
                # and nothing of the answer runs here or reaches the app.
                pre = None
                del queue.items[mark:]
                inp.outcomes.clear()
                outcomes = claim_lost(inp, answer.calls)
                yield from queue.flush_d()
        if queue.degraded:
            self.audit_degraded = True
        if pre is not None:
            answer.body, authority = pre.answer.body, pre.authority
            if queue.degraded:  # the final flush parked the entries (and made no ``then``)
                authority["warnings"] = list(_DEGRADED)  # the response is encoded again
            else:
                ctx.built = (pre.headers, pre.body, after is not None, then)
                if after is not None:
                    ctx.settle_after = None  # it went with the finished answer
        else:
            authority = self._authority(ctx, answer, outcomes, reason, actual,
                                        degraded=queue.degraded)
        with contextlib.suppress(AuthorityError):
            # Without its record a continuation is refused as unknown: failing closed.
            yield from ctx.fmt.record_d(ctx.parsed, answer, authority, caller=ctx.caller.name,
                                        environment=ctx.environment,
                                        ttl_s=self.policy.defaults.served_response_ttl_s)
        if ctx.trace is not None:
            ctx.trace.answered(answer, authority, started)
        return authority

    def _authority(self, ctx: CallContext, answer: Answer, outcomes: list[Any],
                   reason: str | None, actual: float, *, degraded: bool) -> dict[str, Any]:
        """Rewrite ``answer`` for ``outcomes`` and build its ``authority`` field."""
        assert ctx.fmt is not None and ctx.parsed is not None
        followups = ctx.fmt.followups(answer, outcomes, self.policy.redact)
        ctx.fmt.rewrite(answer, outcomes, summary=None,
                        structured_output=ctx.parsed.structured_output)
        cost: dict[str, Any] = ctx.plan.to_authority() if ctx.plan else {}
        cost["actual_usd"] = round(actual, 8)
        authority: dict[str, Any] = {
            "request_id": ctx.request_id,
            "environment": ctx.environment,
            "decision": "allow",
            "reason": reason,
            "code": "post_cost_ceiling_exceeded" if reason else None,
            "cost": cost,
            "idempotency": ({"key": ctx.idem_key, "replayed": False} if ctx.idem_key
                            else None),
            "actions": [o.to_dict() for o in outcomes],
            ctx.fmt.followups_field: followups,
        }
        if ctx.parsed.approval_updates:
            authority["approval_updates"] = ctx.parsed.approval_updates
        if ctx.takeover_answer is not None:
            authority["recovered_from"] = ctx.claim.record.get("takeover_of") if ctx.claim \
                else None
        if degraded:
            authority["warnings"] = list(_DEGRADED)
        return authority

    def _encode(self, ctx: CallContext, answer: Answer,
                authority: dict[str, Any]) -> tuple[dict[str, str], bytes]:
        """The response's headers and body: ``answer`` with its ``authority`` field."""
        answer.body["authority"] = authority
        headers = {"content-type": "application/json", "x-request-id": ctx.request_id}
        if ctx.stream:
            assert ctx.fmt is not None
            headers["content-type"] = "text/event-stream"
            return headers, b"".join(ctx.fmt.synthesise_stream(answer.body))
        return headers, json.dumps(answer.body).encode()

    def _prebuild(self, ctx: CallContext, answer: Answer, outcomes: list[Any],
                  reason: str | None, actual: float, *, copy: bool) -> _Prebuilt:
        """The response as it stands if the audit entries are written as queued: the
        rewritten answer (a copy when ``copy``), its ``authority``, headers and body."""
        if copy:
            answer = Answer(json.loads(json.dumps(answer.body)), answer.calls, answer.usage)
        authority = self._authority(ctx, answer, outcomes, reason, actual, degraded=False)
        return _Prebuilt(answer, authority, *self._encode(ctx, answer, authority))

    @staticmethod
    def _first_hold(ctx: CallContext, answer: Answer) -> tuple[StoreOp, dict[str, Any]] | None:
        """The checkpoint gating would write first thing (``actions.gate_d``: an answer with
        calls under a client's claim that holds no answer yet), and its record."""
        claim = ctx.claim
        if (not answer.calls or ctx.takeover_answer is not None or claim is None
                or claim.record.get("answer") is not None):
            return None
        return idempotency.checkpoint_op(claim, answer.body)

    @staticmethod
    def _settle_after_d(ctx: CallContext) -> Decision[None]:
        settle, ctx.settle_after = ctx.settle_after, None
        if settle is not None:
            with contextlib.suppress(AuthorityError):  # the reservation stays: over-counts
                yield settle

    def _finish_ops(self, ctx: CallContext, status: int, headers: dict[str, str],
                    body: bytes) -> tuple[StoreOp, ...]:
        """The writes that finish a request: its settlement if it waits (``settle_after``),
        and the finished answer kept for replays when it has a key."""
        ops = (ctx.settle_after,) if ctx.settle_after is not None else ()
        if ctx.claim is None:
            return ops
        ttl = self.idempotency_ttl if ctx.key_kind == "client" \
            else self.policy.defaults.retry_window_s
        return (*ops, idempotency.finish_op(ctx.claim, {
            "status_code": status, "headers": headers, "body": body.decode(),
            "request_id": ctx.request_id}, ttl_s=ttl))

    def store_answer_d(self, ctx: CallContext, status: int, headers: dict[str, str],
                       body: bytes, ops: tuple[StoreOp, ...] | None = None
                       ) -> Decision[None]:
        """Keep the answer for replays, with the settlement of an answer without calls
        (``ops``: those writes, already built for this response)."""
        if ops is None:
            if ctx.claim is None:
                yield from self._settle_after_d(ctx)
                return
            ops = self._finish_ops(ctx, status, headers, body)
        ctx.settle_after = None
        with contextlib.suppress(AuthorityError):
            if len(ops) == 1:
                yield ops[0]
            else:  # independent writes: one round trip where the store groups them
                yield StoreOps(ops)

    def _admitting_d(self, req: GatewayRequest,
                     decision: Decision[_T]) -> Decision[_T | GatewayResponse]:
        """``decision`` (admission), with a failure no rule foresaw answered as a 500 and put
        on the record under a request id of its own, not raised: nothing was sent yet."""
        try:
            return (yield from decision)
        except AuthorityError:
            raise
        except Exception as exc:
            log.exception("internal error admitting a request")
            err = AuthorityError("internal error in the gateway")
            request_id = "req_" + secrets.token_hex(12)
            with contextlib.suppress(AuthorityError):
                yield from _append_d((("request", dict(
                    request_id=request_id, environment=req.caller.environment,
                    decision="error", reason=f"{err.message} before the request was admitted "
                    f"({type(exc).__name__})", actor=req.caller.name,
                    policy_hash=self.policy.hash,
                    details={"code": err.code, "path": req.path})),))
            return error_response(err, request_id=request_id)

    def _guarded_d(self, ctx: CallContext,
                   decision: Decision[GatewayResponse]) -> Decision[GatewayResponse]:
        """``decision``, with a failure no rule foresaw (a bug, between any two lines of
        gating an answer) answered and recorded by :meth:`internal_d`, not raised."""
        try:
            return (yield from decision)
        except AuthorityError:
            raise
        except Exception as exc:
            log.exception("internal error in request %s", ctx.request_id)
            err = yield from self.internal_d(ctx, exc)
            return error_response(err, request_id=ctx.request_id)

    def internal_d(self, ctx: CallContext, exc: Exception) -> Decision[AuthorityError]:
        """After an answer came: the request's entry says the gateway failed, and nothing
        more of it runs. Before the decision began, as any unusable answer (``fail_d``);
        after, its reservation stays counted (the budget over-counts) and its key ends with
        its lease, and an entry is added (the decision's own may be written already)."""
        err = AuthorityError("internal error in the gateway")
        if not ctx.done:
            yield from self.fail_d(ctx, err)
            return err
        with contextlib.suppress(AuthorityError):
            yield from _append_d((("request", dict(
                request_id=ctx.request_id, environment=ctx.environment, model=ctx.model,
                decision="error", reason=f"{err.message} after its decision began "
                f"({type(exc).__name__})", actor=ctx.caller.name, policy_hash=self.policy.hash,
                details={"code": err.code, "idempotency_key": ctx.idem_key,
                         "upstream": ctx.upstream_name})),))
        return err

    def stream_error_d(self, ctx: CallContext, exc: AuthorityError) -> Decision[bytes]:
        """A stream that broke (or that the client abandoned) before its end: it may have
        been billed, so the reservation is charged; none of its actions run."""
        if ctx.trace is not None:
            ctx.trace.refused(exc, "error")
        yield from self._settle_after_d(ctx)  # finalized, then failed: its cost is known
        if not ctx.done and ctx.plan is not None:
            ctx.done = True
            try:
                yield from settle_d(ctx.plan, None)
                yield from rate_limits.settle_d(ctx.rate, None)
                yield from self._abandon_d(ctx)
                yield from _append_d((("request", dict(
                    request_id=ctx.request_id, environment=ctx.environment,
                    model=ctx.model, decision="error", reason=exc.message,
                    cost_estimate_usd=ctx.plan.estimate_usd,
                    cost_actual_usd=ctx.plan.estimate_usd + ctx.plan.billed_usd,
                    actor=ctx.caller.name, policy_hash=self.policy.hash,
                    details={"code": exc.code, "stream": True,
                             "upstream": ctx.upstream_name})),))
            except AuthorityError as inner:
                exc = inner
        body = error_response(exc, request_id=ctx.request_id).body
        return b"data: " + body + b"\n\n"

    # -- stored responses (GET /v1/responses/{id}) ----------------------------------------

    def stored_response(self, req: GatewayRequest) -> GatewayResponse:
        return run(self._stored_d(req), self.runtime)

    async def astored_response(self, req: GatewayRequest) -> GatewayResponse:
        return await arun(self._stored_d(req), self.runtime)

    def _stored_d(self, req: GatewayRequest) -> Decision[GatewayResponse]:
        found = served.stored_path(req.path)
        if found is None:
            return error_response(InvalidRequest("not a stored response's path"))
        rid, what = found
        return (yield from served.stored_response_d(rid, what, caller=req.caller.name,
                                                    environment=req.caller.environment))

    # -- drivers -----------------------------------------------------------------------

    def handle(self, req: GatewayRequest, send: Callable[[CallContext], UpstreamReply], *,
               usable: Callable[[NamedUpstream], bool] | None = None) -> GatewayResponse:
        """``send`` asks ``ctx.upstream``; on a 5xx, a connection error or a timeout the
        next upstream of ``ctx.route`` is asked (nothing has reached the client yet)."""
        trace = self.telemetry.start_call(req) if self.telemetry is not None else None
        if trace is None:
            return self._handle(req, send, None, usable)
        self.on_trace(trace.trace_id)
        resp: GatewayResponse | None = None
        try:
            resp = self._handle(req, send, trace, usable)
            return resp
        finally:
            if resp is None or resp.stream is None:  # a stream's span ends with the stream
                trace.finish(None if resp is None else resp.status_code,
                             None if resp is None else resp.code)

    def _handle(self, req: GatewayRequest, send: Callable[[CallContext], UpstreamReply],
                trace: CallTrace | None,
                usable: Callable[[NamedUpstream], bool] | None) -> GatewayResponse:
        try:
            rt = self.runtime
            begun = run(self._admitting_d(req, self.begin_d(req, usable=usable, trace=trace)),
                        rt)
            if not isinstance(begun, CallContext):
                assert isinstance(begun, GatewayResponse)
                return begun
            ctx = begun
            if ctx.takeover_answer is not None:
                return run(self._guarded_d(ctx, self._regate_d(ctx)), rt)
            if trace is not None:
                trace.admitted(ctx)
            try:
                reply = self._send_chain(ctx, send)
            except AuthorityError as exc:
                return run(self.fail_d(ctx, exc), rt)
            except BaseException:
                run(self.fail_d(ctx, UpstreamError("the call to the upstream was interrupted")),
                    rt)
                raise
            if trace is not None:
                trace.received()
            if ctx.stream and reply.status_code < 300 and reply.chunks is not None:
                from .streaming import StreamGate

                return StreamGate(self, ctx, reply).response()
            return run(self._guarded_d(ctx, self.complete_d(ctx, reply.status_code, reply.body)),
                       rt)
        except AuthorityUnavailable as exc:
            return error_response(exc)

    async def ahandle(self, req: GatewayRequest,
                      send: Callable[[CallContext], Awaitable[UpstreamReply]], *,
                      usable: Callable[[NamedUpstream], bool] | None = None,
                      finish_later: bool = False) -> GatewayResponse:
        """The async front door: every effect is awaited (a network backend on its own
        pool, executors on their async clients); a local store's reads run inline, its
        writes and the audit file's appends are group-committed (``effects`` says how).

        ``finish_later`` (a server, whose loop outlives the request: the proxy): a held
        answer's finished answer is written by a task of this loop started as the response
        is returned, instead of before; :meth:`finished` awaits those tasks."""
        rt = self.runtime
        rt.in_flight += 1
        try:
            trace = self.telemetry.start_call(req) if self.telemetry is not None else None
            if trace is None:
                return await self._ahandle(req, send, None, usable, finish_later)
            self.on_trace(trace.trace_id)
            resp: GatewayResponse | None = None
            try:
                resp = await self._ahandle(req, send, trace, usable, finish_later)
                return resp
            finally:
                if resp is None or resp.astream is None:  # a stream's span ends with it
                    trace.finish(None if resp is None else resp.status_code,
                                 None if resp is None else resp.code)
        finally:
            rt.in_flight -= 1

    async def _ahandle(self, req: GatewayRequest,
                       send: Callable[[CallContext], Awaitable[UpstreamReply]],
                       trace: CallTrace | None,
                       usable: Callable[[NamedUpstream], bool] | None,
                       finish_later: bool) -> GatewayResponse:
        try:
            rt = self.runtime
            begun = await arun(self._admitting_d(
                req, self.begin_d(req, may_wait=True, usable=usable, trace=trace)), rt)
            deadline = time.monotonic() + self.policy.max_call_s + _LEASE_MARGIN_S
            delay = 0.05
            while begun is WAIT:
                # A retry of a request still running here: wait for its answer, then replay
                # it, rather than send the client away to retry into the same wait.
                finishing = [t for t in self._finishing.values() if not t.done()]
                if finishing:  # its answer may be one being finished: wake up with it
                    await asyncio.wait(finishing, timeout=delay,
                                       return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                begun = await arun(self._admitting_d(req, self.begin_d(
                    req, may_wait=time.monotonic() < deadline, usable=usable, trace=trace)), rt)
            if not isinstance(begun, CallContext):
                assert isinstance(begun, GatewayResponse)
                return begun
            ctx = begun
            ctx.finish_later = finish_later
            if ctx.takeover_answer is not None:
                return self._finish_later(ctx, await arun(self._guarded_d(ctx,
                                                                          self._regate_d(ctx)), rt))
            if trace is not None:
                trace.admitted(ctx)
            try:
                reply = await self._asend_chain(ctx, send)
            except AuthorityError as exc:
                return await arun(self.fail_d(ctx, exc), rt)
            except BaseException:
                await arun(self.fail_d(ctx, UpstreamError(
                    "the call to the upstream was interrupted")), rt)
                raise
            if trace is not None:
                trace.received()
            if ctx.stream and reply.status_code < 300 and reply.achunks is not None:
                from .streaming import StreamGate

                return StreamGate(self, ctx, reply).aresponse()
            return self._finish_later(ctx, await arun(self._guarded_d(
                ctx, self.complete_d(ctx, reply.status_code, reply.body)), rt))
        except AuthorityUnavailable as exc:
            return error_response(exc)

    def _finish_later(self, ctx: CallContext, resp: GatewayResponse) -> GatewayResponse:
        """Start writing ``ctx``'s finished answer, if ``respond_d`` left it for later."""
        finish, ctx.finish = ctx.finish, None
        if finish is None or ctx.claim is None:
            return resp
        key = ctx.claim.key
        rt = self.runtime

        async def write() -> None:
            crash_point("finish:before_write")  # the crash tests' kill -9, response sent
            try:
                await arun(finish, rt)
            except Exception:  # store_answer_d keeps its own failures; this is a last net
                log.exception("the finished answer of %s was not written", ctx.request_id)

        task = asyncio.get_running_loop().create_task(write())
        self._finishing[key] = task
        task.add_done_callback(lambda t: self._finishing.pop(key, None)
                               if self._finishing.get(key) is t else None)
        return resp

    async def finished(self) -> None:
        """Await the finished answers this loop is writing (``finish_later``)."""
        loop = asyncio.get_running_loop()
        mine = [t for t in self._finishing.values() if t.get_loop() is loop]
        if mine:
            await asyncio.gather(*mine, return_exceptions=True)

    # -- the upstream chain: fallbacks -------------------------------------------------

    def _send_chain(self, ctx: CallContext,
                    send: Callable[[CallContext], UpstreamReply]) -> UpstreamReply:
        for i, up in enumerate(ctx.route or (None,)):
            ctx.upstream = up
            last = i == len(ctx.route) - 1 or not ctx.route
            try:
                reply = send(ctx)
            except AuthorityError as exc:
                if last or not _falls_back(exc):
                    raise
                run(self._fell_back_d(ctx, exc), self.runtime)
                continue
            if reply.status_code < 500 or last:
                return reply
            _close(reply)
            run(self._fell_back_d(ctx, UpstreamError(
                f"the upstream answered {reply.status_code}"), reply.status_code), self.runtime)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _asend_chain(self, ctx: CallContext,
                           send: Callable[[CallContext], Awaitable[UpstreamReply]]
                           ) -> UpstreamReply:
        for i, up in enumerate(ctx.route or (None,)):
            ctx.upstream = up
            last = i == len(ctx.route) - 1 or not ctx.route
            try:
                reply = await send(ctx)
            except AuthorityError as exc:
                if last or not _falls_back(exc):
                    raise
                await arun(self._fell_back_d(ctx, exc), self.runtime)
                continue
            if reply.status_code < 500 or last:
                return reply
            await _aclose(reply)
            await arun(self._fell_back_d(ctx, UpstreamError(
                f"the upstream answered {reply.status_code}"), reply.status_code), self.runtime)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _fell_back_d(self, ctx: CallContext, exc: AuthorityError,
                     status: int | None = None) -> Decision[None]:
        """One attempt failed before anything reached the client, and a fallback follows:
        on the record (which upstream, why). A timed-out attempt may have been billed, so
        its estimate is charged from the reservation that covers the chain."""
        assert ctx.upstream is not None
        nxt = ctx.route[ctx.route.index(ctx.upstream) + 1]
        charged = 0.0
        if isinstance(exc, UpstreamTimeout) and ctx.plan is not None:
            ctx.plan.charge_abandoned_attempt()
            charged = ctx.plan.estimate_usd
        yield from _append_d((("upstream", dict(
            request_id=ctx.request_id, environment=ctx.environment, model=ctx.model,
            decision="error", reason=exc.message, cost_actual_usd=charged,
            actor=ctx.caller.name, policy_hash=self.policy.hash,
            details={"upstream": ctx.upstream.name, "code": exc.code,
                     "status_code": status or exc.status_code,
                     "attempt": ctx.route.index(ctx.upstream) + 1,
                     "fallback_to": nxt.name})),))

    def _regate_d(self, ctx: CallContext) -> Decision[GatewayResponse]:
        assert ctx.fmt is not None
        try:
            answer = ctx.fmt.answer_from(ctx.takeover_answer, ctx.parsed)
        except UpstreamError as exc:
            return (yield from self.fail_d(ctx, exc))
        return (yield from self.respond_d(ctx, answer))


Gateway = Engine  # the name the SDK has always exported


def _sent_fingerprint(req: GatewayRequest, caller: str, environment: str) -> str:
    """The SDK's retry key matches the bytes sent: openai resends an attempt's very body, so
    its digest identifies it without re-serialising the whole conversation in canonical
    form (which grows with every turn, and cost more than the rest of the gate at turn 50).
    Only ever compared with the fingerprints of other attempts under the same retry key."""
    digest = hashlib.sha256(canonical_json(
        [req.path.rsplit("/v1", 1)[-1], caller, environment]).encode() + b"\n")
    digest.update(req.body)
    return digest.hexdigest()


def _is_retry(count: str | None) -> bool:
    try:
        return count is not None and int(count) > 0
    except ValueError:
        return False


def _falls_back(exc: AuthorityError) -> bool:
    """A fallback is tried only where the upstream may simply be down: a connection error
    or a timeout (a 5xx status is checked on the reply). A refusal would be the same
    anywhere."""
    return isinstance(exc, UpstreamError) and exc.code in ("upstream_error", "upstream_timeout")


def _close(reply: UpstreamReply) -> None:
    if reply.close is not None:
        reply.close()


async def _aclose(reply: UpstreamReply) -> None:
    if reply.close is not None:
        got = reply.close()
        if asyncio.iscoroutine(got):
            await got


def _append_d(items: tuple[tuple[str, dict[str, Any]], ...]) -> Decision[list[dict[str, Any]]]:
    entries = yield AuditOp(items)
    return entries


class _Prebuilt(NamedTuple):
    """A response built before its audit entries were written (``Engine._prebuild``)."""

    answer: Answer  # rewritten for the outcomes
    authority: dict[str, Any]
    headers: dict[str, str]
    body: bytes


_DEGRADED = (
    "the audit log could not be written after an action took effect: its entries are kept "
    "in the state store and written as soon as the log is writable; the gateway takes no "
    "new request until then",)


class _suppress_after_effects(contextlib.AbstractContextManager[None]):
    """In the final flush: after an effect, never turn a failure into an error answer
    (the queue parks the entries); before one, let it fail closed."""

    def __init__(self, queue: AuditQueue) -> None:
        self.queue = queue

    def __exit__(self, et: Any, e: Any, tb: Any) -> bool:
        return et is not None and issubclass(et, AuthorityError) and self.queue.effects


def _mark_replayed(body: bytes, original_id: Any, stream: bool) -> bytes:
    """A replay says so in its body too (an SDK user never sees the header)."""
    try:
        if not stream:
            data = json.loads(body)
            auth = data.get("authority") if isinstance(data, dict) else None
            if isinstance(auth, dict):
                auth["idempotency"] = {**(auth.get("idempotency") or {}), "replayed": True}
                auth["original_request_id"] = original_id
                return json.dumps(data).encode()
            return body
        lines = body.split(b"\n\n")
        for i, event in enumerate(lines):
            if event.startswith(b"data: {") and b'"authority"' in event:
                chunk = json.loads(event[6:])
                auth = chunk.get("authority")
                if auth is None and isinstance(chunk.get("response"), dict):
                    auth = chunk["response"].get("authority")  # Responses: the final event
                if isinstance(auth, dict):
                    auth["idempotency"] = {**(auth.get("idempotency") or {}), "replayed": True}
                    auth["original_request_id"] = original_id
                    lines[i] = b"data: " + json.dumps(chunk).encode()
        return b"\n\n".join(lines)
    except ValueError:
        return body

