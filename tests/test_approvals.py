"""Approvals (DESIGN.md §4) driven through ``authority_sdk.control`` on actions that
real completions created through ``AuthorityClient``."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import tool, user
from servers import HttpReceiver

from authority_sdk import control
from authority_sdk.client import AuthorityClient
from authority_sdk.engine import Gateway
from authority_sdk.errors import ApprovalError, Forbidden, KillSwitchEngaged

pytestmark = pytest.mark.usefixtures("audit_chain_intact")

MODEL = "gpt-4o-mini"
TOOLS = [tool("issue_refund"), tool("grant_access")]


def approval_policy(rx: HttpReceiver, **defaults: Any) -> dict[str, Any]:
    return {
        "defaults": defaults,
        "actions": {
            "issue_refund": {"executor": "billing", "mode": "require_human_approval",
                             "dedupe_on": ["order_id"]},
            "grant_access": {"mode": "require_human_approval"},  # the app runs it
        },
        "executors": {"billing": {"type": "webhook", "url": rx.url("/refunds"),
                                  "timeout_s": 5}},
    }


class Setup:
    """An agent's client and an approver's own gateway (as a CLI or the proxy would have),
    on the same policy file, state and audit log."""

    def __init__(self, path: Path, gateways: list[Gateway], caller: str = "support-bot") -> None:
        self.path = path
        agent_gw = Gateway(path)
        self.approver = Gateway(path)
        gateways.extend([agent_gw, self.approver])
        self.client = AuthorityClient(gateway=agent_gw, caller=caller, max_retries=0)

    def request(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        resp = self.client.chat.completions.create(
            model=MODEL, messages=user(f"CALL {name} {json.dumps(args)}"), tools=TOOLS)
        [action] = resp.authority["actions"]
        return dict(action)


@pytest.fixture
def setup(write_policy: Callable[..., Path], rx: HttpReceiver,
          gateways: list[Gateway]) -> Setup:
    return Setup(write_policy(approval_policy(rx)), gateways)


def approval_events(log: Path, approval_id: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [e for e in entries
            if e["event"] == "approval" and e["details"]["approval_id"] == approval_id]


def test_approve_executes_once_and_stores_the_result_on_the_approval(
        setup: Setup, rx: HttpReceiver, tmp_path: Path) -> None:
    action = setup.request("issue_refund", {"amount": 300, "order_id": "o-1"})
    apr = action["approval_id"]
    assert action["status"] == "pending_approval" and rx.requests == []

    got = control.approve(setup.approver, apr, actor="ops-alice", reason="checked the order")
    assert got["status"] == "executed"
    assert got["result"] == {"refund_id": "rf_1"}
    assert got["decided_by"] == "ops-alice"
    assert got["decision_reason"] == "checked the order"
    [posted] = rx.requests
    assert posted.header("idempotency-key") == action["action_key"]
    assert posted.json["arguments"] == {"amount": 300, "order_id": "o-1"}
    stored = control.get_approval(setup.approver, apr)
    assert stored["status"] == "executed" and stored["result"] == {"refund_id": "rf_1"}

    # Approving it again executes nothing and says why.
    with pytest.raises(ApprovalError) as err:
        control.approve(setup.approver, apr, actor="ops-bob")
    assert err.value.code == "approval_executed"
    assert len(rx.requests) == 1

    events = approval_events(tmp_path / "audit.jsonl", apr)
    assert [(e["approval_status"], e["actor"], e["decision"]) for e in events] == [
        ("approved", "ops-alice", "allow"), ("executed", "ops-alice", "allow"),
        ("executed", "ops-bob", "deny")]
    assert events[1]["execution_result"]["result"] == {"refund_id": "rf_1"}


def test_reject_then_approve_executes_nothing(setup: Setup, rx: HttpReceiver,
                                              tmp_path: Path) -> None:
    action = setup.request("issue_refund", {"amount": 300, "order_id": "o-2"})
    apr = action["approval_id"]
    got = control.reject(setup.approver, apr, actor="ops-alice", reason="fraud suspected")
    assert got["status"] == "rejected" and got["decided_by"] == "ops-alice"

    with pytest.raises(ApprovalError) as err:
        control.approve(setup.approver, apr, actor="ops-bob")
    assert err.value.code == "approval_rejected"
    with pytest.raises(ApprovalError):
        control.reject(setup.approver, apr, actor="ops-bob")
    assert rx.requests == []
    assert control.get_approval(setup.approver, apr)["status"] == "rejected"
    events = approval_events(tmp_path / "audit.jsonl", apr)
    # The decision, then both refusals: every attempt is on the record with who made it.
    assert [(e["approval_status"], e["actor"], e["decision"]) for e in events] == [
        ("rejected", "ops-alice", "deny"), ("rejected", "ops-bob", "deny"),
        ("rejected", "ops-bob", "deny")]
    assert events[0]["reason"] == "fraud suspected"

    # A rejected refund does not block the order: a new request asks again.
    again = setup.request("issue_refund", {"amount": 300, "order_id": "o-2"})
    assert again["status"] == "pending_approval"


def test_a_pending_approval_holds_its_order_against_duplicates(setup: Setup) -> None:
    first = setup.request("issue_refund", {"amount": 300, "order_id": "o-3"})
    second = setup.request("issue_refund", {"amount": 301, "order_id": "o-3",
                                            "note": "customer asked twice"})
    assert first["status"] == "pending_approval"
    assert (second["status"], second["code"]) == ("denied", "duplicate_action")
    assert second["result"]["duplicate_of"]["action_key"] == first["action_key"]
    pending = control.list_approvals(setup.approver, "pending")
    assert [a["id"] for a in pending] == [first["approval_id"]]


def test_an_expired_approval_cannot_be_approved(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    s = Setup(write_policy(approval_policy(rx, approval_ttl_s=0.3)), gateways)
    action = s.request("issue_refund", {"amount": 300, "order_id": "o-4"})
    apr = action["approval_id"]
    time.sleep(0.4)

    assert control.get_approval(s.approver, apr)["status"] == "expired"
    assert [a["id"] for a in control.list_approvals(s.approver, "expired")] == [apr]
    assert control.list_approvals(s.approver, "pending") == []
    with pytest.raises(ApprovalError) as err:
        control.approve(s.approver, apr, actor="ops-alice")
    assert err.value.code == "approval_expired"
    assert rx.requests == []

    # It never ran, so the order is free again.
    again = s.request("issue_refund", {"amount": 300, "order_id": "o-4"})
    assert again["status"] == "pending_approval"


def test_an_approved_action_that_fails_is_recorded_and_never_retried(
        setup: Setup, rx: HttpReceiver, tmp_path: Path) -> None:
    action = setup.request("issue_refund", {"amount": 300, "order_id": "o-10"})
    apr = action["approval_id"]
    rx.reply_once(500, body="ledger down")
    got = control.approve(setup.approver, apr, actor="ops-alice")
    assert got["status"] == "failed"
    assert got["error"] == "webhook answered 500: ledger down"
    assert got["result"]["status_code"] == 500
    with pytest.raises(ApprovalError) as err:
        control.approve(setup.approver, apr, actor="ops-bob")
    assert err.value.code == "approval_failed"
    assert len(rx.requests) == 1
    events = approval_events(tmp_path / "audit.jsonl", apr)
    assert events[1]["approval_status"] == "failed"
    assert events[1]["execution_result"]["error"] == "webhook answered 500: ledger down"

    # Like a failed automatic execution, it does not hold the order.
    again = setup.request("issue_refund", {"amount": 300, "order_id": "o-10"})
    assert again["status"] == "pending_approval"


def test_the_requesting_caller_cannot_approve_its_own_action(setup: Setup,
                                                              rx: HttpReceiver) -> None:
    action = setup.request("issue_refund", {"amount": 300, "order_id": "o-5"})
    apr = action["approval_id"]
    assert control.get_approval(setup.approver, apr)["requested_by"] == "support-bot"

    with pytest.raises(Forbidden) as err:
        control.approve(setup.approver, apr, actor="support-bot")
    assert err.value.code == "self_approval_forbidden"
    assert control.get_approval(setup.approver, apr)["status"] == "pending"
    assert rx.requests == []

    assert control.approve(setup.approver, apr, actor="ops-alice")["status"] == "executed"
    assert len(rx.requests) == 1


@pytest.mark.parametrize("scope", [None, "prod"], ids=["global", "environment"])
def test_kill_switch_refuses_approval_and_leaves_it_pending(
        setup: Setup, rx: HttpReceiver, scope: str | None) -> None:
    action = setup.request("issue_refund", {"amount": 300, "order_id": "o-6"})
    apr = action["approval_id"]
    control.set_kill_switch(setup.approver, True, actor="ops", reason="incident",
                            environment=scope)

    with pytest.raises(KillSwitchEngaged) as err:
        control.approve(setup.approver, apr, actor="ops-alice")
    assert err.value.code == "kill_switch_engaged"
    assert control.get_approval(setup.approver, apr)["status"] == "pending"
    assert rx.requests == []

    control.set_kill_switch(setup.approver, False, actor="ops", environment=scope)
    assert control.approve(setup.approver, apr, actor="ops-alice")["status"] == "executed"
    assert len(rx.requests) == 1


def test_approval_is_rechecked_against_the_policy_in_force_now(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        setup: Setup) -> None:
    action = setup.request("issue_refund", {"amount": 300, "order_id": "o-7"})
    apr = action["approval_id"]
    # The policy changed since: refunds above 100 are now denied. Same state and audit.
    stricter = approval_policy(rx)
    stricter["actions"]["issue_refund"]["rules"] = [
        {"if": {"amount": {"gt": 100}}, "mode": "deny"}]
    now = Gateway(write_policy(stricter, name="stricter.yaml"))
    gateways.append(now)
    assert now.policy.hash != setup.approver.policy.hash

    with pytest.raises(ApprovalError) as err:
        control.approve(now, apr, actor="ops-alice")
    assert err.value.code == "approval_denied_by_policy"
    assert "amount > 100" in err.value.message
    assert control.get_approval(now, apr)["status"] == "pending"
    assert rx.requests == []


def test_a_client_dispatched_action_is_approved_for_the_app_to_fetch(
        setup: Setup, rx: HttpReceiver) -> None:
    action = setup.request("grant_access", {"user": "ann", "role": "admin"})
    assert (action["dispatch"], action["status"]) == ("client", "pending_approval")
    got = control.approve(setup.approver, action["approval_id"], actor="ops-alice")
    assert got["status"] == "approved"
    fetched = control.get_approval(setup.approver, action["approval_id"])
    assert fetched["status"] == "approved"
    assert fetched["arguments"] == {"user": "ann", "role": "admin"}
    assert fetched["tool_call"]["name"] == "grant_access"
    assert rx.requests == []


def test_approvals_show_redacted_arguments(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    s = Setup(write_policy(approval_policy(rx)), gateways)
    action = s.request("issue_refund", {"amount": 300, "order_id": "o-8",
                                        "card_number": "4111111111111111"})
    [listed] = control.list_approvals(s.approver, "pending")
    assert listed["id"] == action["approval_id"]
    assert listed["arguments"] == {"amount": 300, "order_id": "o-8",
                                   "card_number": "[REDACTED]"}
    assert "4111111111111111" not in json.dumps(listed)
    control.approve(s.approver, action["approval_id"], actor="ops")
    assert rx.requests[0].json["arguments"]["card_number"] == "4111111111111111"


def _approve_in_process(policy_path: str, approval_id: str, actor: str, start: Any,
                        results: Any) -> None:
    gw = Gateway(policy_path)
    assert gw.store is not None  # opened before the race, not during it
    start.wait(30)
    try:
        got = control.approve(gw, approval_id, actor=actor)
        results.put((actor, "ok", got["status"]))
    except ApprovalError as exc:
        results.put((actor, "refused", exc.code))
    finally:
        gw.close()


def test_two_approvers_racing_in_two_processes_execute_once(setup: Setup,
                                                             rx: HttpReceiver) -> None:
    action = setup.request("issue_refund", {"amount": 300, "order_id": "o-9"})
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [ctx.Process(target=_approve_in_process,
                         args=(str(setup.path), action["approval_id"], f"ops-{i}", start,
                               results)) for i in range(2)]
    for p in procs:
        p.start()
    try:
        outcomes = sorted(results.get(timeout=60)[1:] for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    ok, refused = outcomes
    assert ok == ("ok", "executed")
    assert refused[0] == "refused" and refused[1] in ("approval_approved", "approval_executed")
    assert len(rx.requests) == 1
    final = control.get_approval(setup.approver, action["approval_id"])
    assert final["status"] == "executed" and final["decided_by"] in ("ops-0", "ops-1")


def test_approval_executes_nothing_where_the_policy_now_only_simulates(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        setup: Setup) -> None:
    action = setup.request("issue_refund", {"amount": 300, "order_id": "o-11"})
    apr = action["approval_id"]
    # prod was switched to simulation only (a freeze): approving must not run anything.
    frozen = approval_policy(rx)
    frozen["environments"] = {"prod": {"force_mode": "simulation_only"}}
    now = Gateway(write_policy(frozen, name="frozen.yaml"))
    gateways.append(now)

    with pytest.raises(ApprovalError) as err:
        control.approve(now, apr, actor="ops-alice")
    assert err.value.code == "approval_denied_by_policy"
    assert "simulation_only" in err.value.message
    assert control.get_approval(now, apr)["status"] == "pending"
    assert rx.requests == []


# -- the next turn learns what became of a held action (held_turns) -----------------------

def _next_turn(s: Setup, first: Any, *, tamper: Callable[[list[dict[str, Any]]], None]
               | None = None) -> Any:
    """The agent loop an aware app runs: the gateway's follow-up messages sent back."""
    msgs = [*user("CALL issue_refund {}"), *first.authority["followup_messages"]]
    if tamper is not None:
        tamper(msgs)
    return s.client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS)


def _held(s: Setup, order: str) -> Any:
    first = s.client.chat.completions.create(
        model=MODEL, tools=TOOLS,
        messages=user(f'CALL issue_refund {{"amount": 300, "order_id": "{order}"}}'))
    assert first.authority["actions"][0]["status"] == "pending_approval"
    return first


def test_an_expired_approval_is_told_to_the_model_on_the_next_turn(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        upstream: Any) -> None:
    s = Setup(write_policy(approval_policy(rx, approval_ttl_s=0.3)), gateways)
    first = _held(s, "o-40")
    apr = first.authority["actions"][0]["approval_id"]
    time.sleep(0.4)  # nobody decided; no one listed it either

    nxt = _next_turn(s, first)
    sent = upstream.model.last_request["body"]["messages"][-1]
    assert json.loads(sent["content"])["status"] == "expired"
    assert "nothing was executed" in json.loads(sent["content"])["reason"]
    assert f"expired ({apr})" in nxt.choices[0].message.content
    [update] = nxt.authority["approval_updates"]
    assert update == {"approval_id": apr, "action_type": "issue_refund", "status": "expired",
                      "tool_call_id": first.authority["followup_messages"][1]["tool_call_id"]}
    assert rx.requests == []


def test_a_decided_approval_is_told_with_its_result_or_reason(setup: Setup, upstream: Any,
                                                             rx: HttpReceiver) -> None:
    done, refused = _held(setup, "o-41"), _held(setup, "o-42")
    control.approve(setup.approver, done.authority["actions"][0]["approval_id"],
                    actor="ops-alice")
    control.reject(setup.approver, refused.authority["actions"][0]["approval_id"],
                   actor="ops-alice", reason="order already refunded")

    _next_turn(setup, done)
    told = json.loads(upstream.model.last_request["body"]["messages"][-1]["content"])
    assert (told["status"], told["result"]) == ("executed", {"refund_id": "rf_1"})
    nxt = _next_turn(setup, refused)
    told = json.loads(upstream.model.last_request["body"]["messages"][-1]["content"])
    assert told["status"] == "rejected" and "order already refunded" in told["reason"]
    assert nxt.authority["approval_updates"][0]["status"] == "rejected"
    assert len(rx.requests) == 1  # the approved one ran once; telling it runs nothing


def test_a_pending_approval_and_foreign_or_hostile_answers_are_left_as_sent(
        setup: Setup, write_policy: Callable[..., Path], gateways: list[Gateway],
        upstream: Any, rx: HttpReceiver) -> None:
    first = _held(setup, "o-43")
    apr = first.authority["actions"][0]["approval_id"]
    still = _next_turn(setup, first)
    assert json.loads(upstream.model.last_request["body"]["messages"][-1]["content"])["status"] \
        == "pending_approval"
    assert still.authority.get("approval_updates") in (None, [])

    control.reject(setup.approver, apr, actor="ops-alice", reason="secret reason")
    # Another key sending this approval's id learns nothing about it.
    other = Setup(setup.path, gateways, caller="other-bot")
    msgs = [*user("hi"), *first.authority["followup_messages"]]
    other.client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS)
    assert "secret reason" not in json.dumps(upstream.model.last_request)

    hostile = [
        "not json " + '"pending_approval"',
        json.dumps({"status": "pending_approval", "approval_id": "apr_x\u202e" + apr}),
        json.dumps({"status": "pending_approval", "approval_id": {"$ne": None}}),
        json.dumps({"status": "pending_approval", "approval_id": apr, "pad": "x" * 20_000}),
        "[" * 5000 + '"pending_approval"' + "]" * 5000,
    ]
    for content in hostile:
        def tamper(msgs: list[dict[str, Any]], content: str = content) -> None:
            msgs[-1]["content"] = content
        resp = _next_turn(setup, first, tamper=tamper)
        assert upstream.model.last_request["body"]["messages"][-1]["content"] == content
        assert resp.authority.get("approval_updates") in (None, [])
