"""One-time decision links and the long-poll (issue 16), on a real ``authority serve``
whose own worker delivers signed webhooks to a real receiver; the link page driven in
headless Chromium.

Links are built from ``notifications.public_base_url`` (a reverse proxy's address, as in
production); the tests reach the same path on the proxy's loopback port.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ScriptedServer, tool, user
from proxy_env import ADMIN_KEY, AGENT_KEY, APPROVER_KEY, HYBRID_KEY, RunningProxy, start_proxy
from servers import HttpReceiver
from test_console import Browser, chromium_binary

from authority_sdk import links
from authority_sdk.engine import Gateway

PUBLIC = "https://gateway.example.com"
ALICE_KEY, BOB_KEY = "sk-alice-approver-0123456", "sk-bob-approver-01234567"
TOOLS = [tool("send_note", {"text": {"type": "string"}})]


def _sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@pytest.fixture(scope="module")
def hook() -> Iterator[HttpReceiver]:
    with HttpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def px(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory,
       hook: HttpReceiver) -> Iterator[RunningProxy]:
    def channel(path: str, approver: str) -> dict[str, Any]:
        return {"type": "webhook", "url": hook.url(path), "secret_env": "PX_NOTIFY_SECRET",
                "approver": approver, "events": ["held"]}

    keys = [
        {"name": "support-agent", "secret_env": "PX_AGENT_KEY", "environment": "prod",
         "roles": ["agent"]},
        {"name": "agent-approver", "secret_env": "PX_HYBRID_KEY", "environment": "prod",
         "roles": ["agent", "approver"]},
        {"name": "approver", "secret_sha256": _sha(APPROVER_KEY), "roles": ["approver"]},
        {"name": "ops-admin", "secret_sha256": _sha(ADMIN_KEY), "roles": ["admin"]},
        {"name": "alice", "secret_sha256": _sha(ALICE_KEY), "roles": ["approver"]},
        {"name": "bob", "secret_sha256": _sha(BOB_KEY), "roles": ["approver"]},
    ]
    overrides = {
        "keys": keys, "worker": {"interval_s": 0.2},
        "notifications": {"public_base_url": PUBLIC, "channels": {
            "alice": channel("/alice", "alice"), "bob": channel("/bob", "bob"),
            "hybrid": channel("/hybrid", "agent-approver")}},
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PX_NOTIFY_SECRET", "whsec-links")
        with start_proxy(upstream, tmp_path_factory.mktemp("links"),
                         overrides=overrides) as rp:
            yield rp


def hold(px: RunningProxy, text: str, key: str = AGENT_KEY) -> str:
    resp = px.client(key).chat.completions.create(
        model="gpt-4o-mini", tools=TOOLS, messages=user(f"CALL send_note "
                                                        f"{json.dumps({'text': text})}"))
    action = (resp.model_extra or {})["authority"]["actions"][0]
    assert action["status"] == "pending_approval", action
    return str(action["approval_id"])


def link_for(px: RunningProxy, hook: HttpReceiver, approval_id: str, who: str) -> str:
    """The link the worker sent to ``who`` for ``approval_id``, on the proxy's own port."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for r in list(hook.requests):
            body = r.json
            if r.path == f"/{who}" and body["approval"]["id"] == approval_id:
                url = str(body["decide_url"])
                assert url.startswith(PUBLIC + "/authority/decide/")
                return px.url + url[len(PUBLIC):]
        time.sleep(0.1)
    raise AssertionError(f"no notification to {who} for {approval_id}")


def status(px: RunningProxy, approval_id: str) -> str:
    return str(px.http("GET", f"/authority/approvals/{approval_id}", APPROVER_KEY)
               .json()["status"])


def code_of(page: str) -> str:
    return page.split('<b id="code">', 1)[1][:6]


def post(url: str, **form: str) -> httpx.Response:
    return httpx.post(url, data=form, timeout=30)


def executions(px: RunningProxy, approval_id: str) -> int:
    """Executor runs of the approval's action: each is preceded by its "executing" entry.
    (A losing second approver is audited too: a denial that finds the approval executed.)"""
    return sum(1 for e in px.audit_entries()
               if e["event"] == "action" and e["details"].get("status") == "executing"
               and e["details"].get("approval_id") == approval_id)


def test_get_shows_the_action_escaped_and_never_decides(px: RunningProxy,
                                                         hook: HttpReceiver) -> None:
    attack = "<script>alert(1)</script>\u202eevil\u200b"
    apr = hold(px, attack)
    url = link_for(px, hook, apr, "alice")
    for _ in range(3):  # a link scanner prefetching it, repeatedly
        r = httpx.get(url, timeout=30)
        assert r.status_code == 200
    assert status(px, apr) == "pending"
    assert r.headers["referrer-policy"] == "no-referrer"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert "form-action 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["cache-control"] == "no-store"
    assert "<script>" not in r.text and "&lt;script&gt;" in r.text
    assert "\\u202eevil\\u200b" in r.text and "\u202e" not in r.text
    assert 'id="hidden-chars"' in r.text
    assert "Decide as alice" in r.text and apr in r.text


def test_post_needs_the_typed_code_and_the_page_origin(px: RunningProxy,
                                                       hook: HttpReceiver) -> None:
    apr = hold(px, "refund order 7")
    url = link_for(px, hook, apr, "alice")
    code = code_of(httpx.get(url, timeout=30).text)
    # A blind submit (what a scanner running scripts could do) decides nothing …
    assert post(url, decision="approve").status_code == 400
    assert post(url, decision="approve", confirm="000000").status_code == 400
    # … nor does a form on another site.
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        r = httpx.post(url, data={"decision": "approve", "confirm": code}, headers=headers,
                       timeout=30)
        assert r.status_code == 403
    assert status(px, apr) == "pending"
    # The link survived the mistakes: the person decides with it.
    r = post(url, decision="reject", confirm=code.lower(), reason="not today")
    assert r.status_code == 200 and 'id="status">rejected' in r.text
    got = px.http("GET", f"/authority/approvals/{apr}", APPROVER_KEY).json()
    assert got["status"] == "rejected"
    assert got["decided_by"] == "alice" and got["decision_reason"] == "not today"
    refusals = [e for e in px.audit_entries() if e["event"] == "approval"
                and e["details"].get("approval_id") == apr and e["decision"] == "deny"
                and str(e["reason"]).startswith("decision link refused")]
    assert len(refusals) == 4


def test_a_used_link_is_refused_and_audited(px: RunningProxy, hook: HttpReceiver) -> None:
    apr = hold(px, "one time")
    url = link_for(px, hook, apr, "alice")
    code = code_of(httpx.get(url, timeout=30).text)
    assert post(url, decision="approve", confirm=code).status_code == 200
    replay = post(url, decision="approve", confirm=code)
    assert replay.status_code == 410 and "Nothing was decided" in replay.text
    assert httpx.get(url, timeout=30).status_code == 404
    assert executions(px, apr) == 1
    token = url.rsplit("/", 1)[1]
    assert any(e["details"].get("link") == links.token_hash(token)[:16]
               and "already used" in str(e["reason"]) for e in px.audit_entries())


def test_the_token_is_in_no_log_line_and_no_audit_entry(px: RunningProxy,
                                                         hook: HttpReceiver) -> None:
    """Whoever reads the logs or the audit log could approve with a token found there (the
    confirmation code derives from it): each names the link by its id instead."""
    apr = hold(px, "read my logs")
    url = link_for(px, hook, apr, "alice")
    token = url.rsplit("/", 1)[1]
    code = code_of(httpx.get(url, timeout=30).text)
    assert post(url, decision="approve", confirm=code).status_code == 200
    assert post(url, decision="approve", confirm=code).status_code == 410  # used: audited
    assert httpx.get(url + "x" * 5000, timeout=30).status_code == 400  # the token in it
    log = (px.directory / "proxy.log").read_text()
    assert token not in log and token not in json.dumps(px.audit_entries())
    assert log.count(f"path=/authority/decide/~{links.link_id(token)} ") == 3
    # Behind a prefix or a doubled slash (no route: 404) the token is still the credential.
    for odd in (f"/gw/authority/decide/{token}", f"//authority/decide/{token}"):
        assert httpx.get(px.url + odd, timeout=30).status_code == 404
    assert token not in (px.directory / "proxy.log").read_text()
    assert any(e["details"].get("link") == links.link_id(token) for e in px.audit_entries())


def test_an_expired_link_is_refused(px: RunningProxy) -> None:
    apr = hold(px, "expires soon")
    gw = Gateway(px.policy_path)
    try:
        a = gw.store.approval_get(apr)
        token = links.mint(gw.store, approval=a, approver="alice", channel="alice",
                           ttl_s=0.5)
    finally:
        gw.close()
    url = f"{px.url}/authority/decide/{token}"
    assert httpx.get(url, timeout=30).status_code == 200
    time.sleep(0.8)
    assert httpx.get(url, timeout=30).status_code == 404
    assert post(url, decision="approve", confirm=links.confirmation_code(token)) \
        .status_code == 410
    assert status(px, apr) == "pending"


def test_two_approvers_on_two_links_one_execution(px: RunningProxy,
                                                  hook: HttpReceiver) -> None:
    apr = hold(px, "race me")
    urls = [link_for(px, hook, apr, who) for who in ("alice", "bob")]
    codes = [code_of(httpx.get(u, timeout=30).text) for u in urls]
    barrier = threading.Barrier(2)
    out: list[httpx.Response] = []

    def go(i: int) -> None:
        barrier.wait()
        out.append(post(urls[i], decision="approve", confirm=codes[i]))

    threads = [threading.Thread(target=go, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in out) == [200, 409]
    assert executions(px, apr) == 1 and status(px, apr) == "executed"


def test_a_link_keeps_separation_of_duties_and_the_kill_switch(
        px: RunningProxy, hook: HttpReceiver) -> None:
    own = hold(px, "my own", key=HYBRID_KEY)  # agent-approver asks …
    url = link_for(px, hook, own, "hybrid")  # … and gets a link to decide it: refused
    r = post(url, decision="approve", confirm=code_of(httpx.get(url, timeout=30).text))
    assert r.status_code == 403 and "self_approval_forbidden" in r.text
    assert status(px, own) == "pending"

    apr = hold(px, "while stopped")
    url = link_for(px, hook, apr, "alice")
    code = code_of(httpx.get(url, timeout=30).text)
    assert px.http("POST", "/authority/kill-switch", ADMIN_KEY,
                   json={"engaged": True, "reason": "incident"}).status_code == 200
    try:
        r = post(url, decision="approve", confirm=code)
        assert r.status_code == 403 and "kill_switch_engaged" in r.text
    finally:
        px.http("POST", "/authority/kill-switch", ADMIN_KEY, json={"engaged": False})
    assert status(px, apr) == "pending"


def test_long_poll_returns_when_decided_and_apps_see_only_their_own(
        px: RunningProxy) -> None:
    apr = hold(px, "poll me")
    t0 = time.monotonic()
    r = px.http("GET", f"/authority/approvals/{apr}", AGENT_KEY, params={"wait": 0.6})
    assert r.status_code == 200 and r.json()["status"] == "pending"
    assert time.monotonic() - t0 >= 0.55

    def decide() -> None:
        time.sleep(0.5)
        px.http("POST", f"/authority/approvals/{apr}/approve", APPROVER_KEY, json={})

    threading.Thread(target=decide).start()
    t0 = time.monotonic()
    r = px.http("GET", f"/authority/approvals/{apr}", AGENT_KEY, params={"wait": 20})
    assert r.json()["status"] == "executed" and time.monotonic() - t0 < 5
    # Another app's key does not learn of it; the wait is bounded.
    other = hold(px, "not yours", key=HYBRID_KEY)
    assert px.http("GET", f"/authority/approvals/{other}", AGENT_KEY).status_code == 404
    assert px.http("GET", f"/authority/approvals/{apr}", AGENT_KEY,
                   params={"wait": 61}).status_code == 400


def test_long_poll_waits_through_the_execution_for_the_outcome(px: RunningProxy) -> None:
    """Approved and gateway-dispatched means executing: the poll answers with the outcome,
    not with the moment between the decision and the effect (as another replica would leave
    it mid-execution, driven here from outside the proxy)."""
    apr = hold(px, "executing elsewhere")
    gw = Gateway(px.policy_path)
    try:
        assert gw.store.approval_transition(apr, "pending", "approved", decided_by="approver")

        def finish() -> None:
            time.sleep(0.8)
            gw.store.approval_transition(apr, "approved", "executed", result={"ok": True})

        finisher = threading.Thread(target=finish)
        finisher.start()
        t0 = time.monotonic()
        r = px.http("GET", f"/authority/approvals/{apr}", AGENT_KEY, params={"wait": 20})
        waited = time.monotonic() - t0
        finisher.join()
    finally:
        gw.close()
    assert r.json()["status"] == "executed" and 0.6 <= waited < 5, (r.json(), waited)


@contextlib.contextmanager
def link_browser(binary: str, tmp_path: Path) -> Iterator[tuple[Browser, Path]]:
    """A headless chromium, and where its screenshots go (kept as test artefacts)."""
    browser = Browser(binary, tmp_path / "profile")
    try:
        yield browser, Path(os.environ.get("CONSOLE_SCREENSHOT_DIR") or tmp_path)
    finally:
        browser.close()


def open_link_page(browser: Browser, url: str) -> None:
    browser.call("Page.navigate", url=url)
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById("
                     "'confirm')", "the link page")


def test_a_browser_approves_from_the_link_page(px: RunningProxy, hook: HttpReceiver,
                                               tmp_path: Path) -> None:
    binary = chromium_binary()
    apr = hold(px, "<b>bold?</b> ship it")
    url = link_for(px, hook, apr, "alice")
    with link_browser(binary, tmp_path) as (browser, shots):
        open_link_page(browser, url)
        assert browser.eval("document.querySelectorAll('pre b').length") == 0
        assert "<b>bold?</b>" in browser.eval(
            "document.getElementById('arguments').textContent")
        browser.screenshot(shots / "link-page.png")
        assert status(px, apr) == "pending"  # loading the page decided nothing
        browser.eval("document.getElementById('confirm').value = "
                     "document.getElementById('code').textContent; "
                     "document.getElementById('reason').value = 'checked'; "
                     "document.getElementById('approve').click(); true")
        got = browser.wait_for("document.getElementById('status')?.textContent",
                               "the outcome")
        assert got == "executed"
        browser.screenshot(shots / "link-decided.png")
    assert (shots / "link-page.png").stat().st_size > 0
    a = px.http("GET", f"/authority/approvals/{apr}", APPROVER_KEY).json()
    assert a["decided_by"] == "alice" and a["decision_reason"] == "checked"
    assert executions(px, apr) == 1


def test_a_browser_shows_hostile_arguments_harmlessly_and_rejects_with_a_reason(
        px: RunningProxy, hook: HttpReceiver, tmp_path: Path) -> None:
    binary = chromium_binary()
    hostile = ('<img src=x onerror="document.title=\'pwned\'"><script>document.title='
               "'pwned'</script>\u202egnp.exe\u200b\u2066" + "A" * 5000)
    apr = hold(px, hostile)
    url = link_for(px, hook, apr, "bob")
    with link_browser(binary, tmp_path) as (browser, shots):
        open_link_page(browser, url)
        assert browser.eval("document.querySelectorAll('body img, body script').length") == 0
        shown = browser.eval("document.getElementById('arguments').textContent")
        assert "\\u202egnp.exe\\u200b\\u2066" in shown and "\u202e" not in shown
        assert browser.eval("getComputedStyle(document.getElementById('hidden-chars'))"
                            ".display") != "none"
        # The long string wraps inside the page instead of widening it.
        assert browser.eval("document.documentElement.scrollWidth <= window.innerWidth")
        browser.screenshot(shots / "link-page-hostile.png")
        browser.eval("document.getElementById('confirm').value = "
                     "document.getElementById('code').textContent; "
                     "document.getElementById('reason').value = 'looks like an attack'; "
                     "document.getElementById('reject').click(); true")
        assert browser.wait_for("document.getElementById('status')?.textContent",
                                "the outcome") == "rejected"
        assert browser.eval("document.title") != "pwned"
    a = px.http("GET", f"/authority/approvals/{apr}", APPROVER_KEY).json()
    assert (a["status"], a["decided_by"], a["decision_reason"]) == (
        "rejected", "bob", "looks like an attack")
