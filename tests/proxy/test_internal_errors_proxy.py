"""A bug the proxy meets before the engine can record a request — in admission, say — is a
500 in OpenAI's shape with an audit entry for the authenticated caller (proxy/fastpath.py,
proxy/refusals.py); the proxy keeps serving. The app runs on a loopback port in this
process, so a fault can be injected into the engine's own step."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from helpers import ScriptedServer, free_port, user
from proxy_env import AGENT_KEY, PROXY_ENV, write_proxy_policy

from authority_sdk.audit import verify
from authority_sdk.engine import Engine
from proxy.app import create_app


@pytest.fixture
def proxy_url(upstream: ScriptedServer, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name, value in PROXY_ENV.items():
        monkeypatch.setenv(name, value)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(write_proxy_policy(upstream, tmp_path)),
                                           host="127.0.0.1", port=port, log_level="error",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _chat(url: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {AGENT_KEY}"},
                      json={"model": "gpt-4o-mini", "messages": user("SAY hello")})


def test_a_bug_in_admission_is_a_500_on_the_record_and_the_proxy_keeps_serving(
        proxy_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Engine.begin_d

    def broken(self: Engine, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Engine, "begin_d", broken)
    resp = _chat(proxy_url)
    assert resp.status_code == 500 and resp.headers["x-should-retry"] == "false"
    assert resp.json()["error"]["message"] == "internal error in the gateway"
    log = tmp_path / "audit.jsonl"
    [entry] = [json.loads(line) for line in log.read_text().splitlines()]
    assert (entry["event"], entry["decision"], entry["actor"]) == (
        "request", "error", "support-agent")
    assert entry["details"]["status_code"] == 500
    assert entry["details"]["path"] == "/v1/chat/completions"
    assert resp.headers["x-request-id"] == entry["request_id"]
    monkeypatch.setattr(Engine, "begin_d", original)
    assert _chat(proxy_url).status_code == 200
    assert verify(log).ok
