"""Any answer a model can give, at the main door (chat completions), plain and streamed.

The answers come from a real HTTP upstream and go through both doors: the proxy (a real
``authority serve``) and ``AuthorityClient``. Whatever their shape — calls as objects,
names that are not strings, arguments that are not text, usage in words, chunks that
contradict each other, an upstream that refuses or fails — each is gated or refused,
never answered with an internal error; no call the policy does not let the app run
reaches it; nothing runs that the policy does not allow; every effect is on the record,
and the record verifies.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import ScriptedServer, audit_entries, tool, user, write_policy_file
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from proxy_env import AGENT_KEY, start_proxy
from sample_actions import EFFECTS_ENV
from servers import HttpReceiver

from authority_sdk import AuthorityClient
from authority_sdk.audit import verify
from authority_sdk.engine import Engine

MODEL = "gpt-4o-mini"
# The only call the app may see and run itself; send_note runs in the gateway, issue_refund
# waits for a person, wipe_disk is denied, anything else waits for a person (the default).
CLIENT_RUNS = "lookup_customer"
POLICY: dict[str, Any] = {
    "actions": {
        "send_note": {"executor": "rec", "mode": "auto_execute"},
        CLIENT_RUNS: {"mode": "auto_execute"},
        "issue_refund": {"executor": "rec", "mode": "require_human_approval"},
        "wipe_disk": {"mode": "deny"},
        "admin.exec": {"mode": "deny"},  # "exec" alone: the default, a person decides
    },
    "executors": {"rec": {"type": "python", "target": "sample_actions:record"}},
}
TOOLS = [tool("send_note"), tool(CLIENT_RUNS), tool("issue_refund"), tool("wipe_disk")]
# How the gateway refuses an answer it cannot use: unreadable, or an upstream failure
# (a 5xx, or an error event mid-stream).
REFUSED = {502: {"upstream_malformed_response", "upstream_error"}}

LEAVES = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
          | st.text(max_size=12))
JSON = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
NAMES = (st.sampled_from(["send_note", CLIENT_RUNS, "issue_refund", "wipe_disk", "",
                          "SEND_NOTE", " send_note", "send_note\x00", "lookup_customer "])
         | st.text(max_size=12) | JSON)
ARGUMENT_TEXT = st.one_of(
    st.builds(json.dumps, st.dictionaries(st.sampled_from(["text", "amount", "id"]), JSON,
                                          max_size=3)),
    st.sampled_from(['{"text": "\\ud800"}', '{"a": 1, "a": 2}', '{"text": 1e999}', "{nope",
                     '{"text": NaN}', "[" * 300 + "]" * 300, "", "null"]),
    st.text(max_size=30))
ARGUMENTS = ARGUMENT_TEXT | JSON
def mostly(shape: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``shape`` three times in four, else ``odd``: well-formed enough to reach the gate
    most of the time, anything at all the rest."""
    # (one_of would draw each distinct branch alike: a repeated branch counts once)
    return st.integers(0, 3).flatmap(lambda i: odd if i == 3 else shape)


# Where a shape is well formed its call is mostly one the policy names, with arguments it
# accepts: the gate's every outcome is reached, not only its refusals.
NAME = mostly(st.sampled_from(sorted(POLICY["actions"])), NAMES)
GOOD_ARGUMENTS = mostly(st.sampled_from(["{}", '{"text": "hi"}', '{"amount": 5}']), ARGUMENTS)
FUNCTION = mostly(st.fixed_dictionaries({"name": NAME, "arguments": GOOD_ARGUMENTS}),
                  st.fixed_dictionaries({}, optional={"name": NAMES, "arguments": ARGUMENTS})
                  | JSON)
TOOL_CALL = mostly(
    st.fixed_dictionaries({"id": st.sampled_from(["call_1", "call_2", "call_1 "]),
                           "type": st.just("function"), "function": FUNCTION}),
    st.fixed_dictionaries({}, optional={
        "id": st.sampled_from(["call_1", ""]) | JSON,
        "type": st.sampled_from(["function", "custom"]) | JSON,
        "function": FUNCTION, "index": st.integers(-2, 5) | JSON}) | JSON)
MESSAGE = mostly(
    st.fixed_dictionaries({"role": st.just("assistant"),
                           "content": st.none() | st.text(max_size=20),
                           "tool_calls": st.lists(TOOL_CALL, max_size=4)}),
    st.fixed_dictionaries({"role": st.just("assistant") | JSON}, optional={
        "content": st.none() | st.text(max_size=20) | JSON,
        "tool_calls": st.lists(TOOL_CALL, max_size=4) | JSON,
        "function_call": FUNCTION, "refusal": st.none() | JSON}) | JSON)
USAGE = mostly(
    st.fixed_dictionaries({k: st.integers(0, 5000)
                           for k in ("prompt_tokens", "completion_tokens", "total_tokens")}),
    st.fixed_dictionaries({}, optional={
        k: st.integers(-5, 10**12) | st.just(10**400) | st.floats() | JSON
        for k in ("prompt_tokens", "completion_tokens", "total_tokens")}) | JSON)
CHOICE = mostly(
    st.fixed_dictionaries({"index": st.integers(0, 2), "message": MESSAGE,
                           "finish_reason": st.sampled_from(["stop", "tool_calls"])}),
    st.fixed_dictionaries({"index": st.integers(-1, 3) | JSON, "message": MESSAGE},
                          optional={"finish_reason": JSON}) | JSON)
ANSWER = st.fixed_dictionaries(
    {"id": st.just("chatcmpl-hostile"), "object": st.just("chat.completion"),
     "model": mostly(st.just(MODEL), JSON),
     "choices": mostly(st.lists(CHOICE, min_size=1, max_size=3), JSON)},
    optional={"usage": USAGE, "authority": JSON})
GOOD_CALL = st.fixed_dictionaries({"id": st.sampled_from(["call_1", "call_2", "call_3"]),
                                   "type": st.just("function"), "function": st.fixed_dictionaries(
                                       {"name": NAME, "arguments": GOOD_ARGUMENTS})})
# An answer as a provider would send it, only its calls chosen by the model: most of the
# gate's outcomes need one.
GOOD_ANSWER = st.builds(
    lambda calls, usage: {
        "id": "chatcmpl-hostile", "object": "chat.completion", "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": calls}}], "usage": usage},
    st.lists(GOOD_CALL, min_size=1, max_size=4),
    st.fixed_dictionaries({k: st.integers(0, 5000)
                           for k in ("prompt_tokens", "completion_tokens", "total_tokens")}))
DELTA = mostly(
    st.fixed_dictionaries({"tool_calls": st.lists(
        mostly(st.fixed_dictionaries({"index": st.integers(0, 2)}, optional={
            "id": st.sampled_from(["call_1", "call_2"]), "type": st.just("function"),
            "function": st.fixed_dictionaries({}, optional={
                "name": NAMES, "arguments": st.text(max_size=12) | ARGUMENTS})}),
            TOOL_CALL), max_size=3)}, optional={"content": st.none() | st.text(max_size=10)}),
    st.fixed_dictionaries({}, optional={
        "role": st.just("assistant") | JSON, "content": st.none() | st.text(max_size=10) | JSON,
        "tool_calls": st.lists(TOOL_CALL, max_size=3) | JSON, "function_call": FUNCTION})
    | JSON)
CHUNK = mostly(
    st.fixed_dictionaries(
        {"id": st.just("chatcmpl-hostile"), "object": st.just("chat.completion.chunk"),
         "model": st.just(MODEL),
         "choices": st.lists(st.fixed_dictionaries(
             {"index": mostly(st.integers(0, 1), JSON), "delta": DELTA},
             optional={"finish_reason": st.none() | st.sampled_from(["stop", "tool_calls"])
                       | JSON}), max_size=2)},
        optional={"usage": USAGE}),
    st.fixed_dictionaries({"error": JSON}) | JSON)



def _call_chunks(calls: list[tuple[Any, str]], cut: int) -> list[dict[str, Any]]:
    """A well-formed stream of ``calls`` (name, arguments): each call's name first, its
    arguments in two pieces cut at ``cut``, then the finish and the usage."""
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "chatcmpl-hostile", "object": "chat.completion.chunk", "model": MODEL,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    out = [chunk({"role": "assistant", "content": None})]
    for i, (name, args) in enumerate(calls):
        out.append(chunk({"tool_calls": [{"index": i, "id": f"call_{i}", "type": "function",
                                          "function": {"name": name, "arguments": ""}}]}))
        for piece in (args[:cut], args[cut:]):
            out.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}))
    out.append(chunk({}, "tool_calls"))
    out.append({"id": "chatcmpl-hostile", "object": "chat.completion.chunk", "model": MODEL,
                "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 9,
                                         "total_tokens": 18}})
    return out


STREAM_CALLS = st.builds(
    _call_chunks, st.lists(st.tuples(mostly(st.sampled_from(sorted(POLICY["actions"])), NAMES),
                                     mostly(st.just("{}"), ARGUMENT_TEXT)),
                           min_size=1, max_size=3),
    st.integers(0, 8))
# A well-formed stream as sent, reordered, or with odd chunks slipped in; or odd chunks alone.
STREAM = st.one_of(
    STREAM_CALLS, STREAM_CALLS.flatmap(st.permutations),
    st.builds(lambda good, odd, at: good[:at] + odd + good[at:], STREAM_CALLS,
              st.lists(CHUNK, min_size=1, max_size=2), st.integers(0, 12)),
    st.lists(CHUNK, max_size=5))


@dataclass
class Door:
    """One way in, its upstream, and where it keeps its record and effects."""

    name: str
    client: openai.OpenAI
    receiver: HttpReceiver
    log: Path
    effects: Path


@pytest.fixture(params=["proxy", "sdk"])
def door(request: pytest.FixtureRequest, upstream: ScriptedServer, tmp_path: Path,
         gateways: list[Engine]) -> Iterator[Door]:
    effects = tmp_path / "effects.jsonl"
    with HttpReceiver() as rx:
        overrides = {**POLICY, "upstream": {"base_url": rx.url("/v1")}}
        if request.param == "sdk":
            mp = pytest.MonkeyPatch()
            mp.setenv(EFFECTS_ENV, str(effects))
            eng = Engine(write_policy_file(tmp_path, upstream, overrides))
            gateways.append(eng)
            try:
                yield Door("sdk", AuthorityClient(gateway=eng, max_retries=0), rx,
                           tmp_path / "audit.jsonl", effects)
            finally:
                mp.undo()
            return
        tests_dir = str(Path(__file__).resolve().parent.parent)
        # The proxy's key is rate-limited by tokens: every answer's usage settles it.
        overrides["keys"] = [{"name": "support-agent", "secret_env": "PX_AGENT_KEY",
                              "environment": "prod", "roles": ["agent"],
                              "rate_limit": {"tokens_per_minute": 10**12}}]
        with start_proxy(upstream, tmp_path, overrides=overrides,
                         env={"PYTHONPATH": tests_dir, EFFECTS_ENV: str(effects)}) as px:
            yield Door("proxy", px.client(AGENT_KEY), rx, tmp_path / "audit.jsonl", effects)


def _ran(effects: Path) -> list[dict[str, Any]]:
    if not effects.exists():
        return []
    return [json.loads(line) for line in effects.read_text().splitlines()]


def _record_holds_every_effect(door: Door) -> list[dict[str, Any]]:
    log = door.log
    result = verify(log)
    assert result.ok, result.reason
    executed = {e["details"]["action_key"] for e in audit_entries(log, "action")
                if e["details"].get("status") == "executed"}
    ran = _ran(door.effects)
    # Only the gateway-run action ran, each once, and each run is on the record.
    assert {r["type"] for r in ran} <= {"send_note"}
    assert {r["key"] for r in ran} <= executed and len(ran) == len({r["key"] for r in ran})
    return ran


def _names_in(calls: Any) -> list[Any]:
    return [(c.get("function") or {}).get("name") if isinstance(c, dict) else c
            for c in (calls or [])]


def _refused(status: int, code: str | None) -> bool:
    return code in REFUSED.get(status, set())


HOSTILE = settings(max_examples=150, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture,
                                          HealthCheck.too_slow, HealthCheck.data_too_large])


@HOSTILE
@given(answer=st.one_of(GOOD_ANSWER, ANSWER),
       status=st.sampled_from([200] * 6 + [400, 404, 429, 500, 503]))
def test_any_answer_is_gated_or_refused_and_nothing_unallowed_runs_or_reaches_the_app(
        door: Door, answer: dict[str, Any], status: int) -> None:
    door.receiver.reply(status, json=answer)
    try:
        raw = door.client.chat.completions.with_raw_response.create(
            model=MODEL, messages=user("do it"), tools=TOOLS)
    except openai.APIStatusError as exc:
        if 400 <= status < 500:
            # The upstream refused the request: its refusal reaches the app as it came.
            assert exc.status_code == status and exc.response.content == raw_json(answer)
        else:
            assert _refused(exc.status_code, exc.code), (exc.status_code, exc.code, exc.message)
            assert status == 200 or exc.code == "upstream_error"
        event(f"refused: {exc.status_code} {exc.code if status >= 500 or status == 200 else ''}")
    else:
        assert raw.status_code == status == 200
        body = json.loads(raw.content)
        assert body["authority"]["request_id"]
        for choice in body["choices"]:
            message = choice["message"]
            assert all(n == CLIENT_RUNS for n in _names_in(message.get("tool_calls"))), \
                message
            legacy = message.get("function_call")
            assert legacy is None or legacy.get("name") == CLIENT_RUNS, message
        statuses = sorted({a["status"] for a in body["authority"].get("actions") or []})
        event(f"answered; actions: {statuses}")
    event(f"effects so far: {'some' if _record_holds_every_effect(door) else 'none'}")


def _stream_holds(door: Door, read: Callable[[list[Any]], None]) -> None:
    """``read`` consumes a stream, listing every call name the app is shown: the stream
    ends normally or with the gateway's refusal, no name shown is one the app may not run,
    and the record holds every effect."""
    seen: list[Any] = []
    try:
        read(seen)
    except openai.APIStatusError as exc:
        assert _refused(exc.status_code, exc.code), (exc.status_code, exc.code, exc.message)
        event(f"refused: {exc.code}")
    except openai.APIError as exc:
        # A stream already open reports an unreadable answer as its last event.
        assert (exc.code if hasattr(exc, "code") else None) in REFUSED[502], exc
        event(f"refused mid-stream: {exc.code}")
    assert all(name == CLIENT_RUNS for name in seen), seen
    event(f"streamed; the app saw {len(seen)} call(s)")
    event(f"effects so far: {'some' if _record_holds_every_effect(door) else 'none'}")


def raw_json(value: Any) -> bytes:
    """The bytes HttpReceiver sends for ``json=value``."""
    return json.dumps(value).encode()


def _sse(chunks: list[Any], done: bool) -> bytes:
    events = [f"data: {json.dumps(c)}\n\n" for c in chunks]
    return ("".join(events) + ("data: [DONE]\n\n" if done else "")).encode()


@HOSTILE
@given(chunks=STREAM, done=st.booleans(),
       ctype=st.sampled_from(["text/event-stream"] * 4 + ["application/json", "text/plain"]))
def test_any_stream_is_gated_or_refused_and_nothing_unallowed_runs_or_reaches_the_app(
        door: Door, chunks: list[Any], done: bool, ctype: str) -> None:
    door.receiver.reply(200, body=_sse(chunks, done), content_type=ctype)
    def read(seen: list[Any]) -> None:
        for part in door.client.chat.completions.create(
                model=MODEL, messages=user("do it"), tools=TOOLS, stream=True):
            for choice in part.choices or []:
                delta = choice.delta
                seen.extend(tc.function.name for tc in (delta.tool_calls or [])
                            if tc.function is not None and tc.function.name is not None)
                if delta.function_call is not None and delta.function_call.name is not None:
                    seen.append(delta.function_call.name)

    _stream_holds(door, read)


# -- the Responses API: the same properties on its output items --------------------------

R_TOOLS = [{"type": "function", "name": t["function"]["name"],
            "parameters": t["function"]["parameters"]} for t in TOOLS]
R_CALL = mostly(
    st.fixed_dictionaries({"type": st.just("function_call"),
                           "call_id": st.sampled_from(["call_1", "call_2", "call_1 "]),
                           "name": NAME, "arguments": GOOD_ARGUMENTS},
                          optional={"id": st.sampled_from(["fc_1", "fc_2"]),
                                    "status": st.just("completed")}),
    st.fixed_dictionaries({"type": st.sampled_from(
        ["function_call", "custom_tool_call", "mcp_call", "reasoning", "shell_call"]) | JSON},
        optional={"call_id": JSON, "name": NAMES, "arguments": ARGUMENTS, "input": JSON,
                  "id": JSON, "server_label": JSON, "summary": JSON}) | JSON)
R_MESSAGE = st.fixed_dictionaries({"type": st.just("message"), "role": st.just("assistant"),
                                   "content": mostly(st.just([{"type": "output_text",
                                                               "text": "ok"}]), JSON)},
                                  optional={"id": st.just("msg_1") | JSON})
R_GOOD = st.builds(
    lambda calls: {"id": "resp_hostile", "object": "response", "status": "completed",
                   "model": MODEL, "output": [
                       {"type": "function_call", "id": f"fc_{i}", "call_id": f"call_{i}",
                        "name": name, "arguments": args} for i, (name, args) in enumerate(calls)],
                   "usage": {"input_tokens": 9, "output_tokens": 9, "total_tokens": 18}},
    st.lists(st.tuples(NAME, GOOD_ARGUMENTS), min_size=1, max_size=4))
R_ANSWER = st.fixed_dictionaries(
    {"id": st.just("resp_hostile"), "object": st.just("response"),
     "status": mostly(st.just("completed"), JSON), "model": st.just(MODEL),
     "output": mostly(st.lists(R_CALL | R_MESSAGE, max_size=4), JSON)},
    optional={"usage": mostly(st.fixed_dictionaries(
        {k: st.integers(0, 5000) for k in ("input_tokens", "output_tokens", "total_tokens")}),
        JSON)})


@HOSTILE
@given(answer=st.one_of(R_GOOD, R_ANSWER))
def test_any_responses_answer_is_gated_or_refused_and_nothing_unallowed_runs_or_reaches_the_app(
        door: Door, answer: dict[str, Any]) -> None:
    door.receiver.reply(200, json=answer)
    try:
        raw = door.client.responses.with_raw_response.create(
            model=MODEL, input="do it", tools=R_TOOLS)  # type: ignore[arg-type]
    except openai.APIStatusError as exc:
        assert _refused(exc.status_code, exc.code), (exc.status_code, exc.code, exc.message)
        event(f"refused: {exc.code}")
    else:
        assert raw.status_code == 200
        body = json.loads(raw.content)
        calls = [item for item in body["output"] if isinstance(item, dict)
                 and item.get("type") in ("function_call", "custom_tool_call")]
        assert all(item.get("name") == CLIENT_RUNS for item in calls), body["output"]
        statuses = sorted({a["status"] for a in body["authority"].get("actions") or []})
        event(f"answered; actions: {statuses}")
    event(f"effects so far: {'some' if _record_holds_every_effect(door) else 'none'}")


def _response_events(answer: dict[str, Any]) -> list[Any]:
    """The events an upstream streams ``answer`` with: created, each item added and done,
    completed (anything in ``output`` that is not a list streams no item)."""
    items = answer["output"] if isinstance(answer["output"], list) else []
    head = {k: v for k, v in answer.items() if k != "output"}
    out: list[Any] = [{"type": "response.created", "response": {**head, "output": []}}]
    for i, item in enumerate(items):
        out += [{"type": "response.output_item.added", "output_index": i, "item": item},
                {"type": "response.output_item.done", "output_index": i, "item": item}]
    return [*out, {"type": "response.completed", "response": answer}]


R_EVENT = st.fixed_dictionaries(
    {"type": st.sampled_from(["error", "response.failed", "response.completed",
                              "response.incomplete", "response.output_item.added",
                              "response.output_item.done", "response.output_text.delta",
                              "response.created"]) | JSON},
    optional={"response": R_ANSWER | JSON, "error": JSON, "item": R_CALL | R_MESSAGE | JSON,
              "output_index": st.integers(-1, 3) | JSON, "delta": JSON}) | JSON
R_STREAM = mostly(st.builds(_response_events, st.one_of(R_GOOD, R_ANSWER)), st.one_of(
    st.builds(lambda good, odd, at: good[:at] + odd + good[at:],
              st.builds(_response_events, R_ANSWER), st.lists(R_EVENT, min_size=1, max_size=2),
              st.integers(0, 8)),
    st.lists(R_EVENT, max_size=5)))


@HOSTILE
@given(events=R_STREAM, done=st.booleans())
def test_any_responses_stream_is_gated_or_refused_and_nothing_unallowed_runs_or_reaches_the_app(
        door: Door, events: list[Any], done: bool) -> None:
    door.receiver.reply(200, body=_sse(events, done), content_type="text/event-stream")
    def read(seen: list[Any]) -> None:
        for part in door.client.responses.create(model=MODEL, input="do it", tools=R_TOOLS,
                                                 stream=True):  # type: ignore[arg-type]
            item = getattr(part, "item", None)
            if getattr(item, "type", None) in ("function_call", "custom_tool_call"):
                seen.append(getattr(item, "name", None))
            response = getattr(part, "response", None)
            for out in getattr(response, "output", None) or []:
                if getattr(out, "type", None) in ("function_call", "custom_tool_call"):
                    seen.append(getattr(out, "name", None))

    _stream_holds(door, read)

# The properties above hold vacuously if nothing ever reaches the app or runs: the same
# door, the same checks, on answers whose outcome is known.

WELL_FORMED = [(CLIENT_RUNS, '{"id": 7}'), ("send_note", '{"text": "hi"}'), ("wipe_disk", "{}"),
               ("issue_refund", '{"amount": 5}')]


def test_a_plain_answer_keeps_only_the_call_the_app_may_run(door: Door) -> None:
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": name, "arguments": args}}
             for i, (name, args) in enumerate(WELL_FORMED)]
    door.receiver.reply(200, json={"id": "chatcmpl-ok", "object": "chat.completion", "model": MODEL,
                              "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                                  "role": "assistant", "content": None, "tool_calls": calls}}]})
    raw = door.client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user("do it"), tools=TOOLS)
    body = json.loads(raw.content)
    assert _names_in(body["choices"][0]["message"]["tool_calls"]) == [CLIENT_RUNS]
    assert [a["status"] for a in body["authority"]["actions"]] == [
        "allowed", "executed", "denied", "pending_approval"]
    assert [r["type"] for r in _ran(door.effects)] == ["send_note"]
    _record_holds_every_effect(door)


def test_a_stream_delivers_only_the_call_the_app_may_run(door: Door) -> None:
    door.receiver.reply(200, body=_sse(_call_chunks(WELL_FORMED, 3), True),
                   content_type="text/event-stream")
    seen = [tc.function.name
            for part in door.client.chat.completions.create(model=MODEL, messages=user("do it"),
                                                       tools=TOOLS, stream=True)
            for choice in part.choices for tc in (choice.delta.tool_calls or [])
            if tc.function is not None and tc.function.name is not None]
    assert seen == [CLIENT_RUNS]
    assert [r["type"] for r in _ran(door.effects)] == ["send_note"]
    _record_holds_every_effect(door)


def _response_with(calls: list[tuple[str, str]]) -> dict[str, Any]:
    return {"id": "resp_ok", "object": "response", "status": "completed", "model": MODEL,
            "output": [{"type": "function_call", "id": f"fc_{i}", "call_id": f"call_{i}",
                        "name": name, "arguments": args, "status": "completed"}
                       for i, (name, args) in enumerate(calls)],
            "usage": {"input_tokens": 9, "output_tokens": 9, "total_tokens": 18}}


def test_a_responses_answer_keeps_only_the_call_the_app_may_run(door: Door) -> None:
    door.receiver.reply(200, json=_response_with(WELL_FORMED))
    raw = door.client.responses.with_raw_response.create(
        model=MODEL, input="do it", tools=R_TOOLS)  # type: ignore[arg-type]
    body = json.loads(raw.content)
    assert [i["name"] for i in body["output"] if i["type"] == "function_call"] == [CLIENT_RUNS]
    assert [a["status"] for a in body["authority"]["actions"]] == [
        "allowed", "executed", "denied", "pending_approval"]
    assert [r["type"] for r in _ran(door.effects)] == ["send_note"]
    _record_holds_every_effect(door)


def test_a_responses_stream_delivers_only_the_call_the_app_may_run(door: Door) -> None:
    door.receiver.reply(200, body=_sse(_response_events(_response_with(WELL_FORMED)), True),
                        content_type="text/event-stream")
    parts = list(door.client.responses.create(model=MODEL, input="do it", tools=R_TOOLS,
                                              stream=True))  # type: ignore[arg-type]
    added = [p.item.name for p in parts if p.type == "response.output_item.added"
             and p.item.type == "function_call"]
    final = [o.name for o in parts[-1].response.output if o.type == "function_call"]
    assert added == final == [CLIENT_RUNS]
    assert [r["type"] for r in _ran(door.effects)] == ["send_note"]
    _record_holds_every_effect(door)



# -- numbers, depths and shapes found hostile, one by one (each was a 500 or a lost record) --

HUGE = 10**400  # valid JSON; float arithmetic on it overflows


def _chat_answer(usage: Any = None, **message: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-x", "object": "chat.completion", "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "send_note", "arguments": '{"text": "hi"}'}}],
            **message}}]}
    if usage is not None:
        body["usage"] = usage
    return body


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": HUGE, "completion_tokens": 5, "total_tokens": HUGE},
    {"prompt_tokens": 5, "completion_tokens": HUGE},
    {"prompt_tokens": 5, "completion_tokens": 5,
     "prompt_tokens_details": {"cached_tokens": HUGE},
     "completion_tokens_details": {"reasoning_tokens": HUGE}},
], ids=["prompt", "completion", "details"])
def test_a_usage_past_any_real_count_is_billed_as_the_most_there_is_and_runs_nothing(door: Door,
                                                                     usage: Any) -> None:
    door.receiver.reply(200, json=_chat_answer(usage))
    raw = door.client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user("do it"), tools=TOOLS)
    body = json.loads(raw.content)
    # Billed in full, not read as nothing: past the ceiling, so nothing of it runs.
    assert [(a["status"], a["code"]) for a in body["authority"]["actions"]] == [
        ("denied", "post_cost_ceiling_exceeded")]
    [entry] = audit_entries(door.log, "request")
    assert entry["cost_actual_usd"] > 1e6
    assert _record_holds_every_effect(door) == []


def test_an_answer_nested_past_the_limit_is_refused_and_runs_nothing(door: Door) -> None:
    deep: Any = 1
    for _ in range(900):  # json.loads takes it; a recursive copy of it would not
        deep = [deep]
    door.receiver.reply(200, json=_chat_answer(extra=deep))
    with pytest.raises(openai.APIStatusError) as ei:
        door.client.chat.completions.create(model=MODEL, messages=user("do it"), tools=TOOLS)
    assert (ei.value.status_code, ei.value.code) == (502, "upstream_malformed_response")
    assert "nested deeper than 64 levels" in ei.value.message
    assert _ran(door.effects) == []
    [entry] = audit_entries(door.log, "request")
    assert entry["details"]["code"] == "upstream_malformed_response"


@pytest.mark.parametrize("body", [
    {"max_tokens": HUGE}, {"max_completion_tokens": 2**53 + 1}])
def test_an_output_limit_past_any_model_is_refused_with_its_bound(door: Door,
                                                                  body: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        door.client.chat.completions.create(model=MODEL, messages=user("hi"),
                                            extra_body=body)
    name = next(iter(body))
    assert ei.value.code == "invalid_request"
    assert f"'{name}' must be a positive integer of at most {2**53}" in ei.value.message
    assert door.receiver.requests == []


def test_a_responses_limit_or_tool_description_of_the_wrong_kind_is_refused(door: Door) -> None:
    for extra, says in (
            ({"max_output_tokens": HUGE}, "'max_output_tokens' must be a positive integer"),
            ({"tools": [{"type": "custom", "name": "x", "description": 5,
                         "format": {"type": "text"}}]}, "tools[0].description must be a string")):
        with pytest.raises(openai.BadRequestError) as ei:
            door.client.responses.create(model=MODEL, input="hi", extra_body=extra)
        assert ei.value.code == "invalid_request" and says in ei.value.message
    assert door.receiver.requests == []


def test_a_responses_history_with_a_huge_count_cannot_break_the_next_turn(door: Door) -> None:
    door.receiver.reply(200, json={**_response_with([(CLIENT_RUNS, "{}")]), "usage": {
        "input_tokens": 10**308, "output_tokens": 10**308, "total_tokens": 1}})
    first = door.client.responses.create(model=MODEL, input="hi", tools=R_TOOLS)
    door.receiver.reply(200, json=_response_with([]))
    # A count no answer can reach is not taken: the history is priced from what it said.
    second = door.client.responses.with_raw_response.create(
        model=MODEL, previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": "call_0", "output": "ok"}])
    assert second.status_code == 200
    [_, entry] = audit_entries(door.log, "request")
    assert entry["decision"] == "allow" and entry["cost_estimate_usd"] < 0.05


@pytest.mark.parametrize("event", [
    {"type": "error", "response": "x"},
    {"type": "response.failed", "response": [1]},
    {"type": "response.created", "error": {"message": "quota"}, "response": {"id": "r"}},
], ids=["error-response-text", "failed-response-list", "created-with-error"])
def test_a_responses_stream_error_of_any_shape_is_the_upstream_failing(door: Door,
                                                                       event: Any) -> None:
    door.receiver.reply(200, body=_sse([event], True), content_type="text/event-stream")
    with pytest.raises(openai.APIError) as ei:
        list(door.client.responses.create(model=MODEL, input="hi", stream=True))
    assert getattr(ei.value, "code", None) == "upstream_error", ei.value
    # Read as the upstream's failure, not as the gateway tripping over its shape.
    assert ei.value.message.startswith("the upstream failed mid-stream"), ei.value.message
    [entry] = audit_entries(door.log, "request")
    assert (entry["decision"], entry["details"]["code"]) == ("error", "upstream_error")


def test_a_chat_chunk_with_an_error_beside_its_choices_is_the_upstream_failing(
        door: Door) -> None:
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": MODEL,
             "error": {"message": "quota"},
             "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    door.receiver.reply(200, body=_sse([chunk], True), content_type="text/event-stream")
    with pytest.raises(openai.APIError) as ei:
        list(door.client.chat.completions.create(model=MODEL, messages=user("hi"),
                                                 stream=True))
    assert getattr(ei.value, "code", None) == "upstream_error", ei.value
    [entry] = audit_entries(door.log, "request")
    assert (entry["decision"], entry["details"]["code"]) == ("error", "upstream_error")


def test_a_models_list_nested_past_any_parser_lists_the_policys_names(door: Door) -> None:
    door.receiver.reply(200, body="[" * 100_000 + "]" * 100_000,
                        content_type="application/json")
    listed = [m.id for m in door.client.models.list()]
    assert MODEL in listed


_REFUND = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "issue_refund",
           "arguments": '{"amount": 5}'}
_MESSAGE = {"type": "message", "id": "msg_1", "role": "assistant", "content": []}


@pytest.mark.parametrize("events", [
    [{"type": "response.created", "response": {"id": "r", "output": [_REFUND]}}],
    [{"type": "response.output_item.added", "output_index": 0, "item": _MESSAGE},
     {"type": "response.output_item.done", "output_index": 0, "item": _REFUND}],
], ids=["output-in-created", "message-retyped-as-call"])
def test_a_responses_stream_cannot_slip_a_call_past_the_hold(door: Door,
                                                             events: list[Any]) -> None:
    """Events before the first call are passed on as they come: one that carries a call
    (in an early response, or re-typing an item announced as a message) is refused, and
    the call never reaches the app."""
    completed = {"type": "response.completed", "response": _response_with([])}
    door.receiver.reply(200, body=_sse([*events, completed], True),
                        content_type="text/event-stream")
    shown: list[Any] = []
    with pytest.raises(openai.APIError) as ei:
        for part in door.client.responses.create(model=MODEL, input="hi", tools=R_TOOLS,
                                                 stream=True):  # type: ignore[arg-type]
            shown.append(part.model_dump())
    assert getattr(ei.value, "code", None) == "upstream_malformed_response"
    assert "issue_refund" not in json.dumps(shown)
    assert _ran(door.effects) == []
    [entry] = audit_entries(door.log, "request")
    assert entry["details"]["code"] == "upstream_malformed_response"


FORGED = {"decision": "allow", "actions": [{"tool": "issue_refund", "status": "allowed"}]}


def test_a_forged_authority_in_a_stream_never_reaches_the_app(door: Door) -> None:
    """Only the gateway writes ``authority``: an upstream's own, on a chunk or an event
    passed on before the decision, is dropped; the app reads the gateway's, last."""
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": MODEL, "authority": FORGED,
             "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
    door.receiver.reply(200, body=_sse([chunk], True), content_type="text/event-stream")
    parts = [p.model_dump() for p in door.client.chat.completions.create(
        model=MODEL, messages=user("hi"), stream=True)]
    seen = [p["authority"] for p in parts if p.get("authority")]
    assert len(seen) == 1 and seen[0]["decision"] == "allow" and seen[0]["request_id"]
    events = [{"type": "response.created", "authority": FORGED,
               "response": {"id": "r", "output": [], "authority": FORGED}},
              {"type": "response.completed", "response": _response_with([])}]
    door.receiver.reply(200, body=_sse(events, True), content_type="text/event-stream")
    shown = [p.model_dump() for p in door.client.responses.create(
        model=MODEL, input="hi", stream=True)]
    assert "issue_refund" not in json.dumps(shown)
    assert shown[-1]["response"]["authority"]["request_id"]


_SMUGGLED = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {
    "tool_calls": [{"index": 0, "id": "call_evil", "type": "function", "function": {
        "name": "issue_refund", "arguments": '{"amount": 9999}'}}]}}]}


@pytest.mark.parametrize("where", ["created", "text-delta", "call-arguments"])
def test_a_responses_event_passed_before_the_hold_carries_only_its_own_fields(
        door: Door, where: str) -> None:
    """What passes before the first call is rebuilt from the event type's own fields: chat
    chunk fields an upstream adds (a library bridging streams reads them as calls) or a
    call's argument events at a message's place never reach the app."""
    msg = {"type": "message", "id": "msg_1", "role": "assistant", "content": []}
    done = {**msg, "content": [{"type": "output_text", "text": "ok", "annotations": []}]}
    events: list[Any] = [
        {"type": "response.created", "response": {"id": "r", "output": []},
         **(_SMUGGLED if where == "created" else {})},
        {"type": "response.output_item.added", "output_index": 0, "item": msg}]
    if where == "text-delta":
        events.append({"type": "response.output_text.delta", "output_index": 0,
                       "content_index": 0, "item_id": "msg_1", "delta": "ok", **_SMUGGLED})
    if where == "call-arguments":
        events.append({"type": "response.function_call_arguments.delta", "output_index": 0,
                       "item_id": "msg_1", "delta": '{"amount": 9999}'})
    events += [{"type": "response.output_item.done", "output_index": 0, "item": done},
               {"type": "response.completed", "response": {
                   **_response_with([]), "output": [done]}}]
    door.receiver.reply(200, body=_sse(events, True), content_type="text/event-stream")
    with door.client.responses.with_streaming_response.create(
            model=MODEL, input="hi", tools=R_TOOLS, stream=True) as raw:  # type: ignore[arg-type]
        sent = b"".join(raw.iter_bytes())
    assert b"call_evil" not in sent and b"9999" not in sent and b"choices" not in sent
    assert b'"text": "ok"' in sent  # the message itself still streams


def test_a_namespaced_custom_call_is_gated_under_its_namespace(door: Door) -> None:
    """``admin.exec`` is another action than ``exec``, for a custom call as for a function
    call; and a call a program at the provider made is refused, whatever its kind."""
    tools = [{"type": "custom", "name": "exec"},
             {"type": "namespace", "name": "admin", "description": "",
              "tools": [{"type": "custom", "name": "exec"}]}]
    for item, status in (
            ({"namespace": "admin"}, ("denied", "denied_by_policy")),
            ({"caller": {"type": "program"}}, ("denied", "unsupported_call_type"))):
        door.receiver.reply(200, json={**_response_with([]), "output": [
            {"type": "custom_tool_call", "id": "ctc_1", "call_id": "c1", "name": "exec",
             "input": "DROP TABLE users", **item}]})
        body = json.loads(door.client.responses.with_raw_response.create(
            model=MODEL, input="hi", tools=tools).content)  # type: ignore[arg-type]
        [action] = body["authority"]["actions"]
        assert (action["status"], action["code"]) == status, action
        assert not [o for o in body["output"] if o["type"] == "custom_tool_call"]


# -- the client's side: any request body at the main door --------------------------------

REQ_KEYS = st.sampled_from(["role", "content", "name", "tool_calls", "tool_call_id", "type",
                            "function", "arguments", "parameters", "text", "image_url", "url",
                            "input_audio", "file", "refusal", "id", "strict", "description"])
# What a client can send: JSON has no NaN or infinity (the openai client refuses to encode them).
REQ_LEAVES = (st.none() | st.booleans() | st.integers()
              | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
REQ_JSON = st.recursive(
    REQ_LEAVES | st.sampled_from(["user", "assistant", "tool", "system", "function", "text",
                              "image_url", "send_note", "{}"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(REQ_KEYS, inner, max_size=4),
    max_leaves=12)
def seldom_odd(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` nine times in ten, else any JSON: with many fields each seldom odd, a
    request is now and then entirely valid and reaches the upstream, or odd in one place."""
    return st.integers(0, 9).flatmap(lambda i: REQ_JSON if i == 9 else valid)


MESSAGE_IN = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=20)})
REQUEST = st.fixed_dictionaries(
    {"model": seldom_odd(st.just(MODEL)),
     "messages": seldom_odd(st.lists(seldom_odd(MESSAGE_IN), min_size=1, max_size=4))},
    optional={
        "tools": seldom_odd(st.lists(seldom_odd(st.just(tool("send_note"))), max_size=3)),
        "tool_choice": seldom_odd(st.sampled_from(["auto", "none"])),
        "max_tokens": seldom_odd(st.integers(1, 4000)),
        "n": seldom_odd(st.integers(1, 3)),
        "stream": seldom_odd(st.booleans()),
        "stream_options": seldom_odd(st.fixed_dictionaries({"include_usage": st.booleans()})),
        "response_format": seldom_odd(st.just({"type": "text"})),
        "parallel_tool_calls": seldom_odd(st.booleans()),
        "temperature": seldom_odd(st.floats(0, 2)),
        "user": seldom_odd(st.text(max_size=10)),
        "metadata": seldom_odd(st.dictionaries(st.text(max_size=5), st.text(max_size=5),
                                               max_size=2)),
        "store": seldom_odd(st.booleans()),
        "seed": seldom_odd(st.integers(0, 2**31)),
        "logit_bias": seldom_odd(st.dictionaries(st.sampled_from(["1", "50"]),
                                                 st.integers(-100, 100), max_size=2))})
# Now and then one field of any value, known to the API or not.
EXTRA = st.one_of(st.just({}), st.just({}), st.dictionaries(st.sampled_from(
    ["functions", "function_call", "modalities", "audio", "prediction", "web_search_options",
     "reasoning_effort", "service_tier", "x_unknown", "authority"]), REQ_JSON, max_size=1))


@HOSTILE
@given(body=REQUEST, extra=EXTRA)
def test_any_request_is_answered_or_refused_precisely_never_a_500(
        door: Door, body: dict[str, Any], extra: dict[str, Any]) -> None:
    door.receiver.reply(200, json=_chat_answer({"prompt_tokens": 9, "completion_tokens": 9,
                                                "total_tokens": 18}))
    try:
        raw = door.client.chat.completions.with_raw_response.create(**body, extra_body=extra)
    except openai.APIStatusError as exc:
        assert exc.status_code < 500, (exc.status_code, exc.code, exc.message)
        assert exc.code and exc.message, exc
        event(f"refused: {exc.status_code} {exc.code}")
    except openai.APIError as exc:  # a stream the gateway ended with its refusal
        assert getattr(exc, "code", None) not in (None, "authority_error"), exc
        event("refused mid-stream")
    else:
        if body.get("stream") is True:
            list(raw.parse())
        event(f"answered: {raw.status_code}")
    _record_holds_every_effect(door)
