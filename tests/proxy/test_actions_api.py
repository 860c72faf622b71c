"""``GET /authority/actions`` and ``POST /authority/actions/{action_key}/resolve``.

The execution in doubt is made the hard way: a real proxy process is SIGKILLed while
its executor runs, and a new proxy on the same state recovers it at start. The web
console's "Executions in doubt" section is driven by a real headless browser when
``chromium`` is installed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ScriptedServer, tool, user
from in_doubt import POLICY, crash, note_args
from proxy_env import (
    ADMIN_KEY,
    AGENT_KEY,
    APPROVER_KEY,
    PROXY_ENV,
    RunningProxy,
    start_proxy,
    write_proxy_policy,
)
from test_console import Browser, chromium_binary

from authority_sdk.demo.processes import ProxyProcess

TESTS = Path(__file__).resolve().parent.parent
TOOLS = [tool("write_note", {"text": {"type": "string"}})]


@dataclass
class Doubt:
    proxy: RunningProxy
    action_key: str
    runs: Path
    killed_pid: int
    body: dict[str, Any]


def _killed_mid_execution(upstream: ScriptedServer, directory: Path) -> tuple[str, int, Path,
                                                                              dict[str, Any]]:
    """A proxy that dies (SIGKILL) while its executor runs; the request's body and the pid."""
    policy = write_proxy_policy(upstream, directory, POLICY)
    args = note_args(directory, "proxied", card_number="4111111111111111")
    body = {"model": "gpt-4o-mini", "tools": TOOLS,
            "messages": user(f"CALL write_note {json.dumps(args)}")}
    # The python executor's target lives in the tests folder.
    first = ProxyProcess(policy, env={**PROXY_ENV, "PYTHONPATH": str(TESTS)},
                         log_path=directory / "first.log").start()
    failures: list[BaseException] = []

    def send() -> None:
        try:
            httpx.post(first.url + "/v1/chat/completions", json=body, timeout=60, headers={
                "authorization": f"Bearer {AGENT_KEY}", "idempotency-key": "note-proxied"})
        except httpx.HTTPError as exc:  # the proxy dies under it
            failures.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    ready = Path(args["ready"])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            assert first.proc is not None and first.proc.poll() is None, first.output()
            time.sleep(0.05)
        assert ready.exists(), "the execution did not start:\n" + first.output()
        pid = int(ready.read_text())
        assert first.proc is not None and pid == first.proc.pid
        first.proc.kill()
        first.proc.wait(30)
    finally:
        first.stop()
        sender.join(60)
    assert failures, "the request should have died with the proxy"
    return str(policy), pid, Path(args["runs"]), body


@pytest.fixture(scope="module")
def doubt(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Doubt]:
    directory = tmp_path_factory.mktemp("actions")
    _, pid, runs, body = _killed_mid_execution(upstream, directory)
    # The same policy file, rewritten identically, and a fresh proxy that recovers at start.
    with start_proxy(upstream, directory, overrides=POLICY) as rp:
        [key] = runs.read_text().splitlines()
        yield Doubt(rp, key, runs, pid, body)


def _listed(px: RunningProxy, key: str, status: str | None = "in_doubt") -> list[Any]:
    r = px.http("GET", "/authority/actions", APPROVER_KEY,
                params={"status": status} if status else {})
    assert r.status_code == 200, r.text
    return [e for e in r.json()["data"] if e["action_key"] == key]


def test_the_killed_proxys_action_is_listed_and_resolved_by_an_approver(doubt: Doubt) -> None:
    px, key = doubt.proxy, doubt.action_key
    [entry] = _listed(px, key)
    assert (entry["status"], entry["action_type"], entry["environment"]) == (
        "in_doubt", "write_note", "prod")
    assert entry["pid"] == doubt.killed_pid and entry["executor"] == "notes"
    assert entry["arguments"]["card_number"] == "[REDACTED]"
    recovered = [e for e in px.audit_entries() if e["actor"] == "recovery"]
    assert [(e["details"]["action_key"], e["execution_result"]["status"]) for e in recovered] \
        == [(key, "in_doubt")]

    assert px.http("GET", "/authority/actions", ADMIN_KEY).status_code == 200  # Reader
    agent = px.http("GET", "/authority/actions", AGENT_KEY)
    assert agent.status_code == 403 and agent.json()["error"]["code"] == "insufficient_role"
    assert px.http("GET", "/authority/actions").status_code == 401
    bad = px.http("GET", "/authority/actions", APPROVER_KEY, params={"status": "lost"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"

    path = f"/authority/actions/{key}/resolve"
    for wrong in (AGENT_KEY, ADMIN_KEY):  # resolving needs the approver role
        r = px.http("POST", path, wrong, json={"outcome": "failed"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_role"
    for body in ({"outcome": "maybe"}, {}, {"outcome": "failed", "extra": 1}):
        r = px.http("POST", path, APPROVER_KEY, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", body
    assert _listed(px, key)  # every refusal left it in doubt

    ok = px.http("POST", path, APPROVER_KEY,
                 json={"outcome": "failed", "reason": "no note was written"})
    assert ok.status_code == 200, ok.text
    out = ok.json()
    assert (out["status"], out["resolved_by"], out["resolution_reason"]) == (
        "failed", "approver", "no note was written")
    assert _listed(px, key) == []
    assert [e["status"] for e in _listed(px, key, None)] == ["failed"]

    again = px.http("POST", path, APPROVER_KEY, json={"outcome": "executed"})
    assert again.status_code == 409
    err = again.json()["error"]
    assert (err["code"], err["authority"]) == ("execution_not_in_doubt", {"status": "failed"})
    missing = px.http("POST", "/authority/actions/act_missing/resolve", APPROVER_KEY,
                      json={"outcome": "failed"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"

    tail = px.http("GET", "/authority/audit", APPROVER_KEY, params={"limit": 50}).json()["data"]
    mine = [e for e in tail if e["event"] == "action" and e["actor"] == "approver"]
    assert [(e["decision"], e["execution_result"]) for e in mine] == [
        ("allow", {"status": "failed", "resolved_by": "approver"}), ("deny", None)]
    assert "4111111111111111" not in json.dumps(tail)

    # The app retries with its Idempotency-Key: the outcome a person recorded, no second run.
    retry = px.http("POST", "/v1/chat/completions", AGENT_KEY, json=doubt.body,
                    headers={"idempotency-key": "note-proxied"})
    assert retry.status_code == 200, retry.text
    [action] = retry.json()["authority"]["actions"]
    assert (action["action_key"], action["status"]) == (key, "failed")
    assert retry.json()["choices"][0]["message"].get("tool_calls") is None
    assert doubt.runs.read_text().splitlines() == [key]


def test_openapi_describes_the_actions_endpoints(doubt: Doubt) -> None:
    doc = doubt.proxy.http("GET", "/openapi.json").json()
    listing = doc["paths"]["/authority/actions"]["get"]
    assert [p["name"] for p in listing["parameters"]] == ["status", "limit", "cursor"]
    assert listing["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JournalEntryList"}
    resolve = doc["paths"]["/authority/actions/{action_key}/resolve"]["post"]
    assert {"403", "404", "409"} <= resolve["responses"].keys()
    schemas = doc["components"]["schemas"]
    assert schemas["ResolveBody"]["properties"]["outcome"]["enum"] == ["executed", "failed"]
    assert schemas["ResolveBody"]["required"] == ["outcome"]
    assert {"action_key", "status", "resolved_by", "approval_id"} <= \
        schemas["JournalEntry"]["properties"].keys()


def test_a_browser_resolves_executions_in_doubt(
        doubt: Doubt, tmp_path: Path, procs: list[BaseProcess]) -> None:
    binary = chromium_binary()
    px = doubt.proxy
    attack = '<img src=x onerror="document.title=\'pwned\'">'
    crashed = crash(px.policy_path, tmp_path, procs, approval=True, extra={"memo": attack})
    auto, held = crashed["auto"], crashed["approval"]
    browser = Browser(binary, tmp_path / "profile")
    try:
        browser.open_console(px.url, APPROVER_KEY)
        browser.eval("window.confirm = () => true; true")
        keys = [auto.action_key, held.action_key]
        browser.wait_for(f"{json.dumps(keys)}.every(k => document.querySelector("
                         "`#doubt-list .card[data-key='${k}']`))", "the in-doubt cards")
        in_doubt = px.http("GET", "/authority/actions", APPROVER_KEY,
                           params={"status": "in_doubt"}).json()["data"]
        assert browser.eval("document.getElementById('doubt-count').textContent") == \
            str(len(in_doubt))
        shots = Path(os.environ.get("CONSOLE_SCREENSHOT_DIR") or tmp_path)
        browser.screenshot(shots / "console-in-doubt.png")

        card = f"#doubt-list .card[data-key='{auto.action_key}']"
        shown = json.loads(browser.eval(f"document.querySelector(\"{card} pre\").textContent"))
        assert (shown["memo"], shown["password"]) == (attack, "[REDACTED]")
        assert browser.eval(f"document.querySelectorAll(\"{card} img\").length") == 0

        browser.eval(f"document.querySelector(\"{card} .act input\").value = 'not in the db'; "
                     f"document.querySelector(\"{card} button.reject\").click(); true")
        notice = browser.wait_for(
            "document.querySelector('#doubt-notices .notice.ok')?.textContent", "the notice")
        assert f"Resolved write_note ({auto.action_key}) as failed" in notice
        browser.wait_for(f"!document.querySelector(\"{card}\")", "the card to go")

        held_card = f"#doubt-list .card[data-key='{held.action_key}']"
        browser.eval(f"document.querySelector(\"{held_card} button.resolved\").click(); true")
        browser.wait_for(f"!document.querySelector(\"{held_card}\")", "the card to go")
        notice = browser.eval("document.querySelector('#doubt-notices .notice.ok').textContent")
        assert (f"Resolved note_later ({held.action_key}) as executed; approval "
                f"{held.approval_id} is executed") in notice
        assert browser.eval("document.title") == "AI Authority Gateway · Console"
    finally:
        browser.close()
    [a] = _listed(px, auto.action_key, None)
    assert (a["status"], a["resolved_by"], a["resolution_reason"]) == (
        "failed", "approver", "not in the db")
    approval = px.http("GET", f"/authority/approvals/{held.approval_id}", APPROVER_KEY).json()
    assert (approval["status"], approval["resolved_by"]) == ("executed", "approver")
    assert auto.run_count() == held.run_count() == 1


