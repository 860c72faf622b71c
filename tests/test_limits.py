"""Limits over time (authority_sdk/limits.py): splitting one large action into many small
ones, in one answer or across answers, keys and threads, is bounded."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import tool, user

from authority_sdk import AuthorityClient, authority_of, control
from authority_sdk.engine import Engine
from authority_sdk.policy import PolicyError, parse_policy

MODEL = "gpt-4o-mini"


def count(effects: Path) -> int:
    return len(effects.read_text().splitlines()) if effects.exists() else 0


def refund_policy(*limits: dict[str, Any]) -> dict[str, Any]:
    return {"actions": {"issue_refund": {
        "executor": "rec", "mode": "require_human_approval",
        "rules": [{"if": {"amount": {"lte": 50}}, "mode": "auto_execute"},
                  {"if": {"amount": {"gt": 1000}}, "mode": "deny"}],
        "limits": list(limits)}},
        "executors": {"rec": {"type": "python", "target": "sample_actions:record"}}}


def client(gateways: list[Engine], path: Path, caller: str = "sdk") -> AuthorityClient:
    eng = Engine(path)
    gateways.append(eng)
    return AuthorityClient(gateway=eng, max_retries=0, caller=caller)


def refunds(c: AuthorityClient, amounts: list[Any], start: int = 0) -> list[tuple[str, Any]]:
    script = "\n".join(
        f'CALL issue_refund {json.dumps({"order_id": f"o{start + i}", "amount": a})}'
        for i, a in enumerate(amounts))
    resp = c.chat.completions.create(model=MODEL, messages=user(script),
                                     tools=[tool("issue_refund")])
    return [(a.status, a.code) for a in authority_of(resp).actions]


def test_splitting_one_answer_is_bounded_by_a_per_answer_sum(
        write_policy: Callable[..., Path], effects: Path, gateways: list[Engine]) -> None:
    # 21 x $50 under a policy that denies any single refund over $1,000.
    c = client(gateways, write_policy(refund_policy(
        {"per": "answer", "sum": "amount", "max": 1000, "then": "require_human_approval"})))
    out = refunds(c, [50] * 21)
    assert out[:20] == [("executed", None)] * 20
    assert out[20] == ("pending_approval", None)
    assert count(effects) == 20


def test_a_per_day_count_holds_across_answers_and_keys_share_the_environment(
        write_policy: Callable[..., Path], effects: Path, gateways: list[Engine]) -> None:
    path = write_policy(refund_policy({"per": "day", "max_calls": 3, "then": "deny"}))
    a, b = client(gateways, path, "bot-a"), client(gateways, path, "bot-b")
    assert refunds(a, [10, 10]) == [("executed", None)] * 2
    assert refunds(b, [10, 10], start=2) == [("executed", None),
                                             ("denied", "limit_exceeded")]
    assert count(effects) == 3


def test_a_per_key_limit_counts_each_key_apart(write_policy: Callable[..., Path],
                                               effects: Path, gateways: list[Engine]) -> None:
    path = write_policy(refund_policy(
        {"per": "hour", "scope": "key", "max_calls": 1, "then": "deny"}))
    assert refunds(client(gateways, path, "bot-a"), [10, 10]) == [
        ("executed", None), ("denied", "limit_exceeded")]
    assert refunds(client(gateways, path, "bot-b"), [10], start=5) == [("executed", None)]


def test_concurrent_requests_cannot_pass_a_limit_together(
        write_policy: Callable[..., Path], effects: Path, gateways: list[Engine]) -> None:
    path = write_policy(refund_policy({"per": "day", "sum": "amount", "max": 200,
                                       "then": "deny"}))
    results: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        out = refunds(client(gateways, path), [40, 40], start=10 * i)
        with lock:
            results.extend(out)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    executed = [r for r in results if r[0] == "executed"]
    assert len(executed) == 5  # 5 x $40 = $200; never a sixth
    assert count(effects) == 5


def test_a_value_a_limit_cannot_add_up_falls_to_the_safer_mode(
        write_policy: Callable[..., Path], effects: Path, gateways: list[Engine]) -> None:
    c = client(gateways, write_policy(refund_policy(
        {"per": "day", "sum": "units", "max": 1000, "then": "deny"})))
    # No schema: "7" is a string, not a number the limit can add up: denied, not run.
    script = "\n".join(f'CALL issue_refund {json.dumps(a)}' for a in (
        {"order_id": "u1", "amount": 10, "units": "7"},
        {"order_id": "u2", "amount": 10, "units": 7}))
    resp = c.chat.completions.create(model=MODEL, messages=user(script),
                                     tools=[tool("issue_refund")])
    assert [(a.status, a.code) for a in authority_of(resp).actions] == [
        ("denied", "limit_exceeded"), ("executed", None)]


def test_a_number_past_any_float_is_one_a_limit_cannot_add_up_and_takes_its_then(
        write_policy: Callable[..., Path], effects: Path, gateways: list[Engine]) -> None:
    # 10**400 is valid JSON: once an OverflowError, denied as an error whatever the limit said.
    c = client(gateways, write_policy(refund_policy(
        {"per": "day", "sum": "units", "max": 1000, "then": "require_human_approval"})))
    script = f'CALL issue_refund {{"order_id": "h1", "amount": 10, "units": {10**400}}}'
    resp = c.chat.completions.create(model=MODEL, messages=user(script),
                                     tools=[tool("issue_refund")])
    assert [(a.status, a.code) for a in authority_of(resp).actions] == [
        ("pending_approval", None)]
    assert count(effects) == 0


def test_pending_approvals_hold_their_reservation_and_rejection_gives_it_back(
        write_policy: Callable[..., Path], effects: Path, gateways: list[Engine]) -> None:
    path = write_policy(refund_policy({"per": "day", "max_calls": 2, "then": "deny"}))
    c = client(gateways, path)
    held = refunds(c, [400, 400])
    assert held == [("pending_approval", None)] * 2
    assert refunds(c, [10], start=5) == [("denied", "limit_exceeded")]
    eng = gateways[0]
    [first, _] = control.list_approvals(eng, "pending")
    control.reject(eng, first["id"], actor="ops")
    assert refunds(c, [10], start=6) == [("executed", None)]


def test_limit_configuration_errors_name_their_path() -> None:
    with pytest.raises(PolicyError) as ei:
        parse_policy({"actions": {"issue_refund": {"limits": [{"per": "day"}]}}})
    assert "actions.issue_refund.limits.0" in str(ei.value)
    with pytest.raises(PolicyError):
        parse_policy({"actions": {"a": {"limits": [
            {"per": "day", "max_calls": 1, "then": "auto_execute"}]}}})
