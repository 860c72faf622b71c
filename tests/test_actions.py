"""Gating an answer's calls under hostile output (authority_sdk/actions.py), SDK door.

Each action is handled in isolation; the record precedes every effect; the kill
switch is read again before every executor; alternatives (n > 1) run nothing;
odd answer shapes are read or refused, never a 500; legacy function calls are
gated like tool calls; caps and limits over time hold.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import audit_entries, tool, user
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import HttpReceiver

from authority_sdk import AuthorityClient, authority_of, control
from authority_sdk.audit import verify
from authority_sdk.engine import Engine

MODEL = "gpt-4o-mini"


def ran(effects: Path) -> list[dict[str, Any]]:
    if not effects.exists():
        return []
    return [json.loads(line) for line in effects.read_text().splitlines()]


POLICY: dict[str, Any] = {
    "actions": {
        "send_note": {"executor": "rec", "mode": "auto_execute"},
        "lookup_customer": {"mode": "auto_execute"},
        "issue_refund": {"executor": "rec", "mode": "require_human_approval",
                         "rules": [{"if": {"amount": {"lte": 50}}, "mode": "auto_execute"},
                                   {"if": {"amount": {"gt": 1000}}, "mode": "deny"}]},
    },
    "executors": {"rec": {"type": "python", "target": "sample_actions:record"}},
}


def client_for(gateways: list[Engine], path: Path, **kw: Any) -> AuthorityClient:
    eng = Engine(path)
    gateways.append(eng)
    return AuthorityClient(gateway=eng, max_retries=0, **kw)


def call(name: str, args: Any) -> str:
    text = args if isinstance(args, str) else json.dumps(args)
    return f"CALL {name} {text}"


def ask(client: AuthorityClient, *lines: str, **kw: Any) -> Any:
    kw.setdefault("tools", [tool("send_note"), tool("issue_refund"), tool("lookup_customer")])
    return client.chat.completions.create(model=MODEL, messages=user("\n".join(lines)), **kw)


# -- F1: one bad call never poisons the answer ------------------------------------------

BAD_ARGUMENTS = {
    "lone surrogate": '{"text": "\\ud800"}',
    "deep nesting": '{"text": ' + "[" * 1200 + "]" * 1200 + "}",
    "duplicate keys": '{"text": "a", "text": "b"}',
    "number out of range": '{"text": 1e999}',
    "not json": "{text: nope",
    "NaN": '{"text": NaN}',
}


@pytest.mark.parametrize("bad", sorted(BAD_ARGUMENTS))
def test_one_bad_call_never_poisons_the_answer(write_policy: Callable[..., Path], effects: Path,
                                               gateways: list[Engine], tmp_path: Path,
                                               bad: str) -> None:
    c = client_for(gateways, write_policy(POLICY))
    script = [call("send_note", {"text": "first"}), call("send_note", BAD_ARGUMENTS[bad]),
              call("send_note", {"text": "third"})]
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=user("\n".join(script)), tools=[tool("send_note")],
        extra_headers={"Idempotency-Key": f"poison-{bad}"})
    assert raw.status_code == 200
    actions = authority_of(raw.parse()).actions
    assert [(a.status, a.code) for a in actions] == [
        ("executed", None), ("denied", "invalid_arguments"), ("executed", None)]
    # Every effect that happened is on the record, and the record is valid UTF-8 JSON.
    log = tmp_path / "audit.jsonl"
    log.read_bytes().decode("utf-8")
    keys = {e["details"]["action_key"] for e in audit_entries(log, "action")
            if e["details"]["status"] == "executed"}
    assert {r["key"] for r in ran(effects)} == keys and len(keys) == 2
    assert verify(log).ok
    # The key is finished, not left claimed: the retry replays and runs nothing again.
    again = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=user("\n".join(script)), tools=[tool("send_note")],
        extra_headers={"Idempotency-Key": f"poison-{bad}"})
    assert again.headers.get("idempotent-replayed") == "true"
    assert len(ran(effects)) == 2


JSON_LEAVES = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
               | st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
HOSTILE_TEXT = st.one_of(
    st.builds(json.dumps, st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=5)),
    st.builds(json.dumps, JSON_VALUES),
    st.sampled_from(sorted(BAD_ARGUMENTS.values())),
    st.text(max_size=60),
    st.builds(lambda k, a, b: f'{{"{k}": {json.dumps(a)}, "{k}": {json.dumps(b)}}}',
              st.text(alphabet="abc", min_size=1, max_size=3), JSON_LEAVES, JSON_LEAVES),
    st.builds(lambda n: '{"amount": ' + "[" * n + "1" + "]" * n + "}",
              st.integers(min_value=60, max_value=3000)),
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(args=st.lists(HOSTILE_TEXT, min_size=1, max_size=3),
       names=st.lists(st.sampled_from(["send_note", "issue_refund", "lookup_customer",
                                       "wipe_disk", ""]), min_size=3, max_size=3))
def test_hostile_arguments_never_500_and_never_an_unaudited_effect(
        write_policy: Callable[..., Path], effects: Path, gateways: list[Engine],
        tmp_path: Path, args: list[str], names: list[str]) -> None:
    if not gateways:
        client_for(gateways, write_policy(POLICY))
    c = AuthorityClient(gateway=gateways[0], max_retries=0)
    script = [f"CALL {names[i] or 'x'} {a}" for i, a in enumerate(args)
              if "\n" not in a and "\r" not in a]
    if not script:
        return
    resp = ask(c, *script)
    assert len(authority_of(resp).actions) == len(script)
    audited = {e["details"]["action_key"] for e in audit_entries(tmp_path / "audit.jsonl",
                                                                 "action")}
    assert {r["key"] for r in ran(effects)} <= audited


# -- F4: the kill switch stops an answer in progress ------------------------------------


def test_kill_switch_engaged_mid_answer_stops_the_rest(write_policy: Callable[..., Path],
                                                       gateways: list[Engine],
                                                       tmp_path: Path) -> None:
    with HttpReceiver() as rx:
        rx.reply(200, json={"refund_id": "rf"}, delay_s=0.5)
        path = write_policy({**POLICY, "executors": {"rec": {
            "type": "webhook", "url": rx.url("/refunds"), "timeout_s": 5}}})
        c = client_for(gateways, path)
        ops = Engine(path)
        gateways.append(ops)

        def engage() -> None:
            rx.wait_for(1, timeout_s=10)  # the first refund is at the billing system
            control.set_kill_switch(ops, True, actor="ops", reason="stop the refunds")

        t = threading.Thread(target=engage)
        t.start()
        resp = ask(c, *[call("issue_refund", {"order_id": f"o{i}", "amount": 10})
                        for i in range(8)])
        t.join()
    statuses = [(a.status, a.code) for a in authority_of(resp).actions]
    assert statuses[0] == ("executed", None)
    assert statuses[1:] == [("denied", "kill_switch_engaged")] * 7
    assert len(rx.requests) == 1
    logged = audit_entries(tmp_path / "audit.jsonl", "action")
    assert [e["details"]["code"] for e in logged][1:] == ["kill_switch_engaged"] * 7


# -- F7: n > 1 -------------------------------------------------------------------------


def test_alternative_choices_run_nothing(write_policy: Callable[..., Path], effects: Path,
                                         gateways: list[Engine]) -> None:
    c = client_for(gateways, write_policy(POLICY))
    resp = ask(c, call("send_note", {"text": "once"}), call("lookup_customer", {"id": 1}), n=3)
    assert len(resp.choices) == 3
    by_choice: dict[int, list[tuple[str, str | None]]] = {}
    for a in resp.authority["actions"]:
        by_choice.setdefault(a.get("choice_index", 0), []).append((a["status"], a["code"]))
    assert by_choice[0] == [("executed", None), ("allowed", None)]
    assert by_choice[1] == by_choice[2] == [("denied", "alternative_choice"),
                                            ("allowed", None)]
    assert len(ran(effects)) == 1
    # Each alternative keeps only what the app may run itself.
    assert [[tc.function.name for tc in ch.message.tool_calls] for ch in resp.choices] == [
        ["lookup_customer"]] * 3


# -- F8: answers of an unexpected shape ----------------------------------------------------


def test_content_as_a_list_of_parts_is_read(write_policy: Callable[..., Path], effects: Path,
                                            gateways: list[Engine]) -> None:
    c = client_for(gateways, write_policy(POLICY))
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=user("SHAPE content_parts\nSAY hello\n"
                                   + call("send_note", {"text": "x"})),
        tools=[tool("send_note")])
    body = json.loads(raw.content)
    content = body["choices"][0]["message"]["content"]
    assert content[0] == {"type": "text", "text": "hello"}
    assert content[-1]["text"].startswith("[authority] send_note: executed")
    assert len(ran(effects)) == 1


@pytest.mark.parametrize("shape", ["tool_calls_object", "no_choices"])
def test_an_answer_gating_cannot_read_is_502_audited_and_runs_nothing(
        write_policy: Callable[..., Path], effects: Path, gateways: list[Engine],
        tmp_path: Path, shape: str) -> None:
    c = client_for(gateways, write_policy(POLICY))
    with pytest.raises(openai.APIStatusError) as ei:
        ask(c, f"SHAPE {shape}", call("send_note", {"text": "x"}))
    assert ei.value.status_code == 502 and ei.value.code == "upstream_malformed_response"
    [entry] = audit_entries(tmp_path / "audit.jsonl", "request")
    assert entry["decision"] == "error"
    assert entry["details"]["code"] == "upstream_malformed_response"
    assert ran(effects) == []


# -- G2: legacy function calling ---------------------------------------------------------


def test_legacy_function_call_is_gated_like_a_tool_call(write_policy: Callable[..., Path],
                                                        effects: Path,
                                                        gateways: list[Engine]) -> None:
    c = client_for(gateways, write_policy(POLICY))
    functions = [{"name": "issue_refund", "parameters": {"type": "object"}}]
    big = c.chat.completions.create(
        model=MODEL, functions=functions,  # type: ignore[call-overload]
        messages=user('FUNCTION_CALL issue_refund {"order_id": "A", "amount": 99999}'))
    choice = big.choices[0]
    assert choice.message.function_call is None and choice.finish_reason == "stop"
    [action] = authority_of(big).actions
    assert (action.status, action.code) == ("denied", "denied_by_rule")
    assert choice.message.content == "[authority] issue_refund: denied (denied_by_rule)"
    small = c.chat.completions.create(
        model=MODEL, functions=functions,  # type: ignore[call-overload]
        messages=user('FUNCTION_CALL issue_refund {"order_id": "B", "amount": 5}'))
    assert authority_of(small).actions[0].status == "executed"
    assert len(ran(effects)) == 1
    follow = authority_of(small).followup_messages
    assert follow[0]["function_call"]["name"] == "issue_refund"
    assert follow[1]["role"] == "function" and follow[1]["name"] == "issue_refund"
    # An allowed client-run function call reaches the app unchanged.
    mine = c.chat.completions.create(
        model=MODEL, functions=[{"name": "lookup_customer"}],  # type: ignore[call-overload]
        messages=user('FUNCTION_CALL lookup_customer {"id": 7}'))
    assert mine.choices[0].message.function_call.name == "lookup_customer"
    assert mine.choices[0].finish_reason == "function_call"


def test_functions_count_in_the_cost_estimate(write_policy: Callable[..., Path],
                                              gateways: list[Engine]) -> None:
    c = client_for(gateways, write_policy(POLICY))
    bare = authority_of(c.chat.completions.create(model=MODEL, messages=user("hi")))
    described = {"name": "issue_refund", "description": "word " * 400,
                 "parameters": {"type": "object"}}
    with_fn = authority_of(c.chat.completions.create(
        model=MODEL, messages=user("hi"), functions=[described]))  # type: ignore[call-overload]
    assert bare.cost is not None and with_fn.cost is not None
    assert with_fn.cost.prompt_tokens_estimate >= bare.cost.prompt_tokens_estimate + 400


# -- G13: caps ------------------------------------------------------------------------------


def test_calls_beyond_the_cap_are_denied(write_policy: Callable[..., Path], effects: Path,
                                         gateways: list[Engine]) -> None:
    c = client_for(gateways, write_policy({**POLICY,
                                          "defaults": {"max_tool_calls_per_answer": 3}}))
    resp = ask(c, *[call("send_note", {"text": str(i)}) for i in range(5)])
    assert [(a.status, a.code) for a in authority_of(resp).actions] == [
        ("executed", None)] * 3 + [("denied", "too_many_tool_calls")] * 2
    assert len(ran(effects)) == 3


def test_pending_approvals_are_capped(write_policy: Callable[..., Path],
                                      gateways: list[Engine]) -> None:
    c = client_for(gateways, write_policy({**POLICY, "defaults": {"max_pending_approvals": 2}}))
    resp = ask(c, *[call("issue_refund", {"order_id": f"o{i}", "amount": 500})
                    for i in range(3)])
    assert [(a.status, a.code) for a in authority_of(resp).actions] == [
        ("pending_approval", None), ("pending_approval", None),
        ("denied", "approval_queue_full")]
