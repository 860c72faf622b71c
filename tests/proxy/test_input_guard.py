"""The proxy's input boundary (issue 10: G8, G9, G14; THREATS 6, 7).

A real ``authority serve`` process. Its memory is read from /proc/<pid>/status
(VmHWM, the peak resident set), so "the body was never read" is measured, not
assumed: on the old proxy a 200 MB body with no key cost +400 MB before the 401.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ScriptedServer, user
from proxy_env import ADMIN_KEY, AGENT_KEY, APPROVER_KEY, RunningProxy, start_proxy

MiB = 1 << 20
BIG = 200 * MiB
# The proxy's peak memory may grow by this much while refusing a 200 MB body (the old
# one grew by twice the body).
MEMORY_BOUND = 48 * MiB


@pytest.fixture(scope="module")
def px(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[RunningProxy]:
    # A chat limit well above the management one, to tell the two apart.
    with start_proxy(upstream, tmp_path_factory.mktemp("guard"),
                     overrides={"proxy": {"max_body_bytes": 1 * MiB}}) as rp:
        # Load the price map and tokenizer now, so they do not count as the body's.
        r = rp.http("POST", "/v1/chat/completions", AGENT_KEY,
                    json={"model": "gpt-4o-mini", "messages": user("SAY warm")})
        assert r.status_code == 200, r.text
        yield rp


def peak_rss(px: RunningProxy) -> int:
    assert px.process.proc is not None
    status = Path(f"/proc/{px.process.proc.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def audit_lines(px: RunningProxy) -> int:
    return len((px.directory / "audit.jsonl").read_bytes().splitlines())


class Raw:
    """One HTTP/1.1 request written by hand, so the body can be bigger than memory and
    the answer read before the body is sent."""

    def __init__(self, px: RunningProxy) -> None:
        self.sock = socket.create_connection(("127.0.0.1", px.process.port), timeout=30)
        self.sent = 0

    def head(self, method: str, path: str, headers: dict[str, str]) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1",
                 *(f"{k}: {v}" for k, v in headers.items()), "", ""]
        self.sock.sendall("\r\n".join(lines).encode("latin-1"))

    def body(self, total: int, *, chunked: bool = False, piece: int = MiB) -> None:
        """Send up to ``total`` bytes; stops quietly when the proxy has hung up."""
        block = b"x" * piece
        try:
            while self.sent < total:
                n = min(piece, total - self.sent)
                data = block[:n]
                self.sock.sendall(b"%x\r\n%s\r\n" % (n, data) if chunked else data)
                self.sent += n
            if chunked:
                self.sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass

    def response(self) -> tuple[int, dict[str, str], Any]:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed before an answer: {buf!r}"
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, v in (h.split(":", 1) for h in header_lines)}
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            assert chunk
            rest += chunk
        data = rest[:length]
        try:
            return int(status_line.split()[1]), headers, json.loads(data)
        except ValueError:
            return int(status_line.split()[1]), headers, data

    def close(self) -> None:
        self.sock.close()


def openai_error(body: Any, code: str) -> None:
    assert set(body) == {"error"}
    err = body["error"]
    assert err["code"] == code and err["message"] and err["type"], body


# -- G8: authenticate and bound before reading ----------------------------------------------


def test_an_unauthenticated_200_mb_body_is_refused_before_it_is_read(px: RunningProxy) -> None:
    before, lines = peak_rss(px), audit_lines(px)
    for chunked in (False, True):
        raw = Raw(px)
        framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(BIG)}
        raw.head("POST", "/authority/kill-switch",
                 {"Content-Type": "application/json", **framing})
        # The answer comes from the headers alone, before one byte of the body.
        status, headers, body = raw.response()
        assert status == 401
        openai_error(body, "invalid_api_key")
        assert headers["connection"] == "close"
        raw.body(BIG, chunked=chunked)
        raw.close()
    assert peak_rss(px) - before < MEMORY_BOUND
    assert audit_lines(px) == lines  # junk without a key costs no audit line
    assert px.http("GET", "/healthz").status_code == 200


def test_a_key_without_the_role_is_refused_before_its_body_is_read(px: RunningProxy) -> None:
    before, lines = peak_rss(px), audit_lines(px)
    raw = Raw(px)
    raw.head("POST", "/authority/kill-switch", {
        "Authorization": f"Bearer {AGENT_KEY}", "Content-Type": "application/json",
        "Content-Length": str(BIG)})
    status, _, body = raw.response()
    assert status == 403
    openai_error(body, "insufficient_role")
    raw.body(BIG)
    raw.close()
    assert peak_rss(px) - before < MEMORY_BOUND
    [entry] = [json.loads(x) for x in
               (px.directory / "audit.jsonl").read_bytes().splitlines()[lines:]]
    assert entry["event"] == "request" and entry["decision"] == "deny"
    assert entry["actor"] == "support-agent"
    assert entry["details"]["code"] == "insufficient_role"
    assert entry["request_id"] == body["error"]["authority"]["request_id"]


def test_a_chunked_body_is_counted_as_it_streams_and_cut_at_the_limit(
        px: RunningProxy) -> None:
    before, lines = peak_rss(px), audit_lines(px)
    raw = Raw(px)
    raw.head("POST", "/v1/chat/completions", {
        "Authorization": f"Bearer {AGENT_KEY}", "Content-Type": "application/json",
        "Transfer-Encoding": "chunked"})
    sender = threading.Thread(target=raw.body, args=(BIG,), kwargs={"chunked": True,
                                                                  "piece": 64 * 1024})
    sender.start()
    status, headers, body = raw.response()
    sender.join(120)
    raw.close()
    assert status == 413 and headers["connection"] == "close"
    openai_error(body, "request_too_large")
    assert raw.sent < BIG  # the proxy hung up; it did not drain 200 MB
    assert peak_rss(px) - before < MEMORY_BOUND
    [entry] = [json.loads(x) for x in
               (px.directory / "audit.jsonl").read_bytes().splitlines()[lines:]]
    assert entry["details"]["code"] == "request_too_large"
    assert entry["environment"] == "prod" and entry["actor"] == "support-agent"


def test_management_routes_take_smaller_bodies_than_chat(px: RunningProxy) -> None:
    padding = "p" * (100 * 1024)
    chat = px.http("POST", "/v1/chat/completions", AGENT_KEY, json={
        "model": "gpt-4o-mini", "messages": [{"role": "system", "content": padding},
                                             *user("SAY fits")]})
    assert chat.status_code == 200, chat.text
    kill = px.http("POST", "/authority/kill-switch", ADMIN_KEY,
                   json={"engaged": True, "reason": padding})
    assert kill.status_code == 413
    openai_error(kill.json(), "request_too_large")
    assert px.http("GET", "/authority/kill-switch", ADMIN_KEY).json()["global"]["engaged"] \
        is False
    huge = px.http("POST", "/v1/chat/completions", AGENT_KEY, content=b"{" + b" " * 2 * MiB)
    assert huge.status_code == 413


def test_a_content_length_that_is_not_a_number_is_a_400(px: RunningProxy) -> None:
    raw = Raw(px)
    raw.head("POST", "/authority/kill-switch", {
        "Authorization": f"Bearer {ADMIN_KEY}", "Content-Length": "12abc"})
    status, _, body = raw.response()
    raw.close()
    # uvicorn refuses it before the app sees it; never a 5xx, and nothing is read.
    assert status == 400, body


# -- G14: strict management bodies, no third-party script ----------------------------------


BAD_KILL_SWITCH_BODIES: list[bytes] = [
    b'{"engaged": 0}',
    b'{"engaged": 1}',
    b'{"engaged": "false"}',
    b'{"engaged": null}',
    b'{"engaged": [true]}',
    b'{"engaged": true, "engaged": false}',
    b'{"engaged": true, "extra": 1}',
    b'{"engaged": true, "reason": "\\ud800"}',
    b'{"engaged": true, "reason": NaN}',
    b'{"engaged": true, "environment": 7}',
    json.dumps({"engaged": True, "reason": "r" * 2001}).encode(),
    json.dumps({"engaged": True, "environment": "e" * 65}).encode(),
    b"[true]",
    b'"engaged"',
    b"{",
    b"[" * 20000 + b"]" * 20000,
]


@pytest.mark.parametrize("body", BAD_KILL_SWITCH_BODIES,
                         ids=[b[:40].decode(errors="replace") for b in BAD_KILL_SWITCH_BODIES])
def test_management_bodies_are_validated_strictly(px: RunningProxy, body: bytes) -> None:
    lines = audit_lines(px)
    r = px.http("POST", "/authority/kill-switch", ADMIN_KEY, content=body,
                headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    openai_error(r.json(), "invalid_request")
    assert len(r.text) < 4096
    state = px.http("GET", "/authority/kill-switch", ADMIN_KEY).json()
    assert state["global"]["engaged"] is False
    assert not any(s["engaged"] for s in state["environments"].values())
    entries = [json.loads(x) for x in
               (px.directory / "audit.jsonl").read_bytes().splitlines()[lines:]]
    assert [(e["event"], e["decision"], e["actor"], e["details"]["code"]) for e in entries] \
        == [("request", "error", "ops-admin", "invalid_request")]


def test_decision_and_resolve_bodies_are_strict_too(px: RunningProxy) -> None:
    for path, body in (
            ("/authority/approvals/apr_x/approve", {"reason": "ok", "why": "extra"}),
            ("/authority/approvals/apr_x/reject", {"reason": 5}),
            ("/authority/actions/k/resolve", {"outcome": "executed", "outcome ": "x"}),
            ("/authority/actions/k/resolve", {"outcome": True})):
        r = px.http("POST", path, APPROVER_KEY, json=body)
        assert r.status_code == 400, (path, r.text)
        openai_error(r.json(), "invalid_request")
    dup = px.http("POST", "/authority/actions/k/resolve", APPROVER_KEY,
                  content=b'{"outcome": "failed", "outcome": "executed"}')
    assert dup.status_code == 400 and "duplicate key" in dup.json()["error"]["message"]


def test_no_page_loads_a_third_party_script_and_openapi_stays(px: RunningProxy) -> None:
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        r = px.http("GET", path)
        assert r.status_code == 404, path
        assert "cdn" not in r.text.lower()
    doc = px.http("GET", "/openapi.json")
    assert doc.status_code == 200
    schemas = doc.json()["components"]["schemas"]
    assert schemas["KillSwitchBody"]["properties"]["engaged"]["type"] == "boolean"
    assert schemas["KillSwitchBody"]["additionalProperties"] is False
    assert schemas["KillSwitchBody"]["properties"]["reason"]["anyOf"][0]["maxLength"] == 2000


# -- G9: nothing unbounded is echoed ---------------------------------------------------------


def test_errors_and_the_log_line_never_echo_unbounded_client_values(px: RunningProxy) -> None:
    long_path = "/v1/" + "a" * 20000
    r = px.http("GET", long_path, AGENT_KEY)
    assert r.status_code == 404 and len(r.text) < 2048
    extra = px.http("POST", "/authority/kill-switch", ADMIN_KEY,
                    content=json.dumps({"engaged": True, "k" * 50000: 1, "\u202e\ud800": 2}),
                    headers={"content-type": "application/json"})
    assert extra.status_code == 400 and len(extra.text) < 4096
    extra.json()["error"]["message"].encode("utf-8")  # printable: no lone surrogate
    long_key = px.http("POST", "/authority/kill-switch", ADMIN_KEY,
                       json={"engaged": True, "\u202e" + "k" * 50000: 1})
    assert long_key.status_code == 400 and len(long_key.text) < 4096
    assert "extra" in long_key.json()["error"]["message"].lower()
    model = "m" * 60000
    denied = px.http("POST", "/v1/chat/completions", AGENT_KEY,
                     json={"model": model, "messages": user("hi")})
    assert denied.status_code in (400, 403)
    log = px.process.output()
    assert max(len(line) for line in log.splitlines()) < 4096
    assert "a" * 300 not in log and "m" * 300 not in log


def test_unauthenticated_junk_is_refused_without_an_audit_line(px: RunningProxy) -> None:
    lines = audit_lines(px)
    for method, path, kw in (
            ("POST", "/v1/chat/completions", {"content": b"{nope"}),
            ("POST", "/authority/kill-switch", {"json": {"engaged": 0}}),
            ("GET", "/authority/audit", {"params": {"limit": "x"}}),
            ("POST", "/authority/approvals/apr_1/approve", {"json": {"z": 1}}),
            ("GET", "/v1/models", {"headers": {"authorization": "Bearer sk-wrong"}})):
        r = px.http(method, path, **kw)
        assert r.status_code == 401, (path, r.text)
        openai_error(r.json(), "invalid_api_key")
    assert audit_lines(px) == lines
