"""Every tool call is an action: modes, rules, the rewritten completion, dedupe, redaction
and the audit trail, all through ``AuthorityClient`` against the scripted model
(DESIGN.md §3, issue 3)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import ScriptedServer, audit_entries, tool, user
from servers import HttpReceiver

from authority_sdk import control
from authority_sdk.client import AuthorityClient
from authority_sdk.engine import Gateway

pytestmark = pytest.mark.usefixtures("audit_chain_intact")

MODEL = "gpt-4o-mini"
TOOLS = [tool("issue_refund"), tool("lookup_customer"), tool("wipe_disk"), tool("send_note")]


def refund_policy(rx: HttpReceiver, **action: Any) -> dict[str, Any]:
    """issue_refund runs at the billing webhook; small refunds are automatic, huge ones denied,
    large ones only simulated, the rest wait for a person."""
    return {
        "actions": {
            "issue_refund": {
                "executor": "billing", "mode": "require_human_approval",
                "rules": [
                    {"if": {"amount": {"lte": 50}}, "mode": "auto_execute"},
                    {"if": {"amount": {"gt": 1000}}, "mode": "deny"},
                    {"if": {"amount": {"gt": 500}}, "mode": "simulation_only"},
                ],
                **action,
            },
            "wipe_disk": {"mode": "deny"},
        },
        "executors": {"billing": {"type": "webhook", "url": rx.url("/refunds"),
                                  "timeout_s": 5}},
    }


def make_client(gateways: list[Gateway], path: Path, **kw: Any) -> AuthorityClient:
    gw = Gateway(path)
    gateways.append(gw)
    return AuthorityClient(gateway=gw, max_retries=0, **kw)


def calls(*items: tuple[str, dict[str, Any]]) -> str:
    return "\n".join(f"CALL {name} {json.dumps(args)}" for name, args in items)


def ask(client: AuthorityClient, script: str, **kw: Any) -> Any:
    kw.setdefault("tools", TOOLS)
    return client.chat.completions.create(model=MODEL, messages=user(script), **kw)


# -- each mode ---------------------------------------------------------------------------


def test_auto_execute_with_an_executor_runs_at_the_gateway_and_withholds_the_call(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        tmp_path: Path) -> None:
    client = make_client(gateways, write_policy(refund_policy(rx)))
    resp = ask(client, calls(("issue_refund", {"amount": 20, "order_id": "o-1"})))

    [action] = resp.authority["actions"]
    assert action["mode"] == "auto_execute" and action["dispatch"] == "gateway"
    assert action["status"] == "executed" and action["decision"] == "allow"
    assert action["result"] == {"refund_id": "rf_1"}
    [posted] = rx.requests
    assert posted.method == "POST" and posted.path == "/refunds"
    assert posted.header("idempotency-key") == action["action_key"]
    assert posted.json == {"action_type": "issue_refund", "action_key": action["action_key"],
                           "arguments": {"amount": 20, "order_id": "o-1"}}
    # The gateway ran it: the app must not run it a second time.
    choice = resp.choices[0]
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert choice.message.content == "[authority] issue_refund: executed (amount <= 50)"


def test_auto_execute_without_an_executor_is_returned_for_the_app_to_run(
        write_policy: Callable[..., Path], gateways: list[Gateway]) -> None:
    client = make_client(gateways, write_policy())
    resp = ask(client, calls(("lookup_customer", {"id": 7})))

    [action] = resp.authority["actions"]
    assert (action["mode"], action["dispatch"], action["status"]) == (
        "auto_execute", "client", "allowed")
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    [kept] = choice.message.tool_calls
    assert kept.id == action["tool_call"]["id"]
    assert (kept.function.name, json.loads(kept.function.arguments)) == (
        "lookup_customer", {"id": 7})
    # Nothing for the gateway to report back: the app answers its own call.
    followup = resp.authority["followup_messages"]
    assert [m["role"] for m in followup] == ["assistant"]


def test_require_human_approval_withholds_the_call_and_opens_a_pending_approval(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    client = make_client(gateways, write_policy(refund_policy(rx)), caller="support-bot")
    resp = ask(client, calls(("issue_refund", {"amount": 300, "order_id": "o-9"})))

    [action] = resp.authority["actions"]
    assert action["mode"] == "require_human_approval"
    assert action["status"] == "pending_approval" and action["decision"] == "allow"
    approval = control.get_approval(client.gateway, action["approval_id"])
    assert approval["status"] == "pending"
    assert approval["arguments"] == {"amount": 300, "order_id": "o-9"}
    assert approval["action_key"] == action["action_key"]
    assert approval["requested_by"] == "support-bot"
    assert approval["environment"] == "prod"
    assert approval["expires_at"] > approval["created_at"]
    assert rx.requests == []
    assert resp.choices[0].message.tool_calls is None
    assert resp.choices[0].finish_reason == "stop"
    assert action["approval_id"] in resp.choices[0].message.content


def test_simulation_only_runs_nothing_and_shows_the_exact_request_it_would_send(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    client = make_client(gateways, write_policy(refund_policy(rx)), environment="dev")
    args = {"amount": 20, "order_id": "o-5"}
    resp = ask(client, calls(("issue_refund", args), ("lookup_customer", {"id": 3})))

    refund, lookup = resp.authority["actions"]
    assert refund["mode"] == "simulation_only" and refund["status"] == "simulated"
    assert refund["reason"] == "environment dev forces simulation_only"
    would = refund["result"]["would_execute"]
    # Exactly what the executor would have sent, from the executor itself.
    expected = client.gateway.executors.get("billing").describe(
        "issue_refund", args, refund["action_key"])
    assert would == expected
    assert would["method"] == "POST" and would["url"] == rx.url("/refunds")
    assert would["headers"]["Idempotency-Key"] == refund["action_key"]
    assert would["json"] == {"action_type": "issue_refund", "arguments": args,
                             "action_key": refund["action_key"]}
    assert lookup["status"] == "simulated"
    assert lookup["result"] == {"would_dispatch": "client", "action_type": "lookup_customer",
                                "arguments": {"id": 3}}
    assert rx.requests == []
    # A simulated call is never handed to the app either.
    assert resp.choices[0].message.tool_calls is None
    tool_msgs = [json.loads(m["content"]) for m in resp.authority["followup_messages"][1:]]
    assert [m["status"] for m in tool_msgs] == ["simulated", "simulated"]
    assert tool_msgs[0]["result"]["would_execute"] == expected


def test_simulation_only_never_imports_or_calls_a_python_target(
        write_policy: Callable[..., Path], gateways: list[Gateway], tmp_path: Path) -> None:
    journal = tmp_path / "ran.jsonl"
    path = write_policy({
        "actions": {"write_note": {"executor": "notes", "mode": "auto_execute"}},
        "executors": {"notes": {"type": "python", "target": "sample_actions:write_note"}},
    })
    client = make_client(gateways, path, environment="dev")
    args = {"text": "hello", "journal": str(journal)}
    resp = ask(client, calls(("write_note", args)), tools=[tool("write_note")])

    [action] = resp.authority["actions"]
    assert action["status"] == "simulated"
    assert action["result"]["would_execute"]["target"] == "sample_actions:write_note"
    assert action["result"]["would_execute"]["args"] == [args]
    assert not journal.exists()


def test_deny_mode_withholds_the_call_and_says_why(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    client = make_client(gateways, write_policy(refund_policy(rx)))
    resp = ask(client, calls(("wipe_disk", {"path": "/"}),
                             ("issue_refund", {"amount": 5000, "order_id": "o-2"})))

    wipe, refund = resp.authority["actions"]
    assert (wipe["mode"], wipe["status"], wipe["code"]) == ("deny", "denied", "denied_by_policy")
    assert wipe["reason"] == "action wipe_disk has mode deny"
    assert (refund["status"], refund["code"], refund["reason"]) == (
        "denied", "denied_by_rule", "amount > 1000")
    assert rx.requests == []
    assert resp.choices[0].message.tool_calls is None
    tool_msgs = [json.loads(m["content"]) for m in resp.authority["followup_messages"][1:]]
    assert tool_msgs == [
        {"status": "denied", "reason": "action wipe_disk has mode deny",
         "code": "denied_by_policy"},
        {"status": "denied", "reason": "amount > 1000", "code": "denied_by_rule"},
    ]


# -- every rule matcher decides a real completion ------------------------------------------

MATCHER_CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ("eq", {"tier": {"eq": "gold"}}, {"tier": "gold"}, {"tier": "silver"}),
    ("ne", {"tier": {"ne": "gold"}}, {"tier": "silver"}, {"tier": "gold"}),
    ("lt", {"amount": {"lt": 10}}, {"amount": 9.5}, {"amount": 10}),
    ("lte", {"amount": {"lte": 10}}, {"amount": 10}, {"amount": 10.01}),
    ("gt", {"amount": {"gt": 100}}, {"amount": 100.5}, {"amount": 100}),
    ("gte", {"amount": {"gte": 100}}, {"amount": 100}, {"amount": 99}),
    ("in", {"country": {"in": ["FR", "DE"]}}, {"country": "DE"}, {"country": "US"}),
    ("not_in", {"country": {"not_in": ["FR", "DE"]}}, {"country": "US"}, {"country": "FR"}),
    ("glob", {"email": {"glob": "*@example.com"}}, {"email": "ann@example.com"},
     {"email": "ann@example.org"}),
    ("regex", {"sku": {"regex": "^SKU-[0-9]+$"}}, {"sku": "SKU-12"}, {"sku": "SKU-12a"}),
    ("dotted", {"customer.tier": {"eq": "gold"}}, {"customer": {"tier": "gold"}},
     {"customer": {"tier": "silver"}}),
    ("all_keys", {"amount": {"gt": 10}, "country": {"eq": "FR"}},
     {"amount": 11, "country": "FR"}, {"amount": 11, "country": "DE"}),
]


@pytest.mark.parametrize(("name", "condition", "matching", "other"), MATCHER_CASES,
                         ids=[c[0] for c in MATCHER_CASES])
def test_each_rule_matcher_decides_a_real_completion(
        write_policy: Callable[..., Path], gateways: list[Gateway], name: str,
        condition: dict[str, Any], matching: dict[str, Any], other: dict[str, Any]) -> None:
    path = write_policy({"actions": {"probe": {
        "mode": "auto_execute", "rules": [{"if": condition, "mode": "deny"}]}}})
    client = make_client(gateways, path)
    resp = ask(client, calls(("probe", matching), ("probe", other)), tools=[tool("probe")])

    hit, miss = resp.authority["actions"]
    assert (hit["status"], hit["code"]) == ("denied", "denied_by_rule")
    assert (miss["status"], miss["mode"]) == ("allowed", "auto_execute")
    [kept] = resp.choices[0].message.tool_calls
    assert kept.id == miss["tool_call"]["id"]
    assert json.loads(kept.function.arguments) == other


def test_rules_can_route_to_approval_and_simulation_too(
        write_policy: Callable[..., Path], gateways: list[Gateway]) -> None:
    path = write_policy({"actions": {"probe": {"mode": "auto_execute", "rules": [
        {"if": {"risk": {"eq": "high"}}, "mode": "require_human_approval",
         "reason": "high risk needs a person"},
        {"if": {"risk": {"eq": "unknown"}}, "mode": "simulation_only"},
    ]}}})
    client = make_client(gateways, path)
    resp = ask(client, calls(("probe", {"risk": "high"}), ("probe", {"risk": "unknown"}),
                             ("probe", {"risk": "low"})), tools=[tool("probe")])

    statuses = [(a["status"], a["reason"]) for a in resp.authority["actions"]]
    assert statuses == [("pending_approval", "high risk needs a person"),
                        ("simulated", 'risk == "unknown"'),
                        ("allowed", "action probe has mode auto_execute")]


# -- the other resolution steps, end to end ------------------------------------------------


def test_allowlists_validation_and_defaults_decide_real_completions(
        write_policy: Callable[..., Path], gateways: list[Gateway]) -> None:
    path = write_policy({
        "environments": {
            "staging": {"models": [MODEL], "actions": ["lookup_customer", "archive"],
                        "default_mode": "auto_execute"},
        },
        "actions": {"send_note": {"environments": ["dev"]}, "archive": {}},
    })
    schema_tools = [tool("lookup_customer", {"id": {"type": "integer"}}, ["id"]),
                    tool("send_note"), tool("archive"), tool("format_disk")]
    script = "\n".join([
        calls(("send_note", {"text": "x"}), ("format_disk", {}),
              ("lookup_customer", {"name": "no id"}), ("archive", {"id": 1})),
        'CALL lookup_customer {"id": ',  # not JSON at all
    ])
    prod = make_client(gateways, path)
    resp = ask(prod, script, tools=schema_tools)
    got = [(a["action_type"], a["status"], a["code"]) for a in resp.authority["actions"]]
    assert got == [
        ("send_note", "denied", "action_not_allowed"),  # the action's environments
        ("format_disk", "denied", "action_not_allowed"),  # not in the policy: fail closed
        ("lookup_customer", "denied", "invalid_arguments"),  # the request's tool schema
        ("archive", "pending_approval", None),  # no mode anywhere: the fail-safe default
        ("lookup_customer", "denied", "invalid_arguments"),
    ]
    assert resp.authority["actions"][3]["reason"] == (
        "policy default mode is require_human_approval")

    staging = make_client(gateways, path, environment="staging")
    resp = ask(staging, calls(("archive", {"id": 1}), ("send_note", {"text": "x"})),
               tools=schema_tools)
    archive, note = resp.authority["actions"]
    assert (archive["status"], archive["reason"]) == (
        "allowed", "environment staging defaults to auto_execute")
    assert (note["status"], note["code"]) == ("denied", "action_not_allowed")
    assert [c.function.name for c in resp.choices[0].message.tool_calls] == ["archive"]


def test_kill_switch_engaged_while_the_model_answers_denies_every_action(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        upstream: ScriptedServer) -> None:
    client = make_client(gateways, write_policy(refund_policy(rx)))
    before = upstream.chat_requests
    box: dict[str, Any] = {}

    def call() -> None:
        box["resp"] = ask(client, "SLEEP 1\n" + calls(
            ("issue_refund", {"amount": 20, "order_id": "o-1"}), ("lookup_customer", {"id": 1})))

    worker = threading.Thread(target=call)
    worker.start()
    deadline = time.monotonic() + 10
    while upstream.chat_requests == before and time.monotonic() < deadline:
        time.sleep(0.01)
    # The request passed the gate before the switch; its actions must not.
    control.set_kill_switch(client.gateway, True, actor="ops", reason="incident 7")
    worker.join(15)
    resp = box["resp"]
    assert [(a["status"], a["code"]) for a in resp.authority["actions"]] == [
        ("denied", "kill_switch_engaged"), ("denied", "kill_switch_engaged")]
    assert resp.choices[0].message.tool_calls is None
    assert rx.requests == []

    # And a new request is refused before it reaches the model.
    served = upstream.chat_requests
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask(client, calls(("lookup_customer", {"id": 1})))
    assert err.value.code == "kill_switch_engaged"
    assert upstream.chat_requests == served


# -- several calls in one completion -------------------------------------------------------

MIXED = [
    ("lookup_customer", {"id": 1}),
    ("issue_refund", {"amount": 20, "order_id": "A"}),     # executed at the webhook
    ("issue_refund", {"amount": 300, "order_id": "B"}),    # pending approval
    ("issue_refund", {"amount": 5000, "order_id": "C"}),   # denied by rule
    ("issue_refund", {"amount": 700, "order_id": "D"}),    # simulated
    ("lookup_customer", {"id": 2}),
]


def test_mixed_outcomes_keep_exactly_the_calls_the_app_may_run(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    client = make_client(gateways, write_policy(refund_policy(rx)))
    resp = ask(client, calls(*MIXED))

    actions = resp.authority["actions"]
    assert [a["status"] for a in actions] == [
        "allowed", "executed", "pending_approval", "denied", "simulated", "allowed"]
    assert [(a["tool_call"]["name"], json.loads(a["tool_call"]["arguments"]))
            for a in actions] == MIXED
    assert len({a["tool_call"]["id"] for a in actions}) == 6
    assert len({a["action_key"] for a in actions}) == 6

    # An app that knows nothing of the gateway sees only the two lookups.
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.id for c in choice.message.tool_calls] == [actions[0]["tool_call"]["id"],
                                                         actions[5]["tool_call"]["id"]]
    assert [c.function.arguments for c in choice.message.tool_calls] == [
        actions[0]["tool_call"]["arguments"], actions[5]["tool_call"]["arguments"]]
    # Whenever a call is withheld the content says what the gateway did, so libraries
    # that drop the unknown "authority" field still keep a record of it.
    assert choice.message.content == (
        "[authority] lookup_customer: allowed; issue_refund: executed (amount <= 50); "
        f"issue_refund: pending_approval ({actions[2]['approval_id']}); "
        "issue_refund: denied (denied_by_rule); issue_refund: simulated (amount > 500); "
        "lookup_customer: allowed")
    assert len(rx.requests) == 1 and rx.requests[0].json["arguments"]["order_id"] == "A"

    # followup: the assistant turn with every original call, then one tool message per
    # action the gateway handled, in order.
    followup = resp.authority["followup_messages"]
    assert followup[0]["role"] == "assistant"
    assert [c["id"] for c in followup[0]["tool_calls"]] == [a["tool_call"]["id"]
                                                            for a in actions]
    assert [c["function"]["arguments"] for c in followup[0]["tool_calls"]] == [
        a["tool_call"]["arguments"] for a in actions]
    tool_msgs = followup[1:]
    assert [m["role"] for m in tool_msgs] == ["tool"] * 4
    assert [m["tool_call_id"] for m in tool_msgs] == [a["tool_call"]["id"] for a in actions[1:5]]
    bodies = [json.loads(m["content"]) for m in tool_msgs]
    assert bodies[0] == {"status": "executed", "result": {"refund_id": "rf_1"}}
    assert bodies[1]["status"] == "pending_approval"
    assert bodies[1]["approval_id"] == actions[2]["approval_id"]
    assert bodies[2] == {"status": "denied", "reason": "amount > 1000", "code": "denied_by_rule"}
    assert bodies[3]["status"] == "simulated"
    assert bodies[3]["result"]["would_execute"]["json"]["arguments"] == MIXED[4][1]


def test_when_no_call_remains_finish_reason_is_stop_and_content_summarises(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    client = make_client(gateways, write_policy(refund_policy(rx)))
    resp = ask(client, calls(*MIXED[1:5]))

    actions = resp.authority["actions"]
    choice = resp.choices[0]
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert choice.message.content == (
        "[authority] issue_refund: executed (amount <= 50); "
        f"issue_refund: pending_approval ({actions[1]['approval_id']}); "
        "issue_refund: denied (denied_by_rule); "
        "issue_refund: simulated (amount > 500)")
    # The summary is the gateway's, not the model's: it is not replayed to the model.
    assert resp.authority["followup_messages"][0]["content"] is None

    # Content the model did write is kept, and the summary follows it.
    resp = ask(client, "SAY Refund is on its way.\n" + calls(("wipe_disk", {"path": "/"})))
    assert resp.choices[0].message.content == (
        "Refund is on its way.\n\n[authority] wipe_disk: denied (denied_by_policy)")
    assert resp.choices[0].finish_reason == "stop"
    assert resp.authority["followup_messages"][0]["content"] == "Refund is on its way."


def test_an_unaware_app_never_sees_a_withheld_call_in_the_raw_answer(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    client = make_client(gateways, write_policy(refund_policy(rx)))
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user(calls(*MIXED)), tools=TOOLS)
    body = json.loads(raw.content)
    kept = body["choices"][0]["message"]["tool_calls"]
    allowed_ids = {a["tool_call"]["id"] for a in body["authority"]["actions"]
                   if a["status"] == "allowed"}
    assert {c["id"] for c in kept} == allowed_ids
    assert all(c["function"]["name"] == "lookup_customer" for c in kept)


# -- post-call ceiling --------------------------------------------------------------------


def test_actual_cost_above_the_ceiling_stops_every_action_of_the_completion(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        tmp_path: Path) -> None:
    client = make_client(gateways, write_policy(refund_policy(rx)))
    # 1M output tokens at gpt-4o-mini prices is far above the $0.05 per-request ceiling.
    resp = ask(client, "COMPLETION_TOKENS 1000000\n" + calls(
        ("issue_refund", {"amount": 20, "order_id": "A"}),
        ("issue_refund", {"amount": 300, "order_id": "B"}),
        ("lookup_customer", {"id": 1})))

    authority = resp.authority
    assert authority["code"] == "post_cost_ceiling_exceeded"
    assert authority["cost"]["actual_usd"] > authority["cost"]["ceiling_usd"] == 0.05
    assert [(a["status"], a["code"]) for a in authority["actions"]] == [
        ("denied", "post_cost_ceiling_exceeded")] * 3
    assert resp.choices[0].message.tool_calls is None
    assert resp.choices[0].finish_reason == "stop"
    assert rx.requests == []
    assert control.list_approvals(client.gateway) == []

    [request] = audit_entries(tmp_path / "audit.jsonl", "request")
    assert request["details"]["code"] == "post_cost_ceiling_exceeded"
    assert request["cost_actual_usd"] > 0.05
    actions = audit_entries(tmp_path / "audit.jsonl", "action")
    assert [(a["decision"], a["details"]["code"]) for a in actions] == [
        ("deny", "post_cost_ceiling_exceeded")] * 3


# -- business-key dedupe ------------------------------------------------------------------


def test_second_refund_on_the_same_order_is_a_duplicate_however_it_is_worded(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    path = write_policy(refund_policy(rx, dedupe_on=["order_id"]))
    client = make_client(gateways, path)
    first = ask(client, calls(("issue_refund", {"order_id": "42", "amount": 10,
                                                "note": "sorry for the delay"})))
    [done] = first.authority["actions"]
    assert done["status"] == "executed"

    second = ask(client, calls(("issue_refund", {"order_id": "42", "amount": 12,
                                                 "note": "apologies, refunding again"})))
    [dup] = second.authority["actions"]
    assert (dup["status"], dup["decision"], dup["code"]) == ("denied", "deny",
                                                             "duplicate_action")
    assert dup["result"]["duplicate_of"]["action_key"] == done["action_key"]
    assert dup["result"]["duplicate_of"]["request_id"] == first.authority["request_id"]
    assert done["action_key"] in dup["reason"]
    assert second.choices[0].message.tool_calls is None

    other = ask(client, calls(("issue_refund", {"order_id": "43", "amount": 10})))
    assert other.authority["actions"][0]["status"] == "executed"
    assert [r.json["arguments"]["order_id"] for r in rx.requests] == ["42", "43"]

    # The model asking twice in one answer is no different.
    both = ask(client, calls(("issue_refund", {"order_id": "44", "amount": 10}),
                             ("issue_refund", {"order_id": "44", "amount": 10, "note": "x"})))
    once, twice = both.authority["actions"]
    assert (once["status"], twice["status"], twice["code"]) == (
        "executed", "denied", "duplicate_action")
    assert twice["result"]["duplicate_of"]["action_key"] == once["action_key"]
    assert [r.json["arguments"]["order_id"] for r in rx.requests] == ["42", "43", "44"]


def test_dedupe_on_a_field_inside_a_list(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    # One dotted path reads lists by index, in rules and in dedupe alike (issue 11): the
    # second refund for the same first item is a duplicate, a different item is not.
    client = make_client(gateways, write_policy(refund_policy(rx, dedupe_on=["items.0.sku"])))
    first = ask(client, calls(("issue_refund", {"amount": 10, "items": [{"sku": "A-1"}]})))
    again = ask(client, calls(("issue_refund", {"amount": 9, "items": [{"sku": "A-1"},
                                                                       {"sku": "B"}]})))
    other = ask(client, calls(("issue_refund", {"amount": 10, "items": [{"sku": "C-3"}]})))
    assert [r.authority["actions"][0]["status"] for r in (first, again, other)] == [
        "executed", "denied", "executed"]
    assert again.authority["actions"][0]["code"] == "duplicate_action"
    assert len(rx.requests) == 2


def test_a_failed_execution_does_not_block_the_order(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    client = make_client(gateways, write_policy(refund_policy(rx, dedupe_on=["order_id"])))
    rx.reply_once(503, body="try later")
    first = ask(client, calls(("issue_refund", {"order_id": "77", "amount": 10})))
    assert first.authority["actions"][0]["status"] == "failed"
    again = ask(client, calls(("issue_refund", {"order_id": "77", "amount": 10,
                                                "note": "retry"})))
    assert again.authority["actions"][0]["status"] == "executed"
    assert len(rx.requests) == 2


# -- redaction -----------------------------------------------------------------------------


def test_redacted_arguments_never_reach_the_audit_log_but_reach_the_executor(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        tmp_path: Path) -> None:
    card, password = "4111111111111111", "hunter2-very-secret"
    rx.reply(200, json={"charged": True, "card_number": card})
    path = write_policy({
        "actions": {"charge_card": {
            "executor": "billing", "mode": "auto_execute",
            "rules": [{"if": {"amount": {"gt": 100}}, "mode": "require_human_approval"}]}},
        "executors": {"billing": {"type": "webhook", "url": rx.url("/charge")}},
    })
    args = {"amount": 5, "card_number": card, "account": {"login": "ann", "password": password}}
    script = calls(("charge_card", args), ("charge_card", {**args, "amount": 500}))
    prod = make_client(gateways, path)
    resp = ask(prod, script, tools=[tool("charge_card")])
    executed, pending = resp.authority["actions"]
    assert executed["status"] == "executed" and pending["status"] == "pending_approval"
    dev = make_client(gateways, path, environment="dev")
    sim = ask(dev, script, tools=[tool("charge_card")])
    assert sim.authority["actions"][0]["status"] == "simulated"

    # The executor got the real values.
    [posted] = rx.requests
    assert posted.json["arguments"] == args
    # An approver sees them masked; the action still carries the real ones.
    shown = control.get_approval(prod.gateway, pending["approval_id"])
    assert shown["arguments"]["card_number"] != card
    assert shown["arguments"]["account"]["password"] != password
    control.approve(prod.gateway, pending["approval_id"], actor="ops")
    assert rx.requests[1].json["arguments"]["card_number"] == card

    text = (tmp_path / "audit.jsonl").read_text()
    assert card not in text and password not in text
    logged = [e["details"]["arguments"] for e in audit_entries(tmp_path / "audit.jsonl",
                                                                "action", intents=True)]
    # executing + executed, pending, two simulated, and "executing" when the approval ran it
    assert len(logged) == 6
    assert all(a["card_number"] == "[REDACTED]" for a in logged)
    assert all(a["account"] == {"login": "ann", "password": "[REDACTED]"} for a in logged)


# -- audit --------------------------------------------------------------------------------


def test_one_audit_entry_per_action_with_mode_decision_approval_and_result(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        tmp_path: Path) -> None:
    client = make_client(gateways, write_policy(refund_policy(rx)))
    resp = ask(client, calls(*MIXED))
    request_id = resp.authority["request_id"]
    actions = resp.authority["actions"]

    entries = audit_entries(tmp_path / "audit.jsonl", intents=True)
    requests = [e for e in entries if e["event"] == "request"]
    intents = [e for e in entries if e["event"] == "action"
               and e["details"]["status"] == "executing"]
    logged = [e for e in entries if e["event"] == "action"
              and e["details"]["status"] != "executing"]
    assert [r["request_id"] for r in requests] == [request_id]
    assert len(logged) == len(MIXED)
    # The request is on the record before any of its actions, and the executed refund's
    # intent ("executing") before its outcome.
    outcome = next(e for e in logged if e["details"]["action_key"] == actions[1]["action_key"])
    assert entries.index(requests[0]) < entries.index(intents[0]) < entries.index(outcome)
    assert [e["details"]["action_key"] for e in intents] == [actions[1]["action_key"]]
    assert intents[0]["execution_result"] is None
    for entry, action in zip(logged, actions, strict=True):
        assert entry["request_id"] == request_id
        assert entry["environment"] == "prod" and entry["model"] == MODEL
        assert entry["action_type"] == action["action_type"]
        assert entry["actor"] == "sdk"
        assert entry["details"]["tool_call_id"] == action["tool_call"]["id"]
        assert entry["details"]["action_key"] == action["action_key"]
        assert entry["details"]["status"] == action["status"]
        assert entry["reason"] == action["reason"]
    assert [e["details"]["mode"] for e in logged] == [
        "auto_execute", "auto_execute", "require_human_approval", "deny", "simulation_only",
        "auto_execute"]
    assert [e["decision"] for e in logged] == ["allow", "allow", "allow", "deny", "allow",
                                               "allow"]
    assert [e["approval_status"] for e in logged] == [None, None, "pending", None, None, None]
    assert logged[2]["details"]["approval_id"] == actions[2]["approval_id"]
    results = [e["execution_result"] for e in logged]
    assert results[1] == {"status": "executed", "result": {"refund_id": "rf_1"}}
    assert results[4]["status"] == "simulated"
    assert results[4]["result"]["would_execute"]["url"] == rx.url("/refunds")
    assert results[0] is None and results[2] is None and results[3] is None
    assert all(e["policy_hash"] == client.gateway.policy.hash for e in logged)
