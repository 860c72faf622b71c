"""OpenTelemetry traces and metrics, after the GenAI semantic conventions. Off by default.

On (``telemetry.otel: true`` in the policy, or ``$OTEL_EXPORTER_OTLP_ENDPOINT`` set while
the policy leaves ``otel`` unset), the engine — so both doors, SDK and proxy — records:

- a CLIENT span per model call, ``{gen_ai.operation.name} {gen_ai.request.model}``
  (``chat gpt-4o-mini``), a child of the caller's W3C ``traceparent`` (or of the
  application's current span, in the SDK); its context goes upstream as ``traceparent``;
- an INTERNAL span per action of the answer, ``execute_tool {gen_ai.tool.name}``, under
  which an executor runs (a webhook receives its ``traceparent``, a notification queued
  for an approval carries it to its receiver);
- the gateway's decisions as ``authority.*`` attributes (mode, rule, status, approval id,
  cost, idempotent replay, refusal code);
- the ``gen_ai.client.token.usage`` and ``gen_ai.client.operation.duration`` histograms and
  ``authority.gateway.overhead`` (the gateway's own time: total minus the upstream's wait).

Prompts, answers and arguments stay out of spans unless ``telemetry.capture_content`` is
true (arguments redacted by the policy's ``redact`` even then).

Nothing of OpenTelemetry is imported unless telemetry is on: the engine holds ``None``
and its hot path checks that once per request (a benchmarked path, and an optional
extra: ``pip install 'ai-authority-gateway[otel]'``).
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

from .audit import redact
from .errors import PolicyError

if TYPE_CHECKING:
    from .engine import CallContext
    from .errors import AuthorityError
    from .formats.base import Answer, Call
    from .policy import Policy, TelemetryConfig
    from .records import ActionOutcome
    from .wire import GatewayRequest

__all__ = [
    "ActionSpan",
    "CallTrace",
    "Telemetry",
    "stored_trace",
    "telemetry_for",
    "trace_headers",
    "with_trace",
]

log = logging.getLogger("authority.telemetry")

# Client- or model-chosen strings (a model name, a tool name, a refusal code) are cut to
# this in span names and attributes: a 4 MB model name costs a span 200 characters.
_MAX_TEXT = 200
# Captured content (opt-in) is cut too: one prompt must not make an export batch unsendable.
_MAX_CONTENT = 32 * 1024
# Bucket boundaries the GenAI conventions advise for these two histograms.
_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                  16777216, 67108864]
_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92]
_OVERHEAD_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]

_OPERATION = {"chat.completions": "chat", "responses": "chat", "embeddings": "embeddings"}
_PROVIDERS = (("openai.azure.com", "azure.ai.openai"), ("api.openai.com", "openai"),
              ("api.anthropic.com", "anthropic"), ("api.mistral.ai", "mistral_ai"),
              ("api.groq.com", "groq"), ("api.deepseek.com", "deepseek"),
              ("api.x.ai", "x_ai"), ("api.perplexity.ai", "perplexity"))

# The W3C headers of the action running now (its span's context), for whatever the action
# sends out: read by executors and the notification queue. None while telemetry is off.
_action_headers: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "authority_action_trace", default=None)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _guarded(fn: Callable[_P, _R]) -> Callable[_P, _R | None]:
    """Instrumentation never turns an answer into an error: a failure here is logged and
    the request goes on without it (None where an object was due)."""

    @functools.wraps(fn)
    def safe(*args: _P.args, **kwargs: _P.kwargs) -> _R | None:
        try:
            return fn(*args, **kwargs)
        except Exception:
            log.warning("telemetry failed in %s; the request goes on", fn.__qualname__,
                        exc_info=True)
            return None

    return safe


def trace_headers() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of the action being handled now; ``{}`` when
    telemetry is off or no action is running."""
    headers = _action_headers.get()
    return dict(headers) if headers else {}


def with_trace(headers: dict[str, str],
               trace: Mapping[str, str] | None = None) -> dict[str, str]:
    """``headers`` with the W3C context of ``trace`` (default: the action running now), in
    place of any configured spelling of the same names; unchanged when there is none."""
    if trace is None:
        trace = _action_headers.get()
    if not trace:
        return headers
    out = {k: v for k, v in headers.items() if k.lower() not in trace}
    out.update(trace)
    return out


_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def stored_trace(item: Mapping[str, Any]) -> dict[str, str]:
    """The W3C context an outbox item was queued under (``{}`` if none, or not well
    formed): it is sent as headers, so nothing but a valid header value gets through."""
    trace = item.get("trace")
    if not isinstance(trace, dict):
        return {}
    parent = trace.get("traceparent")
    if not (isinstance(parent, str) and _TRACEPARENT.fullmatch(parent)):
        return {}
    out = {"traceparent": parent}
    state = trace.get("tracestate")
    if isinstance(state, str) and 0 < len(state) <= 512 and state.isprintable():
        out["tracestate"] = state
    return out


def _cut(text: str, limit: int = _MAX_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + f"…[+{len(text) - limit}]"


def _content(obj: Any) -> str:
    try:
        text = json.dumps(obj, ensure_ascii=False, default=str)
    except ValueError:
        text = repr(obj)
    return _cut(text, _MAX_CONTENT)


def _enabled(cfg: TelemetryConfig, environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if cfg.otel is not None:
        return cfg.otel
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _provider_name(cfg: TelemetryConfig, base_url: str) -> str:
    if cfg.provider_name:
        return cfg.provider_name
    host = (urlsplit(base_url).hostname or "").lower()
    for suffix, name in _PROVIDERS:
        if host == suffix or host.endswith("." + suffix):
            return name
    return "openai"  # an OpenAI-compatible server, spoken to in OpenAI's wire format


class _Backend:
    """A tracer and the instruments, shared by every engine of the process that exports to
    the same place (a policy reload builds a new engine, never a second pipeline)."""

    def __init__(self, tracer_provider: Any, meter_provider: Any,
                 owned: tuple[Any, ...] = ()) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        version = _version()
        self.tracer = tracer_provider.get_tracer("authority_sdk", version)
        meter = meter_provider.get_meter("authority_sdk", version)
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Number of input and output tokens used",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS)
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="GenAI operation duration, as the gateway's caller saw it",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS)
        self.overhead = meter.create_histogram(
            "authority.gateway.overhead", unit="s",
            description="The gateway's own time per model call: total minus the upstream's "
                        "wait (a stream: before the upstream plus gating at its end)",
            explicit_bucket_boundaries_advisory=_OVERHEAD_BUCKETS)
        self.propagator = TraceContextTextMapPropagator()
        self._owned = owned

    def shutdown(self) -> None:
        """Flush and stop the providers this module created (never the application's)."""
        for provider in self._owned:
            try:
                provider.shutdown()
            except Exception:  # exiting: a collector that is gone must not fail the exit
                log.debug("telemetry shutdown failed", exc_info=True)


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai-authority-gateway")
    except PackageNotFoundError:
        return None


_backends: dict[tuple[str | None, str], _Backend] = {}
_backends_lock = threading.Lock()


def _is_app_provider(provider: Any) -> bool:
    """Has the application installed its own SDK provider (rather than the API's
    placeholder)? Then our spans and metrics go where the application's go."""
    return type(provider).__name__ not in ("ProxyTracerProvider", "NoOpTracerProvider",
                                           "_ProxyMeterProvider", "NoOpMeterProvider")


def _backend_for(cfg: TelemetryConfig) -> _Backend:
    key = (cfg.endpoint, cfg.service_name)
    with _backends_lock:
        backend = _backends.get(key)
        if backend is None:
            backend = _backends[key] = _build_backend(cfg)
            atexit.register(backend.shutdown)
        return backend


def _build_backend(cfg: TelemetryConfig) -> _Backend:
    from opentelemetry import metrics, trace
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    tracer_provider: Any = trace.get_tracer_provider()
    meter_provider: Any = metrics.get_meter_provider()
    owned: list[Any] = []
    # $OTEL_SERVICE_NAME and $OTEL_RESOURCE_ATTRIBUTES are read by Resource.create.
    resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME")
                               else {"service.name": cfg.service_name})
    if cfg.endpoint is not None or not _is_app_provider(tracer_provider):
        # No endpoint: the exporter reads $OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT itself.
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=cfg.endpoint + "/v1/traces" if cfg.endpoint else None)))
        owned.append(tracer_provider)
    if cfg.endpoint is not None or not _is_app_provider(meter_provider):
        meter_provider = MeterProvider(resource=resource, metric_readers=[
            PeriodicExportingMetricReader(OTLPMetricExporter(
                endpoint=cfg.endpoint + "/v1/metrics" if cfg.endpoint else None))])
        owned.append(meter_provider)
    return _Backend(tracer_provider, meter_provider, tuple(owned))


def telemetry_for(policy: Policy, environ: Mapping[str, str] | None = None) -> Telemetry | None:
    """The engine's telemetry under ``policy``: None when off (nothing is imported).

    ``otel: true`` without the extra installed is a policy error (asked for, and it would
    silently not happen); turned on by the environment alone, it is a warning: a variable
    set for other programs must not stop the gateway."""
    cfg = policy.telemetry
    if not _enabled(cfg, os.environ if environ is None else environ):
        return None
    try:
        backend = _backend_for(cfg)
    except ImportError as exc:
        hint = ("the OpenTelemetry SDK is not installed (pip install "
                f"'ai-authority-gateway[otel]'): {exc}")
        if cfg.otel:
            raise PolicyError(f"telemetry.otel is true but {hint}") from None
        log.warning("$OTEL_EXPORTER_OTLP_ENDPOINT is set but %s; telemetry stays off", hint)
        return None
    return Telemetry(policy, backend)


class Telemetry:
    """One engine's telemetry: its policy's settings over a shared backend."""

    def __init__(self, policy: Policy, backend: _Backend) -> None:
        self.backend = backend
        self.capture_content = policy.telemetry.capture_content
        self.redact = tuple(policy.redact)
        self.provider = _provider_name(policy.telemetry, policy.upstream.base_url)
        parts = urlsplit(policy.upstream.base_url)
        self.server_address = parts.hostname or ""
        self.server_port = parts.port or (443 if parts.scheme == "https" else 80)

    @classmethod
    def with_providers(cls, policy: Policy, *, tracer_provider: Any,
                       meter_provider: Any) -> Telemetry:
        """Telemetry on providers the caller made (tests: in-memory exporter and reader)."""
        return cls(policy, _Backend(tracer_provider, meter_provider))

    @_guarded
    def start_call(self, req: GatewayRequest) -> CallTrace:
        return CallTrace(self, req)

    @_guarded
    def approved_action(self, approval: Mapping[str, Any], approver: str) -> ActionSpan:
        """The run of an action a person approved, maybe hours after its request: a child of
        the action span that held it (its context kept with the approval), so the effect
        lands in the trace of the request that asked for it."""
        from opentelemetry.trace import get_current_span

        parent: Any = self.backend.propagator.extract(stored_trace(approval))
        if not get_current_span(parent).get_span_context().is_valid:
            parent = None
        tool_call = approval.get("tool_call")
        return ActionSpan(self, parent, str(approval.get("action_type") or ""),
                          tool_call.get("id") if isinstance(tool_call, dict) else None, {
                              "authority.approval_id": _cut(str(approval.get("id"))),
                              "authority.approver": _cut(approver),
                              "authority.mode": "require_human_approval",
                              "authority.decision": "allow",
                              "authority.decided_by": "approval",
                              "authority.dispatch": "gateway",
                              "authority.executor": _cut(str(approval.get("executor"))),
                              "authority.action_key": _cut(str(approval.get("action_key")),
                                                           400)})


class CallTrace:
    """One model call's span and measurements, from the request to its last byte."""

    def __init__(self, tel: Telemetry, req: GatewayRequest) -> None:
        from opentelemetry.trace import SpanKind, get_current_span

        self.tel = tel
        self.t0 = time.perf_counter()
        self.t_send: float | None = None
        self.t_recv: float | None = None
        self.finalize_s = 0.0
        self.stream = False
        self.operation = "chat"
        self.model = ""
        self.model_admitted = False
        self.response_model: str | None = None
        self.usage: tuple[int | None, int | None] = (None, None)
        self.error_type: str | None = None
        self.ended = False
        # The caller's traceparent when it sent a well-formed one; else (SDK) the
        # application's current span; else a new trace. A malformed header is ignored.
        parent: Any = tel.backend.propagator.extract(req.headers)
        if not get_current_span(parent).get_span_context().is_valid:
            parent = None  # start_span then takes the current context
        self.span = tel.backend.tracer.start_span("chat", context=parent, kind=SpanKind.CLIENT)
        self.span.set_attributes({
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": tel.provider,
            "server.address": tel.server_address, "server.port": tel.server_port,
            "authority.environment": _cut(req.caller.environment),
            "authority.caller": _cut(req.caller.name)})

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def headers(self) -> dict[str, str]:
        """The W3C headers that make the upstream's work a child of this call."""
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        try:
            self.tel.backend.propagator.inject(carrier, context=set_span_in_context(self.span))
        except Exception:  # never fail the call for its trace context
            log.warning("telemetry: no trace context for the upstream", exc_info=True)
        return carrier

    # -- what the engine tells it, phase by phase ------------------------------------------

    @_guarded
    def request(self, ctx: CallContext) -> None:
        """The request is parsed: its model and options are known."""
        assert ctx.fmt is not None and ctx.parsed is not None
        self.operation = _OPERATION.get(ctx.fmt.name, "chat")
        self.model = ctx.model
        self.stream = ctx.parsed.stream
        self.span.update_name(f"{self.operation} {_cut(ctx.model)}")
        data = ctx.parsed.data
        attrs: dict[str, Any] = {"gen_ai.operation.name": self.operation,
                                 "gen_ai.request.model": _cut(ctx.model),
                                 "authority.request_id": ctx.request_id}
        if ctx.parsed.stream:
            attrs["gen_ai.request.stream"] = True
        if ctx.parsed.n != 1:
            attrs["gen_ai.request.choice.count"] = ctx.parsed.n
        for field, name in (("temperature", "gen_ai.request.temperature"),
                            ("top_p", "gen_ai.request.top_p"),
                            ("frequency_penalty", "gen_ai.request.frequency_penalty"),
                            ("presence_penalty", "gen_ai.request.presence_penalty")):
            value = data.get(field)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attrs[name] = float(value)
        seed = data.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            attrs["gen_ai.request.seed"] = seed
        if self.tel.capture_content:
            prompt = data.get("messages") if "messages" in data else data.get("input")
            attrs["gen_ai.input.messages"] = _content(redact(prompt, self.tel.redact))
            if data.get("instructions") is not None:
                attrs["gen_ai.system_instructions"] = _content(data["instructions"])
        self.span.set_attributes(attrs)

    @_guarded
    def admitted(self, ctx: CallContext) -> None:
        """Admitted, about to be sent: the limit actually sent and the reservation."""
        self.model_admitted = True
        limit = ctx.parsed.explicit_limit if ctx.parsed is not None else None
        if ctx.plan is not None:
            if ctx.plan.injected_limit:
                limit = ctx.plan.output_limit
            self.span.set_attribute("authority.cost_estimate_usd", float(ctx.plan.estimate_usd))
        if limit is not None:
            self.span.set_attribute("gen_ai.request.max_tokens", int(limit))
        self.t_send = time.perf_counter()

    @_guarded
    def received(self) -> None:
        self.t_recv = time.perf_counter()

    @_guarded
    def replayed(self, original_request_id: Any) -> None:
        self.span.set_attributes({"authority.decision": "replay",
                                  "authority.idempotency.replayed": True})
        if isinstance(original_request_id, str):
            self.span.set_attribute("authority.original_request_id", _cut(original_request_id))

    @_guarded
    def refused(self, exc: AuthorityError, decision: str) -> None:
        """Refused before the upstream, or the upstream failed: the code says which."""
        self.error_type = _cut(exc.code)
        attrs: dict[str, Any] = {"authority.decision": decision, "authority.code": _cut(exc.code),
                                 "error.type": _cut(exc.code)}
        decided_by = exc.details.get("decided_by")
        if isinstance(decided_by, str):
            attrs["authority.decided_by"] = _cut(decided_by)
        self.span.set_attributes(attrs)

    @_guarded
    def answered(self, answer: Answer, authority: dict[str, Any], started: float) -> None:
        """Gated: the answer's own facts, then the gateway's."""
        body = answer.body
        attrs: dict[str, Any] = {"authority.decision": authority.get("decision") or "allow",
                                 "authority.actions": len(authority.get("actions") or ())}
        if isinstance(body.get("id"), str):
            attrs["gen_ai.response.id"] = _cut(body["id"])
        if isinstance(body.get("model"), str):
            self.response_model = _cut(body["model"])
            attrs["gen_ai.response.model"] = self.response_model
        reasons = _finish_reasons(body)
        if reasons:
            attrs["gen_ai.response.finish_reasons"] = reasons
        tokens_in, tokens_out = _tokens(answer.usage)
        self.usage = (tokens_in, tokens_out)
        if tokens_in is not None:
            attrs["gen_ai.usage.input_tokens"] = tokens_in
        if tokens_out is not None:
            attrs["gen_ai.usage.output_tokens"] = tokens_out
        cost = authority.get("cost") or {}
        if isinstance(cost.get("actual_usd"), int | float):
            attrs["authority.cost_usd"] = float(cost["actual_usd"])
        if authority.get("code"):
            attrs["authority.code"] = _cut(str(authority["code"]))
        if authority.get("idempotency"):
            attrs["authority.idempotency.replayed"] = False
        if self.tel.capture_content:
            out = body.get("choices") if "choices" in body else body.get("output")
            attrs["gen_ai.output.messages"] = _content(redact(out, self.tel.redact))
        self.span.set_attributes(attrs)
        self.finalize_s += time.perf_counter() - started

    @_guarded
    def action(self, call: Call) -> ActionSpan:
        from opentelemetry.trace import set_span_in_context

        return ActionSpan(self.tel, set_span_in_context(self.span), call.name, call.call_id)

    # -- the end -----------------------------------------------------------------------------

    @_guarded
    def finish(self, status: int | None, code: str | None = None) -> None:
        """The last byte is out (``status`` the answer's; None: the call was interrupted):
        end the span, record the metrics."""
        if self.ended:
            return
        self.ended = True
        from opentelemetry.trace import Status, StatusCode

        ended = time.perf_counter()
        span = self.span
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 400 and self.error_type is None:
                self.error_type = _cut(code or str(status))
                span.set_attribute("error.type", self.error_type)
        elif self.error_type is None:
            self.error_type = "interrupted"
            span.set_attribute("error.type", self.error_type)
        if self.error_type is not None:
            span.set_status(Status(StatusCode.ERROR, self.error_type))
        span.end()
        try:
            self._record(ended)
        except Exception:  # a metric must never fail a request
            log.debug("telemetry metrics failed", exc_info=True)

    def _record(self, ended: float) -> None:
        b = self.tel.backend
        # A refused model name is the client's text: a metric label per name would let any
        # key grow the series without bound; only an admitted model is named.
        attrs: dict[str, Any] = {"gen_ai.operation.name": self.operation,
                                 "gen_ai.provider.name": self.tel.provider,
                                 "gen_ai.request.model": _cut(self.model)
                                 if self.model_admitted else "_OTHER",
                                 "server.address": self.tel.server_address}
        if self.response_model is not None:
            attrs["gen_ai.response.model"] = self.response_model
        if self.error_type is not None:
            b.duration.record(ended - self.t0, {**attrs, "error.type": self.error_type})
        else:
            b.duration.record(ended - self.t0, attrs)
        for kind, count in zip(("input", "output"), self.usage, strict=True):
            if count is not None:
                b.token_usage.record(count, {**attrs, "gen_ai.token.type": kind})
        b.overhead.record(max(self._overhead(ended), 0.0), attrs)

    def _overhead(self, ended: float) -> float:
        if self.t_send is None or self.t_recv is None:
            return ended - self.t0
        if self.stream:  # the upstream's wait is the whole stream: count around it
            return (self.t_send - self.t0) + self.finalize_s
        return (ended - self.t0) - (self.t_recv - self.t_send)


class ActionSpan:
    """``execute_tool {name}``: one action, from its decision to its effect. While it is
    open, :func:`trace_headers` gives its context to what the action sends."""

    def __init__(self, tel: Telemetry, parent: Any, tool_name: str, call_id: Any,
                 attributes: dict[str, Any] | None = None) -> None:
        from opentelemetry.trace import SpanKind, set_span_in_context

        self.tel = tel
        name = _cut(tool_name)
        self.span = tel.backend.tracer.start_span(
            f"execute_tool {name}", context=parent, kind=SpanKind.INTERNAL,
            attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name,
                        "gen_ai.tool.type": "function",
                        "gen_ai.tool.call.id": _cut(call_id if isinstance(call_id, str)
                                                    else ""),
                        **(attributes or {})})
        carrier: dict[str, str] = {}
        tel.backend.propagator.inject(carrier, context=set_span_in_context(self.span))
        self._prev = _action_headers.get()
        _action_headers.set(carrier)

    @_guarded
    def end(self, o: ActionOutcome) -> None:
        """Gated (and run, if it ran): the decision and the outcome."""
        attrs: dict[str, Any] = {"authority.mode": str(o.mode),
                                 "authority.decision": o.decision,
                                 "authority.decided_by": _cut(o.decided_by),
                                 "authority.status": str(o.status),
                                 "authority.dispatch": str(o.dispatch),
                                 "authority.action_key": o.action_key}
        for name, value in (("authority.code", o.code), ("authority.executor", o.executor),
                            ("authority.approval_id", o.approval_id)):
            if value:
                attrs[name] = _cut(str(value))
        if o.extra.get("replayed"):
            attrs["authority.idempotency.replayed"] = True
        if self.tel.capture_content:
            attrs["gen_ai.tool.call.arguments"] = _content(
                redact(o.tool_call.get("arguments"), self.tel.redact))
            if o.result is not None:
                attrs["gen_ai.tool.call.result"] = _content(redact(o.result, self.tel.redact))
        failed = o.decision == "error" or str(o.status) in ("failed", "in_doubt")
        self._end(attrs, _cut(o.code or str(o.status)) if failed else None)

    @_guarded
    def end_approved(self, final: Mapping[str, Any] | None,
                     error: AuthorityError | None = None) -> None:
        """An approved action's run: its final status, or why nothing ran."""
        attrs: dict[str, Any] = {}
        status = final.get("status") if final is not None else None
        if isinstance(status, str):
            attrs["authority.status"] = _cut(status)
        if error is not None:
            attrs["authority.code"] = _cut(error.code)
        if self.tel.capture_content and final is not None and final.get("result") is not None:
            attrs["gen_ai.tool.call.result"] = _content(redact(final["result"], self.tel.redact))
        if error is not None:
            self._end(attrs, _cut(error.code))
        elif final is None:
            self._end(attrs, "interrupted")
        else:
            self._end(attrs, str(status) if status in ("failed", "in_doubt") else None)

    def _end(self, attrs: dict[str, Any], error_type: str | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        _action_headers.set(self._prev)
        if error_type is not None:
            attrs["error.type"] = error_type
        self.span.set_attributes(attrs)
        if error_type is not None:
            self.span.set_status(Status(StatusCode.ERROR, error_type))
        self.span.end()


def _finish_reasons(body: dict[str, Any]) -> list[str]:
    choices = body.get("choices")
    if isinstance(choices, list):
        return [_cut(c["finish_reason"]) for c in choices
                if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)]
    status = body.get("status")  # the Responses API: completed | incomplete | failed
    if isinstance(status, str):
        details = body.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        return [_cut(reason if isinstance(reason, str) else status)]
    return []


def _tokens(usage: dict[str, Any] | None) -> tuple[int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None

    def count(*names: str) -> int | None:
        for name in names:
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
        return None

    return count("prompt_tokens", "input_tokens"), count("completion_tokens", "output_tokens")
