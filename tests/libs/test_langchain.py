"""LangChain (``langchain-openai``, ``create_agent``) through both doors.

The SDK door hands ChatOpenAI a gated HTTP client (``gated_http_client``), the way
LangChain takes one; the proxy door only changes ``base_url`` and the key."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from libs_env import GATED_CALLS, Door, call, need, say
from pydantic import BaseModel

pytestmark = pytest.mark.libs


def _llm(door: Door, model: str = "gpt-4o-mini", **kw: Any) -> Any:
    lc = need("langchain_openai")
    http, ahttp = door.http_clients()
    return lc.ChatOpenAI(model=model, base_url=door.base_url, api_key=door.api_key,
                         max_retries=0, use_responses_api=False, http_client=http,
                         http_async_client=ahttp, **kw)


class Weather(BaseModel):
    city: str
    temp: float


def test_plain_and_streamed(door: Door) -> None:
    llm = _llm(door)
    assert llm.invoke(say("hello from the gateway")).content == "hello from the gateway"
    chunks = [c.content for c in llm.stream(say("streamed through the gate"))]
    assert len(chunks) > 2 and "".join(chunks) == "streamed through the gate"


def test_async(door: Door) -> None:
    import asyncio

    async def main() -> str:
        return str((await _llm(door).ainvoke(say("async hello"))).content)

    assert asyncio.run(main()) == "async hello"


def test_denied_request_raises_the_openai_error(door: Door) -> None:
    with pytest.raises(openai.PermissionDeniedError) as ei:
        _llm(door, model="gpt-4o").invoke(say("hi"))
    assert ei.value.code == "model_not_allowed"


@GATED_CALLS
def test_withheld_calls_leave_a_record_in_the_answer(door: Door, script: str,
                                                    status: str) -> None:
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
             for n in ("tag_ticket", "send_note", "delete_account")]
    msg = _llm(door).bind_tools(tools).invoke(script)
    assert msg.tool_calls == []  # nothing for LangChain to run
    assert f": {status}" in msg.content and msg.content.startswith("[authority]")
    assert door.last_actions()[0]["action_type"] == script.split()[1]


def test_agent_loop_runs_the_apps_own_tool(door: Door) -> None:
    agents = need("langchain.agents")
    tools = need("langchain_core.tools")
    ran: list[int] = []

    @tools.tool
    def lookup_customer(id: int) -> str:
        """Look a customer up by id."""
        ran.append(id)
        return json.dumps({"id": id, "name": "Ada"})

    agent = agents.create_agent(_llm(door), tools=[lookup_customer])
    out = agent.invoke({"messages": [{"role": "user",
                                      "content": call("lookup_customer", '{"id": 7}')}]})
    assert ran == [7]
    assert out["messages"][-1].content == "I have the results: done."


def test_agent_loop_with_a_gateway_executed_tool(door: Door) -> None:
    agents = need("langchain.agents")
    tools = need("langchain_core.tools")
    ran: list[int] = []

    @tools.tool
    def tag_ticket(ticket: int) -> str:
        """Tag a ticket."""
        ran.append(ticket)
        return "tagged locally"

    agent = agents.create_agent(_llm(door), tools=[tag_ticket])
    out = agent.invoke({"messages": [{"role": "user",
                                      "content": call("tag_ticket", '{"ticket": 3}')}]})
    assert ran == []  # the gateway ran it, not the app
    assert "tag_ticket: executed" in out["messages"][-1].content


def test_structured_output_through_a_tool_call(door: Door) -> None:
    structured = _llm(door).with_structured_output(Weather, method="function_calling")
    w = structured.invoke(call("Weather", '{"city": "Paris", "temp": 21}'))
    assert w == Weather(city="Paris", temp=21)
