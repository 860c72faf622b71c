"""The engine: the one place where execution decisions are made.

Both front doors (the SDK transport and the proxy) hand it the same bytes.
Its work is split into phases with the upstream call in between, so the sync
and async front doors share every decision and differ only in how they wait:

    begin()     parse, idempotency, kill switch, model allowlist, cost, budget
    (upstream)  the front door sends ``ctx.upstream_body`` its own way
    complete()  settle cost, gate every tool call, audit, store the idempotent answer
    fail()      the upstream failed: release, audit, answer 502/504

``handle``/``ahandle`` drive those phases around a ``send`` callable.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audit import AuditLog, redact
from .costs import CostPlan, plan_cost, release, settle
from .errors import (
    AuthorityError,
    AuthorityUnavailable,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InvalidRequest,
    KillSwitchEngaged,
    ModelNotAllowed,
    UpstreamError,
)
from .execution import owner_alive, process_owner
from .executors import ExecutorRegistry
from .gating import ActionOutcome, followup_messages, gate_completion
from .policy import KeyConfig, Policy, load_policy
from .pricing import PriceBook
from .store import Store, open_store
from .tokens import TokenCounter, default_counter
from .wire import Caller, GatewayRequest, GatewayResponse, canonical_json, error_response

__all__ = ["CallContext", "Gateway", "UpstreamReply"]

# An in-flight idempotency claim outlives the slowest upstream call by this much;
# after that a crashed holder's claim is taken over.
_LEASE_MARGIN_S = 30.0


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
    request: dict[str, Any]
    model: str = ""
    started: float = field(default_factory=time.perf_counter)
    idem_key: str | None = None
    idem_store_key: str | None = None
    fingerprint: str | None = None
    plan: CostPlan | None = None
    stream: bool = False
    client_wants_usage: bool = False
    upstream_body: bytes = b""
    done: bool = False
    audit_queue: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def action_base(self) -> str:
        return self.idem_store_key or self.request_id


class Gateway:
    """Policy + state + audit + executors. One per process is plenty; it is thread-safe."""

    def __init__(self, policy: Policy | str | Path | None = None, *, store: Store | None = None,
                 audit: AuditLog | None = None, executors: ExecutorRegistry | None = None,
                 counter: TokenCounter | None = None) -> None:
        self.policy = load_policy(policy) if not isinstance(policy, Policy) else policy
        self._store = store
        self._audit = audit
        self._executors = executors
        self.prices = PriceBook(self.policy.pricing)
        self.counter = counter or default_counter
        self.idempotency_ttl = self.policy.defaults.idempotency_ttl_s
        self._lock = threading.Lock()
        self._keys: dict[str, KeyConfig] = {k.name: k for k in self.policy.keys}
        self._executor_actions = frozenset(n for n, a in self.policy.actions.items()
                                           if a.executor)

    # -- lazily opened resources (a CLI command that only reads the policy opens nothing) --

    @property
    def store(self) -> Store:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = open_store(self.policy)
        return self._store

    @property
    def audit(self) -> AuditLog:
        if self._audit is None:
            store = self.store
            with self._lock:
                if self._audit is None:
                    log = AuditLog(self.policy.audit_path, fsync=self.policy.audit.fsync,
                                   head=store)
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

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    # -- shared helpers --------------------------------------------------------------

    def kill_engaged(self, environment: str) -> bool:
        return self.kill_state(environment) is not None

    def kill_state(self, environment: str) -> dict[str, Any] | None:
        state = self.store.kill_switch_state()
        for scope in ("*", environment):
            s = state.get(scope)
            if s and s.get("engaged"):
                return {"scope": "global" if scope == "*" else scope, **s}
        return None

    def audit_event(self, event: str, **fields: Any) -> dict[str, Any]:
        fields.setdefault("policy_hash", self.policy.hash)
        entry = self.audit.append(event, **fields)
        self.on_audit(event, fields)
        return entry

    def on_audit(self, event: str, fields: dict[str, Any]) -> None:
        """Called after every entry is on the record (the proxy's log line and metrics)."""

    def audit_later(self, ctx: CallContext, event: str, **fields: Any) -> None:
        """Queue an entry for this request; ``flush_audit`` writes the queue in one go."""
        fields.setdefault("policy_hash", self.policy.hash)
        ctx.audit_queue.append((event, fields))

    def flush_audit(self, ctx: CallContext) -> None:
        """Put everything queued on the record. Called before anything with an effect
        outside the gateway happens (an executor runs, an approval is created) and at the
        end of the request, so the record always precedes the effect."""
        if not ctx.audit_queue:
            return
        queued, ctx.audit_queue = ctx.audit_queue, []
        self.audit.append_many(queued)
        for event, fields in queued:
            self.on_audit(event, fields)

    def audit_action(self, ctx: CallContext, out: ActionOutcome) -> None:
        args = redact(_loads_or_raw(out.tool_call["arguments"]), self.policy.redact)
        self.audit_later(
            ctx, "action", request_id=ctx.request_id, environment=ctx.environment, model=ctx.model,
            action_type=out.action_type, decision=out.decision, reason=out.reason,
            approval_status="pending" if out.status == "pending_approval" else None,
            execution_result=redact(_execution_record(out), self.policy.redact),
            actor=ctx.caller.name,
            details={"mode": out.mode, "status": out.status, "code": out.code,
                     "dispatch": out.dispatch, "executor": out.executor,
                     "approval_id": out.approval_id, "action_key": out.action_key,
                     "tool_call_id": out.tool_call["id"], "arguments": args},
        )

    # -- phase 1 -----------------------------------------------------------------------

    def begin(self, req: GatewayRequest) -> CallContext | GatewayResponse:
        request_id = "req_" + secrets.token_hex(12)
        caller = req.caller
        ctx = CallContext(request_id=request_id, caller=caller, environment=caller.environment,
                          request={})
        try:
            ctx.request = _parse_chat_request(req.body)
            ctx.model = ctx.request["model"]
            self.audit  # noqa: B018 -- fail closed before anything is decided or sent
            if caller.environment not in self.policy.environments:
                raise InvalidRequest(f"unknown environment {caller.environment!r}")
            replay = self._claim_idempotency(ctx, req)
            if replay is not None:
                return replay
            kill = self.kill_state(ctx.environment)
            if kill is not None:
                why = f": {kill['reason']}" if kill.get("reason") else ""
                raise KillSwitchEngaged(f"the {kill['scope']} kill switch is engaged{why}")
            env = self.policy.environments[ctx.environment]
            if not any(fnmatch.fnmatchcase(ctx.model, g) for g in env.models):
                raise ModelNotAllowed(
                    f"model {ctx.model!r} is not allowed in environment {ctx.environment!r} "
                    f"(allowed: {', '.join(env.models)})")
            key_cfg = self._keys.get(caller.name)
            ctx.plan = plan_cost(self.policy, ctx.environment,
                                 key_cfg.budget if key_cfg else None, caller.name, ctx.request,
                                 store=self.store, prices=self.prices, counter=self.counter)
            ctx.stream = bool(ctx.request.get("stream"))
            if ctx.stream:
                opts = ctx.request.get("stream_options") or {}
                ctx.client_wants_usage = bool(opts.get("include_usage"))
                # Always priced exactly: the upstream tells us the usage of every stream.
                ctx.request["stream_options"] = {**opts, "include_usage": True}
            # Re-serialise only when the gateway changed the request (hot path).
            changed = ctx.stream or ctx.plan.injected_limit
            ctx.upstream_body = json.dumps(ctx.request).encode() if changed else req.body
            return ctx
        except AuthorityError as exc:
            return self._deny_early(ctx, exc)

    def _claim_idempotency(self, ctx: CallContext, req: GatewayRequest) -> GatewayResponse | None:
        key = req.header("idempotency-key")
        if not key:
            return None
        if len(key) > 255:
            raise InvalidRequest("Idempotency-Key must be at most 255 characters")
        ctx.idem_key = key
        ctx.idem_store_key = f"idem:{ctx.caller.name}:{ctx.environment}:{key}"
        ctx.fingerprint = hashlib.sha256(
            canonical_json([ctx.request, ctx.caller.name, ctx.environment]).encode()
        ).hexdigest()
        lease = self.policy.upstream.timeout_s + _LEASE_MARGIN_S
        got = self.store.idem_begin(ctx.idem_store_key, ctx.fingerprint,
                                    ttl_s=self.idempotency_ttl, lease_s=lease,
                                    owner=process_owner(), owner_dead=_owner_dead)
        if got.state == "new":
            return None
        if got.state == "conflict":
            ctx.idem_store_key = None  # not ours: never release it
            raise IdempotencyKeyReused(
                f"Idempotency-Key {key!r} was already used with a different request body")
        if got.state == "in_progress":
            ctx.idem_store_key = None
            raise IdempotencyInProgress(
                f"a request with Idempotency-Key {key!r} is still in progress; retry later")
        assert got.record is not None
        stored = got.record["response"]
        self.audit_event("replay", request_id=ctx.request_id, environment=ctx.environment,
                         model=ctx.model, decision="allow", reason="idempotent replay",
                         actor=ctx.caller.name,
                         details={"idempotency_key": key,
                                  "original_request_id": stored.get("request_id")})
        headers = dict(stored.get("headers") or {})
        headers["idempotent-replayed"] = "true"
        body = stored["body"].encode() if isinstance(stored["body"], str) else stored["body"]
        return GatewayResponse(stored["status_code"], headers, body,
                               request_id=stored.get("request_id"), decision="replay")

    def _deny_early(self, ctx: CallContext, exc: AuthorityError) -> GatewayResponse:
        """A request that never reached the upstream: audit it, release any claim, answer."""
        self._release_idempotency(ctx)
        decision = "error" if exc.status_code >= 500 or exc.status_code == 400 else "deny"
        try:
            self.audit_event(
                "request", request_id=ctx.request_id, environment=ctx.environment,
                model=ctx.model or None, decision=decision, reason=exc.message,
                cost_estimate_usd=exc.details.get("estimate_usd"), actor=ctx.caller.name,
                details={"code": exc.code, "status_code": exc.status_code,
                         "idempotency_key": ctx.idem_key})
        except AuthorityError as audit_exc:
            return error_response(audit_exc, request_id=ctx.request_id)
        return error_response(exc, request_id=ctx.request_id)

    def _release_idempotency(self, ctx: CallContext) -> None:
        if ctx.idem_store_key and ctx.fingerprint:
            # On failure the lease expires; the answer already says what went wrong.
            with contextlib.suppress(AuthorityError):
                self.store.idem_abandon(ctx.idem_store_key, ctx.fingerprint)
            ctx.idem_store_key = None

    # -- phase 3 -----------------------------------------------------------------------

    def fail(self, ctx: CallContext, exc: AuthorityError,
             upstream: tuple[int, bytes] | None = None) -> GatewayResponse:
        """The upstream did not give a usable answer: nothing was spent, nothing executes."""
        if ctx.plan is not None:
            with contextlib.suppress(AuthorityError):
                release(ctx.plan, self.store)
        self._release_idempotency(ctx)
        ctx.done = True
        status = upstream[0] if upstream else exc.status_code
        try:
            self.audit_event(
                "request", request_id=ctx.request_id, environment=ctx.environment,
                model=ctx.model, decision="error", reason=exc.message,
                cost_estimate_usd=ctx.plan.estimate_usd if ctx.plan else None,
                cost_actual_usd=0.0, actor=ctx.caller.name,
                details={"code": exc.code, "status_code": status,
                         "idempotency_key": ctx.idem_key})
        except AuthorityError as audit_exc:
            return error_response(audit_exc, request_id=ctx.request_id)
        if upstream is not None:  # an upstream 4xx passes through as it came
            resp = GatewayResponse(upstream[0], {"content-type": "application/json",
                                                 "x-request-id": ctx.request_id}, upstream[1],
                                   request_id=ctx.request_id, decision="error", code=exc.code)
            return resp
        return error_response(exc, request_id=ctx.request_id)

    def complete(self, ctx: CallContext, status: int, body: bytes) -> GatewayResponse:
        if status >= 400:
            return self._upstream_status(ctx, status, body)
        try:
            completion = json.loads(body)
            if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list):
                raise ValueError("no choices")
        except ValueError:
            return self.fail(ctx, UpstreamError(
                "the upstream answered with malformed JSON (not a chat completion)",
                code="upstream_malformed_response"))
        try:
            authority = self.finalize(ctx, completion)
        except AuthorityUnavailable as exc:
            # Spent, but not on the record: the answer is withheld and nothing more runs.
            self._release_idempotency(ctx)
            return error_response(exc, request_id=ctx.request_id)
        completion["authority"] = authority
        out = json.dumps(completion).encode()
        headers = {"content-type": "application/json", "x-request-id": ctx.request_id}
        self._store_idempotent(ctx, 200, headers, out)
        return GatewayResponse(200, headers, out, request_id=ctx.request_id,
                               decision=authority["decision"])

    def _upstream_status(self, ctx: CallContext, status: int, body: bytes) -> GatewayResponse:
        if status >= 500:
            return self.fail(ctx, UpstreamError(f"the upstream answered {status}"))
        msg = f"the upstream refused the request ({status})"
        return self.fail(ctx, UpstreamError(msg, code="upstream_rejected"),
                         upstream=(status, body))

    def finalize(self, ctx: CallContext, completion: dict[str, Any]) -> dict[str, Any]:
        """Settle cost, audit the request, gate every tool call. Returns the ``authority``
        field. Shared by the plain and the streamed path, so both decide identically."""
        assert ctx.plan is not None
        ctx.done = True
        usage = completion.get("usage")
        actual = settle(ctx.plan, self.store, usage if isinstance(usage, dict) else None)
        ceiling = ctx.plan.ceiling_usd
        over = ceiling is not None and actual > ceiling
        original_calls = {int(c.get("index", 0)): list((c.get("message") or {}).get("tool_calls")
                                                       or [])
                          for c in completion.get("choices") or []}
        n_calls = sum(len(v) for v in original_calls.values())
        reason = (f"actual cost ${actual:.6f} exceeded the ceiling ${ceiling}; "
                  "no action of this completion runs") if over else None
        # Queued first: the request is on the record before any action can run.
        self.audit_later(
            ctx, "request", request_id=ctx.request_id, environment=ctx.environment, model=ctx.model,
            decision="allow", reason=reason, cost_estimate_usd=ctx.plan.estimate_usd,
            cost_actual_usd=actual, actor=ctx.caller.name,
            details={"tool_calls": n_calls, "idempotency_key": ctx.idem_key,
                     "stream": ctx.stream,
                     "max_output_tokens_set_by_gateway":
                         ctx.plan.output_limit if ctx.plan.injected_limit else None,
                     **({"code": "post_cost_ceiling_exceeded"} if over else {})})
        outcomes = gate_completion(self, ctx, completion, post_ceiling_exceeded=over)
        self.flush_audit(ctx)
        cost = {**ctx.plan.to_authority(), "actual_usd": round(actual, 8)}
        return {
            "request_id": ctx.request_id,
            "environment": ctx.environment,
            "decision": "allow",
            "reason": reason,
            "code": "post_cost_ceiling_exceeded" if over else None,
            "cost": cost,
            "idempotency": {"key": ctx.idem_key, "replayed": False} if ctx.idem_key else None,
            "actions": [o.to_dict() for o in outcomes],
            "followup_messages": followup_messages(completion, original_calls, outcomes,
                                                   self.policy.redact),
        }

    def _store_idempotent(self, ctx: CallContext, status: int, headers: dict[str, str],
                          body: bytes) -> None:
        if not (ctx.idem_store_key and ctx.fingerprint):
            return
        self.store.idem_finish(ctx.idem_store_key, ctx.fingerprint, {
            "status_code": status, "headers": headers, "body": body.decode(),
            "request_id": ctx.request_id}, ttl_s=self.idempotency_ttl)

    # -- drivers -----------------------------------------------------------------------

    def handle(self, req: GatewayRequest,
               send: Callable[[CallContext], UpstreamReply]) -> GatewayResponse:
        try:
            begun = self.begin(req)
            if isinstance(begun, GatewayResponse):
                return begun
            ctx = begun
            try:
                reply = send(ctx)
            except AuthorityError as exc:
                return self.fail(ctx, exc)
            except BaseException:
                self.fail(ctx, UpstreamError("the call to the upstream was interrupted"))
                raise
            if ctx.stream and reply.status_code < 300 and reply.chunks is not None:
                from .streaming import StreamGate

                return StreamGate(self, ctx, reply).response()
            return self.complete(ctx, reply.status_code, reply.body)
        except AuthorityUnavailable as exc:
            return error_response(exc)

    async def ahandle(self, req: GatewayRequest,
                      send: Callable[[CallContext], Awaitable[UpstreamReply]]) -> GatewayResponse:
        """Async front doors: the decisions run on the event loop (they take a fraction
        of a millisecond: a few SQLite reads and writes, one audit append). Only a
        completion that may run an executor, which can wait seconds on a webhook or an
        SMTP server, is handed to a worker thread. Handing every request to a thread
        cost far more than it saved: under load each hop waits for the GIL."""
        try:
            begun = self.begin(req)
            if isinstance(begun, GatewayResponse):
                return begun
            ctx = begun
            try:
                reply = await send(ctx)
            except AuthorityError as exc:
                return self.fail(ctx, exc)
            except BaseException:
                self.fail(ctx, UpstreamError("the call to the upstream was interrupted"))
                raise
            if ctx.stream and reply.status_code < 300 and reply.achunks is not None:
                from .streaming import StreamGate

                return StreamGate(self, ctx, reply).aresponse()
            if self.may_execute(reply.body):
                from anyio.to_thread import run_sync

                return await run_sync(self.complete, ctx, reply.status_code, reply.body)
            return self.complete(ctx, reply.status_code, reply.body)
        except AuthorityUnavailable as exc:
            return error_response(exc)

    def may_execute(self, completion: bytes | None = None,
                    tool_names: Iterable[str] | None = None) -> bool:
        """Could gating this answer run an executor (block for seconds)? Errs towards yes."""
        if not self._executor_actions:
            return False
        if tool_names is not None:
            return any(n in self._executor_actions for n in tool_names)
        return completion is None or b"tool_calls" in completion


def _owner_dead(owner: dict[str, Any]) -> bool:
    return not owner_alive(owner)


def _parse_chat_request(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", code="invalid_request")
    msgs = data.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise InvalidRequest("'messages' is required and must be a non-empty list of objects")
    tools = data.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list")
    return data


def _loads_or_raw(s: str) -> Any:
    try:
        return json.loads(s)
    except (ValueError, TypeError):
        return s


def _execution_record(out: ActionOutcome) -> dict[str, Any] | None:
    if out.status in ("executed", "failed", "in_doubt", "simulated"):
        return {"status": out.status, "result": out.result}
    if out.status == "denied" and out.code == "duplicate_action":
        return {"status": "denied", "duplicate_of": (out.result or {}).get("duplicate_of")}
    return None
