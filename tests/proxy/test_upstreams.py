"""Several upstreams through the real proxy (issue 17, point 1): one pool per upstream,
routing by the request's model (chat, Responses, embeddings), each upstream's query,
headers and key, fallbacks on a 5xx / refused connection / timeout only before anything
was streamed, every attempt audited, the models list, and a reload that swaps the pools."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from helpers import ScriptedServer, audit_entries, free_port, user
from proxy_env import AGENT_KEY, PROXY_ENV, RunningProxy, write_proxy_policy
from servers import HttpReceiver

from authority_sdk.demo.processes import ProxyProcess

KEY_A, KEY_B = "sk-upstream-a-1111", "sk-upstream-b-2222"
ENV = {**PROXY_ENV, "UP_KEY_A": KEY_A, "UP_KEY_B": KEY_B}

ANSWER = {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "gpt-4.1-mini",
          "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": "from the receiver"}}],
          "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


@pytest.fixture(scope="module")
def second() -> Iterator[ScriptedServer]:
    srv = ScriptedServer().start()
    yield srv
    srv.stop()


def _ups(a: str, b: str, *, a_extra: dict[str, Any] | None = None,
         b_extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [{"name": "a", "base_url": a, "api_key_env": "UP_KEY_A", "timeout_s": 5,
             "models": ["gpt-4o-mini", "text-embedding-*"], **(a_extra or {})},
            {"name": "b", "base_url": b, "api_key_env": "UP_KEY_B", "timeout_s": 5,
             "models": ["gpt-4.1-*"], **(b_extra or {})}]


def _write(directory: Path, upstream: ScriptedServer, ups: list[dict[str, Any]],
           overrides: dict[str, Any] | None = None) -> Path:
    path = write_proxy_policy(upstream, directory, {
        "environments": {"prod": {"models": ["gpt-4o-mini", "gpt-4.1-*", "gpt-4o",
                                             "text-embedding-*"]}}, **(overrides or {})})
    data = yaml.safe_load(path.read_text())
    del data["upstream"]
    data["upstreams"] = ups
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextmanager
def _proxy(directory: Path, upstream: ScriptedServer, ups: list[dict[str, Any]],
           overrides: dict[str, Any] | None = None) -> Iterator[RunningProxy]:
    policy = _write(directory, upstream, ups, overrides)
    proc = ProxyProcess(policy, env=ENV, log_path=directory / "proxy.log")
    proc.start()
    try:
        yield RunningProxy(proc, policy, directory, upstream)
    finally:
        proc.stop()


def _count(srv: ScriptedServer) -> int:
    return int(httpx.get(f"http://127.0.0.1:{srv.port}/_stats").json()["chat_requests"])


def _last_headers(srv: ScriptedServer) -> dict[str, str]:
    last = httpx.get(f"http://127.0.0.1:{srv.port}/_stats").json()["last_request"]
    return dict(last["headers"])


def _entries(rp: RunningProxy, event: str) -> list[dict[str, Any]]:
    return audit_entries(rp.directory / "audit.jsonl", event)


class HalfStream:
    """An upstream that starts a streamed answer — headers and one chunk — then drops the
    connection: the client has been sent something, so no fallback may follow."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _serve(self) -> None:
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0,
                 "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": None,
                                                      "delta": {"role": "assistant",
                                                                "content": "Hello"}}]}
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    body += conn.recv(65536)
                self.hits += 1
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
                conn.sendall(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                time.sleep(0.3)
            # closed without the terminating chunk: the stream broke

    def close(self) -> None:
        self.sock.close()


# -- routing ----------------------------------------------------------------------------


def test_each_model_goes_to_its_upstream_with_its_key(
        upstream: ScriptedServer, second: ScriptedServer, tmp_path: Path) -> None:
    with _proxy(tmp_path, upstream, _ups(upstream.base_url, second.base_url)) as rp:
        c = rp.client(AGENT_KEY)
        a0, b0 = _count(upstream), _count(second)
        r = c.chat.completions.create(model="gpt-4o-mini", messages=user("SAY via a"))
        assert r.choices[0].message.content == "via a"
        assert (_count(upstream), _count(second)) == (a0 + 1, b0)
        assert _last_headers(upstream)["authorization"] == f"Bearer {KEY_A}"
        r = c.chat.completions.create(model="gpt-4.1-mini", messages=user("SAY via b"))
        assert r.choices[0].message.content == "via b"
        assert (_count(upstream), _count(second)) == (a0 + 1, b0 + 1)
        assert _last_headers(second)["authorization"] == f"Bearer {KEY_B}"
        # The Responses API and embeddings are routed the same way.
        resp = c.responses.create(model="gpt-4.1-mini", input="SAY responses via b")
        assert resp.output_text == "responses via b"
        assert _last_headers(second)["authorization"] == f"Bearer {KEY_B}"
        emb = c.embeddings.create(model="text-embedding-3-small", input="hello")
        assert emb.data and _last_headers(upstream)["authorization"] == f"Bearer {KEY_A}"
        served = [e["details"]["upstream"] for e in _entries(rp, "request")]
        assert served == ["a", "b", "b", "a"]

        # A model the environment allows but no upstream serves: refused, audited, not sent.
        before = (_count(upstream), _count(second))
        with pytest.raises(openai.PermissionDeniedError) as ei:
            c.chat.completions.create(model="gpt-4o", messages=user("hi"))
        assert ei.value.code == "model_not_routed"
        assert (_count(upstream), _count(second)) == before
        last = _entries(rp, "request")[-1]
        assert (last["decision"], last["details"]["code"]) == ("deny", "model_not_routed")


def test_azure_style_query_header_and_key_reach_only_their_upstream(
        upstream: ScriptedServer, tmp_path: Path) -> None:
    with HttpReceiver() as az:
        az.reply(200, json=ANSWER)
        ups = _ups(upstream.base_url, az.url("/openai/deployments/mini"),
                   b_extra={"query": {"api-version": "2024-10-21"},
                            "api_key_header": "api-key", "headers": {"x-tenant": "t1"}})
        with _proxy(tmp_path, upstream, ups) as rp:
            c = rp.client(AGENT_KEY)
            r = c.chat.completions.create(model="gpt-4.1-mini", messages=user("x"))
            assert r.choices[0].message.content == "from the receiver"
            c.chat.completions.create(model="gpt-4o-mini", messages=user("x"))
        [got] = az.requests
        assert got.path == "/openai/deployments/mini/chat/completions?api-version=2024-10-21"
        assert got.header("api-key") == KEY_B and got.header("authorization") is None
        assert got.header("x-tenant") == "t1"
        assert "x-tenant" not in _last_headers(upstream)
        assert "api-key" not in _last_headers(upstream)


# -- fallbacks --------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["5xx", "refused"])
def test_a_failed_upstream_falls_back_once_and_each_attempt_is_audited(
        fault: str, upstream: ScriptedServer, second: ScriptedServer, tmp_path: Path) -> None:
    with HttpReceiver() as bad:
        bad.reply(502, json={"error": {"message": "bad gateway"}})
        primary = bad.url("/v1") if fault == "5xx" else f"http://127.0.0.1:{free_port()}/v1"
        ups = _ups(primary, second.base_url, a_extra={"fallbacks": ["b"]})
        with _proxy(tmp_path, upstream, ups) as rp:
            b0 = _count(second)
            r = rp.client(AGENT_KEY).chat.completions.create(
                model="gpt-4o-mini", messages=user("SAY second try"))
            assert r.choices[0].message.content == "second try"
            assert _count(second) == b0 + 1
            [attempt] = _entries(rp, "upstream")
            [req] = _entries(rp, "request")
            metrics = rp.http("GET", "/metrics").text
            assert 'authority_upstream_fallbacks_total{code="upstream_error",upstream="a"} 1.0' \
                in metrics
            assert "failed (upstream_error" in (tmp_path / "proxy.log").read_text()
        assert len(bad.requests) == (1 if fault == "5xx" else 0)
    assert attempt["request_id"] == req["request_id"]
    assert attempt["details"]["upstream"] == "a" and attempt["details"]["fallback_to"] == "b"
    assert attempt["details"]["code"] == "upstream_error"
    assert attempt["details"]["status_code"] == 502  # the upstream's, or the gateway's
    assert attempt["cost_actual_usd"] == 0.0  # a refusal or a 5xx is not billed
    assert req["decision"] == "allow" and req["details"]["upstream"] == "b"


def test_a_4xx_is_the_answer_no_fallback(upstream: ScriptedServer, second: ScriptedServer,
                                         tmp_path: Path) -> None:
    with HttpReceiver() as bad:
        bad.reply(400, json={"error": {"message": "bad request", "code": "nope"}})
        ups = _ups(bad.url("/v1"), second.base_url, a_extra={"fallbacks": ["b"]})
        with _proxy(tmp_path, upstream, ups) as rp:
            b0 = _count(second)
            with pytest.raises(openai.BadRequestError):
                rp.client(AGENT_KEY).chat.completions.create(model="gpt-4o-mini",
                                                             messages=user("hi"))
            assert _count(second) == b0 and _entries(rp, "upstream") == []
            assert _entries(rp, "request")[-1]["details"]["upstream"] == "a"


def test_a_timeout_falls_back_and_its_estimate_is_charged_to_the_budget(
        upstream: ScriptedServer, second: ScriptedServer, tmp_path: Path) -> None:
    with HttpReceiver() as slow:
        slow.reply(200, json=ANSWER, delay_s=5)
        ups = _ups(slow.url("/v1"), second.base_url,
                   a_extra={"fallbacks": ["b"], "timeout_s": 0.5})
        budget = {"environments": {"prod": {"models": ["gpt-4o-mini", "gpt-4.1-*"],
                                            "budget": {"usd": 5.0, "period": "day"}}}}
        with _proxy(tmp_path, upstream, ups, budget) as rp:
            r = rp.http("POST", "/v1/chat/completions", AGENT_KEY,
                        json={"model": "gpt-4o-mini", "messages": user("SAY after a wait"),
                              "max_tokens": 200})
            assert r.status_code == 200, r.text
            auth = r.json()["authority"]
            [attempt] = _entries(rp, "upstream")
            [req] = _entries(rp, "request")
        assert len(slow.requests) == 1
    assert attempt["details"]["code"] == "upstream_timeout"
    estimate = auth["cost"]["estimate_usd"]
    assert attempt["cost_actual_usd"] == pytest.approx(estimate, rel=1e-6)
    # The request's cost is what the answer cost plus what the abandoned attempt may have.
    assert req["cost_actual_usd"] == pytest.approx(auth["cost"]["actual_usd"], rel=1e-6)
    assert estimate < req["cost_actual_usd"] < 2 * estimate


def test_no_fallback_once_the_stream_has_started(upstream: ScriptedServer,
                                                 second: ScriptedServer, tmp_path: Path) -> None:
    half = HalfStream()
    try:
        ups = _ups(half.base_url, second.base_url, a_extra={"fallbacks": ["b"]})
        with _proxy(tmp_path, upstream, ups) as rp:
            b0 = _count(second)
            got: list[str] = []
            with pytest.raises(openai.APIError) as ei:
                stream = rp.client(AGENT_KEY).chat.completions.create(
                    model="gpt-4o-mini", messages=user("hi"), stream=True)
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        got.append(chunk.choices[0].delta.content)
            assert got == ["Hello"]  # the client had the start of the answer, then the error
            assert "cannot reach the upstream" in str(ei.value)
            assert half.hits == 1 and _count(second) == b0  # no second answer
            assert _entries(rp, "upstream") == []
            [req] = _entries(rp, "request")
            assert req["decision"] == "error" and req["details"]["upstream"] == "a"
    finally:
        half.close()


# -- the models list and reloads ----------------------------------------------------------


def test_models_lists_what_each_upstream_serves(upstream: ScriptedServer,
                                                second: ScriptedServer, tmp_path: Path) -> None:
    with _proxy(tmp_path, upstream, _ups(upstream.base_url, second.base_url)) as rp:
        ids = sorted(m.id for m in rp.client(AGENT_KEY).models.list())
    # gpt-4o is allowed and listed by both models, but no upstream serves it.
    assert ids == ["gpt-4.1-mini", "gpt-4.1-nano", "gpt-4o-mini"]


def test_a_reload_routes_through_new_pools(upstream: ScriptedServer, second: ScriptedServer,
                                           tmp_path: Path) -> None:
    with _proxy(tmp_path, upstream, _ups(upstream.base_url, second.base_url)) as rp:
        c = rp.client(AGENT_KEY)
        b0 = _count(second)
        c.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))
        assert _count(second) == b0
        data = yaml.safe_load(rp.policy_path.read_text())
        data["upstreams"][0]["base_url"] = second.base_url  # a now points at the other model
        rp.policy_path.write_text(yaml.safe_dump(data, sort_keys=False))
        deadline = time.monotonic() + 15
        while not [e for e in _entries(rp, "policy") if e["decision"] == "allow"]:
            assert time.monotonic() < deadline, "the reload was not applied"
            time.sleep(0.1)
        c.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))
        assert _count(second) == b0 + 1
        assert _last_headers(second)["authorization"] == f"Bearer {KEY_A}"


def test_retired_pools_close_once_their_last_request_is_done() -> None:
    """What a reload does to the old policy's pools, step by step on a real loop."""
    from authority_sdk.policy import parse_policy
    from proxy.metrics import Metrics
    from proxy.upstream import Upstreams

    async def scenario() -> None:
        pools = Upstreams(parse_policy({"upstreams": [
            {"name": "a", "base_url": "http://127.0.0.1:9/v1"},
            {"name": "b", "base_url": "http://127.0.0.1:9/v1"}]}), Metrics())
        sessions = [p.session for p in pools.pools.values()]
        pools.enter()  # a request started under the old policy
        await asyncio.to_thread(pools.retire)  # the reload runs in a worker thread
        await asyncio.sleep(0.05)
        assert not pools.closed and not any(s.closed for s in sessions)
        pools.leave()
        await asyncio.sleep(0.05)
        assert pools.closed and all(s.closed for s in sessions)

        idle = Upstreams(parse_policy({}), Metrics())
        idle.enter()
        idle.leave()
        idle.retire()  # nothing in flight: closed at once
        await asyncio.sleep(0.05)
        assert idle.closed

    asyncio.run(scenario())
