"""The OpenAI Agents SDK (``openai-agents``), both doors, with ``OpenAIChatCompletionsModel``
and with its default model, ``OpenAIResponsesModel`` (the Responses API)."""

from __future__ import annotations

import asyncio
import inspect
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


def _agent(door: Door, *, model: str = "gpt-4o-mini", api: str = "chat", **kw: Any) -> Any:
    agents = _agents()
    kind = agents.OpenAIResponsesModel if api == "responses" else \
        agents.OpenAIChatCompletionsModel
    llm = kind(model=model, openai_client=door.aclient())
    return agents.Agent(name="support", instructions="Help the customer.", model=llm, **kw)


API = pytest.mark.parametrize("api", ["chat", "responses"])


@API
def test_plain_run(door: Door, api: str) -> None:
    result = _agents().Runner.run_sync(_agent(door, api=api), say("hello from the gateway"))
    assert result.final_output == "hello from the gateway"


@API
def test_streamed_run(door: Door, api: str) -> None:
    agents = _agents()

    async def main() -> tuple[str, int]:
        run = agents.Runner.run_streamed(_agent(door, api=api), say("streamed through the gate"))
        deltas = 0
        async for event in run.stream_events():
            if event.type == "raw_response_event" and getattr(event.data, "delta", None):
                deltas += 1
        return str(run.final_output), deltas

    text, deltas = asyncio.run(main())
    assert text == "streamed through the gate" and deltas > 2


@API
def test_denied_request_raises_the_openai_error(door: Door, api: str) -> None:
    with pytest.raises(openai.PermissionDeniedError) as ei:
        _agents().Runner.run_sync(_agent(door, model="gpt-4o", api=api), say("hi"))
    assert ei.value.code == "model_not_allowed"


@API
def test_agent_loop_runs_the_apps_own_tool(door: Door, api: str) -> None:
    agents = _agents()
    ran: list[int] = []

    @agents.function_tool
    def lookup_customer(id: int) -> str:
        """Look a customer up by id."""
        ran.append(id)
        return json.dumps({"id": id, "name": "Ada"})

    result = agents.Runner.run_sync(_agent(door, api=api, tools=[lookup_customer]),
                                    call("lookup_customer", '{"id": 7}'))
    assert ran == [7] and result.final_output == "I have the results: done."


@GATED_CALLS
@API
def test_gateway_handled_calls_never_reach_the_apps_tools(door: Door, script: str,
                                                         status: str, api: str) -> None:
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
    result = agents.Runner.run_sync(_agent(door, api=api, tools=tools), script)
    assert ran == []
    assert f": {status}" in result.final_output  # the record survives in the transcript
    assert door.last_actions()[0]["action_type"] == script.split()[1]


class Weather(BaseModel):
    city: str
    temp: float


@API
def test_structured_output(door: Door, api: str) -> None:
    # The Agents SDK asks for structured output with response_format (text.format), not a
    # tool.
    result = _agents().Runner.run_sync(_agent(door, api=api, output_type=Weather),
                                       say('{"city": "Paris", "temp": 21}'))
    assert result.final_output == Weather(city="Paris", temp=21)


def test_a_hosted_tool_is_refused_before_the_call(door: Door) -> None:
    agents = _agents()
    before = door.proxy.upstream.chat_requests
    with pytest.raises(openai.PermissionDeniedError) as ei:
        agents.Runner.run_sync(_agent(door, api="responses", tools=[agents.WebSearchTool()]),
                               say("hi"))
    assert ei.value.code == "tool_not_allowed"
    assert door.proxy.upstream.chat_requests == before


def test_a_run_with_every_kind_of_outcome_ends_sensibly(door: Door) -> None:
    """One answer, three calls: the app runs one, the gateway runs one, one is held; the run
    ends with the model's answer to what it was told, through the Responses API."""
    agents = _agents()
    ran: list[str] = []

    @agents.function_tool
    def lookup_customer(id: int) -> str:
        """Look a customer up by id."""
        ran.append("lookup_customer")
        return json.dumps({"id": id, "name": "Ada"})

    @agents.function_tool
    def tag_ticket(ticket: int) -> str:
        """Tag a ticket."""
        ran.append("tag_ticket")
        return "ran locally"

    @agents.function_tool
    def send_note(text: str) -> str:
        """Send a note."""
        ran.append("send_note")
        return "ran locally"

    script = "\n".join([call("lookup_customer", '{"id": 7}'), call("tag_ticket", '{"ticket": 7}'),
                        call("send_note", '{"text": "hi"}')])
    result = agents.Runner.run_sync(
        _agent(door, api="responses", tools=[lookup_customer, tag_ticket, send_note]), script)
    assert ran == ["lookup_customer"]
    assert result.final_output == "I have the results: done."
    actions = [a for a in door.last_actions(4) if a["details"]["status"] != "executing"]
    assert [(a["action_type"], a["details"]["status"]) for a in actions] == [
        ("lookup_customer", "allowed"), ("tag_ticket", "executed"),
        ("send_note", "pending_approval")]


@pytest.mark.parametrize("status", ["executed", "pending_approval", "denied"])
def test_a_run_chained_by_previous_response_id(door: Door, status: str) -> None:
    """The Agents SDK's server-side chaining (``auto_previous_response_id``): each turn
    sends only what is new and the previous response's id; the gateway prices the history
    and answers the calls it withheld, so the provider's pairing rules hold."""
    agents = _agents()
    if "auto_previous_response_id" not in inspect.signature(agents.Runner.run_sync).parameters:
        pytest.skip("this openai-agents has no auto_previous_response_id")
    ran: list[str] = []

    @agents.function_tool
    def lookup_customer(id: int) -> str:
        """Look a customer up by id."""
        ran.append("lookup_customer")
        return "Ada"

    def make(name: str) -> Any:
        return agents.FunctionTool(
            name=name, description=name, params_json_schema={"type": "object"},
            on_invoke_tool=lambda ctx, args: ran.append(name) or "ran locally",
            strict_json_schema=False)

    withheld = {"executed": "tag_ticket", "pending_approval": "send_note",
                "denied": "delete_account"}[status]
    script = "\n".join([call("lookup_customer", '{"id": 7}'), call(withheld, '{"x": 1}')])
    result = agents.Runner.run_sync(
        _agent(door, api="responses", tools=[lookup_customer, make(withheld)]), script,
        auto_previous_response_id=True)
    assert ran == ["lookup_customer"]
    assert result.final_output.startswith("I have the results: ")
    sent = door.proxy.upstream_stats()["last_request"]["body"]
    assert sent.get("previous_response_id")  # it was chained, not resent
    answers = {i["call_id"]: json.loads(i["output"]).get("status", "app")
               for i in sent["input"] if i.get("type") == "function_call_output"
               and i["output"].startswith("{")}
    assert status in answers.values()  # the gateway answered the call it withheld
