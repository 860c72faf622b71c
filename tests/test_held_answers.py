"""When an answer is kept in its idempotency claim (the SDK's retry key, issue 15).

openai's retry loop sends one ``X-Authority-Retry-Key`` for all attempts of a call. The
answer is held under it (claimed, the answer checkpointed, the reply stored) only before
something of the answer takes effect at the gateway: a call the app dispatches itself
needs no record, since openai retries only an attempt whose answer the app never got.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import audit_entries, tool, user
from servers import HttpReceiver

from authority_sdk.client import AuthorityClient
from authority_sdk.effects import arun, run
from authority_sdk.engine import CallContext, Gateway
from authority_sdk.liveness import process_owner
from authority_sdk.wire import Caller, GatewayRequest

pytestmark = pytest.mark.usefixtures("audit_chain_intact")

MODEL = "gpt-4o-mini"
TOOLS = [tool("lookup_customer"), tool("issue_refund")]


def refund_policy(rx: HttpReceiver) -> dict[str, Any]:
    """lookup_customer goes back to the app; issue_refund runs at the billing webhook."""
    return {"actions": {"issue_refund": {"executor": "billing", "mode": "auto_execute"}},
            "executors": {"billing": {"type": "webhook", "url": rx.url("/refunds"),
                                      "timeout_s": 5}}}


def retry_record(gw: Gateway, retry_key: str) -> dict[str, Any] | None:
    return gw.store.idem_get(f"retry:sdk:prod:{retry_key}")


def ask(gw: Gateway, retry_key: str, *calls: tuple[str, dict[str, Any]]) -> Any:
    client = AuthorityClient(gateway=gw, max_retries=0)
    script = "\n".join(f"CALL {name} {json.dumps(args)}" for name, args in calls)
    return client.chat.completions.create(
        model=MODEL, messages=user(script), tools=TOOLS,
        extra_headers={"X-Authority-Retry-Key": retry_key})


def test_an_answer_the_app_dispatches_itself_writes_no_idempotency_record(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    gw = Gateway(write_policy(refund_policy(rx)))
    gateways.append(gw)
    resp = ask(gw, "rk-client-only", ("lookup_customer", {"customer_id": "C-1"}))

    [action] = resp.authority["actions"]
    assert (action["status"], action["dispatch"]) == ("allowed", "client")
    assert resp.choices[0].message.tool_calls[0].function.name == "lookup_customer"
    # Nothing took effect here: the call costs its audit entry, not a claim and checkpoint.
    assert retry_record(gw, "rk-client-only") is None


def test_an_answer_with_an_effect_is_held_before_it_and_a_retry_replays_it(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    gw = Gateway(write_policy(refund_policy(rx)))
    gateways.append(gw)
    calls = (("lookup_customer", {"customer_id": "C-1"}),
             ("issue_refund", {"amount": 20, "order_id": "o-1"}))
    first = ask(gw, "rk-effect", *calls)

    assert [a["status"] for a in first.authority["actions"]] == ["allowed", "executed"]
    record = retry_record(gw, "rk-effect")
    assert record is not None and record["status"] == "done"
    assert record["response"]["request_id"] == first.authority["request_id"]

    # openai's next attempt of the same call: the stored answer, no second refund.
    again = ask(gw, "rk-effect", *calls)
    assert again.authority["idempotency"]["replayed"] is True
    assert again.authority["original_request_id"] == first.authority["request_id"]
    assert len(rx.requests) == 1


def test_a_retry_key_with_other_bytes_is_refused_not_replayed(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    """A retry key matches the very bytes an attempt sent (openai resends them as they were):
    another body under a held key is a conflict, never the first body's answer."""
    gw = Gateway(write_policy(refund_policy(rx)))
    gateways.append(gw)
    ask(gw, "rk-bytes", ("issue_refund", {"amount": 20, "order_id": "o-1"}))
    with pytest.raises(openai.UnprocessableEntityError) as ei:
        ask(gw, "rk-bytes", ("issue_refund", {"amount": 20, "order_id": "o-2"}))
    assert ei.value.body["code"] == "idempotency_key_reused"  # type: ignore[index]
    assert len(rx.requests) == 1


def _completion(*calls: tuple[str, dict[str, Any]]) -> bytes:
    return json.dumps({
        "id": "chatcmpl-held", "object": "chat.completion", "created": 1, "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None,
            "tool_calls": [{"id": f"call_{i}", "type": "function",
                            "function": {"name": name, "arguments": json.dumps(args)}}
                           for i, (name, args) in enumerate(calls)]}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
    }).encode()


def _begin(gw: Gateway, key: str, header: str = "x-authority-retry-key") -> CallContext:
    """A request begun with the SDK's retry key (a lazy claim) or a client's key (held)."""
    body = json.dumps({"model": MODEL, "messages": user("hello"), "tools": TOOLS}).encode()
    req = GatewayRequest(caller=Caller(name="sdk", environment="prod"), body=body,
                         headers={header: key})
    ctx = run(gw.begin_d(req), gw.runtime)
    assert isinstance(ctx, CallContext)
    assert (ctx.lazy_claim if header == "x-authority-retry-key" else ctx.claim) is not None
    return ctx


def _taken_meanwhile(gw: Gateway, retry_key: str) -> dict[str, Any]:
    """Another attempt (alive: this process) claims the key between this one's begin and
    its answer."""
    theirs = {"claim_id": "req_theirs", "status": "in_flight", "fingerprint": "f",
              "lease_until": 4e9, "claimed_at": 1.0, "owner": process_owner()}
    assert gw.store.idem_claim(f"retry:sdk:prod:{retry_key}", theirs, ttl_s=600) is None
    return theirs


def test_a_key_taken_meanwhile_denies_the_whole_answer_before_its_first_effect(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        tmp_path: Path) -> None:
    gw = Gateway(write_policy(refund_policy(rx)))
    gateways.append(gw)
    ctx = _begin(gw, "rk-lost")
    theirs = _taken_meanwhile(gw, "rk-lost")
    # The app's own call comes first and needs no hold; the refund's hold finds the key
    # taken, so neither runs here: the other attempt gates its own answer.
    resp = run(gw.complete_d(ctx, 200, _completion(
        ("lookup_customer", {"customer_id": "C-1"}),
        ("issue_refund", {"amount": 20, "order_id": "o-1"}))), gw.runtime)

    actions = json.loads(resp.body)["authority"]["actions"]
    assert [a["code"] for a in actions] == ["idempotency_claim_lost"] * 2
    assert [a["status"] for a in actions] == ["denied", "denied"]
    assert json.loads(resp.body)["choices"][0]["message"].get("tool_calls") in (None, [])
    assert rx.requests == []
    # What was decided before the hold failed is not on the record as allowed.
    mine = [e for e in audit_entries(tmp_path / "audit.jsonl")
            if e["request_id"] == ctx.request_id]
    assert [e["event"] for e in mine] == ["request"]
    assert retry_record(gw, "rk-lost") == theirs


def test_an_answer_without_effects_leaves_a_key_taken_meanwhile_alone(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    gw = Gateway(write_policy(refund_policy(rx)))
    gateways.append(gw)
    ctx = _begin(gw, "rk-other")
    theirs = _taken_meanwhile(gw, "rk-other")
    resp = run(gw.complete_d(ctx, 200, _completion(
        ("lookup_customer", {"customer_id": "C-1"}))), gw.runtime)

    [action] = json.loads(resp.body)["authority"]["actions"]
    assert (action["status"], action["dispatch"]) == ("allowed", "client")
    assert retry_record(gw, "rk-other") == theirs


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_client_key_taken_before_its_answer_was_held_hands_the_app_no_call(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        tmp_path: Path, driver: str) -> None:
    """A client's key is held before the app sees the answer's calls, even calls it
    dispatches itself (its checkpoint goes with the audit entries, ``actions.Ride``): when
    a retry took the key meanwhile, nothing of the answer reaches the app, and the record
    shows the request, not an allowed action."""
    gw = Gateway(write_policy(refund_policy(rx)))
    gateways.append(gw)
    ctx = _begin(gw, "ck-lost", "idempotency-key")
    assert ctx.claim is not None
    theirs = {**ctx.claim.record, "claim_id": "req_theirs", "owner": process_owner()}
    assert gw.store.idem_replace(ctx.claim.key, ctx.claim.record["claim_id"], theirs,
                                 ttl_s=600)
    gate = gw.complete_d(ctx, 200, _completion(("lookup_customer", {"customer_id": "C-1"})))
    resp = run(gate, gw.runtime) if driver == "sync" else asyncio.run(arun(gate, gw.runtime))

    [action] = json.loads(resp.body)["authority"]["actions"]
    assert (action["status"], action["code"]) == ("denied", "idempotency_claim_lost")
    assert json.loads(resp.body)["choices"][0]["message"].get("tool_calls") in (None, [])
    mine = [e for e in audit_entries(tmp_path / "audit.jsonl")
            if e["request_id"] == ctx.request_id]
    assert [e["event"] for e in mine] == ["request"]
    assert gw.store.idem_get(ctx.claim.key) == theirs


@pytest.mark.parametrize("script", ['CALL lookup_customer {"customer_id": "C-9"}',
                                    "no calls, just words"], ids=["held", "no-calls"])
def test_a_response_that_cannot_be_built_before_the_record_still_leaves_the_record(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, script: str) -> None:
    """The response is built before the audit entries are written (so that its finished
    answer can go with them); a failure there never costs the record: the entries go
    first, the response is built after them, the key replays it."""
    from authority_sdk.engine import Engine

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("prebuild broke")

    monkeypatch.setattr(Engine, "_prebuild", broken)
    gw = Gateway(write_policy(refund_policy(rx)))
    gateways.append(gw)
    client = AuthorityClient(gateway=gw, max_retries=0)
    hdr = {"Idempotency-Key": f"prebuild-{len(script)}"}
    first = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user(script), tools=TOOLS, extra_headers=hdr)
    again = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user(script), tools=TOOLS, extra_headers=hdr)
    assert again.headers.get("idempotent-replayed") == "true"
    answer = first.parse()
    assert again.parse().choices == answer.choices
    calls = answer.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == (["lookup_customer"] if "CALL" in script else [])
    rid = answer.authority["request_id"]  # type: ignore[attr-defined]
    events = [e["event"] for e in audit_entries(tmp_path / "audit.jsonl")
              if e.get("request_id") == rid]
    assert events == ["request", "action"][:1 + len(calls)]


def test_an_audit_log_that_breaks_at_the_last_write_answers_with_the_warning(
        write_policy: Callable[..., Path], gateways: list[Gateway], effects: Path,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The one call runs, then the log becomes unwritable: the request's last write (its
    outcome, built with its response before it) fails after an effect. The entries are
    parked, the response — encoded again — carries the warning, and nothing runs twice."""
    from sample_actions import BREAK_AUDIT_ENV

    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv(BREAK_AUDIT_ENV, str(log))
    gw = Gateway(write_policy({
        "actions": {"issue_refund": {"executor": "breaker", "mode": "auto_execute"}},
        "executors": {"breaker": {"type": "python",
                                  "target": "sample_actions:record_then_break_audit"}}}))
    gateways.append(gw)
    client = AuthorityClient(gateway=gw, max_retries=0)
    resp = client.chat.completions.create(
        model=MODEL, messages=user('CALL issue_refund {"order_id": "R-1", "amount": 5}'),
        tools=TOOLS, extra_headers={"Idempotency-Key": "breaks-at-the-end"})
    authority = resp.authority  # type: ignore[attr-defined]
    assert [a["status"] for a in authority["actions"]] == ["executed"]
    assert authority["warnings"] and "audit log could not be written" in authority["warnings"][0]
    assert len(effects.read_text().splitlines()) == 1
    with pytest.raises(openai.APIStatusError) as refused:  # no new work until it is written
        client.chat.completions.create(
            model=MODEL, messages=user('CALL issue_refund {"order_id": "R-1", "amount": 5}'),
            tools=TOOLS, extra_headers={"Idempotency-Key": "breaks-at-the-end"})
    assert refused.value.status_code == 503
    assert len(effects.read_text().splitlines()) == 1
    log.rmdir()  # the log mended, for the chain check after the test
    log.with_name(log.name + ".aside").rename(log)
