"""OpenTelemetry through the SDK door (issue 17, point 3): spans after the GenAI semantic
conventions, the gateway's decisions as ``authority.*`` attributes, W3C trace context from
the caller to the upstream, executors and notifications, metrics; off (and not imported)
by default. The exporter and the metric reader are the SDK's in-memory ones; the upstream
and the webhook receivers are real loopback servers that record the headers they get."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import ScriptedServer, tool, user
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from servers import HttpReceiver

from authority_sdk import (
    AsyncAuthorityClient,
    AuthorityClient,
    Gateway,
    Telemetry,
    authority_of,
    control,
)
from authority_sdk.delivery import deliver_round
from authority_sdk.errors import PolicyError
from authority_sdk.policy import load_policy
from authority_sdk.telemetry import telemetry_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SECRET_ARG = "4111111111111111"
PROMPT_WORDS = "the customer's private complaint"
CONTENT_KEYS = ("gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions",
                "gen_ai.tool.call.arguments", "gen_ai.tool.call.result")


@dataclass
class Otel:
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def gateway(self, policy: Path) -> Gateway:
        pol = load_policy(policy)
        return Gateway(pol, telemetry=Telemetry.with_providers(
            pol, tracer_provider=self.tracer_provider, meter_provider=self.meter_provider))

    def client(self, policy: Path, **kw: Any) -> AuthorityClient:
        return AuthorityClient(gateway=self.gateway(policy), environment="prod",
                               max_retries=0, **kw)

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def chat_spans(self) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.kind == SpanKind.CLIENT]

    def tool_spans(self) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.name.startswith("execute_tool ")]

    def histogram(self, name: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        return [point for rm in data.resource_metrics for sm in rm.scope_metrics
                for metric in sm.metrics if metric.name == name
                for point in metric.data.data_points]


@pytest.fixture
def otel() -> Iterator[Otel]:
    spans = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    yield Otel(spans, reader, tp, mp)
    tp.shutdown()
    mp.shutdown()


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def hexid(n: int, width: int = 16) -> str:
    return format(n, f"0{width}x")


def script(*lines: str) -> list[dict[str, Any]]:
    return user("\n".join(lines))


CALLS = ('CALL lookup_customer {"customer_id": "c_42"}',
         f'CALL send_note {{"text": "hello", "card_number": "{SECRET_ARG}"}}')
TOOLS = [tool("lookup_customer", {"customer_id": {"type": "string"}}),
         tool("send_note", {"text": {"type": "string"}, "card_number": {"type": "string"}})]


def test_chat_span_and_one_execute_tool_span_per_action(
        otel: Otel, write_policy: Callable[..., Path]) -> None:
    c = otel.client(write_policy())
    r = c.chat.completions.create(model="gpt-4o-mini", tools=TOOLS, max_tokens=300,
                                  temperature=0.2, messages=script(PROMPT_WORDS, *CALLS))
    info = authority_of(r)
    [chat] = otel.chat_spans()
    a = attrs(chat)
    assert chat.name == "chat gpt-4o-mini"
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.response.model"] == r.model
    assert a["gen_ai.response.id"] == r.id
    assert r.usage is not None
    assert a["gen_ai.usage.input_tokens"] == r.usage.prompt_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == r.usage.completion_tokens > 0
    assert a["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert a["gen_ai.request.max_tokens"] == 300
    assert a["gen_ai.request.temperature"] == pytest.approx(0.2)
    assert a["server.address"] == "127.0.0.1"
    assert a["authority.request_id"] == info.request_id
    assert a["authority.decision"] == "allow"
    assert a["authority.environment"] == "prod"
    assert info.cost is not None
    assert a["authority.cost_usd"] == pytest.approx(info.cost.actual_usd)
    assert a["authority.actions"] == 2
    assert chat.status.status_code != StatusCode.ERROR

    tools = otel.tool_spans()
    assert [s.name for s in tools] == ["execute_tool lookup_customer", "execute_tool send_note"]
    by_name = {attrs(s)["gen_ai.tool.name"]: s for s in tools}
    # The model's call ids (a call the gateway ran is no longer in the app's answer).
    calls = {a.action_type: a.tool_call.id for a in info.actions}
    for name, span in by_name.items():
        assert span.parent is not None and span.parent.span_id == chat.context.span_id
        assert span.context.trace_id == chat.context.trace_id
        assert attrs(span)["gen_ai.operation.name"] == "execute_tool"
        assert attrs(span)["gen_ai.tool.call.id"] == calls[name]
    lookup, note = attrs(by_name["lookup_customer"]), attrs(by_name["send_note"])
    assert (lookup["authority.mode"], lookup["authority.status"],
            lookup["authority.dispatch"]) == ("auto_execute", "allowed", "client")
    assert (note["authority.mode"], note["authority.status"], note["authority.executor"]) == (
        "auto_execute", "executed", "dry")
    actions = {a.action_type: a for a in info.actions}
    assert note["authority.action_key"] == actions["send_note"].action_key
    assert note["authority.decided_by"] == actions["send_note"].decided_by


def test_no_content_in_spans_unless_the_policy_opts_in(
        otel: Otel, write_policy: Callable[..., Path]) -> None:
    c = otel.client(write_policy())
    c.chat.completions.create(model="gpt-4o-mini", tools=TOOLS,
                              messages=script(PROMPT_WORDS, *CALLS))
    spans = otel.finished()
    assert len(spans) == 3
    for span in spans:
        a = attrs(span)
        assert not set(a) & set(CONTENT_KEYS)
        text = json.dumps(a, default=str)
        assert PROMPT_WORDS not in text and SECRET_ARG not in text and "hello" not in text

    otel.spans.clear()
    c = otel.client(write_policy({"telemetry": {"capture_content": True}}))
    c.chat.completions.create(model="gpt-4o-mini", tools=TOOLS,
                              messages=script(PROMPT_WORDS, *CALLS))
    [chat] = otel.chat_spans()
    assert PROMPT_WORDS in attrs(chat)["gen_ai.input.messages"]
    assert "send_note" in attrs(chat)["gen_ai.output.messages"]
    note = attrs(next(s for s in otel.tool_spans() if s.name == "execute_tool send_note"))
    assert "hello" in note["gen_ai.tool.call.arguments"]
    # Opted in, a field the policy redacts still stays out of the model's calls (the prompt
    # is the app's own text, captured as it is).
    assert SECRET_ARG not in attrs(chat)["gen_ai.output.messages"]
    assert SECRET_ARG not in note["gen_ai.tool.call.arguments"]


def test_callers_traceparent_is_the_parent_and_goes_upstream(
        otel: Otel, write_policy: Callable[..., Path], upstream: ScriptedServer) -> None:
    c = otel.client(write_policy(), default_headers={"traceparent": TRACEPARENT,
                                                     "tracestate": "vendor=abc"})
    c.chat.completions.create(model="gpt-4o-mini", messages=user("hello"))
    [chat] = otel.chat_spans()
    assert hexid(chat.context.trace_id, 32) == TRACE_ID
    assert chat.parent is not None and hexid(chat.parent.span_id) == PARENT_ID
    assert chat.parent.is_remote
    sent = upstream.model.last_request
    assert sent is not None
    # The upstream's work is a child of the gateway's span, in the caller's trace.
    assert sent["headers"]["traceparent"] == (
        f"00-{TRACE_ID}-{hexid(chat.context.span_id)}-01")
    assert sent["headers"]["tracestate"] == "vendor=abc"


def test_malformed_traceparent_starts_a_new_trace(
        otel: Otel, write_policy: Callable[..., Path], upstream: ScriptedServer) -> None:
    c = otel.client(write_policy(), default_headers={"traceparent": "00-zz-bad-01"})
    c.chat.completions.create(model="gpt-4o-mini", messages=user("hello"))
    [chat] = otel.chat_spans()
    assert chat.parent is None
    sent = upstream.model.last_request
    assert sent is not None
    assert sent["headers"]["traceparent"].startswith(
        f"00-{hexid(chat.context.trace_id, 32)}-{hexid(chat.context.span_id)}-")


def test_the_applications_current_span_is_the_parent(
        otel: Otel, write_policy: Callable[..., Path]) -> None:
    c = otel.client(write_policy())
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("handle ticket") as app_span:
        c.chat.completions.create(model="gpt-4o-mini", messages=user("hello"))
    [chat] = otel.chat_spans()
    assert chat.parent is not None
    assert chat.parent.span_id == app_span.get_span_context().span_id


def test_webhook_executor_receives_the_action_spans_context(
        otel: Otel, write_policy: Callable[..., Path], rx: HttpReceiver) -> None:
    policy = write_policy({
        "executors": {"billing": {"type": "webhook", "url": rx.url("/refunds"),
                                  "headers": {"Traceparent": "00-configured-spelling"}}},
        "actions": {"issue_refund": {"executor": "billing", "mode": "auto_execute"}}})
    c = otel.client(policy, default_headers={"traceparent": TRACEPARENT})
    c.chat.completions.create(model="gpt-4o-mini", messages=script(
        'CALL issue_refund {"order_id": "o_1", "amount": 5}'))
    [span] = otel.tool_spans()
    [got] = rx.wait_for(1)
    assert got.header("traceparent") == f"00-{TRACE_ID}-{hexid(span.context.span_id)}-01"
    assert attrs(span)["authority.status"] == "executed"
    assert attrs(span)["authority.executor"] == "billing"


def test_held_action_span_and_its_notification_carry_the_trace(
        otel: Otel, write_policy: Callable[..., Path], rx: HttpReceiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SECRET", "s3cret-for-signing")
    policy = write_policy({
        "actions": {"send_note": {"executor": "dry", "mode": "require_human_approval"}},
        "notifications": {"channels": {"ops": {"type": "webhook", "url": rx.url("/hook"),
                                               "secret_env": "NOTIFY_SECRET"}}}})
    c = otel.client(policy, default_headers={"traceparent": TRACEPARENT})
    r = c.chat.completions.create(model="gpt-4o-mini",
                                  messages=script('CALL send_note {"text": "hi"}'))
    [span] = otel.tool_spans()
    a = attrs(span)
    assert a["authority.status"] == "pending_approval"
    assert a["authority.mode"] == "require_human_approval"
    assert a["authority.approval_id"] == authority_of(r).actions[0].approval_id
    assert deliver_round(c.gateway)
    [got] = rx.wait_for(1)
    assert got.header("traceparent") == f"00-{TRACE_ID}-{hexid(span.context.span_id)}-01"


def test_an_approved_action_runs_in_the_trace_of_the_request_that_asked(
        otel: Otel, write_policy: Callable[..., Path], rx: HttpReceiver) -> None:
    policy = write_policy({
        "executors": {"billing": {"type": "webhook", "url": rx.url("/refunds")}},
        "actions": {"issue_refund": {"executor": "billing",
                                     "mode": "require_human_approval"}}})
    c = otel.client(policy, default_headers={"traceparent": TRACEPARENT})
    r = c.chat.completions.create(model="gpt-4o-mini", messages=script(
        'CALL issue_refund {"order_id": "o_1", "amount": 5}'))
    [held] = otel.tool_spans()
    approval_id = authority_of(r).actions[0].approval_id
    assert approval_id and attrs(held)["authority.approval_id"] == approval_id
    assert rx.requests == []

    otel.spans.clear()
    # Later, and outside any request: a person approves; the effect joins the same trace.
    assert control.approve(c.gateway, approval_id, actor="ops-bob")["status"] == "executed"
    [ran] = otel.tool_spans()
    a = attrs(ran)
    assert ran.name == "execute_tool issue_refund"
    assert ran.context.trace_id == held.context.trace_id
    assert ran.parent is not None and ran.parent.span_id == held.context.span_id
    assert (a["authority.approval_id"], a["authority.approver"], a["authority.status"],
            a["authority.executor"]) == (approval_id, "ops-bob", "executed", "billing")
    [got] = rx.wait_for(1)
    assert got.header("traceparent") == f"00-{TRACE_ID}-{hexid(ran.context.span_id)}-01"


def test_refusals_and_replays_are_span_attributes(
        otel: Otel, write_policy: Callable[..., Path]) -> None:
    c = otel.client(write_policy({"actions": {"delete_account": {"mode": "deny"}}}))
    with pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="gpt-4o", messages=user("hello"))
    [denied] = otel.chat_spans()
    a = attrs(denied)
    assert denied.name == "chat gpt-4o"
    assert (a["authority.decision"], a["authority.code"]) == ("deny", "model_not_allowed")
    assert a["error.type"] == "model_not_allowed"
    assert a["authority.decided_by"]
    assert denied.status.status_code == StatusCode.ERROR

    otel.spans.clear()
    c.chat.completions.create(model="gpt-4o-mini", messages=script(
        'CALL delete_account {"id": "u_1"}'))
    [span] = otel.tool_spans()
    assert (attrs(span)["authority.decision"], attrs(span)["authority.mode"],
            attrs(span)["authority.code"]) == ("deny", "deny", "denied_by_policy")

    otel.spans.clear()
    for _ in range(2):
        c.chat.completions.create(model="gpt-4o-mini", messages=user("hello"),
                                  extra_headers={"Idempotency-Key": "order-77"})
    first, second = otel.chat_spans()
    assert attrs(first)["authority.idempotency.replayed"] is False
    assert attrs(second)["authority.idempotency.replayed"] is True
    assert attrs(second)["authority.decision"] == "replay"
    assert attrs(second)["authority.original_request_id"] == attrs(first)[
        "authority.request_id"]


def test_metrics_token_usage_duration_and_overhead(
        otel: Otel, write_policy: Callable[..., Path]) -> None:
    c = otel.client(write_policy())
    r = c.chat.completions.create(model="gpt-4o-mini", messages=user("hello"))
    with pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="a-model-nobody-allowed-" + "x" * 50,
                                  messages=user("hello"))
    assert r.usage is not None
    tokens = {p.attributes["gen_ai.token.type"]: p for p in
              otel.histogram("gen_ai.client.token.usage")}
    assert tokens["input"].sum == r.usage.prompt_tokens
    assert tokens["output"].sum == r.usage.completion_tokens
    assert tokens["input"].attributes["gen_ai.request.model"] == "gpt-4o-mini"
    durations = otel.histogram("gen_ai.client.operation.duration")
    ok = [p for p in durations if "error.type" not in p.attributes]
    failed = [p for p in durations if p.attributes.get("error.type") == "model_not_allowed"]
    assert ok[0].count == 1 and ok[0].sum > 0
    # A refused model name is the client's text: never a metric label of its own.
    assert failed[0].attributes["gen_ai.request.model"] == "_OTHER"
    overhead = otel.histogram("authority.gateway.overhead")
    assert sum(p.count for p in overhead) == 2
    [served] = [p for p in overhead if p.attributes["gen_ai.request.model"] == "gpt-4o-mini"]
    # The gateway's own time: the call's duration less the upstream's wait.
    assert 0 < served.sum < ok[0].sum


def test_a_streamed_answer_ends_its_span_with_the_stream(
        otel: Otel, write_policy: Callable[..., Path]) -> None:
    c = otel.client(write_policy())
    stream = c.chat.completions.create(model="gpt-4o-mini", stream=True, tools=TOOLS,
                                       messages=script(*CALLS))
    assert otel.chat_spans() == []  # still open while the stream runs
    list(stream)
    [chat] = otel.chat_spans()
    a = attrs(chat)
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.usage.output_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert len(otel.tool_spans()) == 2


def test_async_client_spans_and_propagation(
        otel: Otel, write_policy: Callable[..., Path], upstream: ScriptedServer) -> None:
    gw = otel.gateway(write_policy())

    async def go() -> None:
        c = AsyncAuthorityClient(gateway=gw, environment="prod", max_retries=0,
                                 default_headers={"traceparent": TRACEPARENT})
        await c.chat.completions.create(model="gpt-4o-mini", tools=TOOLS,
                                        messages=script(*CALLS))

    asyncio.run(go())
    [chat] = otel.chat_spans()
    assert hexid(chat.context.trace_id, 32) == TRACE_ID
    assert len(otel.tool_spans()) == 2
    sent = upstream.model.last_request
    assert sent is not None
    assert sent["headers"]["traceparent"].split("-")[2] == hexid(chat.context.span_id)


def test_responses_and_embeddings_spans(otel: Otel, write_policy: Callable[..., Path]) -> None:
    c = otel.client(write_policy({"environments": {"prod": {
        "models": ["gpt-4o-mini", "text-embedding-3-*"]}}}))
    r = c.responses.create(model="gpt-4o-mini", input='CALL lookup_customer {"customer_id": "c"}',
                           tools=[{"type": "function", "name": "lookup_customer",
                                   "parameters": {"type": "object", "properties": {
                                       "customer_id": {"type": "string"}}}}])
    [chat] = otel.chat_spans()
    a = attrs(chat)
    assert chat.name == "chat gpt-4o-mini"
    assert a["gen_ai.response.id"] == r.id
    assert r.usage is not None
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (
        r.usage.input_tokens, r.usage.output_tokens)
    assert a["gen_ai.response.finish_reasons"] == ("completed",)
    [span] = otel.tool_spans()
    assert span.name == "execute_tool lookup_customer"

    otel.spans.clear()
    c.embeddings.create(model="text-embedding-3-small", input=["refund policy"])
    [emb] = otel.chat_spans()
    assert emb.name == "embeddings text-embedding-3-small"
    assert attrs(emb)["gen_ai.operation.name"] == "embeddings"
    assert attrs(emb)["gen_ai.usage.input_tokens"] > 0


def test_a_telemetry_failure_never_fails_the_request(
        otel: Otel, write_policy: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import authority_sdk.telemetry as telemetry

    def broken(body: Any) -> list[str]:
        raise RuntimeError("a bug in the instrumentation")

    monkeypatch.setattr(telemetry, "_finish_reasons", broken)
    c = otel.client(write_policy())
    r = c.chat.completions.create(model="gpt-4o-mini", tools=TOOLS, messages=script(*CALLS))
    assert authority_of(r).decision == "allow"
    assert [a.status for a in authority_of(r).actions] == ["allowed", "executed"]
    [chat] = otel.chat_spans()  # the span still ended, without what failed
    assert "gen_ai.response.finish_reasons" not in attrs(chat)
    assert "telemetry failed in CallTrace.answered" in caplog.text

    class NoTracer:
        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("exporter misconfigured")

    class BrokenProvider:
        def get_tracer(self, *args: Any, **kwargs: Any) -> NoTracer:
            return NoTracer()

    pol = load_policy(write_policy())
    gw = Gateway(pol, telemetry=Telemetry.with_providers(
        pol, tracer_provider=BrokenProvider(), meter_provider=otel.meter_provider))
    c = AuthorityClient(gateway=gw, environment="prod", max_retries=0)
    assert c.chat.completions.create(model="gpt-4o-mini", messages=user("hi")).choices


# -- configuration -------------------------------------------------------------------------


def test_on_and_off_by_policy_and_environment(write_policy: Callable[..., Path]) -> None:
    pol = load_policy(write_policy())
    assert telemetry_for(pol, {}) is None
    assert telemetry_for(pol, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}) is not None
    assert telemetry_for(pol, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
                               "OTEL_SDK_DISABLED": "true"}) is None
    off = load_policy(write_policy({"telemetry": {"otel": False}}))
    assert telemetry_for(off, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}) is None
    on = load_policy(write_policy({"telemetry": {"otel": True,
                                                 "endpoint": "http://127.0.0.1:9/"}}))
    tel = telemetry_for(on, {})
    assert tel is not None and tel.provider == "openai"
    azure = load_policy(write_policy({"upstream": {
        "base_url": "https://acme.openai.azure.com/openai/v1"}}))
    assert Telemetry.with_providers(azure, tracer_provider=TracerProvider(),
                                    meter_provider=MeterProvider()).provider == "azure.ai.openai"


def test_without_the_extra_asking_fails_and_the_environment_only_warns(
        write_policy: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # As if 'pip install ai-authority-gateway[otel]' had not been run.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                        None)
    asked = load_policy(write_policy({"telemetry": {"otel": True,
                                                    "endpoint": "http://127.0.0.1:7/none"}}))
    with pytest.raises(PolicyError, match=r"\[otel\]"):
        Gateway(asked)
    hinted = load_policy(write_policy({"telemetry": {"endpoint": "http://127.0.0.1:7/env"}}))
    assert telemetry_for(hinted, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:7"}) is None
    assert "telemetry stays off" in caplog.text


@pytest.mark.parametrize(("telemetry", "where"), [
    ({"otel": "yes"}, "telemetry.otel"),
    ({"capture_content": 1}, "telemetry.capture_content"),
    ({"otel": True, "endpont": "http://c:4318"}, "telemetry.endpont"),
    ({"endpoint": "http://c:4318/?key=1"}, "telemetry.endpoint"),
    ({"endpoint": "http://user:pw@c:4318"}, "telemetry.endpoint"),
    ({"endpoint": "ftp://c"}, "telemetry.endpoint"),
    ({"service_name": ""}, "telemetry.service_name"),
])
def test_telemetry_config_is_strict(write_policy: Callable[..., Path],
                                    telemetry: dict[str, Any], where: str) -> None:
    with pytest.raises(PolicyError, match=where.replace(".", r"\.")):
        load_policy(write_policy({"telemetry": telemetry}))


_PROBE = textwrap.dedent("""
    import sys
    from authority_sdk import AuthorityClient
    c = AuthorityClient(policy=sys.argv[1], environment="prod", max_retries=0)
    r = c.chat.completions.create(model="gpt-4o-mini",
                                  messages=[{"role": "user", "content": "hello"}])
    assert r.authority["decision"] == "allow"
    print(c.gateway.telemetry is None,
          sorted(m for m in sys.modules if m.startswith("opentelemetry")))
""")


def _probe(policy: Path, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    root = str(Path(__file__).resolve().parents[1])
    clean["PYTHONPATH"] = os.pathsep.join(p for p in (root, clean.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(policy)], env={**clean, **env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_off_by_default_imports_nothing_of_opentelemetry(
        write_policy: Callable[..., Path]) -> None:
    assert _probe(write_policy()) == "True []"


def test_on_by_the_environment_in_a_fresh_process(write_policy: Callable[..., Path]) -> None:
    with HttpReceiver() as collector:
        out = _probe(write_policy(), OTEL_EXPORTER_OTLP_ENDPOINT=collector.url(),
                     OTEL_BSP_SCHEDULE_DELAY="10")
        assert out.startswith("False [") and "opentelemetry.sdk.trace" in out
        # The exit flushed the batch to the collector named by the environment.
        paths = {r.path for r in collector.wait_for(1)}
        assert "/v1/traces" in paths
