"""Crashes and retries against the real proxy: once, on the record, or not at all.

``authority serve`` runs as a child process and is killed with SIGKILL at chosen
points; real receivers (HTTP, SMTP) count the effects; the scripted model words
every answer anew (``{nonce}``), so a gateway that asked it again would run a new,
different action.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import ScriptedServer, user
from proxy_env import ADMIN_KEY, AGENT_KEY, PROXY_ENV, write_proxy_policy
from servers import HttpReceiver, SmtpSink

from authority_sdk.audit import verify
from authority_sdk.audit.crashpoints import CRASH_ENV
from authority_sdk.demo.processes import ProxyProcess

pytestmark = pytest.mark.slow

MODEL = "gpt-4o-mini"


def _policy(rx: HttpReceiver, smtp: SmtpSink, **extra: Any) -> dict[str, Any]:
    return {
        "upstream": {"timeout_s": 20},
        "worker": {"interval_s": 0.3},
        "actions": {
            "issue_refund": {"executor": "billing", "mode": "auto_execute",
                             "dedupe_on": ["order_id"]},
            "send_email": {"executor": "email", "mode": "auto_execute"},
        },
        "executors": {
            "billing": {"type": "webhook", "url": rx.url("/refunds"), "timeout_s": 60},
            "email": {"type": "smtp", "host": smtp.host, "port": smtp.port,
                      "sender": "agent@example.com", "timeout_s": 5},
        },
        **extra,
    }


class Proxy:
    """A proxy that can be SIGKILLed and restarted on the same port, state and log."""

    def __init__(self, upstream: ScriptedServer, directory: Path,
                 overrides: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.upstream = upstream
        self.directory = directory
        self.policy = write_proxy_policy(upstream, directory, overrides)
        self.proc = ProxyProcess(self.policy, env={**PROXY_ENV, **(env or {})},
                                 log_path=directory / "proxy.log").start(60)
        self.port = self.proc.port

    @property
    def url(self) -> str:
        return self.proc.url

    def kill9(self) -> None:
        assert self.proc.proc is not None
        self.proc.proc.send_signal(signal.SIGKILL)
        self.proc.proc.wait(10)
        self.proc.stop()

    def restart(self) -> None:
        self.proc = ProxyProcess(self.policy, port=self.port, env=PROXY_ENV,
                                 log_path=self.directory / "proxy.log").start(60)

    def stop(self) -> None:
        self.proc.stop()

    def chat(self, script: str, key: str | None = None, timeout: float = 60,
             **extra: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {AGENT_KEY}"}
        if key:
            headers["idempotency-key"] = key
        return httpx.post(self.url + "/v1/chat/completions", timeout=timeout, headers=headers,
                          json={"model": MODEL, "messages": user(script), **extra})

    def responses(self, script: str, key: str, stream: bool = False,
                  timeout: float = 60) -> httpx.Response:
        return httpx.post(self.url + "/v1/responses", timeout=timeout, headers={
            "authorization": f"Bearer {AGENT_KEY}", "idempotency-key": key},
            json={"model": MODEL, "input": script, "stream": stream})

    def audit(self) -> list[dict[str, Any]]:
        path = self.directory / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def verify(self) -> bool:
        return verify(self.directory / "audit.jsonl").ok

    def management(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, timeout=30,
                             headers={"authorization": f"Bearer {ADMIN_KEY}"}, **kw)


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


def _in_thread(fn: Any) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def _swallow(fn: Any) -> Any:
    def run() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the proxy died under it: the point
            fn()
    return run


def test_a_retry_after_a_crash_regates_the_stored_answer_and_sends_one_email(
        upstream: ScriptedServer, tmp_path: Path, rx: HttpReceiver, smtp: SmtpSink) -> None:
    """Issue 9, F2: the crash lands while the refund's webhook is in flight; the email of
    the same answer has not gone yet. The retry must not ask the model again (which would
    word the email anew) and must send the email once, as first worded."""
    px = Proxy(upstream, tmp_path, _policy(rx, smtp))
    try:
        rx.reply_once(200, json={"refund_id": "rf"}, delay_s=30)  # the first delivery hangs
        script = ('CALL issue_refund {"order_id": "A-1", "amount": 10, "note": "{nonce}"}\n'
                  'CALL send_email {"to": "ann@example.com", "subject": "Refund", '
                  '"body": "Your refund {nonce} is on its way."}')
        served = upstream.chat_requests
        _in_thread(_swallow(lambda: px.chat(script, key="order-A-1")))
        rx.wait_for(1, timeout_s=30)
        px.kill9()
        assert smtp.messages == []
        px.restart()
        resp = px.chat(script, key="order-A-1")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert upstream.chat_requests == served + 1  # never asked again
        statuses = [a["status"] for a in body["authority"]["actions"]]
        assert statuses == ["executed", "executed"]
        smtp.wait_for(1)
        time.sleep(0.5)
        assert len(smtp.messages) == 1
        # The refund was resent with the same Idempotency-Key: one effect downstream.
        assert len({r.header("idempotency-key") for r in rx.requests}) == 1
        # What was sent is what the first answer said.
        [intent] = [e for e in px.audit() if e["event"] == "action"
                    and e["action_type"] == "send_email"
                    and e["details"]["status"] == "executing"]
        assert intent["details"]["arguments"]["body"] in smtp.messages[0].message.get_content()
        assert px.verify()
    finally:
        px.stop()


def test_a_crash_between_a_response_and_its_finished_answer_leaves_a_retry_the_same_calls(
        upstream: ScriptedServer, tmp_path: Path) -> None:
    """The proxy sends a held answer's response before it writes the finished answer (README
    section 7). Killed right there (a real SIGKILL at the crash point), it leaves the claim
    holding the answer: the retry, on the restarted proxy, re-gates it — the same calls,
    the model not asked again — and the next one replays."""
    px = Proxy(upstream, tmp_path, {}, env={CRASH_ENV: "finish:before_write"})
    try:
        script = 'CALL lookup_customer {"customer_id": "C-{nonce}"}'
        served = upstream.chat_requests
        first = px.chat(script, key="crash-after-response")
        assert first.status_code == 200, first.text
        calls = first.json()["choices"][0]["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["lookup_customer"]
        assert px.proc.proc is not None
        assert px.proc.proc.wait(10) == -signal.SIGKILL  # died before the finished answer
        px.proc.stop()
        px.restart()
        again = px.chat(script, key="crash-after-response")
        assert again.status_code == 200, again.text
        assert upstream.chat_requests == served + 1  # never asked again
        assert again.json()["choices"][0]["message"]["tool_calls"] == calls
        assert again.json()["authority"]["recovered_from"] is not None
        replay = px.chat(script, key="crash-after-response")
        assert replay.headers.get("idempotent-replayed") == "true"
        assert replay.json()["choices"][0]["message"]["tool_calls"] == calls
        assert upstream.chat_requests == served + 1
        assert px.verify()
    finally:
        px.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_responses_retry_after_a_crash_regates_the_stored_answer(
        upstream: ScriptedServer, tmp_path: Path, rx: HttpReceiver, smtp: SmtpSink,
        stream: bool) -> None:
    """The same crash through the Responses API: the retry re-gates the stored answer (as
    a synthesised stream for a streaming client), the model is not asked again, each
    effect happens once."""
    px = Proxy(upstream, tmp_path, _policy(rx, smtp))
    try:
        rx.reply_once(200, json={"refund_id": "rf"}, delay_s=30)
        script = ('CALL issue_refund {"order_id": "R-1", "amount": 10, "note": "{nonce}"}\n'
                  'CALL send_email {"to": "ann@example.com", "subject": "Refund", '
                  '"body": "Your refund {nonce} is on its way."}')
        served = upstream.chat_requests
        _in_thread(_swallow(lambda: px.responses(script, "resp-R-1", stream)))
        rx.wait_for(1, timeout_s=30)
        px.kill9()
        px.restart()
        resp = px.responses(script, "resp-R-1", stream)
        assert resp.status_code == 200, resp.text
        if stream:
            events = [json.loads(line[6:]) for line in resp.text.split("\n")
                      if line.startswith("data: {")]
            assert [e["sequence_number"] for e in events] == list(range(len(events)))
            body = events[-1]["response"]
            assert events[-1]["type"] == "response.completed"
        else:
            body = resp.json()
        assert upstream.chat_requests == served + 1  # never asked again
        assert [a["status"] for a in body["authority"]["actions"]] == ["executed", "executed"]
        assert body["authority"]["recovered_from"]
        assert [i["type"] for i in body["output"]] == ["message"]  # both ran: withheld
        smtp.wait_for(1)
        time.sleep(0.5)
        assert len(smtp.messages) == 1
        assert len({r.header("idempotency-key") for r in rx.requests}) == 1
        assert px.verify()
    finally:
        px.stop()


def test_recovery_waits_while_the_kill_switch_is_engaged(
        upstream: ScriptedServer, tmp_path: Path, rx: HttpReceiver, smtp: SmtpSink) -> None:
    """Issue 9, F5: an execution interrupted by kill -9 is not re-run at start-up while the
    switch is engaged; it is, by the background worker, once the switch is released."""
    px = Proxy(upstream, tmp_path, _policy(rx, smtp))
    try:
        rx.reply_once(200, json={"refund_id": "rf"}, delay_s=30)
        _in_thread(_swallow(lambda: px.chat(
            'CALL issue_refund {"order_id": "K-1", "amount": 10}', key="k-1")))
        rx.wait_for(1, timeout_s=30)
        px.kill9()
        # Engaged while the gateway is down, through the same state (the CLI would do this).
        from authority_sdk import control
        from authority_sdk.engine import Engine

        ops = Engine(px.policy)
        control.set_kill_switch(ops, True, actor="ops", reason="incident")
        ops.close()
        px.restart()
        time.sleep(1.5)  # several worker rounds
        assert len(rx.requests) == 1  # nothing re-ran while engaged
        r = px.management("POST", "/authority/kill-switch",
                          json={"engaged": False, "reason": "resolved"})
        assert r.status_code == 200, r.text
        rx.wait_for(2, timeout_s=10)  # the worker retried the idempotent delivery
        assert rx.requests[1].header("idempotency-key") == rx.requests[0].header(
            "idempotency-key")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            recovered = [e for e in px.audit() if e["actor"] == "recovery"]
            if recovered:
                break
            time.sleep(0.1)
        assert recovered and recovered[0]["details"]["status"] == "executed"
        assert px.verify()
    finally:
        px.stop()


def test_stock_openai_retries_after_a_timeout_run_the_action_once(
        upstream: ScriptedServer, tmp_path: Path, rx: HttpReceiver, smtp: SmtpSink) -> None:
    """Issue 9, F6: the app sets no key; openai times out while the refund is still at the
    billing system and retries; the gateway recognises the retry and replays."""
    px = Proxy(upstream, tmp_path, _policy(rx, smtp))
    try:
        rx.reply(200, json={"refund_id": "rf"}, delay_s=3)
        client = openai.OpenAI(base_url=px.url + "/v1", api_key=AGENT_KEY, timeout=2,
                               max_retries=3)
        resp = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=user('CALL issue_refund {"order_id": "R-1", "amount": 10}'))
        assert resp.headers.get("idempotent-replayed") == "true"
        assert resp.parse().model_extra["authority"]["actions"][0]["status"] == "executed"
        assert len(rx.requests) == 1
    finally:
        px.stop()


def test_kill9_under_load_then_every_request_retried(
        upstream: ScriptedServer, tmp_path: Path, rx: HttpReceiver, smtp: SmtpSink) -> None:
    """Issue 9, "Also" and F10: 64 concurrent requests with Idempotency-Keys and executing
    calls, SIGKILL mid-run, restart, retry every request with its key: zero duplicate
    effects, every effect on the record, a retry told what really happened, the chain
    verifies, and what is in doubt is listed."""
    px = Proxy(upstream, tmp_path, _policy(rx, smtp))
    try:
        rx.reply(200, json={"refund_id": "rf"}, delay_s=0.05)

        def script(i: int) -> str:
            return (f'CALL issue_refund {{"order_id": "O-{i}", "amount": 10, '
                    f'"note": "{{nonce}}"}}\n'
                    f'CALL send_email {{"to": "c{i}@example.com", "subject": "s", '
                    f'"body": "refund {{nonce}}"}}')

        def first(i: int) -> None:
            _swallow(lambda: px.chat(script(i), key=f"load-{i}", timeout=30))()

        pool = ThreadPoolExecutor(64)
        futures = [pool.submit(first, i) for i in range(64)]
        rx.wait_for(20, timeout_s=60)
        px.kill9()
        for f in futures:
            f.result(timeout=60)
        pool.shutdown()
        px.restart()
        answers = {}
        with ThreadPoolExecutor(16) as retry_pool:
            for i, resp in zip(range(64), retry_pool.map(
                    lambda i: px.chat(script(i), key=f"load-{i}"), range(64)), strict=True):
                assert resp.status_code == 200, resp.text
                answers[i] = resp.json()["authority"]["actions"]
        # A retry is told what really happened: never "duplicate" for its own action.
        for actions in answers.values():
            assert {a["code"] for a in actions} <= {None}, actions
            assert {a["status"] for a in actions} <= {"executed", "in_doubt"}
        # Zero duplicate effects: one refund key per order (resends carry the same
        # Idempotency-Key), at most one email per customer.
        keys_by_order: dict[str, set[str]] = {}
        for r in rx.requests:
            keys_by_order.setdefault(r.json["arguments"]["order_id"], set()).add(
                str(r.header("idempotency-key")))
        assert len(keys_by_order) == 64
        assert all(len(k) == 1 for k in keys_by_order.values())
        rcpts = [m.rcpt_tos[0] for m in smtp.messages]
        assert len(rcpts) == len(set(rcpts))
        # Every effect is on the record before it happened.
        entries = px.audit()
        intended = {e["details"]["action_key"] for e in entries if e["event"] == "action"
                    and e["details"].get("status") == "executing"}
        delivered = {r.header("idempotency-key") for r in rx.requests}
        assert delivered <= intended
        assert px.verify()
        # Each email went exactly once, or may have and is in doubt, listed for a person.
        for i, actions in answers.items():
            email = actions[1]["status"]
            sent = rcpts.count(f"c{i}@example.com")
            assert (email, sent) in {("executed", 1), ("in_doubt", 0), ("in_doubt", 1)}, i
        doubt = px.management("GET", "/authority/actions?status=in_doubt").json()["data"]
        in_doubt = sum(a["status"] == "in_doubt" for acts in answers.values() for a in acts)
        assert len(doubt) == in_doubt
    finally:
        px.stop()



def test_an_audit_log_that_breaks_after_an_effect_parks_the_record_and_stops_new_work(
        upstream: ScriptedServer, tmp_path: Path) -> None:
    """Issue 9, F3: the log becomes unwritable right after an action ran. The answer says
    what ran, the key is never released (a retry replays), nothing more runs, the missing
    entries wait in the state store and reach the log once it is writable."""
    log = tmp_path / "audit.jsonl"
    effects = tmp_path / "effects.jsonl"
    tests_dir = str(Path(__file__).resolve().parent.parent)
    overrides = {"worker": {"interval_s": 0.3},
                 "actions": {"send_note": {"executor": "breaker", "mode": "auto_execute"}},
                 "executors": {"breaker": {"type": "python",
                                           "target": "sample_actions:record_then_break_audit"}}}
    policy = write_proxy_policy(upstream, tmp_path, overrides)
    env = {**PROXY_ENV, "PYTHONPATH": tests_dir, "AUTHORITY_TEST_EFFECTS": str(effects),
           "AUTHORITY_TEST_BREAK_AUDIT": str(log)}
    proc = ProxyProcess(policy, env=env, log_path=tmp_path / "proxy.log").start(60)
    try:
        def chat(script: str, key: str | None = None) -> httpx.Response:
            headers = {"authorization": f"Bearer {AGENT_KEY}"}
            if key:
                headers["idempotency-key"] = key
            return httpx.post(proc.url + "/v1/chat/completions", headers=headers, timeout=30,
                              json={"model": MODEL, "messages": user(script)})

        script = 'CALL send_note {"text": "one"}\nCALL send_note {"text": "two"}'
        resp = chat(script, key="k-1")
        assert resp.status_code == 200, resp.text
        authority = resp.json()["authority"]
        assert [(a["status"], a["code"]) for a in authority["actions"]] == [
            ("executed", None), ("denied", "authority_unavailable")]
        assert authority["warnings"]
        [effect] = [json.loads(line) for line in effects.read_text().splitlines()]
        # No request is taken while the record is incomplete — not even a retry, which
        # runs nothing either: the key was not released.
        for refused in (chat(script, key="k-1"), chat("SAY hello")):
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "authority_unavailable"
        assert len(effects.read_text().splitlines()) == 1
        # The log is writable again: the parked entries go in first, then requests flow.
        log.rmdir()
        log.with_name(log.name + ".aside").rename(log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if chat("SAY hello").status_code == 200:
                break
            time.sleep(0.2)
        # ...and the retry replays what ran.
        again = chat(script, key="k-1")
        assert again.headers.get("idempotent-replayed") == "true"
        assert len(effects.read_text().splitlines()) == 1
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        executed = [e for e in entries if e["event"] == "action"
                    and e["details"].get("status") == "executed"]
        assert [e["details"]["action_key"] for e in executed] == [effect["key"]]
        assert verify(log).ok
    finally:
        proc.stop()
