"""The proxy as a process: graceful SIGTERM, and several workers sharing one state."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ScriptedServer, concurrently, user
from proxy_env import ADMIN_KEY, AGENT_KEY, APPROVER_KEY, DEV_KEY, start_proxy

from authority_sdk.audit import verify


def _wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_sigterm_lets_the_in_flight_request_finish_and_exits_0(
        upstream: ScriptedServer, tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path) as px:
        before = px.upstream_stats()["chat_requests"]
        result: dict[str, httpx.Response] = {}

        def slow() -> None:
            result["r"] = px.http("POST", "/v1/chat/completions", AGENT_KEY, json={
                "model": "gpt-4o-mini", "messages": user("SLEEP 2\nSAY finished anyway")})

        t = threading.Thread(target=slow)
        t.start()
        # The upstream counts a request when it arrives, before sleeping.
        _wait_until(lambda: px.upstream_stats()["chat_requests"] > before)
        assert px.process.proc is not None
        px.process.proc.send_signal(signal.SIGTERM)
        t.join(30)
        rc = px.process.proc.wait(30)  # one SIGTERM only: a second one forces the exit
        r = result["r"]
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "finished anyway"
        assert rc == 0, px.process.output()
        rid = r.json()["authority"]["request_id"]
        assert [e["event"] for e in px.audit_entries() if e.get("request_id") == rid] == [
            "request"]
        assert verify(tmp_path / "audit.jsonl").ok
        with pytest.raises(httpx.ConnectError):
            httpx.get(px.url + "/healthz", timeout=2)


def test_two_workers_share_idempotency_kill_switch_approvals_and_metrics(
        upstream: ScriptedServer, tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path, workers=2) as px:
        _wait_until(lambda: px.process.output().count("Application startup complete") >= 2)
        before = px.upstream_stats()["chat_requests"]
        body = {"model": "gpt-4o-mini", "messages": user("SLEEP 0.3\nSAY shared")}
        # A fresh connection each time, so the kernel spreads them over both workers.
        results = concurrently(lambda: px.http("POST", "/v1/chat/completions", AGENT_KEY,
                                               json=body,
                                               headers={"Idempotency-Key": "two-workers"}))
        assert px.upstream_stats()["chat_requests"] - before == 1
        assert {r.status_code for r in results} <= {200, 409}
        assert len({r.json()["authority"]["request_id"] for r in results
                    if r.status_code == 200}) == 1

        # A switch flipped through one worker holds in all: every request after is refused.
        on = px.http("POST", "/authority/kill-switch", ADMIN_KEY, json={"engaged": True})
        assert on.status_code == 200
        codes = {px.http("POST", "/v1/chat/completions", DEV_KEY, json={
            "model": "gpt-4o-mini", "messages": user("SAY hi")}).json()["error"]["code"]
                 for _ in range(8)}
        assert codes == {"kill_switch_engaged"}
        px.http("POST", "/authority/kill-switch", ADMIN_KEY, json={"engaged": False})

        created = px.http("POST", "/v1/chat/completions", AGENT_KEY, json={
            "model": "gpt-4o-mini", "messages": user('CALL send_note {"text": "w"}')}).json()
        apr = created["authority"]["actions"][0]["approval_id"]
        decided = [px.http("POST", f"/authority/approvals/{apr}/approve", APPROVER_KEY)
                   for _ in range(4)]
        assert sorted(r.status_code for r in decided) == [200, 409, 409, 409]

        metrics = px.http("GET", "/metrics").text
        total = sum(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("authority_requests_total{")
                    and 'route="/v1/chat/completions"' in line)
        # Summed over both workers, whichever one answers the scrape.
        assert total == 16 + 8 + 1
    assert verify(tmp_path / "audit.jsonl").ok
