"""The same scenarios through both front doors: the answers must agree.

``AuthorityClient`` (the engine in-process) and the stock ``openai`` client pointed at the
real proxy, on the same policy and the same scripted model. Each scenario is run through
both and the answers are compared once ids, times and costs are taken out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from helpers import ScriptedServer, tool, user
from proxy_env import AGENT_KEY, RunningProxy, start_proxy

from authority_sdk import AuthorityClient
from authority_sdk.engine import Engine

MODEL = "gpt-4o-mini"
TOOLS = [tool("lookup_customer"), tool("send_note"), tool("delete_account")]
RESPONSES_TOOLS = [{"type": "function", "name": t["function"]["name"],
                    "parameters": t["function"]["parameters"]} for t in TOOLS] + [
    {"type": "custom", "name": "patch"}]

# Identifiers and figures that differ per run by design.
_VOLATILE = re.compile(r"(req|apr|act|chatcmpl|call|resp|fc|msg|msg_authority)_[0-9a-zA-Z_-]+")


def normalise(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()
                if k not in ("id", "created", "request_id", "cost", "usage", "action_key",
                             "approval_id", "tool_call_id", "system_fingerprint",
                             "created_at", "call_id")}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, str):
        return _VOLATILE.sub(r"\1_…", value)
    return value


@pytest.fixture(scope="module")
def doors(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[dict[str, openai.OpenAI]]:
    folder = tmp_path_factory.mktemp("parity")
    (folder / "proxy").mkdir()
    with start_proxy(upstream, folder / "proxy") as rp:
        sdk_folder = folder / "sdk"
        sdk_folder.mkdir()
        # The SDK runs on a copy of the proxy's policy with its own state and audit log.
        policy = rp.policy_path.read_text().replace(str(rp.directory), str(sdk_folder))
        (sdk_folder / "authority.yaml").write_text(policy)
        engine = Engine(sdk_folder / "authority.yaml")
        sdk = AuthorityClient(gateway=engine, environment="prod", caller="support-agent",
                              max_retries=0)
        yield {"sdk": sdk, "proxy": _proxy_client(rp)}
        engine.close()


def _proxy_client(rp: RunningProxy) -> openai.OpenAI:
    return rp.client(AGENT_KEY)


def both(doors: dict[str, openai.OpenAI], fn: Callable[[openai.OpenAI], Any]) -> list[Any]:
    out = []
    for name in ("sdk", "proxy"):
        try:
            out.append(("ok", normalise(fn(doors[name]))))
        except openai.APIStatusError as exc:
            out.append(("error", exc.status_code, exc.code))
    return out


def _dump(resp: Any) -> Any:
    return json.loads(resp.model_dump_json())


SCENARIOS: dict[str, Callable[[openai.OpenAI], Any]] = {
    "plain answer": lambda c: _dump(c.chat.completions.create(
        model=MODEL, messages=user("SAY hello"))),
    "model outside the allowlist": lambda c: c.chat.completions.create(
        model="gpt-4o", messages=user("hi")),
    "ceiling": lambda c: c.chat.completions.create(
        model=MODEL, messages=user("hi"), max_tokens=1_000_000),
    "mixed calls": lambda c: _dump(c.chat.completions.create(
        model=MODEL, tools=TOOLS, messages=user(
            'CALL lookup_customer {"id": 1}\nCALL send_note {"text": "x"}\n'
            'CALL delete_account {"id": 2}\nCALL wipe {"x": 1}'))),
    "legacy function call": lambda c: _dump(c.chat.completions.create(
        model=MODEL, functions=[{"name": "delete_account"}],  # type: ignore[call-overload]
        messages=user('FUNCTION_CALL delete_account {"id": 3}'))),
    "n = 2": lambda c: _dump(c.chat.completions.create(
        model=MODEL, tools=TOOLS, n=2, messages=user('CALL lookup_customer {"id": 1}'))),
    "bad arguments": lambda c: _dump(c.chat.completions.create(
        model=MODEL, tools=TOOLS, messages=user('CALL lookup_customer {"id": "\\ud800"}'))),
    "malformed answer": lambda c: c.chat.completions.create(
        model=MODEL, messages=user("SHAPE no_choices")),
    "unknown endpoint": lambda c: c.completions.create(model=MODEL, prompt="hi"),
    "responses: mixed calls": lambda c: _dump(c.responses.create(
        model=MODEL, tools=RESPONSES_TOOLS, input=(  # type: ignore[arg-type]
            'SAY ok\nCALL lookup_customer {"id": 1}\nCALL send_note {"text": "x"}\n'
            'CALL delete_account {"id": 2}\nCUSTOM patch *** x'))),
    "responses: hosted tool": lambda c: c.responses.create(
        model=MODEL, input="hi", tools=[{"type": "web_search"}]),
    "responses: previous response": lambda c: c.responses.create(
        model=MODEL, input="hi", previous_response_id="resp_1"),
    "responses: hostile item": lambda c: _dump(c.responses.create(
        model=MODEL, input='ITEM {"type": "local_shell_call", "id": "ls_1", "call_id": "c",'
        ' "action": {"type": "exec", "command": ["rm", "-rf", "/"]}}')),
    "responses: malformed answer": lambda c: c.responses.create(
        model=MODEL, input='ITEM "not an object"'),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_both_doors_agree(doors: dict[str, openai.OpenAI], name: str) -> None:
    sdk, proxy = both(doors, SCENARIOS[name])
    assert sdk == proxy


def test_a_stream_assembles_the_same_through_both_doors(doors: dict[str, openai.OpenAI]) -> None:
    def streamed(c: openai.OpenAI) -> Any:
        chunks = list(c.chat.completions.create(
            model=MODEL, tools=TOOLS, stream=True,
            messages=user('SAY streaming\nCALL lookup_customer {"id": 1}\n'
                          'CALL send_note {"text": "x"}')))
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        auth = [ch.model_extra["authority"] for ch in chunks
                if (ch.model_extra or {}).get("authority")]
        return {"content": content, "authority": auth}

    sdk, proxy = both(doors, streamed)
    assert sdk == proxy


def test_a_responses_stream_assembles_the_same_through_both_doors(
        doors: dict[str, openai.OpenAI]) -> None:
    def streamed(c: openai.OpenAI) -> Any:
        events = [_dump(e) for e in c.responses.create(
            model=MODEL, tools=RESPONSES_TOOLS, stream=True, input=(  # type: ignore[arg-type]
                'SAY streaming\nREASON hm\nCALL lookup_customer {"id": 1}\n'
                'CALL send_note {"text": "x"}'))]
        return events

    sdk, proxy = both(doors, streamed)
    assert sdk == proxy and sdk[0] == "ok"
    assert sdk[1][-1]["response"]["authority"]["actions"][1]["status"] == "pending_approval"


def test_the_compared_answers_are_the_answers_claimed(doors: dict[str, openai.OpenAI]) -> None:
    """Not vacuous: the scenario gives the outcomes its name says, through a door."""
    [(kind, answer), _] = both(doors, SCENARIOS["mixed calls"])
    assert kind == "ok"
    assert [a["status"] for a in answer["authority"]["actions"]] == [
        "allowed", "pending_approval", "denied", "denied"]
    [(kind, answer), _] = both(doors, SCENARIOS["responses: mixed calls"])
    assert kind == "ok"
    assert [(a["action_type"], a["status"]) for a in answer["authority"]["actions"]] == [
        ("lookup_customer", "allowed"), ("send_note", "pending_approval"),
        ("delete_account", "denied"), ("patch", "denied")]
    assert [i["type"] for i in answer["output"]] == ["message", "function_call", "message"]
    for name in ("responses: hosted tool", "responses: previous response",
                 "responses: malformed answer"):
        [(kind, *_), _] = both(doors, SCENARIOS[name])
        assert kind == "error", name
