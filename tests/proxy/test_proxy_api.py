"""The proxy as an existing app sees it: the stock openai client, only base_url changed.

One real ``authority serve`` process per module (and per xdist worker) in front
of the scripted model; tests that change shared state (kill switch) undo it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import ScriptedServer, concurrently, tool, user
from proxy_env import (
    ADMIN_KEY,
    AGENT_KEY,
    APPROVER_KEY,
    DEV_KEY,
    HYBRID_KEY,
    UPSTREAM_KEY,
    RunningProxy,
    start_proxy,
)

TOOLS = [tool("lookup_customer", {"id": {"type": "integer"}}),
         tool("send_note", {"text": {"type": "string"}}),
         tool("delete_account", {"id": {"type": "integer"}})]


@pytest.fixture(scope="module")
def px(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[RunningProxy]:
    with start_proxy(upstream, tmp_path_factory.mktemp("proxy")) as rp:
        yield rp


def authority(resp: Any) -> dict[str, Any]:
    extra = resp.model_extra or {}
    assert "authority" in extra, resp
    return dict(extra["authority"])


def chat(px: RunningProxy, text: str, key: str = AGENT_KEY, **kw: Any) -> Any:
    return px.client(key).chat.completions.create(
        model=kw.pop("model", "gpt-4o-mini"), messages=user(text), tools=TOOLS, **kw)


# -- completions -------------------------------------------------------------------------


def test_allowed_completion_carries_the_authority_field(px: RunningProxy) -> None:
    resp = chat(px, "SAY hello through the proxy")
    assert resp.choices[0].message.content == "hello through the proxy"
    a = authority(resp)
    assert a["decision"] == "allow"
    assert a["environment"] == "prod"
    assert a["request_id"].startswith("req_")
    assert a["cost"]["actual_usd"] > 0
    entries = [e for e in px.audit_entries() if e.get("request_id") == a["request_id"]]
    assert [e["event"] for e in entries] == ["request"]
    assert entries[0]["actor"] == "support-agent"


def test_unaware_app_receives_only_the_tool_calls_it_may_run(px: RunningProxy) -> None:
    resp = chat(px, 'CALL lookup_customer {"id": 7}\nCALL send_note {"text": "refund soon"}\n'
                    'CALL delete_account {"id": 7}')
    calls = resp.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["lookup_customer"]
    assert json.loads(calls[0].function.arguments) == {"id": 7}
    by_type = {x["action_type"]: x for x in authority(resp)["actions"]}
    assert by_type["lookup_customer"]["status"] == "allowed"
    assert by_type["send_note"]["status"] == "pending_approval"
    assert by_type["send_note"]["approval_id"].startswith("apr_")
    assert by_type["delete_account"]["status"] == "denied"


def test_the_key_fixes_the_environment_whatever_the_headers_say(px: RunningProxy) -> None:
    resp = px.client(AGENT_KEY).chat.completions.create(
        model="gpt-4o-mini", messages=user('CALL send_note {"text": "x"}'), tools=TOOLS,
        extra_headers={"X-Authority-Environment": "dev", "Authority-Env": "dev"})
    a = authority(resp)
    assert a["environment"] == "prod"
    assert a["actions"][0]["status"] == "pending_approval"
    dev = chat(px, 'CALL send_note {"text": "x"}', key=DEV_KEY)
    assert authority(dev)["environment"] == "dev"
    assert authority(dev)["actions"][0]["status"] == "simulated"  # dev forces simulation


def test_denials_surface_as_openai_errors_with_their_codes(px: RunningProxy) -> None:
    with pytest.raises(openai.PermissionDeniedError) as denied:
        chat(px, "SAY hi", model="gpt-4o")
    assert denied.value.code == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError) as ceiling:
        chat(px, "SAY hi", max_tokens=1_000_000)
    assert ceiling.value.code == "cost_ceiling_exceeded"
    with pytest.raises(openai.AuthenticationError) as bad_key:
        chat(px, "SAY hi", key="sk-not-a-key")
    assert bad_key.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError) as role:
        chat(px, "SAY hi", key=APPROVER_KEY)
    assert role.value.code == "insufficient_role"


def test_models_lists_only_what_the_environment_allows(px: RunningProxy) -> None:
    assert [m.id for m in px.client(AGENT_KEY).models.list()] == ["gpt-4o-mini"]
    # dev allows "gpt-4o-mini" and "gpt-4.1-*": matched against the upstream's list
    assert sorted(m.id for m in px.client(DEV_KEY).models.list()) == [
        "gpt-4.1-mini", "gpt-4.1-nano", "gpt-4o-mini"]


def test_upstream_failures_map_to_gateway_codes(px: RunningProxy) -> None:
    with pytest.raises(openai.APIStatusError) as failed:
        chat(px, "FAIL 500")
    assert failed.value.status_code == 502 and failed.value.code == "upstream_error"
    with pytest.raises(openai.APIStatusError) as garbage:
        chat(px, "GARBAGE")
    assert garbage.value.code == "upstream_malformed_response"
    with pytest.raises(openai.BadRequestError) as refused:  # an upstream 4xx passes through
        chat(px, "FAIL 400")
    assert "scripted failure" in refused.value.message


# -- streaming ---------------------------------------------------------------------------


STREAM_SCRIPT = 'SAY streamed words arrive\nCALL lookup_customer {"id": 3}\n' \
                'CALL send_note {"text": "held back"}'


def _collect(chunks: list[Any]) -> tuple[str, list[str], dict[str, Any]]:
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    names = [tc.function.name for c in chunks if c.choices
             for tc in (c.choices[0].delta.tool_calls or []) if tc.function and tc.function.name]
    auth = [c.model_extra["authority"] for c in chunks if (c.model_extra or {}).get("authority")]
    assert len(auth) == 1
    return content, names, auth[0]


def test_streaming_through_the_proxy_sync(px: RunningProxy) -> None:
    stream = px.client().chat.completions.create(
        model="gpt-4o-mini", messages=user(STREAM_SCRIPT), tools=TOOLS, stream=True)
    content, names, auth = _collect(list(stream))
    held = next(a for a in auth["actions"] if a["status"] == "pending_approval")
    assert content == ("streamed words arrive\n\n[authority] lookup_customer: allowed; "
                       f"send_note: pending_approval ({held['approval_id']})")
    assert names == ["lookup_customer"]
    assert {a["action_type"]: a["status"] for a in auth["actions"]} == {
        "lookup_customer": "allowed", "send_note": "pending_approval"}


def test_streaming_through_the_proxy_async(px: RunningProxy) -> None:
    async def run() -> list[Any]:
        client = px.aclient()
        try:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=user(STREAM_SCRIPT), tools=TOOLS, stream=True,
                stream_options={"include_usage": True})
            return [c async for c in stream]
        finally:
            await client.close()

    chunks = asyncio.run(run())
    content, names, auth = _collect(chunks)
    assert content.startswith("streamed words arrive\n\n[authority] lookup_customer: allowed")
    assert names == ["lookup_customer"]
    assert any(c.usage is not None for c in chunks)  # asked for, so passed on
    assert auth["cost"]["actual_usd"] > 0


# -- approvals and the kill switch over HTTP ----------------------------------------------


def _pending(px: RunningProxy, key: str, text: str = "please") -> str:
    resp = chat(px, f'CALL send_note {{"text": "{text}"}}', key=key)
    action = authority(resp)["actions"][0]
    assert action["status"] == "pending_approval"
    return str(action["approval_id"])


def test_approvals_over_http_with_each_role(px: RunningProxy) -> None:
    apr = _pending(px, AGENT_KEY, "from the agent")
    assert px.http("GET", "/authority/approvals", AGENT_KEY).status_code == 403
    assert px.http("GET", "/authority/approvals").status_code == 401
    listed = px.http("GET", "/authority/approvals", APPROVER_KEY, params={"status": "pending"})
    assert listed.status_code == 200
    assert apr in [a["id"] for a in listed.json()["data"]]
    shown = px.http("GET", f"/authority/approvals/{apr}", ADMIN_KEY).json()
    assert shown["arguments"] == {"text": "from the agent"}
    assert shown["requested_by"] == "support-agent"

    refused = px.http("POST", f"/authority/approvals/{apr}/approve", AGENT_KEY)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_role"
    refused = px.http("POST", f"/authority/approvals/{apr}/approve", ADMIN_KEY)
    assert refused.json()["error"]["code"] == "insufficient_role"

    ok = px.http("POST", f"/authority/approvals/{apr}/approve", APPROVER_KEY,
                 json={"reason": "looks right"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "executed"
    assert ok.json()["decided_by"] == "approver"
    again = px.http("POST", f"/authority/approvals/{apr}/approve", APPROVER_KEY)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "approval_executed"

    own = _pending(px, HYBRID_KEY, "my own")
    selfish = px.http("POST", f"/authority/approvals/{own}/approve", HYBRID_KEY)
    assert selfish.status_code == 403
    assert selfish.json()["error"]["code"] == "self_approval_forbidden"
    assert px.http("GET", f"/authority/approvals/{own}", APPROVER_KEY).json()["status"] == \
        "pending"
    rejected = px.http("POST", f"/authority/approvals/{own}/reject", APPROVER_KEY, json={})
    assert rejected.json()["status"] == "rejected"

    missing = px.http("POST", "/authority/approvals/apr_nope/approve", APPROVER_KEY)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    audited = [e for e in px.audit_entries() if e["event"] == "approval"
               and (e.get("details") or {}).get("approval_id") in (apr, own)]
    assert {(e["approval_status"], e["actor"]) for e in audited} >= {
        ("approved", "approver"), ("executed", "approver"), ("rejected", "approver")}
    assert any(e["decision"] == "deny" and e["actor"] == "agent-approver" for e in audited)


def test_kill_switch_over_http_then_completions_are_refused(px: RunningProxy) -> None:
    body = {"engaged": True, "reason": "incident 7", "environment": "dev"}
    assert px.http("POST", "/authority/kill-switch", APPROVER_KEY, json=body).status_code == 403
    on = px.http("POST", "/authority/kill-switch", ADMIN_KEY, json=body)
    assert on.status_code == 200, on.text
    assert on.json()["engaged"] is True and on.json()["scope"] == "dev"
    try:
        status = px.http("GET", "/authority/kill-switch", ADMIN_KEY).json()
        assert status["environments"]["dev"]["engaged"] is True
        assert status["global"]["engaged"] is False
        with pytest.raises(openai.PermissionDeniedError) as exc:
            chat(px, "SAY hi", key=DEV_KEY)
        assert exc.value.code == "kill_switch_engaged"
        assert "incident 7" in str(exc.value)
        chat(px, "SAY prod still works")  # only dev was switched off
    finally:
        off = px.http("POST", "/authority/kill-switch", ADMIN_KEY,
                      json={"engaged": False, "environment": "dev"})
        assert off.status_code == 200
    chat(px, "SAY back", key=DEV_KEY)


# -- idempotency -------------------------------------------------------------------------


def test_sixteen_concurrent_requests_with_one_key_make_one_upstream_call(
        px: RunningProxy) -> None:
    body = {"model": "gpt-4o-mini", "messages": user("SLEEP 0.5\nSAY once only")}
    before = px.upstream_stats()["chat_requests"]
    results = concurrently(lambda: px.http("POST", "/v1/chat/completions", AGENT_KEY,
                                           json=body, headers={"Idempotency-Key": "order-16"}))
    assert px.upstream_stats()["chat_requests"] - before == 1
    ok = [r for r in results if r.status_code == 200]
    busy = [r for r in results if r.status_code == 409]
    assert len(ok) + len(busy) == 16 and ok
    assert {r.json()["error"]["code"] for r in busy} <= {"idempotency_request_in_progress"}
    ids = {r.json()["authority"]["request_id"] for r in ok}
    assert len(ids) == 1  # replays carry the original answer
    replay = px.http("POST", "/v1/chat/completions", AGENT_KEY, json=body,
                     headers={"Idempotency-Key": "order-16"})
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["authority"]["request_id"] in ids
    assert px.upstream_stats()["chat_requests"] - before == 1
    reused = px.http("POST", "/v1/chat/completions", AGENT_KEY,
                     json={**body, "messages": user("SAY other")},
                     headers={"Idempotency-Key": "order-16"})
    assert reused.status_code == 422
    assert reused.json()["error"]["code"] == "idempotency_key_reused"


# -- bad input ---------------------------------------------------------------------------


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    return dict(err)


def test_bad_input_is_a_clear_4xx_never_a_500(px: RunningProxy) -> None:
    post = "/v1/chat/completions"
    bad_json = px.http("POST", post, AGENT_KEY, content=b'{"model": "gpt-4o-mini", ')
    err = _error(bad_json, 400, "invalid_request")
    rid = err["authority"]["request_id"]
    _error(px.http("POST", post, AGENT_KEY, json={"prompt": "not a chat"}), 400,
           "invalid_request")
    _error(px.http("POST", post, AGENT_KEY, json=["a", "list"]), 400, "invalid_request")
    _error(px.http("POST", post, AGENT_KEY, content=b"\xff\xfe\x00"), 400, "invalid_request")
    _error(px.http("POST", post, AGENT_KEY, json={"model": "gpt-4o-mini", "messages": []}),
           400, "invalid_request")
    big = {"model": "gpt-4o-mini", "messages": user("x" * 70_000)}
    _error(px.http("POST", post, AGENT_KEY, json=big), 413, "request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        yield b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 8192
        yield b'"}]}'

    _error(px.http("POST", post, AGENT_KEY, content=chunked()), 413, "request_too_large")
    _error(px.http("POST", post), 401, "invalid_api_key")
    _error(px.http("POST", post, headers={"authorization": "Basic abc"}), 401,
           "invalid_api_key")
    # an OpenAI endpoint the gateway does not serve: the SDK answers the same (test_both_doors)
    _error(px.http("GET", "/v1/nothing-here", AGENT_KEY), 404, "endpoint_not_allowed")
    _error(px.http("GET", "/v2/chat/completions"), 404, "not_found")
    _error(px.http("GET", post, AGENT_KEY), 404, "endpoint_not_allowed")  # stored completions
    _error(px.http("DELETE", "/authority/kill-switch", ADMIN_KEY), 405, "method_not_allowed")
    _error(px.http("POST", "/authority/kill-switch", ADMIN_KEY, content=b"{nope"), 400,
           "invalid_request")
    _error(px.http("POST", "/authority/kill-switch", ADMIN_KEY, json={"engaged": "maybe"}),
           400, "invalid_request")
    _error(px.http("POST", "/authority/kill-switch", ADMIN_KEY,
                   json={"engaged": True, "environment": "nowhere"}), 400, "invalid_request")
    _error(px.http("GET", "/authority/approvals", APPROVER_KEY, params={"status": "bogus"}),
           400, "invalid_request")
    # What reached the engine is on the record, with its code.
    entry = next(e for e in px.audit_entries() if e.get("request_id") == rid)
    assert entry["decision"] == "error"
    assert entry["details"]["code"] == "invalid_request"
    assert entry["actor"] == "support-agent"


# -- secrets, health, metrics, logs, OpenAPI -------------------------------------------


def test_upstream_key_reaches_the_upstream_but_is_never_shown(px: RunningProxy) -> None:
    raw = px.http("POST", "/v1/chat/completions", AGENT_KEY,
                  json={"model": "gpt-4o-mini", "messages": user("SAY key check")})
    assert raw.status_code == 200
    seen = px.upstream_stats()["last_request"]["headers"]
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert AGENT_KEY not in json.dumps(seen)
    assert UPSTREAM_KEY not in raw.text and UPSTREAM_KEY not in str(raw.headers)
    denied = px.http("POST", "/v1/chat/completions", AGENT_KEY,
                     json={"model": "gpt-4o", "messages": user("hi")})
    assert UPSTREAM_KEY not in denied.text
    assert UPSTREAM_KEY not in (px.directory / "audit.jsonl").read_text()
    assert UPSTREAM_KEY not in px.process.output()
    assert AGENT_KEY not in (px.directory / "audit.jsonl").read_text()


def test_healthz_metrics_and_one_log_line_per_request(px: RunningProxy) -> None:
    health = px.http("GET", "/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    resp = chat(px, 'CALL send_note {"text": "metric me"}')
    rid = authority(resp)["request_id"]
    with pytest.raises(openai.PermissionDeniedError):
        chat(px, "SAY hi", model="gpt-4o")
    text = px.http("GET", "/metrics").text
    assert 'authority_requests_total{code="none",decision="allow",' \
           'route="/v1/chat/completions",status="200"}' in text
    assert 'code="model_not_allowed",decision="deny"' in text
    assert 'authority_actions_total{status="pending_approval"}' in text
    assert "authority_upstream_latency_seconds_count" in text
    assert "authority_gateway_overhead_seconds_count" in text
    cost = [line for line in text.splitlines()
            if line.startswith('authority_cost_usd_total{environment="prod"}')]
    assert cost and float(cost[0].split()[-1]) > 0
    mine = [line for line in px.process.output().splitlines() if f"request_id={rid}" in line]
    lines = [line for line in mine if " method=" in line]  # the request's line
    assert len(lines) == 1
    assert len(mine) - 1 == len(authority(resp)["actions"])  # and one line per action
    assert "key=support-agent" in lines[0] and "model=gpt-4o-mini" in lines[0]
    assert "decision=allow" in lines[0] and "status=200" in lines[0]
    assert "latency_ms=" in lines[0]
    px.http("GET", "/v1/x%0Arequest_id=forged%20key=admin", AGENT_KEY)
    assert not any(line.startswith("request_id=forged")
                   for line in px.process.output().splitlines())


def test_openapi_describes_the_management_api(px: RunningProxy) -> None:
    doc = px.http("GET", "/openapi.json").json()
    paths = doc["paths"]
    for p in ("/authority/approvals", "/authority/approvals/{approval_id}",
              "/authority/approvals/{approval_id}/approve",
              "/authority/approvals/{approval_id}/reject", "/authority/kill-switch",
              "/healthz", "/metrics", "/v1/chat/completions", "/v1/models"):
        assert p in paths, p
    assert set(paths["/authority/kill-switch"]) == {"get", "post"}
    schemas = doc["components"]["schemas"]
    assert set(schemas["KillSwitchBody"]["properties"]) == {"engaged", "reason", "environment"}
    assert "status" in schemas["Approval"]["properties"]
    assert "reason" in schemas["DecisionBody"]["properties"]


def test_audit_chain_verifies_after_every_kind_of_entry(upstream: ScriptedServer,
                                                         tmp_path: Path) -> None:
    """Its own proxy and its own traffic: requests, actions, an approval, the kill switch,
    a replay and a refusal all chain, whatever other tests did."""
    from authority_sdk.audit import verify

    with start_proxy(upstream, tmp_path) as rp:
        approval_id = _pending(rp, AGENT_KEY)
        assert rp.http("POST", f"/authority/approvals/{approval_id}/approve",
                       APPROVER_KEY).status_code == 200
        chat(rp, 'CALL lookup_customer {"id": 1}', extra_headers={"Idempotency-Key": "k"})
        chat(rp, 'CALL lookup_customer {"id": 1}', extra_headers={"Idempotency-Key": "k"})
        for engaged in (True, False):
            assert rp.http("POST", "/authority/kill-switch", ADMIN_KEY,
                           json={"engaged": engaged}).status_code == 200
        rp.http("POST", "/v1/chat/completions", AGENT_KEY, json={"model": "gpt-4o"})
        events = {e["event"] for e in rp.audit_entries()}
        assert {"request", "action", "approval", "kill_switch", "replay"} <= events
        assert verify(Path(tmp_path / "audit.jsonl")).ok
