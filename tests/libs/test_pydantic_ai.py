"""pydantic-ai (``pydantic-ai-slim[openai]``) on its chat-completions model and on its
Responses model, both doors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from libs_env import GATED_CALLS, Door, call, need, say
from pydantic import BaseModel

pytestmark = [pytest.mark.libs, pytest.mark.parametrize("api", ["chat", "responses"])]


def _model(door: Door, api: str, name: str = "gpt-4o-mini") -> Any:
    models = need("pydantic_ai.models.openai")
    providers = need("pydantic_ai.providers.openai")
    # The chat-completions model class (OpenAIChatModel; OpenAIModel before it was renamed),
    # or the Responses one.
    cls = models.OpenAIResponsesModel if api == "responses" else (
        getattr(models, "OpenAIChatModel", None) or models.OpenAIModel)
    return cls(name, provider=providers.OpenAIProvider(openai_client=door.aclient()))


def _agent(door: Door, api: str, model: str = "gpt-4o-mini", **kw: Any) -> Any:
    pai = need("pydantic_ai")
    return pai.Agent(_model(door, api, model), instructions="Help the customer.", **kw)


class Weather(BaseModel):
    city: str
    temp: float


def test_plain_and_streamed(door: Door, api: str) -> None:
    assert _agent(door, api).run_sync(say("hello from the gateway")).output == (
        "hello from the gateway")

    async def stream() -> list[str]:
        async with _agent(door, api).run_stream(say("streamed through the gate")) as r:
            return [t async for t in r.stream_text(delta=True)]

    parts = asyncio.run(stream())  # pydantic-ai may group deltas: check what went upstream
    assert "".join(parts) == "streamed through the gate"
    assert door.proxy.upstream_stats()["last_request"]["body"]["stream"] is True


def test_denied_request_is_an_http_error(door: Door, api: str) -> None:
    exc = need("pydantic_ai.exceptions")
    with pytest.raises(exc.ModelHTTPError) as ei:
        _agent(door, api, "gpt-4o").run_sync(say("hi"))
    assert ei.value.status_code == 403 and "model_not_allowed" in str(ei.value.body)


def test_agent_loop_runs_the_apps_own_tool(door: Door, api: str) -> None:
    agent = _agent(door, api)
    ran: list[int] = []

    @agent.tool_plain
    def lookup_customer(id: int) -> str:
        """Look a customer up by id."""
        ran.append(id)
        return json.dumps({"id": id, "name": "Ada"})

    out = agent.run_sync(call("lookup_customer", '{"id": 7}')).output
    assert ran == [7] and out == "I have the results: done."


@GATED_CALLS
def test_gateway_handled_calls_never_reach_the_apps_tools(door: Door, api: str, script: str,
                                                         status: str) -> None:
    agent = _agent(door, api)
    ran: list[str] = []

    @agent.tool_plain
    def tag_ticket(ticket: int) -> str:
        ran.append("tag_ticket")
        return "local"

    @agent.tool_plain
    def send_note(text: str) -> str:
        ran.append("send_note")
        return "local"

    @agent.tool_plain
    def delete_account(id: int) -> str:
        ran.append("delete_account")
        return "local"

    out = agent.run_sync(script).output
    assert ran == [] and f": {status}" in out
    assert door.last_actions()[0]["action_type"] == script.split()[1]


def test_structured_output_through_the_final_result_tool(door: Door, api: str) -> None:
    agent = _agent(door, api, output_type=Weather)
    out = agent.run_sync(call("final_result", '{"city": "Paris", "temp": 21}')).output
    assert out == Weather(city="Paris", temp=21)
    action = door.last_actions()[0]
    assert action["action_type"] == "final_result" and action["decision"] == "allow"
