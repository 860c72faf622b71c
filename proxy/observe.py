"""Per-request bookkeeping: the access log line, request metrics and gateway overhead.

The engine already says what it decided, once, in its audit entries; the proxy
listens to those (``ObservedGateway.on_audit``) instead of re-parsing
bodies, so the log line and the metrics agree with the audit log by
construction. The request's ``RequestInfo`` travels in a context variable: the
engine's worker threads (anyio copies the context) and the streaming task see
the same object.
"""

from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from authority_sdk.effects import Decision
from authority_sdk.engine import CallContext, Gateway
from authority_sdk.formats import Answer

from .decide import loggable_path

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from .metrics import Metrics
    from .upstream import Upstreams

__all__ = ["AccessLog", "ObservedGateway", "RequestInfo", "current_info"]

log = logging.getLogger("authority.proxy")

_current: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar(
    "authority_request_info", default=None)

# Probes would drown the log; they still answer, and still count.
_QUIET_PATHS = frozenset({"/healthz", "/metrics"})


@dataclass
class RequestInfo:
    method: str
    path: str
    started: float
    route: str = "unmatched"
    key: str | None = None
    environment: str | None = None
    request_id: str | None = None
    model: str | None = None
    decision: str | None = None
    code: str | None = None
    status: int = 0
    upstream_start: float | None = None
    upstream_end: float | None = None
    streamed: bool = False
    finalize_s: float = 0.0
    trace_id: str | None = None

    def overhead_s(self, ended: float) -> float:
        if self.upstream_start is None or self.upstream_end is None:
            return ended - self.started
        pre = self.upstream_start - self.started
        if self.streamed:
            return pre + self.finalize_s
        return (ended - self.started) - (self.upstream_end - self.upstream_start)


# A client chooses the path and the model: each is cut to this many characters before
# escaping, so a 4 MB model name costs the log line 200 bytes, not 4 MB.
_MAX_FIELD = 200


def _clean(text: str, limit: int = _MAX_FIELD) -> str:
    """One field of one line: a client-chosen path or model can neither forge log lines
    nor make them unbounded."""
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    if not (text.isprintable() and " " not in text):
        text = text.encode("unicode_escape").decode("ascii").replace(" ", "\\x20")
    return f"{text}…[+{cut}]" if cut > 0 else text


def current_info() -> RequestInfo | None:
    return _current.get()


_HEX = frozenset("0123456789abcdef")


def trace_id_of(scope: Scope) -> str | None:
    """The W3C trace id of the caller's ``traceparent`` header, when it is well formed
    (``00-<32 hex>-<16 hex>-<2 hex>``, ids not all zero); anything else is ignored."""
    for name, value in scope.get("headers") or ():
        if name != b"traceparent":
            continue
        if len(value) != 55:
            return None
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            return None
        parts = text.split("-")
        if [len(p) for p in parts] != [2, 32, 16, 2] or parts[0] == "ff":
            return None
        if not set(text.replace("-", "")) <= _HEX:
            return None
        if parts[1] == "0" * 32 or parts[2] == "0" * 16:
            return None
        return parts[1]
    return None


class ObservedGateway(Gateway):
    """The engine, unchanged, with its audit entries feeding the log line and metrics."""

    metrics: Metrics | None = None
    upstreams: Upstreams | None = None  # the proxy's pools for this engine's policy

    def on_audit(self, event: str, fields: dict[str, Any]) -> None:
        try:
            self._observe(event, fields)
        except Exception:  # instrumentation must never turn an answer into an error
            log.exception("metrics hook failed")

    def _observe(self, event: str, fields: dict[str, Any]) -> None:
        details = fields.get("details") or {}
        info = _current.get()
        m = self.metrics
        if event == "request":
            if info is not None:
                info.request_id = fields.get("request_id") or info.request_id
                info.model = fields.get("model") or info.model
                info.decision = fields.get("decision")
                info.code = details.get("code")
            cost = fields.get("cost_actual_usd")
            if m is not None and isinstance(cost, int | float) and cost > 0:
                m.cost.labels(str(fields.get("environment"))).inc(cost)
        elif event == "replay":
            if info is not None:
                info.request_id = fields.get("request_id")
                info.model = fields.get("model")
                info.decision = "replay"
        elif event == "action":
            if m is not None:
                m.actions.labels(str(details.get("status") or "unknown")).inc()
            if log.isEnabledFor(logging.INFO):
                log.info("action request_id=%s action=%s status=%s decision=%s code=%s",
                         fields.get("request_id") or "-",
                         _clean(str(fields.get("action_type") or "-")),
                         details.get("status") or "-", fields.get("decision") or "-",
                         details.get("code") or "none",
                         extra={"fields": {
                             "kind": "action", "request_id": fields.get("request_id"),
                             "trace_id": info.trace_id if info is not None else None,
                             "action_type": fields.get("action_type"),
                             "action_key": details.get("action_key"),
                             "status": details.get("status"), "mode": details.get("mode"),
                             "decision": fields.get("decision"), "code": details.get("code"),
                             "decided_by": details.get("decided_by"),
                             "environment": fields.get("environment")}})
        elif event == "approval" and m is not None:
            m.approvals.labels(str(fields.get("approval_status"))).inc()
        elif event == "upstream":
            if m is not None:
                m.fallbacks.labels(str(details.get("upstream")), str(details.get("code"))).inc()
            # Names from the policy and the gateway's own codes: nothing a client chose.
            log.warning("upstream %s failed (%s, %s); asking %s request_id=%s",
                        details.get("upstream"), details.get("code"),
                        details.get("status_code"), details.get("fallback_to"),
                        fields.get("request_id") or "-")

    def on_trace(self, trace_id: str) -> None:
        # The call's span decides the trace id (the caller's, or a new one): log lines and
        # spans then correlate even when the caller sent no traceparent.
        info = _current.get()
        if info is not None:
            info.trace_id = trace_id

    def finalize_d(self, ctx: CallContext, answer: Answer, *,
                   respond: bool = False) -> Decision[dict[str, Any]]:
        t = time.perf_counter()
        try:
            return (yield from super().finalize_d(ctx, answer, respond=respond))
        finally:
            info = _current.get()
            if info is not None and ctx.stream:
                info.finalize_s += time.perf_counter() - t


class AccessLog:
    """Pure ASGI middleware (streams pass through untouched): one log line per request,
    written when the last byte of the answer has been sent."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = RequestInfo(method=scope["method"], path=loggable_path(scope["path"]),
                           started=time.perf_counter(), trace_id=trace_id_of(scope))
        token = _current.set(info)
        done = False

        async def send_wrapper(message: Message) -> None:
            nonlocal done
            if message["type"] == "http.response.start":
                info.status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done = True
                self._finish(info, scope)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if not done:
                info.status = info.status or 500
                self._finish(info, scope)
                done = True
            raise
        finally:
            if not done:  # the client went away before the answer was complete
                info.status = info.status or 499
                self._finish(info, scope)
            _current.reset(token)

    def _finish(self, info: RequestInfo, scope: Scope) -> None:
        ended = time.perf_counter()
        route = scope.get("route")  # set by the router on the shared scope once matched
        info.route = getattr(route, "path", None) or info.route
        status = info.status
        decision = info.decision or ("allow" if status < 400 else
                                     "deny" if status < 500 else "error")
        code = info.code or ("none" if status < 400 else str(status))
        try:
            self.metrics.requests.labels(info.route, decision, code, str(status)).inc()
            if info.route == "/v1/chat/completions" and info.request_id is not None:
                self.metrics.overhead.observe(max(info.overhead_s(ended), 0.0))
        except Exception:
            log.exception("metrics failed")
        level = logging.DEBUG if info.path in _QUIET_PATHS else logging.INFO
        if log.isEnabledFor(level):
            latency_ms = (ended - info.started) * 1000.0
            log.log(level,
                    "request_id=%s key=%s env=%s method=%s path=%s model=%s decision=%s "
                    "code=%s status=%d latency_ms=%.1f",
                    info.request_id or "-", info.key or "-", info.environment or "-",
                    info.method, _clean(info.path), _clean(info.model or "-"), decision, code,
                    status, latency_ms,
                    extra={"fields": {
                        "kind": "request", "request_id": info.request_id,
                        "trace_id": info.trace_id, "key": info.key,
                        "environment": info.environment, "method": info.method,
                        "path": _clean(info.path, 2000), "route": info.route,
                        "model": _clean(info.model, 2000) if info.model else None,
                        "decision": decision, "code": code, "status": status,
                        "latency_ms": round(latency_ms, 3),
                        "overhead_ms": round(max(info.overhead_s(ended), 0.0) * 1000.0, 3)
                        if info.request_id is not None else None}})
