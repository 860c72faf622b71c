"""LangChain (``langchain-openai``, ``create_agent``) through both doors, on chat completions
and on the Responses API (``use_responses_api=True``).

The SDK door hands ChatOpenAI a gated HTTP client (``gated_http_client``), the way
LangChain takes one; the proxy door only changes ``base_url`` and the key."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from libs_env import GATED_CALLS, Door, call, need, say
from pydantic import BaseModel

pytestmark = [pytest.mark.libs, pytest.mark.parametrize("api", ["chat", "responses"])]


def _llm(door: Door, api: str, model: str = "gpt-4o-mini", **kw: Any) -> Any:
    lc = need("langchain_openai")
    http, ahttp = door.http_clients()
    kw.setdefault("http_client", http)
    kw.setdefault("http_async_client", ahttp)
    return lc.ChatOpenAI(model=model, base_url=door.base_url, api_key=door.api_key,
                         max_retries=0, use_responses_api=api == "responses", **kw)


class Weather(BaseModel):
    city: str
    temp: float


def test_plain_and_streamed(door: Door, api: str) -> None:
    llm = _llm(door, api)
    # .text: the answer's text whether content is a string (chat) or blocks (Responses)
    assert llm.invoke(say("hello from the gateway")).text == "hello from the gateway"
    chunks = [c.text for c in llm.stream(say("streamed through the gate"))]
    assert len(chunks) > 2 and "".join(chunks) == "streamed through the gate"


def test_async(door: Door, api: str) -> None:
    import asyncio

    async def main() -> str:
        # LangChain caches its default async client per base_url, bound to the first event
        # loop; each asyncio.run here has its own, so the proxy door gets a fresh client.
        kw = {"http_async_client": openai.DefaultAsyncHttpxClient()} \
            if door.name == "proxy" else {}
        return str((await _llm(door, api, **kw).ainvoke(say("async hello"))).text)

    assert asyncio.run(main()) == "async hello"


def test_denied_request_raises_the_openai_error(door: Door, api: str) -> None:
    with pytest.raises(openai.PermissionDeniedError) as ei:
        _llm(door, api, model="gpt-4o").invoke(say("hi"))
    assert ei.value.code == "model_not_allowed"


@GATED_CALLS
def test_withheld_calls_leave_a_record_in_the_answer(door: Door, api: str, script: str,
                                                    status: str) -> None:
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
             for n in ("tag_ticket", "send_note", "delete_account")]
    msg = _llm(door, api).bind_tools(tools).invoke(script)
    assert msg.tool_calls == []  # nothing for LangChain to run
    assert f": {status}" in msg.text and msg.text.startswith("[authority]")
    assert door.last_actions()[0]["action_type"] == script.split()[1]


def test_agent_loop_runs_the_apps_own_tool(door: Door, api: str) -> None:
    agents = need("langchain.agents")
    tools = need("langchain_core.tools")
    ran: list[int] = []

    @tools.tool
    def lookup_customer(id: int) -> str:
        """Look a customer up by id."""
        ran.append(id)
        return json.dumps({"id": id, "name": "Ada"})

    agent = agents.create_agent(_llm(door, api), tools=[lookup_customer])
    out = agent.invoke({"messages": [{"role": "user",
                                      "content": call("lookup_customer", '{"id": 7}')}]})
    assert ran == [7]
    assert out["messages"][-1].text == "I have the results: done."


def test_agent_loop_with_a_gateway_executed_tool(door: Door, api: str) -> None:
    agents = need("langchain.agents")
    tools = need("langchain_core.tools")
    ran: list[int] = []

    @tools.tool
    def tag_ticket(ticket: int) -> str:
        """Tag a ticket."""
        ran.append(ticket)
        return "tagged locally"

    agent = agents.create_agent(_llm(door, api), tools=[tag_ticket])
    out = agent.invoke({"messages": [{"role": "user",
                                      "content": call("tag_ticket", '{"ticket": 3}')}]})
    assert ran == []  # the gateway ran it, not the app
    assert "tag_ticket: executed" in out["messages"][-1].text


def test_structured_output_through_a_tool_call(door: Door, api: str) -> None:
    structured = _llm(door, api).with_structured_output(Weather, method="function_calling")
    w = structured.invoke(call("Weather", '{"city": "Paris", "temp": 21}'))
    assert w == Weather(city="Paris", temp=21)
