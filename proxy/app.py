"""The proxy: an OpenAI-compatible front door to the engine (DESIGN.md §1, §9).

An existing app changes only its ``base_url`` and key. The key decides who the
caller is, its environment and its roles; the request bytes go to the same
engine as the SDK's, and its answer goes back as it is. Every error, ours or
the framework's, leaves in OpenAI's shape.

The input boundary (guard.py) authenticates and bounds every request before
any body is read. Management routes act within the key's scope (control.py)
and take strict bodies: no unknown fields, no duplicate keys, no coercion
(``{"engaged": 0}`` is a 400), bounded strings. An authenticated caller's
refusal is audited (refusals.py). ``/docs`` and ``/redoc`` are off: their pages
load scripts from a CDN; ``/openapi.json`` stays for tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, cast

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from authority_sdk import control
from authority_sdk.errors import (
    AuthorityError,
    EndpointNotAllowed,
    InvalidRequest,
    NotFound,
    RequestTooLarge,
)
from authority_sdk.paging import MAX_CURSOR_CHARS, MAX_LIMIT
from authority_sdk.policy import POLICY_ENV, Policy, default_policy_path, load_policy
from authority_sdk.render import clip, escape_surrogates
from authority_sdk.strictjson import StrictJSONError, unique_pairs
from authority_sdk.wire import GatewayRequest, GatewayResponse, error_response

from .auth import Identity, KeyRing
from .console import AuditTail, AuditVerify, audit_tail, audit_verify, console_response
from .decide import DECIDE_PATH, decide_get, decide_post, loggable_path
from .fastpath import PRIVATE_HEADERS, GatedDoors
from .guard import IDENTITY, MANAGEMENT_MAX_BODY, InputGuard, RoleCheck
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .observe import AccessLog, ObservedGateway, current_info
from .refusals import AUDITED_STATUSES, audit_refusal
from .reload import LiveGateway, Reloader
from .schemas import (
    Approval,
    ApprovalList,
    DecisionBody,
    ErrorBody,
    EvaluateBody,
    Evaluation,
    Health,
    JournalEntry,
    JournalEntryList,
    KillSwitchBody,
    KillSwitchChange,
    KillSwitchStatus,
    ModelList,
    ResolveBody,
)
from .upstream import Upstreams

# Names this machine in replica names (default: the host name), e.g. the pod's name.
REPLICA_ENV = "AUTHORITY_REPLICA"

__all__ = ["POLICY_ENV", "create_app", "create_app_from_env"]

log = logging.getLogger("authority.proxy")


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 405, 409, 413, 503)}

# OpenAI's request, as far as the gateway reads it (the rest passes through untouched).
_CHAT_BODY: dict[str, Any] = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"],
            "properties": {"role": {"type": "string"},
                           "content": {"type": ["string", "null"]}}}},
        "max_tokens": {"type": "integer", "minimum": 1},
        "stream": {"type": "boolean"}}}}}}
_CHAT_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS, **{code: {"model": ErrorBody} for code in (422, 502, 504)}}

_MAX_ID = 256
ApprovalId = Annotated[str, PathParam(max_length=_MAX_ID)]
ActionKey = Annotated[str, PathParam(max_length=_MAX_ID)]
Limit = Annotated[int | None, Query(ge=1, le=MAX_LIMIT, description=(
    f"Page size (default 50, at most {MAX_LIMIT})."))]
Cursor = Annotated[str | None, Query(max_length=MAX_CURSOR_CHARS, description=(
    "The next_cursor of the previous page; omit for the first page."))]


class MethodNotAllowed(InvalidRequest):
    status_code = 405
    default_code = "method_not_allowed"


def _safe(text: str, limit: int = 200) -> str:
    """A client-supplied value fit to quote in an error: clipped and printable."""
    return escape_surrogates(clip(text, limit))


def _note(decision: str | None, code: str | None, request_id: str | None = None) -> None:
    info = current_info()
    if info is None:
        return
    info.decision = info.decision or decision
    info.code = info.code or code
    info.request_id = info.request_id or request_id


def _to_response(resp: GatewayResponse) -> Response:
    _note(resp.decision, resp.code, resp.request_id)
    if resp.astream is not None:
        headers = {k: v for k, v in resp.headers.items() if k.lower() != "content-type"}
        return StreamingResponse(resp.astream, status_code=resp.status_code, headers=headers,
                                 media_type="text/event-stream")
    return Response(resp.body, status_code=resp.status_code, headers=resp.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 if it passes ``limit``. The guard has already refused a
    declared or streamed size above it; this holds should the app run without it."""
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise RequestTooLarge(f"the request body passes the limit of {limit} bytes")
    return bytes(buf)


# Long-poll of one approval: bounded, so a waiting client holds a connection at most this long.
MAX_WAIT_S = 60.0
POLL_S = 0.25


def _unsettled(approval: dict[str, Any]) -> bool:
    """Still moving: pending, or approved and being executed by the gateway right now (the
    caller waits for the outcome, not for the moment between the decision and the effect)."""
    status = approval.get("status")
    return status == "pending" or (status == "approved" and approval.get("dispatch") == "gateway"
                                   and bool(approval.get("executor")))


Agent = Annotated[Identity, Depends(RoleCheck("agent"))]
Approver = Annotated[Identity, Depends(RoleCheck("approver"))]
Reader = Annotated[Identity, Depends(RoleCheck("approver", "admin"))]
AppOrReader = Annotated[Identity, Depends(RoleCheck("agent", "approver", "admin"))]
Admin = Annotated[Identity, Depends(RoleCheck("admin"))]


async def _strict_json(request: Request) -> None:
    """A management body means one thing: a key given twice is refused, not last-wins."""
    body = await request.body()  # already read (and bounded) by FastAPI; cached
    if not body.strip():
        return
    try:
        json.loads(body, object_pairs_hook=unique_pairs)
    except StrictJSONError as exc:
        raise InvalidRequest(f"invalid request: {exc} in the body") from None
    except (ValueError, RecursionError):
        return  # not JSON: the body's own validation answers with the details


StrictJson = [Depends(_strict_json)]


def _warm_up(gw: ObservedGateway) -> None:
    """Load the price map and tokenizers now, not on the first caller's request."""
    try:
        for env in gw.policy.environments.values():
            for pattern in env.models:
                if not any(c in pattern for c in "*?["):
                    gw.prices.lookup(pattern)
                    gw.counter.count_prompt(pattern, [{"role": "user", "content": "hi"}], None)
    except Exception:  # a slow first request is better than a proxy that will not start
        log.debug("warm-up failed", exc_info=True)


def _join_replicas(gw: ObservedGateway) -> str | None:
    """On a store shared by several replicas, name this process's replica (its claims
    carry the name) and send its first heartbeat before it takes a request."""
    from authority_sdk.liveness import HOST, replica_lease_name, set_replica
    from authority_sdk.worker import replica_lease_s

    store = gw.store
    if not getattr(store, "shared", False):
        return None
    name = f"{os.environ.get(REPLICA_ENV) or HOST}:{os.getpid()}:{secrets.token_hex(3)}"
    set_replica(name)
    store.lease_acquire(replica_lease_name(name), name,
                        ttl_s=replica_lease_s(gw.policy.worker.interval_s))
    return name


async def _watch_policy(reloader: Reloader, every_s: float = 1.0) -> None:
    """SIGHUP, or a change of the file on disk (checked each second), reloads the policy."""
    loop = asyncio.get_running_loop()
    hup = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, hup.set)
    try:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(hup.wait(), every_s)
            trigger = "SIGHUP" if hup.is_set() else "file"
            hup.clear()
            try:
                if trigger == "file" and not await run_in_threadpool(reloader.changed_on_disk):
                    continue
                await run_in_threadpool(reloader.reload, trigger)
            except Exception:  # the watch must outlive any one attempt
                log.exception("policy reload failed; the policy in force stays")
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGHUP)


def _without_native_telemetry() -> dict[str, Any]:
    """FastAPI's own OpenTelemetry (FastAPI 0.16x and later) turns itself on whenever the
    process has global providers (``opentelemetry-instrument``, or its own
    ``FASTAPI_OTEL_AUTO_CONFIGURE``) and puts every request's path in a span — a decision
    link's token, the credential that decides, among them. The gateway's telemetry
    (``authority_sdk.telemetry``) exports what it decides and nothing secret: FastAPI's is
    off, where that FastAPI has it (which also spares each request its checks)."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False,
                          "auto_configure": False}}


def create_app(policy: Policy | str | Path) -> FastAPI:
    """The proxy as an ASGI app. ``app.state.gateway`` is its engine."""
    pol = load_policy(policy)
    metrics = Metrics()
    engine = ObservedGateway(pol)
    engine.metrics = metrics
    # Every handler reads the engine in force through this; a chat request keeps the one
    # it started with (``gw.ahandle`` is bound once), so a reload never changes its policy.
    gw = LiveGateway(engine)
    # Each engine sends through the pools of its own policy, and runs its own executors; a
    # reload retires the old ones, closed once the requests that started on it are done.
    engine.upstreams = Upstreams(pol, metrics, engine.executors)
    pool_sets: list[Upstreams] = [engine.upstreams]

    def attach_pools(new: ObservedGateway) -> None:
        new.upstreams = Upstreams(new.policy, metrics, new.executors)
        pool_sets[:] = [p for p in pool_sets if not p.closed] + [new.upstreams]

    def retire_pools(old: ObservedGateway) -> None:
        if old.upstreams is not None:
            old.upstreams.retire()
    policy_path = None if isinstance(policy, Policy) else Path(default_policy_path(policy))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Open the store and the audit log now: a broken one fails the start, not a caller.
        await run_in_threadpool(lambda: gw.audit)
        from authority_sdk.worker import Worker

        replica = await run_in_threadpool(_join_replicas, gw.current)
        # The first round (recovery of what a crash left) before the first caller is served.
        # The live gateway, not one engine: the worker follows reloads.
        worker = Worker(cast("ObservedGateway", gw), interval_s=pol.worker.interval_s,
                        replica=replica)
        await run_in_threadpool(worker.tick)
        worker.start()
        # Before the first caller, not beside it: a warm-up thread parsing the price map holds
        # the GIL long enough to starve the event loop, and upstream timeouts fire on requests
        # that were answered in time.
        await run_in_threadpool(_warm_up, gw.current)
        watch = None
        if policy_path is not None:
            reloader = Reloader(policy_path.resolve(), gw, keyring, attach=attach_pools,
                                retire=retire_pools)
            app.state.reloader = reloader
            watch = asyncio.get_running_loop().create_task(_watch_policy(reloader))
        try:
            yield
        finally:
            if watch is not None:
                watch.cancel()
            await gw.current.finished()  # finished answers still being written
            await run_in_threadpool(worker.stop)
            for pools in pool_sets:
                await pools.aclose()
            # A network store's async pool lives on this loop: close it here, awaited.
            aclose = getattr(gw.store.aio, "aclose", None)
            if aclose is not None:
                await aclose()
            gw.close()

    app = FastAPI(
        title="AI Authority Gateway",
        version="0.1.0",
        description="OpenAI-compatible proxy gated by policy, and its management API.",
        lifespan=lifespan,
        # Their pages load scripts from a CDN: no third-party script is served here.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        **_without_native_telemetry(),
    )
    keyring = KeyRing(pol)
    app.state.gateway = gw
    app.state.metrics = metrics
    app.state.keyring = keyring

    async def on_refusal(ident: Identity, exc: AuthorityError, method: str,
                         path: str) -> AuthorityError | None:
        return await audit_refusal(gw.current, ident, exc, method, path)

    # Innermost: the gated doors, once the guard has let the request in (fastpath.py).
    async def handle_gated(req: GatewayRequest) -> GatewayResponse:
        # The engine and its pools are taken once: a reload never changes them mid-request.
        current = gw.current
        pools = current.upstreams
        assert pools is not None
        pools.enter()
        try:
            # The finished answer of a held answer is written as the response goes out.
            resp = await current.ahandle(req, pools.send, finish_later=True)
        except BaseException:
            pools.leave()
            raise
        if resp.astream is not None:
            return dataclasses.replace(resp, astream=pools.held(resp.astream))
        pools.leave()
        return resp

    app.add_middleware(GatedDoors, handle=handle_gated,
                       answer_error=lambda ident, exc, method, path: _answer_for(
                           ident, exc, method, path),
                       to_response=_to_response, max_body=pol.proxy.max_body_bytes)
    # Added before the access log, so it runs inside it: its refusals are logged and counted.
    app.add_middleware(InputGuard, keyring=keyring, routes=lambda: app.routes,
                       max_body=pol.proxy.max_body_bytes, on_refusal=on_refusal)
    app.add_middleware(AccessLog, metrics=metrics)

    # -- errors: one shape for all -------------------------------------------------------

    async def _answer_for(ident: Identity | None, exc: AuthorityError, method: str, path: str,
                          headers: dict[str, str] | None = None) -> Response:
        if ident is not None and exc.status_code in AUDITED_STATUSES:
            replaced = await audit_refusal(gw.current, ident, exc, method, path)
            exc = replaced or exc
        rid = exc.details.get("request_id")
        resp = error_response(exc, request_id=rid if isinstance(rid, str) else None)
        _note(resp.decision, exc.code, resp.request_id)
        return Response(resp.body, status_code=resp.status_code,
                        headers={**resp.headers, **(headers or {})})

    async def _answer(request: Request, exc: AuthorityError,
                      headers: dict[str, str] | None = None) -> Response:
        return await _answer_for(request.scope.get(IDENTITY), exc, request.method,
                                 request.url.path, headers)

    @app.exception_handler(AuthorityError)
    async def _authority_error(request: Request, exc: AuthorityError) -> Response:
        return await _answer(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (404, 405) and request.url.path.startswith("/v1/"):
            # An OpenAI endpoint the gateway does not serve: the SDK's transport gives the
            # very same answer (status, code and advice).
            return await _answer(request, EndpointNotAllowed.for_request(
                request.method, request.url.path))
        where = f"{_safe(request.method, 16)} {_safe(request.url.path)}"
        if exc.status_code == 404:
            return await _answer(request, NotFound(f"no such endpoint: {where}"))
        if exc.status_code == 405:
            return await _answer(request, MethodNotAllowed(f"{where}: method not allowed"),
                                 headers=dict(exc.headers or {}))
        # FastAPI raises 400 for a body it cannot parse at all; nothing else is expected.
        return await _answer(request, InvalidRequest(
            f"invalid request: {_safe(str(exc.detail))}",
            code="invalid_request" if exc.status_code == 400 else f"http_{exc.status_code}"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        problems = "; ".join(
            f"{'.'.join(_safe(str(p), 64) for p in e.get('loc', ()) if p != 'body') or 'body'}"
            f": {_safe(str(e.get('msg')))}" for e in errors[:5])
        if len(errors) > 5:
            problems += f"; and {len(errors) - 5} more"
        body_error = any(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors)
        if body_error and "json" not in request.headers.get("content-type", ""):
            problems += " (send the body as JSON with 'Content-Type: application/json')"
        return await _answer(request, InvalidRequest(f"invalid request: {problems}"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", _safe(request.method, 16),
                      _safe(loggable_path(request.url.path)))
        return await _answer(request, AuthorityError("internal error in the gateway"))

    # -- OpenAI-compatible ---------------------------------------------------------------

    @app.post("/v1/chat/completions", tags=["openai"], responses=_CHAT_ERRORS,
              openapi_extra={"requestBody": _CHAT_BODY},
              summary="Chat completion (streaming or not), gated by policy")
    async def chat_completions(request: Request, ident: Agent) -> Response:
        body = await _read_body(request, pol.proxy.max_body_bytes)
        headers = {k: v for k, v in request.headers.items() if k not in PRIVATE_HEADERS}
        resp = await handle_gated(GatewayRequest(ident.caller, body, headers,
                                                 path=request.url.path))
        return _to_response(resp)

    @app.post("/v1/embeddings", tags=["openai"], responses=_CHAT_ERRORS,
              summary="Embeddings: model allowlist, cost of the input, budgets and audit")
    async def embeddings(request: Request, ident: Agent) -> Response:
        return await chat_completions(request, ident)

    @app.post("/v1/responses", tags=["openai"], responses=_CHAT_ERRORS,
              summary="The Responses API (streaming or not), gated like chat completions")
    async def responses(request: Request, ident: Agent) -> Response:
        return await chat_completions(request, ident)

    @app.get("/v1/responses/{response_id}", tags=["openai"], responses=_ERRORS,
             summary="A response this gateway served to this key's environment, as the app "
             "got it (withheld calls still withheld)")
    async def stored_response(response_id: Annotated[str, PathParam(max_length=_MAX_ID)],
                              request: Request, ident: Agent) -> Response:
        return _to_response(await gw.astored_response(GatewayRequest(
            ident.caller, b"", {}, path=request.url.path, method="GET")))

    @app.get("/v1/responses/{response_id}/input_items", tags=["openai"], responses=_ERRORS,
             summary="The input of a response this gateway served to this key's environment")
    async def stored_input_items(response_id: Annotated[str, PathParam(max_length=_MAX_ID)],
                                 request: Request, ident: Agent) -> Response:
        return await stored_response(response_id, request, ident)

    @app.get("/v1/models", tags=["openai"], response_model=ModelList, responses=_ERRORS,
             summary="The models the caller's environment allows")
    async def list_models(ident: Agent) -> dict[str, Any]:
        current = gw.current
        patterns = current.policy.environments[ident.caller.environment].models
        pools = current.upstreams
        assert pools is not None
        pools.enter()
        try:
            return {"object": "list", "data": await pools.allowed_models(patterns)}
        finally:
            pools.leave()

    # -- management ----------------------------------------------------------------------
    # Every route passes the key's scope: a key bound to an environment reads and acts
    # only there (control.py).

    @app.get("/authority/approvals", tags=["management"], response_model=ApprovalList,
             responses=_ERRORS, summary="Approvals, newest first, one page at a time")
    def list_approvals(ident: Reader, status: Annotated[str | None, Query(
            max_length=200, description="pending, approved, rejected, expired, executed, "
            "failed, in_doubt, or several separated by commas")] = None,
            limit: Limit = None, cursor: Cursor = None) -> dict[str, Any]:
        page = control.list_approvals(gw.current, status, limit=limit, cursor=cursor,
                                      scope=ident.scope)
        return {"object": "list", "data": page, "next_cursor": page.next_cursor}

    @app.get("/authority/approvals/{approval_id}", tags=["management"],
             response_model=Approval, responses=_ERRORS)
    async def get_approval(approval_id: ApprovalId, ident: AppOrReader, wait: Annotated[
            float, Query(ge=0, le=MAX_WAIT_S, description="Long-poll: hold the answer up "
                         f"to this many seconds (at most {MAX_WAIT_S}) while the approval is "
                         "pending (or approved and being executed by the gateway); it returns "
                         "as soon as it is rejected, expired or approved with its outcome")] = 0
            ) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            got = await run_in_threadpool(control.get_approval, gw.current, approval_id,
                                          scope=ident.scope)
            if not ident.caller.roles & {"approver", "admin"} \
                    and got.get("requested_by") != ident.name:
                # An app's key learns the fate of its own actions only (DESIGN.md §4).
                raise NotFound(f"no approval {approval_id!r}")
            left = deadline - asyncio.get_running_loop().time()
            if not _unsettled(got) or left <= 0:
                return got
            # Polling the store, not a wake-up: a decision may come from another process.
            await asyncio.sleep(min(POLL_S, left))

    @app.post("/authority/approvals/{approval_id}/approve", tags=["management"],
              response_model=Approval, responses=_ERRORS, dependencies=StrictJson,
              summary="Approve a pending action (a gateway-dispatched one executes now)")
    def approve(approval_id: ApprovalId, ident: Approver,
                body: Annotated[DecisionBody | None, Body()] = None) -> dict[str, Any]:
        return control.approve(gw.current, approval_id, actor=ident.name,
                               reason=body.reason if body else None, scope=ident.scope)

    @app.post("/authority/approvals/{approval_id}/reject", tags=["management"],
              response_model=Approval, responses=_ERRORS, dependencies=StrictJson)
    def reject(approval_id: ApprovalId, ident: Approver,
               body: Annotated[DecisionBody | None, Body()] = None) -> dict[str, Any]:
        return control.reject(gw.current, approval_id, actor=ident.name,
                              reason=body.reason if body else None, scope=ident.scope)

    @app.get("/authority/actions", tags=["management"], response_model=JournalEntryList,
             responses=_ERRORS, summary="Actions the gateway ran (its execution journal)")
    def list_executions(ident: Reader, status: Annotated[str | None, Query(
            max_length=200, description="started, executed, failed, in_doubt, or several "
            "separated by commas")] = None,
            limit: Limit = None, cursor: Cursor = None) -> dict[str, Any]:
        page = control.list_executions(gw.current, status, limit=limit, cursor=cursor,
                                       scope=ident.scope)
        return {"object": "list", "data": page, "next_cursor": page.next_cursor}

    @app.post("/authority/actions/{action_key}/resolve", tags=["management"],
              response_model=JournalEntry, responses=_ERRORS, dependencies=StrictJson,
              summary="Settle an in_doubt action as executed or failed (nothing runs)")
    def resolve_execution(action_key: ActionKey, body: ResolveBody,
                          ident: Approver) -> dict[str, Any]:
        return control.resolve_execution(gw.current, action_key, outcome=body.outcome,
                                         actor=ident.name, reason=body.reason,
                                         scope=ident.scope)

    @app.post("/authority/policy/evaluate", tags=["management"], response_model=Evaluation,
              responses=_ERRORS, dependencies=StrictJson,
              summary="Dry-run one action against the policy in force (nothing runs)")
    def evaluate(body: EvaluateBody, ident: Admin) -> dict[str, Any]:
        return control.evaluate_action(gw.current, body.action, body.arguments,
                                       environment=body.environment, scope=ident.scope)

    @app.get("/authority/kill-switch", tags=["management"], response_model=KillSwitchStatus,
             responses=_ERRORS, summary="The global switch and those of the key's "
             "environments")
    def kill_switch_status(ident: Admin) -> dict[str, Any]:
        return control.kill_switch_status(gw.current, scope=ident.scope)

    @app.post("/authority/kill-switch", tags=["management"], response_model=KillSwitchChange,
              responses=_ERRORS, dependencies=StrictJson,
              summary="Engage or release the global (unscoped admin only) or one "
              "environment's kill switch")
    def set_kill_switch(body: KillSwitchBody, ident: Admin) -> dict[str, Any]:
        return control.set_kill_switch(gw.current, body.engaged, actor=ident.name,
                                       reason=body.reason, environment=body.environment,
                                       scope=ident.scope)

    @app.get("/authority/audit", tags=["management"], response_model=AuditTail,
             responses=_ERRORS, summary="The last entries of the audit log, oldest first")
    def audit_log_tail(ident: Reader, limit: Annotated[int, Query(
            ge=1, le=1000, description="How many entries (at most 1000)")] = 50,
            cursor: Cursor = None) -> dict[str, Any]:
        return audit_tail(gw.current, limit, cursor=cursor, scope=ident.scope)

    @app.get("/authority/audit/verify", tags=["management"], response_model=AuditVerify,
             responses=_ERRORS, summary="Check the audit log's hash chain and its head")
    def audit_log_verify(ident: Reader) -> dict[str, Any]:
        return audit_verify(gw.current, scope=ident.scope)

    # A one-time link is its own credential (no key): GET shows, only the page's POST decides.
    @app.get(DECIDE_PATH, include_in_schema=False)
    def decide_page(token: Annotated[str, PathParam(max_length=64)]) -> Response:
        return decide_get(gw.current, token)

    @app.post(DECIDE_PATH, include_in_schema=False)
    async def decide(request: Request,
                     token: Annotated[str, PathParam(max_length=64)]) -> Response:
        raw = await _read_body(request, MANAGEMENT_MAX_BODY)
        return await run_in_threadpool(decide_post, gw.current, token, request, raw)

    @app.get("/authority/ui", include_in_schema=False)
    async def console() -> Response:
        # No key to load the page: it holds no data, and every call it makes needs one.
        return console_response()

    @app.get("/healthz", tags=["management"], response_model=Health,
             responses={503: {"model": ErrorBody}})
    async def healthz() -> dict[str, Any]:
        await run_in_threadpool(gw.store.health)
        return {"status": "ok", "policy_hash": pol.hash}

    @app.get("/metrics", tags=["management"], response_class=Response,
             summary="Prometheus metrics")
    async def prometheus() -> Response:
        body = metrics.render()
        if pol.audit.stream:
            body += (await run_in_threadpool(_audit_stream_metrics)).encode()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def _audit_stream_metrics() -> str:
        from authority_sdk.audit.lifecycle import stream_metrics

        try:
            head = gw.store.get_audit_head()
        except AuthorityError:
            return ""  # the store is down: /healthz says so; the other metrics still answer
        return stream_metrics(pol, head[0] if head else 0)

    return app


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn's worker processes: the policy path comes from the environment."""
    from .logformat import lean_records

    lean_records()  # a spawned worker starts with logging's defaults
    return create_app(default_policy_path())
