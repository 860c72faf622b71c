"""Paged lists and stored data that renders, through a real proxy (issue 10: G9, G10, G13).

4,000 pending approvals used to make each console poll 4.9 MB; a surrogate in a
model name broke ``GET /authority/audit``. Here both are made for real (the
approvals in the proxy's own state store, the model name through the engine) and
read back the way the console and the CLI read them. The console's text helper
runs under node, on the page's own source.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import ScriptedServer, user
from proxy_env import ADMIN_KEY, AGENT_KEY, APPROVER_KEY, RunningProxy, start_proxy
from typer.testing import CliRunner

from authority_sdk.audit import AuditLog
from authority_sdk.cli import actions_cmd, control_cmd
from authority_sdk.policy import load_policy
from authority_sdk.store import open_store

PENDING = 4000


@pytest.fixture(scope="module")
def px(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[RunningProxy]:
    with start_proxy(upstream, tmp_path_factory.mktemp("pages")) as rp:
        store = open_store(load_policy(rp.policy_path))
        try:
            now = time.time()
            for i in range(PENDING):
                args = {"text": f"note {i} " + "x" * 1000}
                store.approval_create({
                    "id": f"apr_bulk{i:06d}", "status": "pending", "environment": "prod",
                    "action_type": "send_note", "arguments": args,
                    "arguments_json": json.dumps(args), "requested_by": "support-agent",
                    "created_at": now - PENDING + i, "expires_at": now + 3600})
        finally:
            store.close()
        yield rp


def test_a_console_poll_with_4000_pending_approvals_stays_small(px: RunningProxy) -> None:
    html = px.http("GET", "/authority/ui").text
    assert "approvals?status=pending&limit=" in html
    poll = px.http("GET", "/authority/approvals", APPROVER_KEY,
                   params={"status": "pending", "limit": 50})
    assert poll.status_code == 200
    body = poll.json()
    assert len(body["data"]) == 50 and body["next_cursor"]
    assert len(poll.content) < 100_000  # was 4.9 MB: every approval on every poll
    assert body["data"][0]["id"] == f"apr_bulk{PENDING - 1:06d}"  # newest first
    everything: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"status": "pending", "limit": 500}
        if cursor:
            params["cursor"] = cursor
        page = px.http("GET", "/authority/approvals", APPROVER_KEY, params=params).json()
        everything += [a["id"] for a in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    bulk = [i for i in everything if i.startswith("apr_bulk")]
    assert len(bulk) == len(set(bulk)) == PENDING


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 501}, {"limit": "x"},
                                    {"cursor": "garbage"}, {"cursor": "c" * 513},
                                    {"status": "pending,nope"}])
def test_bad_page_parameters_are_400s(px: RunningProxy, params: dict[str, Any]) -> None:
    for path in ("/authority/approvals", "/authority/actions"):
        r = px.http("GET", path, APPROVER_KEY, params=params)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_request"


def test_the_cli_lists_a_page_and_says_where_the_next_starts(px: RunningProxy) -> None:
    runner = CliRunner()
    import typer

    app = typer.Typer()
    app.add_typer(control_cmd.approvals_app, name="approvals")
    app.add_typer(actions_cmd.actions_app, name="actions")
    out = runner.invoke(app, ["approvals", "list", "--limit", "5", "--json", "--url", px.url,
                              "--key", APPROVER_KEY])
    assert out.exit_code == 0, out.stderr
    assert len(json.loads(out.stdout)) == 5 and "--cursor" in out.stderr
    cursor = out.stderr.split("--cursor", 1)[1].split()[0]
    nxt = runner.invoke(app, ["approvals", "list", "--limit", "5", "--json", "--cursor",
                              cursor, "--policy", str(px.policy_path)])
    assert nxt.exit_code == 0, nxt.stderr
    first, second = json.loads(out.stdout), json.loads(nxt.stdout)
    assert not {a["id"] for a in first} & {a["id"] for a in second}
    assert runner.invoke(app, ["actions", "list", "--limit", "3", "--policy",
                               str(px.policy_path)]).exit_code == 0


# -- the audit log renders whatever it holds ---------------------------------------------


def test_the_audit_api_renders_any_line(px: RunningProxy) -> None:
    # Through the engine: a model name with a lone surrogate, and a huge one.
    for model in ("gpt\ud800", "m" * 50_000):
        r = px.http("POST", "/v1/chat/completions", AGENT_KEY,
                    content=json.dumps({"model": model, "messages": user("hi")}),
                    headers={"content-type": "application/json"})
        assert r.status_code in (400, 403), r.text
    # And what a person reads must survive anything else on file.
    log = AuditLog(px.directory / "audit.jsonl", fsync=False)
    log.append("request", environment="prod", reason="bidi \u202egnp.exe\u202c zero\u200bwidth",
               details={"html": "<img src=x onerror=alert(1)>", "lone": "\udc80",
                        "huge": "h" * 100_000}, actor="test")
    log.close()
    with (px.directory / "audit.jsonl").open("ab") as f:
        f.write(b'{"seq": "one", "hash": 5, "ts": 7}\n')  # an entry in shape only
        f.write(b"\xff\xfe not json at all\n")
        f.write(b'{"torn": "last line, no newline')
    try:
        r = px.http("GET", "/authority/audit", APPROVER_KEY, params={"limit": 10})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        invalid = [e for e in data if e.get("invalid_line")]
        assert len(invalid) == 3
        assert invalid[-1]["invalid_line"].startswith('{"torn"')
        entries = [e for e in data if not e.get("invalid_line")]
        models = [e["model"] for e in entries if e.get("model")]
        # A lone surrogate in the body is refused by the strict parser, before any field is
        # read: the entry says why, and never carries the unencodable model name.
        assert any((e.get("details") or {}).get("code") == "invalid_request"
                   and "surrogate" in (e.get("reason") or "") for e in entries)
        # So is a 50,000-character model name, by its bound; the log never holds it.
        assert any("1 to 256 characters" in (e.get("reason") or "") for e in entries)
        assert not any(m.startswith("mmmm") for m in models)
        mine = next(e for e in entries if e.get("actor") == "test")
        assert mine["details"]["lone"] == "\\udc80"
        assert mine["details"]["html"] == "<img src=x onerror=alert(1)>"  # data, as data
        assert len(mine["details"]["huge"]) < 4200
        assert len(r.content) < 200_000
        verdict = px.http("GET", "/authority/audit/verify", ADMIN_KEY)
        assert verdict.status_code == 200 and verdict.json()["ok"] is False
    finally:
        raw = (px.directory / "audit.jsonl").read_bytes()
        good = raw[:raw.index(b'{"seq": "one"')]
        (px.directory / "audit.jsonl").write_bytes(good)
    # The proxy writes on after the repair, and the chain is whole again.
    assert px.http("POST", "/authority/kill-switch", ADMIN_KEY,
                   json={"engaged": False}).status_code == 200
    assert px.http("GET", "/authority/audit/verify", ADMIN_KEY).json()["ok"] is True


def test_audit_pages_walk_back_to_the_start_once_each(px: RunningProxy) -> None:
    on_file = [json.loads(x) for x in (px.directory / "audit.jsonl").read_bytes().splitlines()]
    seqs: list[int] = []
    cursor = None
    for _ in range(len(on_file) + 2):
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = px.http("GET", "/authority/audit", ADMIN_KEY, params=params).json()
        seqs = [e["seq"] for e in page["data"]] + seqs
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seqs[: len(on_file)] == [e["seq"] for e in on_file]
    forged = px.http("GET", "/authority/audit", ADMIN_KEY, params={"cursor": cursor or "x"})
    assert forged.status_code == 400
    from authority_sdk.paging import encode_cursor

    mid_line = encode_cursor("audit", (5.0, ""))  # not the start of a line
    r = px.http("GET", "/authority/audit", ADMIN_KEY, params={"cursor": mid_line})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


# -- the console shows what it is given, visibly ---------------------------------------------


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_console_makes_hidden_characters_visible_and_clips(px: RunningProxy) -> None:
    html = px.http("GET", "/authority/ui").text
    script = html.split("<script>", 1)[1].split("</script>", 1)[0]
    start = script.index("const MAX_TEXT")
    end = script.index("function text(")
    helper = script[start:end]
    cases = ["a\u202eexe.txt", "order-1\u200b", "ok\u2066\u2069", "soft\u00adhyphen",
             "x\ud800y", "<b>bold</b>\n\tkept", "\u0000\u001b[31m", "x" * 25_000,
             "tag\U000e0041", "line\u2028sep"]
    program = helper + "\nconst cases = " + json.dumps(cases) + ";\n" + \
        "process.stdout.write(JSON.stringify(cases.map(visible)));\n"
    out = subprocess.run([NODE, "-e", program], capture_output=True, text=True, timeout=60,
                         check=True)
    shown = json.loads(out.stdout)
    assert shown[0] == "a\u27e8U+202E\u27e9exe.txt"
    assert shown[1] == "order-1\u27e8U+200B\u27e9"
    assert shown[2] == "ok\u27e8U+2066\u27e9\u27e8U+2069\u27e9"
    assert shown[3] == "soft\u27e8U+00AD\u27e9hyphen"
    assert shown[4] == "x\u27e8U+D800\u27e9y"
    assert shown[5] == "<b>bold</b>\n\tkept"  # markup stays text; newlines and tabs stay
    assert shown[6] == "\u27e8U+0000\u27e9\u27e8U+001B\u27e9[31m"
    assert shown[7].endswith("\u2026[+5000 chars]") and len(shown[7]) < 20_100
    assert shown[8] == "tag\u27e8U+E0041\u27e9"
    assert shown[9] == "line\u27e8U+2028\u27e9sep"
    # Every text the page writes goes through it: no other text node is made.
    assert script.count("document.createTextNode(") == 1
    assert "function text(value) { return document.createTextNode(visible(value)); }" in script
