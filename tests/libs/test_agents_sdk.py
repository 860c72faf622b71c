"""The OpenAI Agents SDK (``openai-agents``) with ``OpenAIChatCompletionsModel``, both doors.

(Its Responses models are not gated yet: the Responses API is refused by the gateway.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from libs_env import GATED_CALLS, Door, call, need, say
from pydantic import BaseModel

pytestmark = pytest.mark.libs


def _agents() -> Any:
    agents = need("agents")
    agents.set_tracing_disabled(True)  # no trace export to OpenAI from a test
    return agents


def _agent(door: Door, *, model: str = "gpt-4o-mini", **kw: Any) -> Any:
    agents = _agents()
    llm = agents.OpenAIChatCompletionsModel(model=model, openai_client=door.aclient())
    return agents.Agent(name="support", instructions="Help the customer.", model=llm, **kw)


def test_plain_run(door: Door) -> None:
    result = _agents().Runner.run_sync(_agent(door), say("hello from the gateway"))
    assert result.final_output == "hello from the gateway"


def test_streamed_run(door: Door) -> None:
    agents = _agents()

    async def main() -> tuple[str, int]:
        run = agents.Runner.run_streamed(_agent(door), say("streamed through the gate"))
        deltas = 0
        async for event in run.stream_events():
            if event.type == "raw_response_event" and getattr(event.data, "delta", None):
                deltas += 1
        return str(run.final_output), deltas

    text, deltas = asyncio.run(main())
    assert text == "streamed through the gate" and deltas > 2


def test_denied_request_raises_the_openai_error(door: Door) -> None:
    with pytest.raises(openai.PermissionDeniedError) as ei:
        _agents().Runner.run_sync(_agent(door, model="gpt-4o"), say("hi"))
    assert ei.value.code == "model_not_allowed"


def test_agent_loop_runs_the_apps_own_tool(door: Door) -> None:
    agents = _agents()
    ran: list[int] = []

    @agents.function_tool
    def lookup_customer(id: int) -> str:
        """Look a customer up by id."""
        ran.append(id)
        return json.dumps({"id": id, "name": "Ada"})

    result = agents.Runner.run_sync(_agent(door, tools=[lookup_customer]),
                                    call("lookup_customer", '{"id": 7}'))
    assert ran == [7] and result.final_output == "I have the results: done."


@GATED_CALLS
def test_gateway_handled_calls_never_reach_the_apps_tools(door: Door, script: str,
                                                         status: str) -> None:
    agents = _agents()
    ran: list[str] = []

    def make(name: str) -> Any:
        def fn(**kwargs: Any) -> str:
            ran.append(name)
            return "ran locally"
        return agents.FunctionTool(
            name=name, description=name, params_json_schema={"type": "object"},
            on_invoke_tool=lambda ctx, args: fn(), strict_json_schema=False)

    tools = [make(n) for n in ("tag_ticket", "send_note", "delete_account")]
    result = agents.Runner.run_sync(_agent(door, tools=tools), script)
    assert ran == []
    assert f": {status}" in result.final_output  # the record survives in the transcript
    assert door.last_actions()[0]["action_type"] == script.split()[1]


class Weather(BaseModel):
    city: str
    temp: float


def test_structured_output(door: Door) -> None:
    # The Agents SDK asks for structured output with response_format, not a tool.
    result = _agents().Runner.run_sync(_agent(door, output_type=Weather),
                                       say('{"city": "Paris", "temp": 21}'))
    assert result.final_output == Weather(city="Paris", temp=21)
