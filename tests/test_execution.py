"""Execution: once, or visibly not (DESIGN.md §5). Real executors against real local
servers, and real processes killed with SIGKILL in the middle of an execution."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
from helpers import audit_entries, tool, user
from servers import HttpReceiver, SmtpSink

from authority_sdk import control
from authority_sdk.client import AuthorityClient
from authority_sdk.engine import Gateway
from authority_sdk.errors import ApprovalError

pytestmark = pytest.mark.usefixtures("audit_chain_intact")

MODEL = "gpt-4o-mini"
TOOLS = [tool("issue_refund"), tool("send_email"), tool("write_note"), tool("write_note_idem"),
         tool("note_later")]
HERE = __name__  # the python executor imports its targets from this module


# -- python executor targets ---------------------------------------------------------------


def hang_once(arguments: dict[str, Any], *, action_key: str, action_type: str) -> dict[str, Any]:
    """Record the run; the first run signals that it is under way, then hangs (to be killed)."""
    runs = Path(arguments["runs"])
    with runs.open("a", encoding="utf-8") as f:
        f.write(action_key + "\n")
    n = len(runs.read_text(encoding="utf-8").splitlines())
    if n == 1:
        ready = Path(arguments["ready"])
        tmp = ready.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, ready)
        time.sleep(60)
    return {"runs": n}


# -- fixtures and helpers -------------------------------------------------------------------


def exec_policy(rx: HttpReceiver, smtp_port: int = 25, webhook_timeout_s: float = 30,
                upstream_timeout_s: float = 5) -> dict[str, Any]:
    return {
        "upstream": {"timeout_s": upstream_timeout_s},
        "actions": {
            "issue_refund": {"executor": "billing", "mode": "auto_execute"},
            "send_email": {"executor": "email", "mode": "auto_execute"},
            "write_note": {"executor": "notes", "mode": "auto_execute"},
            "write_note_idem": {"executor": "notes_idem", "mode": "auto_execute"},
            "note_later": {"executor": "notes", "mode": "require_human_approval"},
        },
        "executors": {
            "billing": {"type": "webhook", "url": rx.url("/refunds"),
                        "timeout_s": webhook_timeout_s},
            "email": {"type": "smtp", "host": "127.0.0.1", "port": smtp_port,
                      "sender": "agent@example.com", "timeout_s": 5},
            "notes": {"type": "python", "target": f"{HERE}:hang_once"},
            "notes_idem": {"type": "python", "target": f"{HERE}:hang_once", "idempotent": True},
        },
    }


def make_client(gateways: list[Gateway], path: Path, **kw: Any) -> AuthorityClient:
    gw = Gateway(path)
    gateways.append(gw)
    return AuthorityClient(gateway=gw, max_retries=0, **kw)


def script_for(name: str, args: dict[str, Any]) -> str:
    return f"CALL {name} {json.dumps(args)}"


def ask(client: AuthorityClient, script: str, idem_key: str | None = None) -> Any:
    headers = {"Idempotency-Key": idem_key} if idem_key else None
    return client.chat.completions.create(model=MODEL, messages=user(script), tools=TOOLS,
                                          extra_headers=headers)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- executors against real servers ---------------------------------------------------------


def test_smtp_executor_sends_one_real_email(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    with SmtpSink() as sink:
        client = make_client(gateways, write_policy(exec_policy(rx, smtp_port=sink.port)))
        args = {"to": "ann@example.com", "subject": "Your refund", "body": "It is on its way."}
        resp = ask(client, script_for("send_email", args))
        [action] = resp.authority["actions"]
        assert action["status"] == "executed"
        [mail] = sink.messages
    assert mail.mail_from == "agent@example.com" and mail.rcpt_tos == ["ann@example.com"]
    assert mail.message["Subject"] == "Your refund"
    assert mail.message.get_content().strip() == "It is on its way."
    assert mail.message["X-Authority-Action-Key"] == action["action_key"]
    assert action["result"]["message_id"] == mail.message["Message-ID"]


def test_smtp_refusal_is_failed_audited_and_not_retried(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        tmp_path: Path) -> None:
    with SmtpSink(reject=["nobody@example.com"]) as sink:
        client = make_client(gateways, write_policy(exec_policy(rx, smtp_port=sink.port)))
        resp = ask(client, script_for("send_email", {"to": "nobody@example.com",
                                                     "subject": "x", "body": "y"}))
        assert sink.messages == []
    [action] = resp.authority["actions"]
    assert action["status"] == "failed"
    assert "every recipient was refused" in action["reason"]
    [logged] = audit_entries(tmp_path / "audit.jsonl", "action")
    assert logged["execution_result"]["status"] == "failed"


@pytest.mark.parametrize("failure", ["500", "timeout"])
def test_webhook_failure_is_failed_audited_and_nothing_is_retried(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        tmp_path: Path, failure: str) -> None:
    if failure == "500":
        rx.reply(500, body="ledger exploded")
    else:
        rx.reply(200, json={"late": True}, delay_s=30)
    path = write_policy(exec_policy(rx, webhook_timeout_s=0.3))
    client = make_client(gateways, path)
    script = script_for("issue_refund", {"amount": 10, "order_id": "o-1"})
    resp = ask(client, script, idem_key="refund-o-1")

    [action] = resp.authority["actions"]
    assert action["status"] == "failed"
    expected = ("webhook answered 500: ledger exploded" if failure == "500"
                else "webhook timed out after 0.3s")
    assert action["reason"] == expected
    assert len(rx.requests) == 1
    [logged] = audit_entries(tmp_path / "audit.jsonl", "action")
    assert logged["execution_result"]["status"] == "failed"
    assert logged["reason"] == expected
    assert logged["details"]["action_key"] == action["action_key"]

    # The client retries with the same key: the stored answer, no second delivery.
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user(script), tools=TOOLS,
        extra_headers={"Idempotency-Key": "refund-o-1"})
    assert raw.headers.get("idempotent-replayed") == "true"
    assert raw.parse().authority["actions"][0]["status"] == "failed"
    assert len(rx.requests) == 1


def test_a_replayed_request_never_executes_again(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    client = make_client(gateways, write_policy(exec_policy(rx)))
    script = script_for("issue_refund", {"amount": 10, "order_id": "o-2"})
    first = ask(client, script, idem_key="order-o-2")
    again = ask(client, script, idem_key="order-o-2")
    replayed = dict(again.authority)
    assert replayed.pop("original_request_id") == first.authority["request_id"]
    assert replayed.pop("idempotency")["replayed"] is True
    assert replayed == {k: v for k, v in first.authority.items() if k != "idempotency"}
    assert len(rx.requests) == 1
    assert rx.requests[0].header("idempotency-key") == first.authority["actions"][0]["action_key"]


# -- crashes: SIGKILL in the middle of an execution -----------------------------------------


def _request_in_process(policy_path: str, script: str, idem_key: str) -> None:
    client = AuthorityClient(policy=policy_path, max_retries=0)
    ask(client, script, idem_key)


def _approve_in_process(policy_path: str, approval_id: str) -> None:
    control.approve(Gateway(policy_path), approval_id, actor="ops-alice")


def _spawn(target: Callable[..., None], *args: str) -> BaseProcess:
    proc = multiprocessing.get_context("spawn").Process(target=target, args=args)
    proc.start()
    return proc


def _wait(cond: Callable[[], bool], proc: BaseProcess, what: str) -> None:
    deadline = time.monotonic() + 60
    while not cond():
        assert proc.is_alive(), f"the child died (exit {proc.exitcode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _kill(proc: BaseProcess) -> None:
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL


def _resend(client: AuthorityClient, script: str, idem_key: str) -> Any:
    """Send again at once: the dead request's claim on the key is taken over right away
    (its owner process is gone), not after the lease runs out."""
    return ask(client, script, idem_key)


def test_killed_non_idempotent_execution_becomes_in_doubt_and_never_runs_again(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        tmp_path: Path, procs: list[BaseProcess]) -> None:
    path = write_policy(exec_policy(rx, upstream_timeout_s=1))
    runs, ready = tmp_path / "runs.txt", tmp_path / "ready"
    script = script_for("write_note", {"text": "hi", "runs": str(runs), "ready": str(ready)})
    procs.append(child := _spawn(_request_in_process, str(path), script, "note-1"))
    _wait(ready.exists, child, "the execution started")

    restarted = Gateway(path)
    gateways.append(restarted)
    assert control.recover(restarted) == []  # its owner is alive: not ours to settle
    _kill(child)

    [settled] = control.recover(restarted)
    assert settled["status"] == "in_doubt"
    assert lines(runs) == [settled["action_key"]]
    # Listed for a person, and settled: a second recovery leaves it alone.
    [doubt] = restarted.store.journal_list("in_doubt")
    assert doubt["action_key"] == settled["action_key"]
    assert control.recover(restarted) == []
    [logged] = audit_entries(tmp_path / "audit.jsonl", "action")
    assert (logged["actor"], logged["decision"]) == ("recovery", "error")
    assert logged["execution_result"]["status"] == "in_doubt"

    # The app retries with the same Idempotency-Key: the same action, still in doubt.
    client = make_client(gateways, path)
    resp = _resend(client, script, "note-1")
    [action] = resp.authority["actions"]
    assert (action["action_key"], action["status"]) == (settled["action_key"], "in_doubt")
    assert resp.choices[0].message.tool_calls is None
    assert lines(runs) == [settled["action_key"]]


def test_killed_idempotent_python_execution_is_retried_exactly_once(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        tmp_path: Path, procs: list[BaseProcess]) -> None:
    path = write_policy(exec_policy(rx, upstream_timeout_s=1))
    runs, ready = tmp_path / "runs.txt", tmp_path / "ready"
    script = script_for("write_note_idem", {"text": "hi", "runs": str(runs),
                                            "ready": str(ready)})
    procs.append(child := _spawn(_request_in_process, str(path), script, "note-2"))
    _wait(ready.exists, child, "the execution started")
    _kill(child)

    restarted = Gateway(path)
    gateways.append(restarted)
    [settled] = control.recover(restarted)
    assert settled["status"] == "executed"
    key = settled["action_key"]
    assert lines(runs) == [key, key]
    assert control.recover(restarted) == []

    client = make_client(gateways, path)
    resp = _resend(client, script, "note-2")
    [action] = resp.authority["actions"]
    assert (action["action_key"], action["status"]) == (key, "executed")
    assert action["result"] == {"runs": 2}
    assert lines(runs) == [key, key]


def test_killed_webhook_delivery_is_resent_once_with_the_same_idempotency_key(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        tmp_path: Path, procs: list[BaseProcess]) -> None:
    rx.reply_once(200, json={"refund_id": "never-seen"}, delay_s=60)
    path = write_policy(exec_policy(rx, upstream_timeout_s=1))
    script = script_for("issue_refund", {"amount": 10, "order_id": "o-3"})
    procs.append(child := _spawn(_request_in_process, str(path), script, "refund-3"))
    _wait(lambda: len(rx.requests) == 1, child, "the webhook was called")
    _kill(child)

    restarted = Gateway(path)
    gateways.append(restarted)
    [settled] = control.recover(restarted)
    assert settled["status"] == "executed"
    first, second = rx.requests
    assert first.header("idempotency-key") == second.header("idempotency-key") == (
        settled["action_key"])
    assert first.json == second.json

    client = make_client(gateways, path)
    resp = _resend(client, script, "refund-3")
    [action] = resp.authority["actions"]
    assert (action["action_key"], action["status"]) == (settled["action_key"], "executed")
    assert action["result"] == {"refund_id": "rf_1"}
    assert len(rx.requests) == 2


def test_killed_approver_leaves_the_approval_in_doubt(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
        tmp_path: Path, procs: list[BaseProcess]) -> None:
    path = write_policy(exec_policy(rx))
    runs, ready = tmp_path / "runs.txt", tmp_path / "ready"
    client = make_client(gateways, path)
    resp = ask(client, script_for("note_later", {"text": "hi", "runs": str(runs),
                                                 "ready": str(ready)}))
    [action] = resp.authority["actions"]
    apr = action["approval_id"]
    procs.append(child := _spawn(_approve_in_process, str(path), apr))
    _wait(ready.exists, child, "the approved execution started")
    _kill(child)

    restarted = Gateway(path)
    gateways.append(restarted)
    assert control.get_approval(restarted, apr)["status"] == "approved"
    [settled] = control.recover(restarted)
    assert (settled["approval_id"], settled["status"]) == (apr, "in_doubt")
    assert control.get_approval(restarted, apr)["status"] == "in_doubt"
    with pytest.raises(ApprovalError) as err:
        control.approve(restarted, apr, actor="ops-bob")
    assert err.value.code == "approval_in_doubt"
    assert lines(runs) == [action["action_key"]]
