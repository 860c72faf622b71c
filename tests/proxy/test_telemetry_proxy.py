"""OpenTelemetry through the real proxy (``authority serve`` as a child process), exporting
OTLP/HTTP to a collector on loopback that decodes what it gets: the same spans as the
SDK door (one engine serves both), the caller's ``traceparent`` as their parent and on the
upstream request, the log lines carrying the spans' trace id, and the metrics."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import ScriptedServer, tool, user
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from proxy_env import AGENT_KEY, RunningProxy, start_proxy
from servers import HttpReceiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    return getattr(v, kind) if kind else None


class OtlpCollector:
    """A real OTLP/HTTP receiver: POST /v1/traces and /v1/metrics, protobuf bodies."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Span]] = []  # (resource attributes, span)
        self.metrics: list[ExportMetricsServiceRequest] = []
        self._cond = threading.Condition()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                reply: bytes
                if self.path == "/v1/traces":
                    req = ExportTraceServiceRequest.FromString(body)
                    with collector._cond:
                        for rs in req.resource_spans:
                            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                            for ss in rs.scope_spans:
                                collector.spans.extend((resource, s) for s in ss.spans)
                        collector._cond.notify_all()
                    reply = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    with collector._cond:
                        collector.metrics.append(ExportMetricsServiceRequest.FromString(body))
                        collector._cond.notify_all()
                    reply = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait(self, predicate: Callable[[OtlpCollector], bool], timeout_s: float = 15) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout_s):
                raise TimeoutError(f"collector got {len(self.spans)} span(s), "
                                   f"{len(self.metrics)} metric export(s)")

    def named(self, prefix: str) -> list[Span]:
        with self._cond:
            return [s for _, s in self.spans if s.name.startswith(prefix)]

    def metric_points(self, name: str) -> list[Any]:
        with self._cond:
            return [p for req in self.metrics for rm in req.resource_metrics
                    for sm in rm.scope_metrics for m in sm.metrics if m.name == name
                    for p in m.histogram.data_points]


def attrs(span: Any) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpCollector]:
    c = OtlpCollector()
    # The proxy is turned on by the standard variable alone (the policy says nothing).
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", c.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-under-test")
    yield c
    c.close()


def _log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().split("\n")
            if line.startswith("{")]


def test_proxy_exports_spans_parented_by_the_caller_and_propagates_upstream(
        upstream: ScriptedServer, tmp_path: Path, collector: OtlpCollector,
        rx: HttpReceiver) -> None:
    overrides = {
        "executors": {"billing": {"type": "webhook", "url": rx.url("/refunds")}},
        "actions": {"issue_refund": {"executor": "billing", "mode": "auto_execute"}},
    }
    with start_proxy(upstream, tmp_path, overrides=overrides,
                     serve_args=["--log-format", "json"]) as px:
        r = px.http("POST", "/v1/chat/completions", AGENT_KEY,
                    headers={"traceparent": TRACEPARENT, "tracestate": "vendor=abc"},
                    json={"model": "gpt-4o-mini", "max_tokens": 200, "messages": user(
                        'CALL lookup_customer {"id": 7}\n'
                        'CALL issue_refund {"order_id": "o_1", "amount": 5}'),
                          "tools": [tool("lookup_customer", {"id": {"type": "integer"}})]})
        assert r.status_code == 200, r.text
        body = r.json()
        upstream_headers = px.upstream_stats()["last_request"]["headers"]
        untraced = px.http("POST", "/v1/chat/completions", AGENT_KEY,
                           json={"model": "gpt-4o-mini", "messages": user("SAY hi")})
        denied = px.http("POST", "/v1/chat/completions", AGENT_KEY,
                         json={"model": "gpt-4o", "messages": user("hi")})
        assert (untraced.status_code, denied.status_code) == (200, 403)
        chunks = list(px.client(default_headers={"traceparent": TRACEPARENT}).chat.completions
                      .create(model="gpt-4o-mini", stream=True,
                              messages=user("SAY a streamed answer")))
        streamed_id = chunks[-1].model_extra["authority"]["request_id"]  # type: ignore[index]
        collector.wait(lambda c: len(c.named("chat ")) >= 4 and len(
            c.named("execute_tool ")) >= 2)
        collector.wait(lambda c: bool(c.metric_points("gen_ai.client.token.usage")))
        lines = _log_lines(tmp_path / "proxy.log")

    request_id = body["authority"]["request_id"]
    by_request = {attrs(s)["authority.request_id"]: s for s in collector.named("chat ")}
    chat = by_request[request_id]
    a = attrs(chat)
    assert chat.name == "chat gpt-4o-mini" and chat.kind == Span.SPAN_KIND_CLIENT
    assert chat.trace_id.hex() == TRACE_ID and chat.parent_span_id.hex() == PARENT_ID
    assert (a["gen_ai.operation.name"], a["gen_ai.provider.name"],
            a["gen_ai.request.model"]) == ("chat", "openai", "gpt-4o-mini")
    assert a["gen_ai.response.id"] == body["id"]
    assert a["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    assert a["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert a["gen_ai.request.max_tokens"] == 200
    assert a["authority.decision"] == "allow" and a["authority.caller"] == "support-agent"
    assert a["authority.cost_usd"] == pytest.approx(body["authority"]["cost"]["actual_usd"])
    assert not any(k.startswith(("gen_ai.input", "gen_ai.output", "gen_ai.tool.call.arg"))
                   for k in a)
    [resource] = {json.dumps(res, sort_keys=True) for res, _ in collector.spans}
    assert json.loads(resource)["service.name"] == "gateway-under-test"

    # The upstream got the caller's trace, with the gateway's span as the parent.
    assert upstream_headers["traceparent"].startswith(f"00-{TRACE_ID}-{chat.span_id.hex()}-")
    assert upstream_headers["tracestate"] == "vendor=abc"

    tools = {attrs(s)["gen_ai.tool.name"]: s for s in collector.named("execute_tool ")
             if s.parent_span_id == chat.span_id}
    assert set(tools) == {"lookup_customer", "issue_refund"}
    refund = attrs(tools["issue_refund"])
    assert (refund["authority.status"], refund["authority.mode"],
            refund["authority.executor"]) == ("executed", "auto_execute", "billing")
    [hook] = rx.wait_for(1)
    assert hook.header("traceparent") == (
        f"00-{TRACE_ID}-{tools['issue_refund'].span_id.hex()}-01")

    # Log lines and spans correlate: the caller's trace id, or the span's new one.
    logged = {x["request_id"]: x["trace_id"] for x in lines if x.get("kind") == "request"}
    assert logged[request_id] == TRACE_ID
    untraced_id = untraced.json()["authority"]["request_id"]
    assert logged[untraced_id] == by_request[untraced_id].trace_id.hex()
    assert by_request[untraced_id].parent_span_id == b""

    streamed = attrs(by_request[streamed_id])
    assert streamed["gen_ai.request.stream"] is True
    assert streamed["gen_ai.usage.output_tokens"] > 0
    assert streamed["gen_ai.response.finish_reasons"] == ("stop",)
    assert by_request[streamed_id].trace_id.hex() == TRACE_ID

    refused = next(s for s in collector.named("chat gpt-4o") if s.name == "chat gpt-4o")
    assert attrs(refused)["authority.code"] == "model_not_allowed"
    assert refused.status.code == refused.status.STATUS_CODE_ERROR

    tokens = {dict((kv.key, _value(kv.value)) for kv in p.attributes)["gen_ai.token.type"]
              for p in collector.metric_points("gen_ai.client.token.usage")}
    assert tokens == {"input", "output"}
    assert collector.metric_points("gen_ai.client.operation.duration")
    assert collector.metric_points("authority.gateway.overhead")


def test_proxy_without_telemetry_sends_no_trace_upstream(
        upstream: ScriptedServer, tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path) as px:
        r = px.http("POST", "/v1/chat/completions", AGENT_KEY,
                    headers={"traceparent": TRACEPARENT},
                    json={"model": "gpt-4o-mini", "messages": user("SAY hi")})
        assert r.status_code == 200
        sent = px.upstream_stats()["last_request"]["headers"]
    # Off: nothing of the caller's request but the body goes upstream (as before).
    assert "traceparent" not in sent


def _say_hi(px: RunningProxy) -> str:
    """A plain chat request through the proxy; its request id."""
    r = px.http("POST", "/v1/chat/completions", AGENT_KEY,
                json={"model": "gpt-4o-mini", "messages": user("SAY hi")})
    assert r.status_code == 200
    return str(r.json()["authority"]["request_id"])


def _wait_for_chat(collector: OtlpCollector, request_id: str) -> None:
    collector.wait(lambda c: any(attrs(s).get("authority.request_id") == request_id
                                 for s in c.named("chat ")))


def test_policy_names_the_collector(upstream: ScriptedServer, tmp_path: Path) -> None:
    c = OtlpCollector()
    try:
        with start_proxy(upstream, tmp_path, overrides={
                "telemetry": {"otel": True, "endpoint": c.url}}) as px:
            request_id = _say_hi(px)
            # Exported on the batch schedule (5 s by default), or at the latest at exit.
        _wait_for_chat(c, request_id)
    finally:
        c.close()


def test_a_decision_links_token_reaches_no_span_and_no_log_line(
        upstream: ScriptedServer, tmp_path: Path, collector: OtlpCollector,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The token in ``/authority/decide/{token}`` decides (its confirmation code derives
    from it). With OpenTelemetry on everywhere the process can turn it on — the gateway's
    own, and FastAPI's (``FASTAPI_OTEL_AUTO_CONFIGURE``, global providers) — no span
    attribute and no log line carries it: the access log names the link by its id."""
    import secrets

    from authority_sdk import links

    monkeypatch.setenv("FASTAPI_OTEL_AUTO_CONFIGURE", "true")
    token = secrets.token_urlsafe(32)
    with start_proxy(upstream, tmp_path, serve_args=["--log-format", "json"]) as px:
        for method in ("GET", "POST"):
            assert px.http(method, f"/authority/decide/{token}").status_code in (404, 410)
        _wait_for_chat(collector, _say_hi(px))
    # Exported at the latest when the process exits (stopped above).
    exported = [json.dumps(attrs(s), default=str) + s.name for _, s in collector.spans]
    assert not [e for e in exported if token in e]
    assert not [e for e in exported if "/authority/decide" in e]  # not even the route's span
    log = (tmp_path / "proxy.log").read_text()
    assert token not in log
    decide = [line for line in _log_lines(tmp_path / "proxy.log")
              if str(line.get("path", "")).startswith("/authority/decide/")]
    assert [line["path"] for line in decide] == [
        f"/authority/decide/~{links.link_id(token)}"] * 2
