"""LlamaIndex (``llama-index-llms-openai``, ``FunctionAgent``) through both doors.

llama-index-llms-openai still requires openai<3, so it runs in the openai-2 venv."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from libs_env import GATED_CALLS, Door, call, need, say
from pydantic import BaseModel

pytestmark = pytest.mark.libs


def _llm(door: Door, model: str = "gpt-4o-mini", **kw: Any) -> Any:
    li = need("llama_index.llms.openai")
    return li.OpenAI(model=model, api_key=door.api_key, api_base=door.base_url, max_retries=0,
                     openai_client=door.client(), async_openai_client=door.aclient(), **kw)


def _user(text: str) -> list[Any]:
    core = need("llama_index.core.llms")
    return [core.ChatMessage(role="user", content=text)]


class Weather(BaseModel):
    city: str
    temp: float


def test_plain_and_streamed(door: Door) -> None:
    llm = _llm(door)
    assert llm.chat(_user(say("hello from the gateway"))).message.content == (
        "hello from the gateway")
    deltas = [r.delta for r in llm.stream_chat(_user(say("streamed through the gate")))]
    assert len(deltas) > 2 and "".join(d or "" for d in deltas) == "streamed through the gate"


def test_denied_request_raises_the_openai_error(door: Door) -> None:
    with pytest.raises(openai.PermissionDeniedError) as ei:
        _llm(door, "gpt-4o").chat(_user(say("hi")))
    assert ei.value.code == "model_not_allowed"


def _run_agent(door: Door, tools: list[Any], prompt: str) -> str:
    wf = need("llama_index.core.agent.workflow")

    async def main() -> str:
        agent = wf.FunctionAgent(tools=tools, llm=_llm(door), system_prompt="Help.")
        return str(await agent.run(user_msg=prompt))

    return asyncio.run(main())


def test_function_agent_runs_the_apps_own_tool(door: Door) -> None:
    tools = need("llama_index.core.tools")
    ran: list[int] = []

    def lookup_customer(id: int) -> str:
        """Look a customer up by id."""
        ran.append(id)
        return json.dumps({"id": id, "name": "Ada"})

    out = _run_agent(door, [tools.FunctionTool.from_defaults(fn=lookup_customer)],
                     call("lookup_customer", '{"id": 7}'))
    assert ran == [7] and out == "I have the results: done."


@GATED_CALLS
def test_gateway_handled_calls_never_reach_the_apps_tools(door: Door, script: str,
                                                         status: str) -> None:
    tools = need("llama_index.core.tools")
    ran: list[str] = []

    def tag_ticket(ticket: int) -> str:
        """Tag a ticket."""
        ran.append("tag_ticket")
        return "local"

    def send_note(text: str) -> str:
        """Send a note."""
        ran.append("send_note")
        return "local"

    def delete_account(id: int) -> str:
        """Delete an account."""
        ran.append("delete_account")
        return "local"

    out = _run_agent(door, [tools.FunctionTool.from_defaults(fn=f)
                            for f in (tag_ticket, send_note, delete_account)], script)
    assert ran == [] and f": {status}" in out
    assert door.last_actions()[0]["action_type"] == script.split()[1]


@pytest.mark.parametrize("mode", ["function", "default"])
def test_structured_predict(door: Door, mode: str) -> None:
    # "function": a tool call named after the class (output_tools); the default on OpenAI
    # models asks with response_format instead, whose content passes untouched.
    prompts = need("llama_index.core.prompts")
    program = need("llama_index.core.types").PydanticProgramMode
    kw = {"pydantic_program_mode": program.FUNCTION} if mode == "function" else {}
    script = (call("Weather", '{"city": "Paris", "temp": 21}') if mode == "function"
              else say('{"city": "Paris", "temp": 21}'))
    w = _llm(door, **kw).structured_predict(Weather, prompts.PromptTemplate("{q}"), q=script)
    assert w.model_dump() == {"city": "Paris", "temp": 21}
