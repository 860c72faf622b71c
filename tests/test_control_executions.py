"""Executions in doubt, listed and settled by a person (DESIGN.md §5): real processes
SIGKILLed mid-execution, recovered, then resolved through ``authority_sdk.control``."""

from __future__ import annotations

from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
from in_doubt import POLICY, audit_lines, crash
from test_execution import ask, make_client

from authority_sdk import ExecutionError, control
from authority_sdk.audit import verify
from authority_sdk.engine import Gateway
from authority_sdk.errors import ApprovalError, Forbidden, InvalidRequest, NotFound


@pytest.fixture
def policy(write_policy: Callable[..., Path]) -> Path:
    return write_policy(POLICY)


def test_an_auto_executed_action_in_doubt_is_listed_then_resolved_as_failed(
        policy: Path, tmp_path: Path, procs: list[BaseProcess],
        gateways: list[Gateway]) -> None:
    crashed = crash(policy, tmp_path, procs, auto=True, approval=True)
    auto, held = crashed["auto"], crashed["approval"]
    gw = Gateway(policy)
    gateways.append(gw)

    doubts = control.list_executions(gw, "in_doubt")
    assert {e["action_key"] for e in doubts} == {auto.action_key, held.action_key}
    # Newest first: the approval's execution started after the auto one's request.
    assert [e["started_at"] for e in doubts] == sorted(
        (e["started_at"] for e in doubts), reverse=True)
    listed = next(e for e in doubts if e["action_key"] == auto.action_key)
    assert listed["action_type"] == "write_note" and listed["executor"] == "notes"
    assert listed["environment"] == "prod" and listed["request_id"].startswith("req_")
    assert listed["arguments"]["password"] == "[REDACTED]"
    assert listed["arguments"]["text"] == "auto"
    assert "interrupted" in listed["reason"]
    assert {e["action_key"] for e in control.list_executions(gw)} >= {auto.action_key}
    assert control.list_executions(gw, "executed") == []
    with pytest.raises(InvalidRequest):
        control.list_executions(gw, "lost")

    out = control.resolve_execution(gw, auto.action_key, outcome="failed", actor="ops-carol",
                                    reason="no note in the ledger")
    assert (out["status"], out["resolved_by"], out["resolution_reason"]) == (
        "failed", "ops-carol", "no note in the ledger")
    assert out["arguments"]["password"] == "[REDACTED]" and "approval_status" not in out
    assert auto.run_count() == 1  # a person said what happened; nothing ran
    assert gw.store.journal_get(auto.action_key)["status"] == "failed"
    assert [e["action_key"] for e in control.list_executions(gw, "in_doubt")] == [
        held.action_key]

    with pytest.raises(ExecutionError) as twice:
        control.resolve_execution(gw, auto.action_key, outcome="executed", actor="ops-dave")
    assert (twice.value.code, twice.value.status_code) == ("execution_not_in_doubt", 409)
    assert twice.value.details == {"status": "failed"}
    assert gw.store.journal_get(auto.action_key)["resolved_by"] == "ops-carol"

    # The app retries with the same Idempotency-Key: it sees the outcome, nothing runs.
    client = make_client(gateways, policy)
    [again] = ask(client, auto.script, auto.idem_key).authority["actions"]
    assert (again["action_key"], again["status"]) == (auto.action_key, "failed")
    assert "resolved as failed by ops-carol" in again["reason"]
    assert auto.run_count() == 1

    entries = [e for e in audit_lines(tmp_path / "audit.jsonl") if e["event"] == "action"
               and (e.get("details") or {}).get("action_key") == auto.action_key]
    resolved = [e for e in entries if e["actor"] == "ops-carol"]
    assert [(e["decision"], e["reason"], e["execution_result"]) for e in resolved] == [
        ("allow", "no note in the ledger", {"status": "failed", "resolved_by": "ops-carol"})]
    refused = [e for e in entries if e["actor"] == "ops-dave"]
    assert [e["decision"] for e in refused] == ["deny"]
    assert verify(tmp_path / "audit.jsonl").ok


def test_an_approved_action_in_doubt_is_resolved_and_its_approval_follows(
        policy: Path, tmp_path: Path, procs: list[BaseProcess],
        gateways: list[Gateway]) -> None:
    held = crash(policy, tmp_path, procs, auto=False, approval=True)["approval"]
    assert held.approval_id is not None
    gw = Gateway(policy)
    gateways.append(gw)
    assert control.get_approval(gw, held.approval_id)["status"] == "in_doubt"

    out = control.resolve_execution(gw, held.action_key, outcome="executed", actor="ops-erin",
                                    reason="the note is there")
    assert (out["status"], out["approval_id"], out["approval_status"]) == (
        "executed", held.approval_id, "executed")
    approval = control.get_approval(gw, held.approval_id)
    assert (approval["status"], approval["resolved_by"], approval["resolution_reason"]) == (
        "executed", "ops-erin", "the note is there")
    assert control.list_approvals(gw, "in_doubt") == []
    assert held.run_count() == 1
    with pytest.raises(ApprovalError) as err:
        control.approve(gw, held.approval_id, actor="ops-frank")
    assert err.value.code == "approval_executed"

    log = audit_lines(tmp_path / "audit.jsonl")
    mine = [e for e in log if e["actor"] == "ops-erin"]
    assert [(e["event"], e["decision"]) for e in mine] == [("action", "allow"),
                                                          ("approval", "allow")]
    assert mine[0]["execution_result"] == {"status": "executed", "resolved_by": "ops-erin"}
    assert mine[1]["approval_status"] == "executed"
    assert mine[1]["details"]["approval_id"] == held.approval_id


def test_only_an_in_doubt_execution_can_be_resolved(
        write_policy: Callable[..., Path], tmp_path: Path, gateways: list[Gateway]) -> None:
    # send_note runs at once on the log executor: executed, never in doubt.
    policy = write_policy(POLICY)
    client = make_client(gateways, policy)
    [done] = ask(client, 'CALL send_note {"text": "hi"}').authority["actions"]
    assert done["status"] == "executed"
    gw = client.gateway
    [listed] = control.list_executions(gw)
    assert (listed["action_key"], listed["status"]) == (done["action_key"], "executed")

    with pytest.raises(ExecutionError) as err:
        control.resolve_execution(gw, done["action_key"], outcome="failed", actor="ops-gus")
    assert err.value.code == "execution_not_in_doubt"
    assert gw.store.journal_get(done["action_key"])["status"] == "executed"
    with pytest.raises(NotFound):
        control.resolve_execution(gw, "act_missing", outcome="failed", actor="ops-gus")
    with pytest.raises(InvalidRequest):
        control.resolve_execution(gw, done["action_key"], outcome="maybe", actor="ops-gus")
    [refusal] = [e for e in audit_lines(tmp_path / "audit.jsonl") if e["actor"] == "ops-gus"]
    assert (refusal["event"], refusal["decision"]) == ("action", "deny")
    assert refusal["details"]["status"] == "executed"


def test_the_requesting_key_cannot_settle_its_own_action(
        policy: Path, tmp_path: Path, procs: list[BaseProcess],
        gateways: list[Gateway]) -> None:
    auto = crash(policy, tmp_path, procs, auto=True, approval=False)["auto"]
    gw = Gateway(policy)
    gateways.append(gw)
    with pytest.raises(Forbidden) as ei:
        control.resolve_execution(gw, auto.action_key, outcome="executed", actor="sdk")
    assert ei.value.code == "self_approval_forbidden"
    assert control.list_executions(gw, "in_doubt")[0]["action_key"] == auto.action_key
    done = control.resolve_execution(gw, auto.action_key, outcome="executed", actor="ops")
    assert done["status"] == "executed"
