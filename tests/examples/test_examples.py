"""Every file in examples/ runs, as a user would run it, against the scripted model.

The stack is the demo's: the example webhook receiver and the demo model as
child processes, ``examples/policy.yaml`` with their ports and a fresh state
folder filled in, and the real proxy where the example talks HTTP.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from authority_sdk.demo.config import pick_keys, write_policy
from authority_sdk.demo.processes import Child, ProxyProcess, start_child, start_demo_model
from authority_sdk.policy import Policy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    log = tmp_path_factory.mktemp("receiver") / "receiver.log"
    child = start_child("webhook receiver",
                        lambda p: [sys.executable, "-u", str(EXAMPLES / "webhook_receiver.py"),
                                   "--port", str(p)], log, ready_path="/received")
    yield child
    child.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    child = start_demo_model(tmp_path_factory.mktemp("model"))
    yield child
    child.stop()


@dataclass
class Stack:
    folder: Path
    policy_path: Path
    policy: Policy
    env: dict[str, str]
    receiver: Child
    model: Child

    def run(self, script: str, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(EXAMPLES / script), *args],
                              cwd=self.folder, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=60)

    def deliveries(self, order_id: str) -> list[dict[str, Any]]:
        got = httpx.get(self.receiver.url + "/received").json()["deliveries"]
        # Held actions also notify this receiver (at /notifications): those are not actions.
        return [d for d in got if not d["path"].startswith("/notifications")
                and d["body"]["arguments"].get("order_id") == order_id]

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.policy.audit_path.read_text().splitlines()]


@pytest.fixture
def stack(tmp_path: Path, receiver: Child, model: Child) -> Stack:
    path, policy, secrets = write_policy(EXAMPLES / "policy.yaml", tmp_path,
                                         model_url=model.url, receiver_url=receiver.url)
    env = {**os.environ, **secrets, "AUTHORITY_NOTES_FILE": str(tmp_path / "notes.jsonl")}
    for var in ("OPENAI_BASE_URL", "AUTHORITY_POLICY", "AUTHORITY_ENV"):
        env.pop(var, None)
    return Stack(tmp_path, path, policy, env, receiver, model)


@pytest.fixture
def proxy(stack: Stack) -> Iterator[str]:
    with ProxyProcess(stack.policy_path, env={**stack.env, "PYTHONPATH": str(EXAMPLES)},
                      log_path=stack.folder / "proxy.log") as p:
        yield p.url


def test_policy_example_has_every_section_and_passes_check() -> None:
    data = yaml.safe_load((EXAMPLES / "policy.yaml").read_text())
    assert set(data) == {"version", "default_environment", "upstream", "state", "audit",
                         "defaults", "environments", "actions", "executors", "keys", "pricing",
                         "redact", "output_tools", "notifications"}
    assert {e["type"] for e in data["executors"].values()} == {"webhook", "smtp", "python",
                                                               "log"}
    assert any(k.get("secret_sha256") for k in data["keys"])
    assert any(k.get("secret_env") for k in data["keys"])
    assert not Path(data["state"]["path"]).is_absolute()
    assert not Path(data["audit"]["path"]).is_absolute()
    done = subprocess.run([sys.executable, "-c", "from authority_sdk.cli import main; main()",
                           "policy", "check", "--policy", str(EXAMPLES / "policy.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{EXAMPLES / 'policy.yaml'}: ok")


def test_dropin_sdk_agent_loop(stack: Stack) -> None:
    done = stack.run("dropin_sdk.py", "--policy", str(stack.policy_path))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert 'lookup_customer {"customer_id": "C-17"} -> allowed' in out
    assert 'ran lookup_customer here: {"customer_id": "C-17", "tier": "gold"' in out
    assert 'issue_refund {"order_id": "B-2001", "amount": 25} -> executed' in out
    assert 'issue_refund {"order_id": "B-2002", "amount": 400} -> pending_approval (apr_' in out
    # The loop sent the results back and the model answered in words: the loop ended.
    assert "turn 2: assistant: I have the results: executed; pending_approval (apr_" in out
    assert "turn 3" not in out
    assert "waiting for a person: authority approvals approve apr_" in out

    assert len(stack.deliveries("B-2001")) == 1
    assert stack.deliveries("B-2002") == []
    actions = [e for e in stack.audit() if e["event"] == "action"]
    # The executed refund was on the record ("executing") before its webhook ran.
    assert {(e["action_type"], e["details"]["status"], e["actor"]) for e in actions} == {
        ("issue_refund", "executing", "support-bot"),
        ("lookup_customer", "allowed", "support-bot"),
        ("issue_refund", "executed", "support-bot"),
        ("issue_refund", "pending_approval", "support-bot")}
    assert stack.model.alive()


def test_unaware_app_through_the_proxy(stack: Stack, proxy: str) -> None:
    keys = pick_keys(stack.policy)
    done = stack.run("unaware_app.py", env={"OPENAI_BASE_URL": proxy + "/v1",
                                            "OPENAI_API_KEY": keys.agent.secret})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "1. answer: Hello! How can I help you today?"
    assert lines[1].startswith("2. finish_reason=stop tool_calls=None content='[authority] "
                               "issue_refund: pending_approval (apr_")
    assert lines[2] == "3. gpt-4o: refused, 403 model_not_allowed"
    assert stack.deliveries("C-3001") == []
    requests = [e for e in stack.audit() if e["event"] == "request"]
    assert [e["actor"] for e in requests] == ["support-agent"] * 3


def test_approvals_over_http(stack: Stack, proxy: str) -> None:
    keys = pick_keys(stack.policy)

    def hold(order_id: str) -> str:
        r = httpx.post(proxy + "/v1/chat/completions",
                       headers={"Authorization": f"Bearer {keys.agent.secret}"},
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content":
                             f'CALL issue_refund {{"order_id": "{order_id}", "amount": 300}}'}]})
        approval_id: str = r.json()["authority"]["actions"][0]["approval_id"]
        return approval_id

    first, second = hold("D-1"), hold("D-2")
    cli = ["--url", proxy, "--key", keys.ops.secret]
    listed = stack.run("approvals.py", *cli, "list")
    assert listed.returncode == 0, listed.stderr
    assert first in listed.stdout and second in listed.stdout
    assert listed.stdout.rstrip().endswith("2 pending")

    approved = stack.run("approvals.py", *cli, "approve", first, "--reason", "checked")
    assert approved.returncode == 0, approved.stderr
    assert f"{first}  executed" in approved.stdout
    assert '"refund_id": "rf_' in approved.stdout
    assert len(stack.deliveries("D-1")) == 1

    again = stack.run("approvals.py", *cli, "approve", first)
    assert again.returncode == 1
    assert "409 approval_executed" in again.stderr
    assert len(stack.deliveries("D-1")) == 1

    rejected = stack.run("approvals.py", *cli, "reject", second, "--reason", "duplicate")
    assert rejected.returncode == 0, rejected.stderr
    assert f"{second}  rejected" in rejected.stdout
    assert stack.deliveries("D-2") == []

    as_agent = stack.run("approvals.py", "--url", proxy, "--key", keys.agent.secret, "list")
    assert as_agent.returncode == 1
    assert "403 insufficient_role" in as_agent.stderr

    approvals = [e for e in stack.audit() if e["event"] == "approval"]
    assert [(e["approval_status"], e["decision"]) for e in approvals] == [
        ("approved", "allow"), ("executed", "allow"), ("executed", "deny"),
        ("rejected", "deny")]
    assert {e["actor"] for e in approvals} == {keys.ops.name}


def test_python_executor_example(stack: Stack) -> None:
    done = stack.run("python_executor.py", "--policy", str(stack.policy_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'add_note: executed -> {"note_id": "note_1", "ticket_id": "T-1"}' in done.stdout
    notes = [json.loads(x) for x in (stack.folder / "notes.jsonl").read_text().splitlines()]
    assert [(n["action_type"], n["arguments"]["ticket_id"]) for n in notes] == [
        ("add_note", "T-1")]


def test_python_executor_target_writes_once_per_action_key(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    spec = importlib.util.spec_from_file_location("python_executor_example",
                                                  EXAMPLES / "python_executor.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("AUTHORITY_NOTES_FILE", str(tmp_path / "n.jsonl"))
    first = mod.add_note({"ticket_id": "T-9", "text": "x"}, action_key="act_1",
                         action_type="add_note")
    again = mod.add_note({"ticket_id": "T-9", "text": "x"}, action_key="act_1",
                         action_type="add_note")
    other = mod.add_note({"ticket_id": "T-9", "text": "y"}, action_key="act_2",
                         action_type="add_note")
    assert again == {**first, "already_written": True}
    assert other["note_id"] != first["note_id"]
    assert len((tmp_path / "n.jsonl").read_text().splitlines()) == 2


def test_python_executor_runs_inside_the_proxy(stack: Stack, proxy: str) -> None:
    # The proxy imports the target from examples/ (on its PYTHONPATH, as the demo sets it).
    keys = pick_keys(stack.policy)
    r = httpx.post(proxy + "/v1/chat/completions",
                   headers={"Authorization": f"Bearer {keys.agent.secret}"},
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content":
                         'CALL add_note {"ticket_id": "T-5", "text": "via proxy"}'}]})
    action = r.json()["authority"]["actions"][0]
    assert (action["status"], action["result"]["ticket_id"]) == ("executed", "T-5")
    assert "T-5" in (stack.folder / "notes.jsonl").read_text()


def test_webhook_receiver_dedupes_on_the_idempotency_key(receiver: Child) -> None:
    body = {"action_type": "issue_refund", "arguments": {"order_id": "W-1", "amount": 5},
            "action_key": "act_w1"}
    first = httpx.post(receiver.url + "/refunds", json=body, headers={"Idempotency-Key": "k-w1"})
    again = httpx.post(receiver.url + "/refunds", json=body, headers={"Idempotency-Key": "k-w1"})
    other = httpx.post(receiver.url + "/refunds", json=body, headers={"Idempotency-Key": "k-w2"})
    assert first.status_code == again.status_code == other.status_code == 200
    assert again.json() == first.json()
    assert other.json()["refund_id"] != first.json()["refund_id"]
    mine = [d for d in httpx.get(receiver.url + "/received").json()["deliveries"]
            if (d["body"].get("arguments") or {}).get("order_id") == "W-1"]
    assert [(d["idempotency_key"], d["replayed"]) for d in mine] == [
        ("k-w1", False), ("k-w1", True), ("k-w2", False)]
    bad = httpx.post(receiver.url + "/refunds", content=b"not json")
    assert bad.status_code == 400
