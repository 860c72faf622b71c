"""The proxy: an OpenAI-compatible front door to the engine (DESIGN.md §1, §9).

An existing app changes only its ``base_url`` and key. The key decides who the
caller is, its environment and its roles; the request bytes go to the same
engine as the SDK's, and its answer goes back as it is. Every error, ours or
the framework's, leaves in OpenAI's shape.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from authority_sdk import control
from authority_sdk.errors import (
    AuthorityError,
    EndpointNotAllowed,
    InvalidRequest,
    RequestTooLarge,
)
from authority_sdk.policy import Policy, load_policy
from authority_sdk.wire import GatewayRequest, GatewayResponse, error_response

from .auth import Identity, KeyRing
from .console import AuditTail, AuditVerify, audit_tail, audit_verify, console_response
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .observe import AccessLog, ObservedGateway, current_info
from .schemas import (
    Approval,
    ApprovalList,
    DecisionBody,
    ErrorBody,
    Execution,
    ExecutionList,
    Health,
    KillSwitchBody,
    KillSwitchChange,
    KillSwitchStatus,
    ModelList,
    ResolveBody,
)
from .upstream import Upstream

__all__ = ["POLICY_ENV", "create_app", "create_app_from_env"]

POLICY_ENV = "AUTHORITY_POLICY"
log = logging.getLogger("authority.proxy")

# Request headers the engine has no business seeing (it records what it is given).
_PRIVATE_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 503)}


def _error_body(status: int, message: str, code: str, type_: str,
                headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code,
                                   "param": None}},
                        status_code=status, headers={**(headers or {}), "x-should-retry": "false"})


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
    """The body, refused with 413 before it is all in memory if it passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise InvalidRequest("Content-Length is not a number") from exc
        if size > limit:
            raise RequestTooLarge(f"the request body is {size} bytes; the limit is {limit}")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise RequestTooLarge(f"the request body passes the limit of {limit} bytes")
    return bytes(buf)


async def _identity(request: Request) -> Identity:
    ident: Identity = request.app.state.keyring.authenticate(request.headers.get("authorization"))
    info = current_info()
    if info is not None:
        info.key = ident.name
        info.environment = ident.caller.environment
    return ident


def _role(*roles: str) -> Any:
    async def check(ident: Annotated[Identity, Depends(_identity)]) -> Identity:
        ident.require(*roles)
        return ident
    return check


Agent = Annotated[Identity, Depends(_role("agent"))]
Approver = Annotated[Identity, Depends(_role("approver"))]
Reader = Annotated[Identity, Depends(_role("approver", "admin"))]
Admin = Annotated[Identity, Depends(_role("admin"))]


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


def create_app(policy: Policy | str | Path) -> FastAPI:
    """The proxy as an ASGI app. ``app.state.gateway`` is its engine."""
    pol = load_policy(policy)
    metrics = Metrics()
    gw = ObservedGateway(pol)
    gw.metrics = metrics
    state: dict[str, Upstream] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["upstream"] = Upstream(pol, metrics)
        # Open the store and the audit log now: a broken one fails the start, not a caller.
        await run_in_threadpool(lambda: gw.audit)
        threading.Thread(target=_warm_up, args=(gw,), daemon=True,
                         name="authority-warm-up").start()
        try:
            yield
        finally:
            await state["upstream"].aclose()
            gw.close()

    app = FastAPI(
        title="AI Authority Gateway",
        version="0.1.0",
        description="OpenAI-compatible proxy gated by policy, and its management API.",
        lifespan=lifespan,
    )
    app.state.gateway = gw
    app.state.metrics = metrics
    app.state.keyring = KeyRing(pol)
    app.add_middleware(AccessLog, metrics=metrics)

    # -- errors: one shape for all -------------------------------------------------------

    @app.exception_handler(AuthorityError)
    async def _authority_error(request: Request, exc: AuthorityError) -> Response:
        resp = error_response(exc)
        _note(resp.decision, exc.code)
        return Response(resp.body, status_code=resp.status_code, headers=resp.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (404, 405) and request.url.path.startswith("/v1/"):
            # An OpenAI endpoint the gateway does not serve: the SDK's transport gives the
            # very same answer (status, code and advice).
            return await _authority_error(request, EndpointNotAllowed.for_request(
                request.method, request.url.path))
        _note("deny", {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, f"http_{exc.status_code}"))
        if exc.status_code == 404:
            return _error_body(404, f"no such endpoint: {request.method} {request.url.path}",
                               "not_found", "not_found_error")
        if exc.status_code == 405:
            return _error_body(405, f"{request.method} is not allowed on {request.url.path}",
                               "method_not_allowed", "invalid_request_error",
                               headers=dict(exc.headers or {}))
        return _error_body(exc.status_code, str(exc.detail), f"http_{exc.status_code}",
                           "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
            f"{e.get('msg')}" for e in exc.errors())
        body_error = any(tuple(e.get("loc", ()))[:1] == ("body",) for e in exc.errors())
        if body_error and "json" not in request.headers.get("content-type", ""):
            problems += " (send the body as JSON with 'Content-Type: application/json')"
        _note("deny", "invalid_request")
        return _error_body(400, f"invalid request: {problems}", "invalid_request",
                           "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_body(500, "internal error in the gateway", "authority_error",
                           "authority_error")

    # -- OpenAI-compatible ---------------------------------------------------------------

    @app.post("/v1/chat/completions", tags=["openai"], responses=_ERRORS,
              summary="Chat completion (streaming or not), gated by policy")
    async def chat_completions(request: Request, ident: Agent) -> Response:
        body = await _read_body(request, pol.proxy.max_body_bytes)
        headers = {k: v for k, v in request.headers.items() if k not in _PRIVATE_HEADERS}
        resp = await gw.ahandle(GatewayRequest(ident.caller, body, headers),
                                state["upstream"].send)
        return _to_response(resp)

    @app.get("/v1/models", tags=["openai"], response_model=ModelList, responses=_ERRORS,
             summary="The models the caller's environment allows")
    async def list_models(ident: Agent) -> dict[str, Any]:
        patterns = pol.environments[ident.caller.environment].models
        return {"object": "list", "data": await state["upstream"].allowed_models(patterns)}

    # -- management ----------------------------------------------------------------------

    @app.get("/authority/approvals", tags=["management"], response_model=ApprovalList,
             responses=_ERRORS)
    def list_approvals(ident: Reader, status: Annotated[str | None, Query(
            description="pending, approved, rejected, expired, executed, failed, in_doubt")]
            = None) -> dict[str, Any]:
        return {"object": "list", "data": control.list_approvals(gw, status)}

    @app.get("/authority/approvals/{approval_id}", tags=["management"],
             response_model=Approval, responses=_ERRORS)
    def get_approval(approval_id: str, ident: Reader) -> dict[str, Any]:
        return control.get_approval(gw, approval_id)

    @app.post("/authority/approvals/{approval_id}/approve", tags=["management"],
              response_model=Approval, responses=_ERRORS,
              summary="Approve a pending action (a gateway-dispatched one executes now)")
    def approve(approval_id: str, ident: Approver,
                body: Annotated[DecisionBody | None, Body()] = None) -> dict[str, Any]:
        return control.approve(gw, approval_id, actor=ident.name,
                               reason=body.reason if body else None)

    @app.post("/authority/approvals/{approval_id}/reject", tags=["management"],
              response_model=Approval, responses=_ERRORS)
    def reject(approval_id: str, ident: Approver,
               body: Annotated[DecisionBody | None, Body()] = None) -> dict[str, Any]:
        return control.reject(gw, approval_id, actor=ident.name,
                              reason=body.reason if body else None)

    @app.get("/authority/actions", tags=["management"], response_model=ExecutionList,
             responses=_ERRORS, summary="Actions the gateway ran (its execution journal)")
    def list_executions(ident: Reader, status: Annotated[str | None, Query(
            description="started, executed, failed, in_doubt")] = None) -> dict[str, Any]:
        return {"object": "list", "data": control.list_executions(gw, status)}

    @app.post("/authority/actions/{action_key}/resolve", tags=["management"],
              response_model=Execution, responses=_ERRORS,
              summary="Settle an in_doubt action as executed or failed (nothing runs)")
    def resolve_execution(action_key: str, body: ResolveBody,
                          ident: Approver) -> dict[str, Any]:
        return control.resolve_execution(gw, action_key, outcome=body.outcome,
                                         actor=ident.name, reason=body.reason)

    @app.get("/authority/kill-switch", tags=["management"], response_model=KillSwitchStatus,
             responses=_ERRORS)
    def kill_switch_status(ident: Admin) -> dict[str, Any]:
        return control.kill_switch_status(gw)

    @app.post("/authority/kill-switch", tags=["management"], response_model=KillSwitchChange,
              responses=_ERRORS, summary="Engage or release the global or one environment's "
              "kill switch")
    def set_kill_switch(body: KillSwitchBody, ident: Admin) -> dict[str, Any]:
        return control.set_kill_switch(gw, body.engaged, actor=ident.name, reason=body.reason,
                                       environment=body.environment)

    @app.get("/authority/audit", tags=["management"], response_model=AuditTail,
             responses=_ERRORS, summary="The last entries of the audit log, oldest first")
    def audit_log_tail(ident: Reader, limit: Annotated[int, Query(
            ge=1, le=1000, description="How many entries")] = 50) -> dict[str, Any]:
        return audit_tail(gw, limit)

    @app.get("/authority/audit/verify", tags=["management"], response_model=AuditVerify,
             responses=_ERRORS, summary="Check the audit log's hash chain and its head")
    def audit_log_verify(ident: Reader) -> dict[str, Any]:
        return audit_verify(gw)

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
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn's worker processes: the policy path comes from the environment."""
    return create_app(os.environ.get(POLICY_ENV) or "authority.yaml")
