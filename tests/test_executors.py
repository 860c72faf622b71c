"""Built-in executors against real local servers (HTTP receiver, aiosmtpd)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sample_actions
from helpers import concurrently
from servers import HttpReceiver, SmtpSink, free_port, self_signed_cert

from authority_sdk.executors import (
    ExecutionResult,
    Executor,
    ExecutorRegistry,
    build_executor,
)
from authority_sdk.policy import (
    LogExecutor,
    PythonExecutor,
    SmtpExecutor,
    WebhookExecutor,
    parse_policy,
)

KEY = "act_7f3a9c"
TARGET = sample_actions.__name__


_opened: list[Executor] = []


@pytest.fixture(autouse=True)
def _close_executors() -> Any:
    yield
    while _opened:
        close = getattr(_opened.pop(), "close", None)
        if close is not None:
            close()


def webhook(url: str, **kw: Any) -> Executor:
    ex = build_executor("billing", WebhookExecutor(type="webhook", url=url, **kw))
    _opened.append(ex)
    return ex


def smtp(sink_or_port: SmtpSink | int, **kw: Any) -> Executor:
    port = sink_or_port.port if isinstance(sink_or_port, SmtpSink) else sink_or_port
    kw.setdefault("timeout_s", 5)
    return build_executor("email", SmtpExecutor(type="smtp", host="127.0.0.1", port=port,
                                                sender="agent@example.com", **kw))


def python(fn: str, **kw: Any) -> Executor:
    return build_executor("notes", PythonExecutor(type="python", target=f"{TARGET}:{fn}", **kw))


def journal_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def rx() -> Any:
    with HttpReceiver() as receiver:
        yield receiver


@pytest.fixture
def sink() -> Any:
    with SmtpSink() as s:
        yield s


# -- webhook ------------------------------------------------------------------


def test_webhook_posts_action_with_idempotency_key_and_keeps_json_result(rx: HttpReceiver) -> None:
    rx.reply(201, json={"refund_id": "re_1", "amount": 42})
    ex = webhook(rx.url("/refunds"), headers={"Authorization": "Bearer s3cret", "X-Tenant": "acme"})

    res = ex.execute("issue_refund", {"order_id": "o-1", "amount": 42}, KEY)

    assert res == ExecutionResult(ok=True, result={"refund_id": "re_1", "amount": 42})
    [req] = rx.requests
    assert (req.method, req.path) == ("POST", "/refunds")
    assert req.header("Idempotency-Key") == KEY
    assert req.header("Content-Type") == "application/json"
    assert req.header("Authorization") == "Bearer s3cret"
    assert req.header("X-Tenant") == "acme"
    assert req.json == {"action_type": "issue_refund",
                        "arguments": {"order_id": "o-1", "amount": 42}, "action_key": KEY}


def test_webhook_config_cannot_override_idempotency_key(rx: HttpReceiver) -> None:
    ex = webhook(rx.url(), headers={"idempotency-key": "fixed", "content-type": "text/plain"})
    assert ex.execute("t", {}, KEY).ok
    [req] = rx.requests
    assert req.header("Idempotency-Key") == KEY
    assert req.header("Content-Type") == "application/json"


@pytest.mark.parametrize(("status", "body", "expected"), [
    (202, "queued for processing", {"status_code": 202, "text": "queued for processing"}),
    (204, "", {"status_code": 204, "text": ""}),
])
def test_webhook_success_without_json_keeps_text(rx: HttpReceiver, status: int, body: str,
                                                 expected: dict[str, Any]) -> None:
    rx.reply(status, body=body)
    res = webhook(rx.url()).execute("t", {"a": 1}, KEY)
    assert res.ok and res.error is None
    assert res.result == expected


def test_webhook_500_is_a_failure_with_the_body(rx: HttpReceiver) -> None:
    rx.reply(500, body="database   on fire\n")
    res = webhook(rx.url()).execute("issue_refund", {"amount": 5}, KEY)
    assert not res.ok
    assert res.error == "webhook answered 500: database on fire"
    assert res.result == {"status_code": 500, "text": "database on fire"}
    assert len(rx.requests) == 1  # no automatic retry


def test_webhook_long_error_body_is_shortened(rx: HttpReceiver) -> None:
    rx.reply(422, body="x" * 5000)
    res = webhook(rx.url()).execute("t", {}, KEY)
    assert res.error is not None and res.error.startswith("webhook answered 422: xxx")
    assert len(res.error) < 300


def test_webhook_does_not_follow_redirects(rx: HttpReceiver) -> None:
    rx.reply(307, body="", headers={"Location": "/elsewhere"})
    res = webhook(rx.url("/hook")).execute("t", {}, KEY)
    assert not res.ok and res.error is not None and res.error.startswith("webhook answered 307")
    assert [r.path for r in rx.requests] == ["/hook"]


def test_webhook_timeout(rx: HttpReceiver) -> None:
    rx.reply_once(delay_s=30)
    res = webhook(rx.url(), timeout_s=0.3).execute("t", {"a": 1}, KEY)
    assert not res.ok
    assert res.error == "webhook timed out after 0.3s"
    # The receiver got the request and may act on it: the error must not say otherwise.
    assert "nothing was sent" not in res.error
    assert len(rx.requests) == 1


def test_webhook_connection_refused_says_nothing_was_sent() -> None:
    res = webhook(f"http://127.0.0.1:{free_port()}/hook").execute("t", {}, KEY)
    assert not res.ok
    assert res.error is not None and res.error.startswith("webhook unreachable (nothing was sent)")


def test_webhook_reuses_its_connection(rx: HttpReceiver) -> None:
    ex = webhook(rx.url())
    assert ex.execute("t", {"n": 1}, "k1").ok
    assert ex.execute("t", {"n": 2}, "k2").ok
    first, second = rx.requests
    assert first.client_port == second.client_port


def test_webhook_executor_is_shared_safely_between_threads(rx: HttpReceiver) -> None:
    ex = webhook(rx.url())
    results: dict[int, ExecutionResult] = {}

    def call(i: int) -> None:
        results[i] = ex.execute("t", {"i": i}, f"key-{i}")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.ok for r in results.values()) and len(results) == 8
    assert sorted(r.header("Idempotency-Key") or "" for r in rx.requests) == sorted(
        f"key-{i}" for i in range(8))
    assert all(r.json["action_key"] == r.header("Idempotency-Key") for r in rx.requests)


def test_webhook_refuses_an_action_key_that_would_break_the_header(rx: HttpReceiver) -> None:
    res = webhook(rx.url()).execute("t", {}, "evil\r\nX-Injected: 1")
    assert not res.ok and res.error is not None and "action_key" in res.error
    assert rx.requests == []


def test_webhook_describe_shows_the_request_masks_secrets_and_sends_nothing(
        rx: HttpReceiver) -> None:
    url = rx.url("/refunds").replace("http://", "http://svc:pw@")
    ex = webhook(url, timeout_s=3, headers={"Authorization": "Bearer s3cret", "X-Tenant": "acme"})
    # Every configured header value is masked, whatever its name: the gateway cannot know
    # which of them are secrets. Its own headers are shown.
    assert ex.describe("issue_refund", {"amount": 7}, KEY) == {
        "executor": "billing",
        "type": "webhook",
        "method": "POST",
        "url": rx.url("/refunds").replace("http://", "http://***@"),
        "headers": {"Authorization": "***", "X-Tenant": "***",
                    "Content-Type": "application/json", "Idempotency-Key": KEY},
        "json": {"action_type": "issue_refund", "arguments": {"amount": 7}, "action_key": KEY},
        "timeout_s": 3.0,
    }
    assert rx.requests == []


def test_webhook_aexecute(rx: HttpReceiver) -> None:
    rx.reply(json={"done": True})
    rx.reply_once(503, body="maintenance")
    ex = webhook(rx.url("/a"))

    async def run(*keys: str) -> list[ExecutionResult]:
        try:
            return [await ex.aexecute("t", {"x": k}, k) for k in keys]
        finally:
            await ex.aclose()  # type: ignore[attr-defined]

    failed, done = asyncio.run(run("k-a", "k-b"))
    # A second event loop gets a working client of its own.
    [again] = asyncio.run(run("k-c"))
    assert failed == ExecutionResult(False, {"status_code": 503, "text": "maintenance"},
                                     "webhook answered 503: maintenance")
    assert done == again == ExecutionResult(True, {"done": True})
    assert [r.header("Idempotency-Key") for r in rx.requests] == ["k-a", "k-b", "k-c"]
    assert rx.requests[2].json == {"action_type": "t", "arguments": {"x": "k-c"},
                                   "action_key": "k-c"}


def test_webhook_aexecute_timeout_and_refused(rx: HttpReceiver) -> None:
    rx.reply_once(delay_s=30)
    slow = webhook(rx.url(), timeout_s=0.25)
    dead = webhook(f"http://127.0.0.1:{free_port()}/")

    async def run() -> tuple[ExecutionResult, ExecutionResult]:
        try:
            return await slow.aexecute("t", {}, KEY), await dead.aexecute("t", {}, KEY)
        finally:
            await slow.aclose()  # type: ignore[attr-defined]
            await dead.aclose()  # type: ignore[attr-defined]

    timed_out, refused = asyncio.run(run())
    assert (timed_out.ok, timed_out.error) == (False, "webhook timed out after 0.25s")
    assert not refused.ok and "nothing was sent" in str(refused.error)


# -- smtp ---------------------------------------------------------------------


def test_smtp_delivers_a_real_message(sink: SmtpSink) -> None:
    args = {"to": ["Ann Buyer <ann@example.org>", "bob@example.net"], "cc": "carol@example.com",
            "subject": "Your refund", "body": "Hello Ann,\nyour refund is on its way.\n"}
    res = smtp(sink).execute("send_email", args, KEY)

    assert res.ok, res.error
    [mail] = sink.messages
    msg = mail.message
    assert mail.mail_from == "agent@example.com"
    assert mail.rcpt_tos == ["ann@example.org", "bob@example.net", "carol@example.com"]
    assert msg["From"] == "agent@example.com"
    assert msg["To"] == "Ann Buyer <ann@example.org>, bob@example.net"
    assert msg["Cc"] == "carol@example.com"
    assert msg["Subject"] == "Your refund"
    assert msg.get_content() == "Hello Ann,\nyour refund is on its way.\n"
    assert msg["X-Authority-Action-Key"] == KEY
    assert msg["Date"]
    assert msg["Message-ID"].endswith("@example.com>") and msg["Message-ID"].startswith("<")
    assert res.result == {"message_id": msg["Message-ID"],
                          "recipients": ["ann@example.org", "bob@example.net",
                                         "carol@example.com"]}


def test_smtp_non_ascii_names_subject_and_body(sink: SmtpSink) -> None:
    args = {"to": "Zoë Ünal <zoe@example.org>", "subject": "Rückerstattung ✓",
            "body": "Grüße — 你好"}
    assert smtp(sink).execute("send_email", args, KEY).ok
    msg = sink.messages[0].message
    assert (msg["To"], msg["Subject"]) == ("Zoë Ünal <zoe@example.org>", "Rückerstattung ✓")
    assert msg.get_content().rstrip("\n") == "Grüße — 你好"


def test_smtp_message_id_follows_the_action_key(sink: SmtpSink) -> None:
    ex = smtp(sink)
    args = {"to": "ann@example.org", "subject": "s", "body": "b"}
    first, again, other = (ex.execute("send_email", args, k) for k in (KEY, KEY, "other-key"))
    ids = [m.message["Message-ID"] for m in sink.wait_for(3)]
    assert ids[0] == ids[1] != ids[2]
    assert [first.result["message_id"], again.result["message_id"],
            other.result["message_id"]] == ids


@pytest.mark.parametrize(("args", "error"), [
    ({"subject": "s", "body": "b"}, "missing argument 'to'"),
    ({"to": [], "subject": "s", "body": "b"}, "argument 'to' names no recipient"),
    ({"to": "not-an-address", "subject": "s", "body": "b"}, "not a well-formed address"),
    ({"to": 42, "subject": "s", "body": "b"},
     "argument 'to': must be an address or a list of addresses, not a number"),
    ({"to": "a@b.org", "body": "b"}, "missing argument 'subject'"),
    ({"to": "a@b.org", "subject": "s"}, "missing argument 'body'"),
    ({"to": "a@b.org", "subject": "s", "body": ["b"]}, "argument 'body' must be a string"),
    ({"to": "a@b.org", "subject": "hi\r\nBcc: spy@evil.com", "body": "b"},
     "argument 'subject': line breaks are not allowed"),
    ({"to": "a@b.org\nBcc: spy@evil.com", "subject": "s", "body": "b"},
     "an address must not contain a line break"),
    ({"to": "a@b.org", "subject": "s", "body": "b", "attachments": ["x.pdf"]},
     "unexpected argument(s) 'attachments'"),
])
def test_smtp_refuses_malformed_arguments_without_sending(sink: SmtpSink, args: dict[str, Any],
                                                          error: str) -> None:
    res = smtp(sink).execute("send_email", args, KEY)
    assert not res.ok
    assert res.error is not None and res.error.startswith("email not sent: ")
    assert error in res.error
    assert smtp(sink).describe("send_email", args, KEY)["error"] == res.error
    assert sink.messages == []


def test_smtp_connection_refused_says_not_sent() -> None:
    res = smtp(free_port()).execute("send_email", {"to": "a@b.org", "subject": "s", "body": "b"},
                                    KEY)
    assert not res.ok
    assert res.error is not None and res.error.startswith("email not sent: SMTP server 127.0.0.1:")


def test_smtp_partly_refused_recipients() -> None:
    with SmtpSink(reject={"gone@example.org"}) as sink:
        ex = smtp(sink)
        partly = ex.execute("send_email", {"to": ["ann@example.org", "gone@example.org"],
                                           "subject": "s", "body": "b"}, KEY)
        nobody = ex.execute("send_email", {"to": "gone@example.org", "subject": "s", "body": "b"},
                            "k2")
        [mail] = sink.messages
    # Delivered to someone: a success, so nobody is tempted to resend to Ann.
    assert partly.ok
    assert partly.result["recipients"] == ["ann@example.org"]
    assert partly.result["refused"] == {"gone@example.org": "550 5.1.1 no such user"}
    assert mail.rcpt_tos == ["ann@example.org"]
    assert not nobody.ok
    assert nobody.error == ("email not sent: every recipient was refused: "
                            "gone@example.org: 550 5.1.1 no such user")


def test_smtp_login_with_credentials_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_SMTP_USER", "agent")
    monkeypatch.setenv("T_SMTP_PASS", "hunter2")
    args = {"to": "a@b.org", "subject": "s", "body": "b"}
    with SmtpSink(auth={"agent": "hunter2"}) as sink:
        good = smtp(sink, username_env="T_SMTP_USER", password_env="T_SMTP_PASS")
        assert good.execute("send_email", args, KEY).ok
        monkeypatch.setenv("T_SMTP_PASS", "wrong")
        bad = good.execute("send_email", args, "k2")
        monkeypatch.delenv("T_SMTP_PASS")
        unset = good.execute("send_email", args, "k3")
        anonymous = smtp(sink).execute("send_email", args, "k4")
        [mail] = sink.messages
    assert mail.login == "agent"
    assert not bad.ok and bad.error is not None
    assert bad.error.startswith("email not sent: SMTP login failed: 535")
    assert unset.error == ("email not sent: SMTP credentials missing: "
                           "environment variable(s) T_SMTP_PASS not set")
    assert not anonymous.ok and str(anonymous.error).startswith("email not sent: ")


def test_smtp_starttls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed_cert(tmp_path)
    args = {"to": "a@b.org", "subject": "over tls", "body": "b"}
    with SmtpSink(tls=(cert, key)) as sink:
        untrusted = smtp(sink, starttls=True).execute("send_email", args, KEY)
        plain = smtp(sink).execute("send_email", args, KEY)
        monkeypatch.setenv("SSL_CERT_FILE", cert)
        trusted = smtp(sink, starttls=True).execute("send_email", args, KEY)
        [mail] = sink.messages
    assert trusted.ok, trusted.error
    assert mail.tls and mail.message["Subject"] == "over tls"
    assert not untrusted.ok and untrusted.error is not None
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.error
    assert not plain.ok  # the server demands STARTTLS before MAIL


def test_smtp_describe_shows_envelope_headers_and_body(sink: SmtpSink) -> None:
    ex = smtp(sink, username_env="U", password_env="P")
    d = ex.describe("send_email", {"to": "ann@example.org", "subject": "Hi", "body": "Text"}, KEY)
    headers = d.pop("headers")
    assert d == {
        "executor": "email", "type": "smtp",
        "server": {"host": "127.0.0.1", "port": sink.port, "starttls": False, "login": True},
        "envelope": {"mail_from": "agent@example.com", "rcpt_to": ["ann@example.org"]},
        "recipients": {"to": ["ann@example.org"]},
        "body": "Text\n",
    }
    assert headers["From"] == "agent@example.com" and headers["To"] == "ann@example.org"
    assert headers["Subject"] == "Hi" and headers["X-Authority-Action-Key"] == KEY
    sent = smtp(sink).execute("send_email", {"to": "ann@example.org", "subject": "Hi",
                                             "body": "Text"}, KEY)
    assert headers["Message-ID"] == sent.result["message_id"]


def test_smtp_aexecute(sink: SmtpSink) -> None:
    ex = smtp(sink)
    res = asyncio.run(ex.aexecute("send_email", {"to": "ann@example.org", "subject": "async",
                                                 "body": "b"}, KEY))
    assert res.ok
    assert sink.messages[0].message["Subject"] == "async"
    bad = asyncio.run(ex.aexecute("send_email", {"subject": "s", "body": "b"}, KEY))
    assert bad.error == ("email not sent: missing argument 'to' "
                         "(a recipient address or a list of them)")


# -- python -------------------------------------------------------------------


def test_python_sync_target(tmp_path: Path) -> None:
    journal = tmp_path / "calls.jsonl"
    args = {"text": "hello", "journal": str(journal)}
    res = python("write_note").execute("write_note", args, KEY)
    assert res.ok
    assert res.result["note"] == "HELLO"
    assert (res.result["key"], res.result["type"]) == (KEY, "write_note")
    assert journal_lines(journal) == [{"fn": "write_note", "key": KEY, "type": "write_note"}]
    assert "mutated" not in args  # the target got a copy


def test_python_async_target_from_sync_code(tmp_path: Path) -> None:
    journal = tmp_path / "calls.jsonl"
    res = python("awrite_note").execute("n", {"text": "abc", "journal": str(journal)}, KEY)
    assert res.ok and res.result["note"] == "cba"
    assert journal_lines(journal) == [{"fn": "awrite_note", "key": KEY, "type": "n"}]


def test_python_async_target_from_sync_code_inside_a_running_loop() -> None:
    ex = python("awrite_note")

    async def inside() -> ExecutionResult:
        return ex.execute("n", {"text": "xy"}, KEY)  # a sync caller that happens to be in a loop

    res = asyncio.run(inside())
    assert res.ok and res.result["note"] == "yx"
    assert res.result["loop_thread"] == "authority-python-executor"


def test_python_aexecute_awaits_async_targets_and_threads_sync_ones() -> None:
    async def run() -> tuple[ExecutionResult, ExecutionResult]:
        return (await python("awrite_note").aexecute("n", {"text": "ab"}, KEY),
                await python("write_note").aexecute("n", {"text": "ab"}, KEY))

    awaited, threaded = asyncio.run(run())
    assert awaited.ok and awaited.result["loop_thread"] == threading.current_thread().name
    assert threaded.ok and threaded.result["note"] == "AB"
    assert threaded.result["thread"] != threading.current_thread().name


@pytest.mark.parametrize(("fn", "error"), [
    ("refuse", "PermissionError: refund over limit: 99"),
    ("arefuse", "ValueError: async target failed"),
])
def test_python_exceptions_become_failures(fn: str, error: str) -> None:
    ex = python(fn)
    for res in (ex.execute("t", {"amount": 99}, KEY),
                asyncio.run(ex.aexecute("t", {"amount": 99}, KEY))):
        assert res == ExecutionResult(False, None, error)


def test_python_return_values_are_kept_as_json() -> None:
    assert python("opaque").execute("t", {}, KEY).result == "<opaque 42>"
    assert python("as_tuple").execute("t", {}, KEY).result == [1, "two", None]


def test_python_import_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_actions_mod.py").write_text("import dependency_that_is_missing_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def run(target: str) -> ExecutionResult:
        return build_executor("x", PythonExecutor(type="python", target=target)).execute(
            "t", {}, KEY)

    assert run("no_such_module_xyz:fn").error == (
        "python target 'no_such_module_xyz:fn': module 'no_such_module_xyz' not found")
    assert run(f"{TARGET}:missing").error == (
        f"python target '{TARGET}:missing': '{TARGET}' has no attribute 'missing'")
    assert run(f"{TARGET}:NOT_CALLABLE").error == (
        f"python target '{TARGET}:NOT_CALLABLE' is not callable")
    broken = run("broken_actions_mod:fn")
    assert broken.error == ("python target 'broken_actions_mod:fn': importing "
                            "'broken_actions_mod' failed: ModuleNotFoundError: No module named "
                            "'dependency_that_is_missing_xyz'")
    assert not broken.ok


def test_python_describe_does_not_import_or_call(tmp_path: Path) -> None:
    ex = build_executor("n", PythonExecutor(type="python", target="never_imported_xyz:go",
                                            idempotent=True))
    assert ex.describe("note", {"text": "t"}, KEY) == {
        "executor": "n", "type": "python", "target": "never_imported_xyz:go",
        "call": "go(arguments, action_key=..., action_type=...)",
        "args": [{"text": "t"}], "kwargs": {"action_key": KEY, "action_type": "note"},
    }
    assert "never_imported_xyz" not in sys.modules


# -- log ------------------------------------------------------------------------


def test_log_executor_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    ex = build_executor("dry", LogExecutor(type="log"))
    with caplog.at_level(logging.INFO, logger="authority.executor"):
        res = ex.execute("issue_refund", {"amount": 3}, KEY)
        ares = asyncio.run(ex.aexecute("issue_refund", {"amount": 3}, KEY))
    assert res == ares == ExecutionResult(True, {"logged": True})
    line = ("executor=dry action_type=issue_refund action_key=act_7f3a9c "
            'arguments={"amount":3}')
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("authority.executor", logging.INFO, line)] * 2
    assert ex.describe("issue_refund", {"amount": 3}, KEY) == {
        "executor": "dry", "type": "log", "logger": "authority.executor", "level": "INFO",
        "message": line}


# -- registry and common contract ---------------------------------------------


POLICY = {
    "executors": {
        "billing": {"type": "webhook", "url": "http://127.0.0.1:9/refunds"},
        "email": {"type": "smtp", "sender": "agent@example.com"},
        "notes": {"type": "python", "target": f"{TARGET}:write_note", "idempotent": True},
        "safe_notes": {"type": "python", "target": f"{TARGET}:write_note"},
        "dry": {"type": "log"},
    },
}


def test_registry_builds_each_executor_once_with_its_kind_and_idempotency() -> None:
    registry = ExecutorRegistry.from_policy(parse_policy(POLICY))
    assert sorted(registry) == ["billing", "dry", "email", "notes", "safe_notes"]
    assert "billing" in registry and "nope" not in registry
    facts = {}
    for name in registry:
        ex = registry.get(name)
        assert isinstance(ex, Executor)
        _opened.append(ex)
        assert registry.get(name) is ex
        assert ex.name == name
        facts[name] = (ex.kind, ex.idempotent_downstream)
    assert facts == {"billing": ("webhook", True), "email": ("smtp", False),
                     "notes": ("python", True), "safe_notes": ("python", False),
                     "dry": ("log", True)}
    with pytest.raises(KeyError, match="unknown executor 'nope'"):
        registry.get("nope")
    registry.close()


def test_registry_hands_out_one_executor_to_concurrent_threads() -> None:
    registry = ExecutorRegistry(parse_policy(POLICY).executors)
    seen = concurrently(lambda: registry.get("billing"), n=6)
    assert len(seen) == 6 and all(e is seen[0] for e in seen)


def test_importing_the_package_leaves_io_libraries_out() -> None:
    code = ("import sys, authority_sdk.executors as e; "
            "e.ExecutorRegistry({}); "
            "bad = [m for m in ('httpx', 'smtplib', 'openai') if m in sys.modules]; "
            "assert not bad, bad; "
            "e.WebhookActionExecutor; assert 'httpx' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def _wait_for_request(rx: HttpReceiver, n: int = 1) -> None:
    deadline = time.monotonic() + 10
    while len(rx.requests) < n:
        assert time.monotonic() < deadline, "the webhook never arrived"
        time.sleep(0.01)


def test_closing_a_webhook_client_in_use_waits_for_the_call_on_it(rx: HttpReceiver) -> None:
    """A reload (or an app closing its client) closes the executors' clients; a call on the
    wire at that moment must still get its answer (cut off, it would be in doubt), and the
    client closes when it is done. The next call opens a new client."""
    rx.reply(200, json={"refund_id": "rf_slow"}, delay_s=0.5)
    ex: Any = webhook(rx.url("/refund"))

    async def go() -> tuple[ExecutionResult, bool, bool]:
        call = asyncio.create_task(ex.aexecute("issue_refund", {"order_id": "A-1"}, KEY))
        await asyncio.to_thread(_wait_for_request, rx)
        held = ex._aclients[asyncio.get_running_loop()]
        await ex.aclose()
        open_during = not held.client.is_closed
        result = await call
        return result, open_during, held.client.is_closed

    result, open_during, closed_after = asyncio.run(go())
    assert result.ok and result.result == {"refund_id": "rf_slow"}, result
    assert open_during and closed_after

    # The sync client: closed from another thread while a call is on it.
    out: dict[str, ExecutionResult] = {}
    thread = threading.Thread(target=lambda: out.update(
        r=ex.execute("issue_refund", {"order_id": "A-2"}, KEY)))
    thread.start()
    _wait_for_request(rx, 2)
    held = ex._client
    ex.close()
    assert not held.client.is_closed
    thread.join(10)
    assert out["r"].ok and held.client.is_closed
    rx.reply(200, json={"refund_id": "rf_3"})
    assert ex.execute("issue_refund", {"order_id": "A-3"}, KEY).ok  # a new client
