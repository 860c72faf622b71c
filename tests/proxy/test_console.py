"""The web console (``GET /authority/ui``) and the audit endpoints it reads.

A real ``authority serve`` process per module. The page's own calls are
exercised over HTTP exactly as its script makes them; a real headless browser
drives the page too when ``chromium`` is installed (skipped otherwise: CI has
none).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ScriptedServer, tool, user
from proxy_env import ADMIN_KEY, AGENT_KEY, APPROVER_KEY, RunningProxy, start_proxy

from authority_sdk.audit import AuditLog
from authority_sdk.engine import Gateway
from authority_sdk.policy import load_policy
from proxy.console import audit_verify

TOOLS = [tool("send_note", {"text": {"type": "string"}})]


@pytest.fixture(scope="module")
def px(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[RunningProxy]:
    with start_proxy(upstream, tmp_path_factory.mktemp("console")) as rp:
        yield rp


def pending(px: RunningProxy, arguments: dict[str, Any]) -> str:
    """An agent request whose send_note call waits for a person; its approval id."""
    resp = px.client(AGENT_KEY).chat.completions.create(
        model="gpt-4o-mini", tools=TOOLS,
        messages=user(f"CALL send_note {json.dumps(arguments)}"))
    action = (resp.model_extra or {})["authority"]["actions"][0]
    assert action["status"] == "pending_approval", action
    return str(action["approval_id"])


def page(px: RunningProxy) -> str:
    r = px.http("GET", "/authority/ui")
    assert r.status_code == 200, r.text
    return r.text


# -- the page ----------------------------------------------------------------------------


def test_page_loads_without_a_key_and_is_self_contained(px: RunningProxy) -> None:
    r = px.http("GET", "/authority/ui")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    html = r.text
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert not re.search(r"https?:", html, re.IGNORECASE)  # no CDN, font or image fetched
    assert not re.search(r"""(?:src|href)\s*=\s*(?!["']?data:)""", html, re.IGNORECASE)
    assert "@import" not in html and "url(" not in html
    # Data is written as text only: nothing in the script parses strings as markup.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function"):
        assert sink not in html, sink
    assert "sessionStorage" in html and "localStorage" not in html


def test_content_security_policy_admits_exactly_the_page_script(px: RunningProxy) -> None:
    r = px.http("GET", "/authority/ui")
    csp = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"]
               .split(";"))
    assert csp["default-src"] == "'none'"
    assert csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'"
    scripts = re.findall(r"<script>(.*?)</script>", r.text, re.DOTALL)
    assert len(scripts) == 1 and "unsafe-inline" not in csp["script-src"]
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert csp["script-src"] == f"'sha256-{digest}'"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"


def test_every_call_the_page_makes_is_a_route_of_the_api(px: RunningProxy) -> None:
    html = page(px)
    calls = set(re.findall(r"api\('(GET|POST)', '([^'?]+)", html))
    assert calls == {("GET", "approvals"), ("POST", "approvals/"), ("GET", "kill-switch"),
                     ("POST", "kill-switch"), ("GET", "audit"), ("GET", "audit/verify"),
                     ("GET", "actions"), ("POST", "actions/")}
    assert "'/' + verb" in html and "decide('approve')" in html and "decide('reject')" in html
    # The page resolves them against its own folder: /authority/ui -> /authority/<path>.
    assert "location.pathname.replace(/\\/ui\\/?$/, '/')" in html
    paths = px.http("GET", "/openapi.json").json()["paths"]
    routes = {(m.upper(), p) for p, ops in paths.items() for m in ops}
    for method, rel in calls:
        path = "/authority/" + rel
        if rel == "approvals/":
            for verb in ("approve", "reject"):
                assert (method, f"/authority/approvals/{{approval_id}}/{verb}") in routes
        elif rel == "actions/":
            assert "+ '/resolve'" in html
            assert (method, "/authority/actions/{action_key}/resolve") in routes
        else:
            assert (method, path) in routes, (method, path)
    assert "/authority/ui" not in paths


# -- audit endpoints ---------------------------------------------------------------------


def test_audit_tail_with_each_role(px: RunningProxy) -> None:
    pending(px, {"text": "for the tail"})
    assert px.http("GET", "/authority/audit").status_code == 401
    refused = px.http("GET", "/authority/audit", AGENT_KEY)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_role"
    assert "lacks the approver or admin role" in refused.json()["error"]["message"]
    assert px.http("GET", "/authority/audit/verify", AGENT_KEY).status_code == 403
    on_file = px.audit_entries()
    for key in (APPROVER_KEY, ADMIN_KEY):
        r = px.http("GET", "/authority/audit", key, params={"limit": 3})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert [e["seq"] for e in data] == [e["seq"] for e in on_file[-3:]]  # newest last
        assert data[-1]["hash"] == on_file[-1]["hash"]
    default = px.http("GET", "/authority/audit", APPROVER_KEY).json()["data"]
    assert len(default) == min(50, len(on_file))
    for bad in ("0", "1001", "many"):
        r = px.http("GET", "/authority/audit", APPROVER_KEY, params={"limit": bad})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


def test_audit_verify_reports_an_intact_chain(px: RunningProxy) -> None:
    pending(px, {"text": "verify me"})
    for key in (APPROVER_KEY, ADMIN_KEY):
        r = px.http("GET", "/authority/audit/verify", key)
        assert r.status_code == 200, r.text
        body = r.json()
        on_file = px.audit_entries()
        assert body["ok"] is True and body["reason"] is None and body["first_bad_line"] is None
        assert body["entries"] == len(on_file) == body["last_seq"]
        assert body["last_hash"] == on_file[-1]["hash"]
        assert body["head_checked"] is True
        assert body["warnings"] == []


def test_verify_finds_an_edited_line_and_a_cut_off_end(upstream: ScriptedServer,
                                                      tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path) as rp:
        for i in range(3):
            pending(rp, {"text": f"entry {i}"})
        log = tmp_path / "audit.jsonl"
        original = log.read_bytes()
        lines = original.splitlines(keepends=True)
        assert rp.http("GET", "/authority/audit/verify", APPROVER_KEY).json()["ok"] is True

        entry = json.loads(lines[1])
        entry["reason"] = "nothing to see here"
        edited = [*lines[:1], (json.dumps(entry) + "\n").encode(), *lines[2:]]
        log.write_bytes(b"".join(edited))
        body = rp.http("GET", "/authority/audit/verify", APPROVER_KEY).json()
        assert body["ok"] is False
        assert body["first_bad_line"] == 2 and body["entries"] == 1
        assert "altered" in body["reason"]

        log.write_bytes(b"".join(lines[:-1]))  # every line intact, the last one gone
        body = rp.http("GET", "/authority/audit/verify", ADMIN_KEY).json()
        assert body["ok"] is False
        assert "truncated" in body["reason"]
        assert body["entries"] == len(lines) - 1

        log.write_bytes(original)
        assert rp.http("GET", "/authority/audit/verify", ADMIN_KEY).json()["ok"] is True


def test_verify_tells_live_appends_from_entries_past_a_stale_head(
        write_policy: Callable[..., Path]) -> None:
    policy = load_policy(write_policy())
    gw = Gateway(policy)
    gw.audit_event("kill_switch", decision="deny", reason="first", actor="t")
    real = gw.store

    class AppendsWhileVerifyReads:
        """The store as verify sees it on a busy gateway: a request lands right after
        the head is read and before the file is."""

        reads = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def get_audit_head(self) -> tuple[int, str] | None:
            head = real.get_audit_head()
            self.reads += 1
            if self.reads == 1:
                gw.audit_event("kill_switch", decision="allow", reason="second", actor="t")
            return head

    busy = Gateway(policy, store=AppendsWhileVerifyReads(), audit=gw.audit)  # type: ignore[arg-type]
    live = audit_verify(busy)
    assert live["ok"] is True and live["entries"] == 2 and live["warnings"] == []

    # A line written with no head recorded after it: what a crash leaves. That is reported.
    AuditLog(policy.audit_path, fsync=False).append("kill_switch", reason="third", actor="t")
    after_crash = audit_verify(gw)
    assert after_crash["ok"] is True and after_crash["entries"] == 3
    assert after_crash["warnings"] == [
        "1 entries after the head recorded in the state store (seq 2); expected only after "
        "a crash"]
    gw.close()


def test_openapi_describes_the_audit_endpoints(px: RunningProxy) -> None:
    doc = px.http("GET", "/openapi.json").json()
    tail_ok = doc["paths"]["/authority/audit"]["get"]["responses"]["200"]
    verify_ok = doc["paths"]["/authority/audit/verify"]["get"]["responses"]["200"]
    assert tail_ok["content"]["application/json"]["schema"]["$ref"].endswith("/AuditTail")
    assert verify_ok["content"]["application/json"]["schema"]["$ref"].endswith("/AuditVerify")
    verify_fields = doc["components"]["schemas"]["AuditVerify"]["properties"]
    assert {"ok", "entries", "first_bad_line", "reason", "warnings"} <= verify_fields.keys()
    params = doc["paths"]["/authority/audit"]["get"]["parameters"]
    assert [p["name"] for p in params] == ["limit", "cursor"]


# -- what the page does, over HTTP ---------------------------------------------------------


def test_the_pages_approve_flow(px: RunningProxy) -> None:
    apr = pending(px, {"text": "refund order 42", "card_number": "4111111111111111"})
    # Refresh: one list, split by status on the page.
    listed = px.http("GET", "/authority/approvals", APPROVER_KEY).json()["data"]
    shown = next(a for a in listed if a["id"] == apr)
    assert shown["status"] == "pending"
    assert shown["arguments"] == {"text": "refund order 42", "card_number": "[REDACTED]"}
    assert shown["requested_by"] == "support-agent" and shown["environment"] == "prod"
    assert shown["created_at"] < shown["expires_at"]
    # The Approve button: POST with the optional reason as JSON.
    out = px.http("POST", f"/authority/approvals/{apr}/approve", APPROVER_KEY,
                  json={"reason": "checked with the customer"})
    assert out.status_code == 200, out.text
    assert out.json()["status"] == "executed"
    decided = next(a for a in px.http("GET", "/authority/approvals", APPROVER_KEY).json()["data"]
                   if a["id"] == apr)
    assert decided["decided_by"] == "approver"
    assert decided["decision_reason"] == "checked with the customer"
    # A second click: the page shows the error message as the API words it.
    again = px.http("POST", f"/authority/approvals/{apr}/approve", APPROVER_KEY,
                    json={"reason": None})
    assert again.status_code == 409
    assert again.json()["error"] == {
        "message": f"approval {apr} is executed, not pending: nothing was executed",
        "type": again.json()["error"]["type"], "code": "approval_executed", "param": None}
    # The audit tail the page shows carries the transitions, redacted.
    tail = px.http("GET", "/authority/audit", ADMIN_KEY, params={"limit": 20}).json()["data"]
    mine = [e for e in tail if (e.get("details") or {}).get("approval_id") == apr]
    assert ("approval", "approved", "approver", "checked with the customer") in {
        (e["event"], e["approval_status"], e["actor"], e["reason"]) for e in mine}
    assert ("approval", "executed") in {(e["event"], e["approval_status"]) for e in mine}
    assert "4111111111111111" not in json.dumps(tail)


def test_the_pages_reject_and_kill_switch_controls(px: RunningProxy) -> None:
    apr = pending(px, {"text": "maybe not"})
    admin_tries = px.http("POST", f"/authority/approvals/{apr}/approve", ADMIN_KEY, json={})
    assert admin_tries.status_code == 403
    assert admin_tries.json()["error"]["message"] == \
        "key 'ops-admin' lacks the approver role (it has: admin)"

    # The kill switch section, loaded with an approver key, shows the refusal.
    refused = px.http("GET", "/authority/kill-switch", APPROVER_KEY)
    assert refused.status_code == 403
    assert refused.json()["error"]["message"] == \
        "key 'approver' lacks the admin role (it has: approver)"
    on = px.http("POST", "/authority/kill-switch", ADMIN_KEY,
                 json={"engaged": True, "reason": "console drill", "environment": "prod"})
    assert on.status_code == 200, on.text
    try:
        state = px.http("GET", "/authority/kill-switch", ADMIN_KEY).json()
        assert state["environments"]["prod"] == {**state["environments"]["prod"],
                                                 "engaged": True, "reason": "console drill",
                                                 "actor": "ops-admin"}
        blocked = px.http("POST", f"/authority/approvals/{apr}/approve", APPROVER_KEY, json={})
        assert blocked.status_code == 403
        assert blocked.json()["error"]["code"] == "kill_switch_engaged"
    finally:
        off = px.http("POST", "/authority/kill-switch", ADMIN_KEY,
                      json={"engaged": False, "reason": None, "environment": "prod"})
        assert off.status_code == 200 and off.json()["engaged"] is False
    no = px.http("POST", f"/authority/approvals/{apr}/reject", APPROVER_KEY,
                 json={"reason": "not today"})
    assert no.status_code == 200 and no.json()["status"] == "rejected"
    tail = px.http("GET", "/authority/audit", APPROVER_KEY, params={"limit": 10}).json()["data"]
    assert [e["details"]["engaged"] for e in tail if e["event"] == "kill_switch"][-2:] == [
        True, False]


# -- a real browser (only where chromium is installed) ------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _no_browser(reason: str) -> None:
    # CI installs chromium and sets AUTHORITY_REQUIRE_BROWSER: there a missing browser is a
    # failure, so the console's browser tests cannot pass by being skipped.
    if os.environ.get("AUTHORITY_REQUIRE_BROWSER"):
        pytest.fail(f"{reason} (AUTHORITY_REQUIRE_BROWSER is set)")
    pytest.skip(reason)


def chromium_binary() -> str:
    found = _chromium()
    if found is None:
        _no_browser("chromium is not installed")
    return str(found)


class Browser:
    """Just enough of the DevTools protocol: evaluate, wait, screenshot."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--remote-debugging-port=0", "--window-size=1440,1300",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                _no_browser("chromium did not start")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 << 20)
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return dict(msg["result"])

    def eval(self, expression: str) -> Any:
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        assert "exceptionDetails" not in out, out
        return out["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def open_console(self, url: str, key: str) -> None:
        """The console at ``url``, connected with ``key``."""
        self.call("Page.navigate", url=url + "/authority/ui")
        self.wait_for("document.readyState === 'complete' && !!document.getElementById('key')",
                      "the page")
        self.eval(f"document.getElementById('key').value = {json.dumps(key)}; "
                  "document.getElementById('connect').click(); true")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        if hasattr(self, "ws"):
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_a_browser_renders_untrusted_arguments_as_text_and_approves(
        px: RunningProxy, tmp_path: Path) -> None:
    binary = chromium_binary()
    attack = ('<img src=x onerror="document.title=\'pwned\'">'
              "<script>document.title='pwned'</script>")
    hostile = pending(px, {"text": attack})
    plain = pending(px, {"text": "ship the replacement"})
    browser = Browser(binary, tmp_path / "profile")
    try:
        browser.open_console(px.url, APPROVER_KEY)
        ids = [hostile, plain]
        browser.wait_for(f"{json.dumps(ids)}.every(id => document.querySelector("
                         "`#pending-list .card[data-id='${id}']`))", "the pending cards")
        browser.wait_for("document.querySelectorAll('#audit-list tr.entry').length > 0",
                         "the audit table")
        # The kill switch section shows the API's refusal for an approver key, verbatim.
        assert browser.wait_for("document.getElementById('kill-error').textContent",
                                "the kill switch error") == \
            "403 insufficient_rolekey 'approver' lacks the admin role (it has: approver)"
        shots = Path(os.environ.get("CONSOLE_SCREENSHOT_DIR") or tmp_path)
        browser.screenshot(shots / "console-pending.png")

        card = f"#pending-list .card[data-id='{hostile}']"
        assert browser.eval(f"document.querySelector(\"{card} pre\").textContent") == \
            json.dumps({"text": attack}, indent=2)
        assert browser.eval(f"document.querySelectorAll(\"{card} img, {card} script\").length") \
            == 0
        assert browser.eval("sessionStorage.getItem('authority.console.key')") == APPROVER_KEY
        assert browser.eval("localStorage.length") == 0

        plain_card = f"#pending-list .card[data-id='{plain}']"
        browser.eval(f"document.querySelector(\"{plain_card} .act input\").value = "
                     "'approved from the browser'; "
                     f"document.querySelector(\"{plain_card} button.approve\").click(); true")
        notice = browser.wait_for(
            "document.querySelector('#pending-notices .notice.ok')?.textContent",
            "the approval notice")
        assert f"Approved send_note ({plain}): executed" in notice
        browser.wait_for(f"!document.querySelector(\"{plain_card}\")", "the card to go")
        assert browser.eval("document.title") == "AI Authority Gateway · Console"
        browser.eval("document.getElementById('verify').click(); true")
        verdict = browser.wait_for(
            "document.querySelector('#verify-result .notice.ok')?.textContent",
            "the verify result")
        assert verdict.startswith("Chain intact: ")
        browser.screenshot(shots / "console-after.png")
    finally:
        browser.close()
    got = px.http("GET", f"/authority/approvals/{plain}", APPROVER_KEY).json()
    assert got["status"] == "executed"
    assert got["decision_reason"] == "approved from the browser"
    hostile_now = px.http("GET", f"/authority/approvals/{hostile}", APPROVER_KEY).json()
    assert hostile_now["status"] == "pending"
    px.http("POST", f"/authority/approvals/{hostile}/reject", APPROVER_KEY, json={})


@pytest.mark.slow
def test_a_browser_walks_1000_pending_approvals_a_page_at_a_time(
        upstream: ScriptedServer, tmp_path: Path) -> None:
    """Issue 16: 1,000 pending approvals, listed by cursor pages (never one oversized
    request), hostile arguments among them shown as text with invisible characters marked."""
    binary = chromium_binary()
    (tmp_path / "px").mkdir()
    with start_proxy(upstream, tmp_path / "px", overrides={
            "defaults": {"max_pending_approvals": 2000}}) as big:
        agent = big.client(AGENT_KEY)
        hostile = "<b>x</b>\u202egnp.exe\u200b" + "L" * 30_000
        for batch in range(40):  # 25 held calls an answer: 1,000 pending
            texts = [hostile if batch == i == 0 else f"n{batch}-{i}" for i in range(25)]
            script = "\n".join(f"CALL send_note {json.dumps({'text': t})}" for t in texts)
            resp = agent.chat.completions.create(model="gpt-4o-mini", tools=TOOLS,
                                                 messages=user(script))
            actions = (resp.model_extra or {})["authority"]["actions"]
            assert {a["status"] for a in actions} == {"pending_approval"}
        browser = Browser(binary, tmp_path / "profile")
        try:
            browser.open_console(big.url, APPROVER_KEY)
            count = "document.getElementById('pending-count').textContent"
            assert browser.wait_for(f"{count} === '50+' && {count}", "the first page") == "50+"
            # Each click asks for 50 more; the list only ever grows (polls overlap clicks).
            seen = [50]
            while browser.eval(f"{count}") != "1000":
                assert len(seen) < 40, seen
                shown = browser.eval(f"{count}")
                browser.eval("document.getElementById('pending-more').click(); true")
                browser.wait_for(f"{count} !== {json.dumps(shown)}", "the next page")
                seen.append(int(browser.eval(f"{count}").rstrip("+")))
            assert seen == sorted(seen), seen
            assert browser.eval("document.querySelectorAll('#pending-list .card').length") == 1000
            assert browser.eval("document.getElementById('pending-more').hidden") is True
            # The hostile one: markup as text, the bidi override and zero-width space marked.
            text = browser.eval("[...document.querySelectorAll('#pending-list .card pre')]"
                                ".map(p => p.textContent).find(t => t.includes('gnp.exe'))")
            assert "<b>x</b>" in text and "\u202e" not in text and "\u200b" not in text
            assert "U+202E" in text and "U+200B" in text
            assert browser.eval("document.querySelectorAll('#pending-list b').length") == 0
            shots = Path(os.environ.get("CONSOLE_SCREENSHOT_DIR") or tmp_path)
            browser.screenshot(shots / "console-1000-pending.png")
        finally:
            browser.close()
