"""The notification outbox is durable: a proxy killed with SIGKILL while its receiver is
down delivers after a restart, and the approval waits untouched throughout."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from helpers import ScriptedServer, audit_entries, tool, user
from proxy_env import AGENT_KEY, APPROVER_KEY, PROXY_ENV, write_proxy_policy
from servers import HttpReceiver

from authority_sdk.demo.processes import ProxyProcess

TOOLS = [tool("send_note", {"text": {"type": "string"}})]


def test_outbox_survives_kill_9_and_is_delivered_after_restart(
        upstream: ScriptedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PX_NOTIFY_SECRET", "whsec-crash")
    with HttpReceiver() as hook:
        hook.reply(503)
        policy = write_proxy_policy(upstream, tmp_path, {
            "worker": {"interval_s": 0.2},
            "notifications": {"backoff_s": 0.2, "max_attempts": 50, "channels": {"ops": {
                "type": "webhook", "url": hook.url("/ops"), "secret_env": "PX_NOTIFY_SECRET",
                "events": ["held"]}}}})
        proc = ProxyProcess(policy, env=PROXY_ENV, log_path=tmp_path / "proxy.log").start(60)
        try:
            import openai

            client = openai.OpenAI(base_url=proc.url + "/v1", api_key=AGENT_KEY, max_retries=0)
            resp = client.chat.completions.create(
                model="gpt-4o-mini", tools=TOOLS,
                messages=user("CALL send_note " + json.dumps({"text": "after the crash"})))
            apr = (resp.model_extra or {})["authority"]["actions"][0]["approval_id"]
            hook.wait_for(1, timeout_s=20)  # tried, refused by the receiver, audited
            log = tmp_path / "audit.jsonl"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not audit_entries(log, "notification"):
                time.sleep(0.05)
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(10)
            proc.stop()
            tried = len(hook.requests)
            hook.reply(200)
            proc = ProxyProcess(policy, port=proc.port, env=PROXY_ENV,
                                log_path=tmp_path / "proxy.log").start(60)
            hook.wait_for(tried + 1, timeout_s=20)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(
                    e["decision"] == "allow"
                    for e in audit_entries(tmp_path / "audit.jsonl", "notification")):
                time.sleep(0.1)
            import httpx

            got = httpx.get(f"{proc.url}/authority/approvals/{apr}", timeout=30,
                            headers={"authorization": f"Bearer {APPROVER_KEY}"}).json()
        finally:
            proc.stop()
    assert got["status"] == "pending"
    last = hook.requests[-1]
    assert last.json["approval"]["id"] == apr and last.json["type"] == "approval.held"
    # Every attempt carried the same notification id, so the receiver can dedupe.
    assert len({r.header("idempotency-key") for r in hook.requests}) == 1
    notes = audit_entries(tmp_path / "audit.jsonl", "notification")
    assert notes[0]["decision"] == "error" and notes[-1]["decision"] == "allow"
    assert sum(e["decision"] == "allow" for e in notes) == 1
