"""Malformed and hostile request bodies, through both doors: a 400 in OpenAI's shape,
audited (the caller is known), with bounded echoes; never a 500.

The proxy is the real ``authority serve``; the SDK door is the gated httpx transport
under a plain ``httpx.Client``, which receives exactly the bytes given.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ScriptedServer, write_policy_file
from proxy_env import AGENT_KEY, RunningProxy, start_proxy

from authority_sdk.engine import Engine
from authority_sdk.transport import transport_classes
from authority_sdk.wire import Caller

OK = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def body(**over: Any) -> bytes:
    return json.dumps({**OK, **over}).encode()


BAD: dict[str, bytes] = {
    "duplicate model": b'{"model": "gpt-4o-mini", "model": "gpt-4o", '
                       b'"messages": [{"role": "user", "content": "hi"}]}',
    "deep nesting": b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],'
                    b' "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "lone surrogate": b'{"model": "gpt-4o-mini", "messages": '
                      b'[{"role": "user", "content": "\\ud800"}]}',
    "tools not objects": body(tools=[1]),
    "stream_options a string": body(stream_options="x"),
    "stream not a bool": body(stream="yes"),
    "n zero": body(n=0),
    "max_tokens a string": body(max_tokens="10"),
    "messages empty": body(messages=[]),
    "message without role": body(messages=[{"content": "hi"}]),
    "a tool declared twice": body(tools=[
        {"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "t", "parameters": {"type": "string"}}}]),
    "huge model name": body(model="m" * 4_000_000),
    "NaN": b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], '
           b'"temperature": NaN}',
    "not json": b"{model: gpt",
    "not an object": b"[1, 2]",
    "not utf-8": b'{"model": "\xff\xfe"}',
}


@pytest.fixture(scope="module")
def px(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[RunningProxy]:
    with start_proxy(upstream, tmp_path_factory.mktemp("bad"),
                     overrides={"proxy": {"max_body_bytes": 8 * 1024 * 1024}}) as rp:
        yield rp


def _check(status: int, payload: dict[str, Any]) -> None:
    assert status == 400, payload
    err = payload["error"]
    assert err["code"] == "invalid_request" and err["type"] == "invalid_request_error"
    assert len(err["message"]) < 1000  # never an unbounded echo


@pytest.mark.parametrize("name", sorted(BAD))
def test_proxy_refuses_bad_bodies_with_an_audited_400(px: RunningProxy, name: str) -> None:
    resp = px.http("POST", "/v1/chat/completions", AGENT_KEY, content=BAD[name],
                   headers={"content-type": "application/json"})
    _check(resp.status_code, resp.json())
    request_id = resp.json()["error"]["authority"]["request_id"]
    [entry] = [e for e in px.audit_entries() if e["request_id"] == request_id]
    assert entry["event"] == "request" and entry["decision"] == "error"
    assert entry["details"]["code"] == "invalid_request"
    line = json.dumps(entry)
    assert len(line) < 10_000  # a 4 MB model name does not reach the fsynced log


@pytest.fixture(scope="module")
def sdk_http(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[httpx.Client, Path]]:
    folder = tmp_path_factory.mktemp("sdk-bad")
    engine = Engine(write_policy_file(folder, upstream))
    sync_transport, _ = transport_classes("httpx")
    transport = sync_transport(engine, Caller("sdk", "prod"))
    with httpx.Client(transport=transport, base_url=upstream.base_url) as http:
        yield http, folder / "audit.jsonl"
    engine.close()


@pytest.mark.parametrize("name", sorted(BAD))
def test_sdk_door_gives_the_same_answer(sdk_http: tuple[httpx.Client, Path], name: str) -> None:
    http, log = sdk_http
    resp = http.post("/chat/completions", content=BAD[name],
                     headers={"content-type": "application/json"})
    _check(resp.status_code, resp.json())
    request_id = resp.json()["error"]["authority"]["request_id"]
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["details"]["code"] for e in entries if e["request_id"] == request_id] == [
        "invalid_request"]
