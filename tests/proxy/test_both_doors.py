"""The same case through both doors: the proxy and ``AuthorityClient`` answer alike."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import ScriptedServer, tool, user
from proxy_env import ADMIN_KEY, AGENT_KEY, DEV_KEY, RunningProxy, start_proxy

from authority_sdk import AuthorityClient, authority_of

OUTPUT = {"output_tools": ["final_result", "final_result_*"]}
FINAL = tool("final_result", {"city": {"type": "string"}, "temp": {"type": "number"}},
             ["city"])
SCRIPT = 'CALL final_result {"city": "Paris", "temp": 21}'


@pytest.fixture(scope="module")
def px(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[RunningProxy]:
    with start_proxy(upstream, tmp_path_factory.mktemp("proxy"), overrides=OUTPUT) as rp:
        yield rp


@pytest.fixture
def sdk(px: RunningProxy) -> AuthorityClient:
    # The proxy's own policy file (another state folder would do as well).
    return AuthorityClient(policy=str(px.policy_path), environment="prod", max_retries=0)


def _answer(call: Callable[[], Any]) -> tuple[int, str | None, str]:
    try:
        call()
    except openai.APIStatusError as e:
        assert e.response.headers["x-should-retry"] == "false"  # a retry cannot help
        return e.status_code, e.code, str(e.message)
    raise AssertionError("expected a refusal")


ENDPOINTS: list[tuple[str, Callable[[openai.OpenAI], Any]]] = [
    ("legacy completions", lambda c: c.completions.create(model="gpt-4o-mini", prompt="x")),
    # (the raw post: not every openai 2.x has responses.input_tokens)
    ("responses input tokens", lambda c: c.post(
        "/responses/input_tokens", body={"model": "gpt-4o-mini", "input": "hi"}, cast_to=object)),
    ("responses cancel", lambda c: c.responses.cancel("resp_123")),
    ("responses delete", lambda c: c.responses.delete("resp_123")),
    ("conversations", lambda c: c.conversations.create()),
    ("stored completions", lambda c: c.chat.completions.list()),
    ("model by id", lambda c: c.models.retrieve("gpt-4o-mini")),
    ("files", lambda c: c.files.list()),
    ("legacy completions", lambda c: c.completions.create(model="gpt-4o-mini", prompt="x")),
]


@pytest.mark.parametrize(("name", "call"), ENDPOINTS, ids=[n for n, _ in ENDPOINTS])
def test_unserved_endpoint_same_status_code_and_advice_from_both_doors(
        px: RunningProxy, sdk: AuthorityClient, name: str,
        call: Callable[[openai.OpenAI], Any]) -> None:
    before = px.upstream.chat_requests
    via_proxy = _answer(lambda: call(px.client(AGENT_KEY)))
    via_sdk = _answer(lambda: call(sdk))
    assert via_proxy[:2] == via_sdk[:2] == (404, "endpoint_not_allowed"), (via_proxy, via_sdk)
    for _, _, message in (via_proxy, via_sdk):
        assert "POST /v1/chat/completions" in message and "chat completions" in message
    assert px.upstream.chat_requests == before


def test_unserved_endpoint_is_refused_before_its_body_is_read(px: RunningProxy) -> None:
    # Without a key nothing under /v1 says what exists: authentication comes first.
    r = px.http("POST", "/v1/audio/speech", content=b"x" * 10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = px.http("POST", "/v1/audio/speech", AGENT_KEY, content=b"x" * 10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "endpoint_not_allowed"
    long = px.http("GET", "/v1/" + "a" * 5000, AGENT_KEY)  # never echoed unbounded
    assert long.status_code == 404 and len(long.text) < 1500
    # outside /v1 a missing route is still a plain not_found
    assert px.http("GET", "/nothing", ADMIN_KEY).json()["error"]["code"] == "not_found"


def test_models_list_the_same_from_both_doors(px: RunningProxy, sdk: AuthorityClient) -> None:
    proxy_ids = [m.id for m in px.client(AGENT_KEY).models.list()]
    assert proxy_ids == [m.id for m in sdk.models.list()] == ["gpt-4o-mini"]
    dev_sdk = sdk.copy(environment="dev")
    assert sorted(m.id for m in px.client(DEV_KEY).models.list()) == sorted(
        m.id for m in dev_sdk.models.list())


def _passed_to_app(r: Any) -> None:
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "final_result"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "temp": 21}
    action = authority_of(r).actions[0]
    assert action.status == "allowed" and action.dispatch == "client"
    assert "output tool" in (action.reason or "")


def test_output_tool_passed_to_the_app_by_both_doors(px: RunningProxy,
                                                     sdk: AuthorityClient) -> None:
    for c in (px.client(AGENT_KEY), sdk):
        _passed_to_app(c.chat.completions.create(model="gpt-4o-mini", messages=user(SCRIPT),
                                                 tools=[FINAL]))
    entries = [json.loads(x) for x in Path(px.directory / "audit.jsonl").read_text()
               .splitlines()]
    actions = [e for e in entries if e["event"] == "action"][-2:]
    assert [a["action_type"] for a in actions] == ["final_result", "final_result"]
    assert all(a["decision"] == "allow" and a["execution_result"] is None for a in actions)
