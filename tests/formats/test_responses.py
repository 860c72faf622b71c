"""The Responses API as a wire format (authority_sdk/formats/responses.py), over the format
alone: requests parsed and refused, calls found, answers rewritten, follow-ups that keep the
next turn valid, and streams whose held calls never leave before their decision."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authority_sdk.errors import AuthorityError, InvalidRequest, RequestDenied, UpstreamError
from authority_sdk.formats import Responses, format_for_path
from authority_sdk.formats.responses import ResponsesStream
from authority_sdk.formats.sse import SSEDecoder
from authority_sdk.records import ActionOutcome, ActionStatus
from authority_sdk.tokens import default_counter

FMT = Responses()
FN = {"type": "function", "name": "lookup_customer",
      "parameters": {"type": "object", "properties": {"id": {"type": "integer"}}}}


def parse(**body: Any) -> Any:
    return FMT.parse(json.dumps({"model": "gpt-4o-mini", **body}).encode())


def refused(**body: Any) -> AuthorityError:
    with pytest.raises(AuthorityError) as ei:
        parse(**body)
    return ei.value


def fc(name: str, args: str = "{}", call_id: str = "c1", **kw: Any) -> dict[str, Any]:
    return {"type": "function_call", "id": "fc_" + call_id, "call_id": call_id, "name": name,
            "arguments": args, "status": "completed", **kw}


def msg(text: str, iid: str = "msg_1") -> dict[str, Any]:
    return {"type": "message", "id": iid, "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def reasoning(iid: str = "rs_1") -> dict[str, Any]:
    return {"type": "reasoning", "id": iid, "summary": [{"type": "summary_text",
                                                          "text": "thinking"}]}


def answer(*items: dict[str, Any]) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4o-mini",
            "output": list(items), "usage": {"input_tokens": 10, "output_tokens": 5,
                                             "total_tokens": 15}}


def outcome(call: Any, status: str) -> ActionOutcome:
    return ActionOutcome(tool_call={"id": call.call_id, "name": call.name,
                                    "arguments": call.arguments},
                         action_type=call.name, mode="deny", dispatch="client",
                         decision="allow" if status == ActionStatus.ALLOWED else "deny",
                         status=status, reason="policy", action_key="act_x",
                         decided_by="policy", code=None if status == "allowed" else "no",
                         position=call.position, call_kind=call.kind)


def valid_next_turn(items: list[dict[str, Any]]) -> None:
    """The pairing rules upstream enforces on a stateless turn: every call has its output
    and every output its call; a reasoning item is followed by an item; a call whose
    reasoning item was in the answer still follows it."""
    kinds = ("function_call", "custom_tool_call", "shell_call", "apply_patch_call",
             "local_shell_call", "computer_call")
    calls = [i["call_id"] for i in items if i.get("type") in kinds]
    outputs = [i.get("call_id") or i["id"] for i in items
               if i.get("type") in [k + "_output" for k in kinds]]
    assert sorted(calls) == sorted(outputs), (calls, outputs)
    for n, item in enumerate(items):
        if item.get("type") == "reasoning":
            assert n + 1 < len(items), "a reasoning item without its following item"


# -- requests ---------------------------------------------------------------------------------


def test_served_path_and_a_string_input_counted_like_a_user_message() -> None:
    assert format_for_path("/v1/responses") is FMT.__class__ or isinstance(
        format_for_path("/v1/responses"), Responses)
    assert format_for_path("/v1/responses/resp_1") is None
    req = parse(input="hello there", instructions="be brief", max_output_tokens=50,
                tools=[FN])
    assert req.explicit_limit == 50 and req.limit_field == "max_output_tokens"
    assert req.tool_schemas == {"lookup_customer": FN["parameters"]}
    assert req.prompt_messages == [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "hello there"}]
    chat_like = default_counter.count_request("gpt-4o-mini", {
        "messages": req.prompt_messages, "tools": [{"type": "function", "function": {
            "name": "lookup_customer", "description": "", "parameters": FN["parameters"]}}]})
    assert default_counter.count_request("gpt-4o-mini", req.count_body()).tokens \
        == chat_like.tokens > 0


def test_item_input_with_calls_and_outputs_is_counted_in_full() -> None:
    items = [{"role": "user", "content": [{"type": "input_text", "text": "find 7"}]},
             fc("lookup_customer", '{"id": 7}'),
             {"type": "function_call_output", "call_id": "c1", "output": '{"name": "Ann"}'}]
    req = parse(input=items, tools=[FN])
    short = parse(input=items[:1], tools=[FN])
    long_n = default_counter.count_request("gpt-4o-mini", req.count_body()).tokens
    short_n = default_counter.count_request("gpt-4o-mini", short.count_body()).tokens
    assert long_n > short_n + 10  # the call and its output are billed as input too
    assert req.prompt_messages[2]["role"] == "tool"


@pytest.mark.parametrize(("field", "value", "code"), [
    ("background", True, "background_not_allowed"),
    ("prompt", {"id": "pmpt_1"}, "prompt_not_allowed"),
    ("conversation", "conv_1", "conversation_not_allowed"),
])
def test_fields_that_bring_unseen_calls_are_refused(field: str, value: Any, code: str) -> None:
    exc = refused(input="hi", **{field: value})
    assert isinstance(exc, InvalidRequest) and exc.code == code and field in exc.message


@pytest.mark.parametrize(("kind", "family"), [
    ("web_search", "web_search"), ("web_search_preview", "web_search"),
    ("file_search", "file_search"), ("code_interpreter", "code_interpreter"),
    ("image_generation", "image_generation")])
def test_hosted_tools_are_named_for_the_policy_to_admit(kind: str, family: str) -> None:
    req = parse(input="hi", tools=[FN, {"type": kind}], tool_choice={"type": kind})
    assert req.hosted_tools == [family]
    # their result items are part of the answer when offered, a call to deny when not
    item = {"type": f"{family}_call", "id": "h1", "status": "completed"}
    assert FMT.answer_from(answer(item), req).calls == []
    assert FMT.answer_from(answer(item)).calls[0].problem_code == "unsupported_call_type"


@pytest.mark.parametrize("tool", [
    {"type": "something_new"},
    {"type": "shell", "environment": {"type": "container_auto"}},  # runs at the provider
], ids=lambda t: t["type"] + ("-hosted" if "environment" in t else ""))
def test_tools_the_gateway_cannot_gate_are_refused(tool: dict[str, Any]) -> None:
    exc = refused(input="hi", tools=[FN, tool])
    assert isinstance(exc, RequestDenied) and exc.code == "tool_not_allowed"
    assert exc.status_code == 403


def test_app_run_built_ins_are_offered_and_their_calls_are_actions() -> None:
    req = parse(input="hi", tools=[FN, {"type": "shell"}, {"type": "apply_patch"},
                                   {"type": "shell", "environment": {"type": "local"}}])
    assert req.tool_schemas == {"lookup_customer": FN["parameters"]}
    a = FMT.answer_from(answer(
        {"type": "shell_call", "id": "sh_1", "call_id": "c1",
         "action": {"commands": ["ls -la", "rm -rf /"], "timeout_ms": 1000}},
        {"type": "apply_patch_call", "id": "ap_1", "call_id": "c2",
         "operation": {"type": "update_file", "path": "a.py", "diff": "-x\n+y"}},
        {"type": "shell_call", "id": "sh_2", "call_id": "c3", "action": "ls"}))
    [shell, patch, bad] = a.calls
    assert (shell.kind, shell.name) == ("shell_call", "shell_call")
    assert json.loads(shell.arguments)["command"] == "ls -la\nrm -rf /"  # for a rule's glob
    assert (patch.name, json.loads(patch.arguments)["path"]) == ("apply_patch_call", "a.py")
    assert bad.problem and bad.problem_code is None
    outs = _gated(a, ["denied", "pending_approval", "denied"])
    followups = FMT.followups(a, outs, [])
    assert [f["type"] for f in followups] == ["shell_call", "shell_call_output",
                                              "apply_patch_call", "apply_patch_call_output",
                                              "shell_call", "shell_call_output"]
    assert followups[1]["output"][0]["outcome"] == {"type": "exit", "exit_code": 1}
    assert json.loads(followups[1]["output"][0]["stderr"])["status"] == "denied"
    assert followups[3]["status"] == "failed"
    # the follow-ups are valid input of the next turn
    nxt = parse(input=[{"role": "user", "content": "go"}, *followups])
    assert len(nxt.prompt_messages) == 7
    valid_next_turn(followups)


def test_local_shell_and_computer_calls_are_actions_answered_in_their_own_shape() -> None:
    req = parse(input="hi", tools=[{"type": "local_shell"}, {"type": "computer_use_preview",
                                                              "display_width": 1024,
                                                              "display_height": 768,
                                                              "environment": "browser"}])
    assert req.tool_schemas == {} and "display_width" in json.dumps(req.prompt_tools)
    a = FMT.answer_from(answer(
        {"type": "local_shell_call", "id": "lsh_1", "call_id": "c1", "status": "completed",
         "action": {"type": "exec", "command": ["rm", "-rf", "/"], "env": {}}},
        {"type": "computer_call", "id": "cu_1", "call_id": "c2", "status": "completed",
         "action": {"type": "click", "x": 10, "y": 20, "button": "left"},
         "pending_safety_checks": [{"id": "sc_1", "code": "malicious_instructions"}]},
        {"type": "computer_call", "id": "cu_2", "call_id": "c3", "status": "completed",
         "actions": [{"type": "type", "text": "hunter2"}, {"type": "keypress",
                                                          "keys": ["ENTER"]}]},
        {"type": "computer_call", "id": "cu_3", "call_id": "c4", "action": "click"},
        {"type": "local_shell_call", "id": "lsh_2", "call_id": "c5", "action": ["ls"]}))
    [shell, click, typed, bad_click, bad_shell] = a.calls
    assert (shell.kind, shell.name) == ("local_shell_call", "local_shell_call")
    assert json.loads(shell.arguments)["command_line"] == "rm -rf /"  # for a rule's glob
    assert json.loads(click.arguments) == {
        "action": {"type": "click", "x": 10, "y": 20, "button": "left"},
        "safety_checks": ["malicious_instructions"]}
    assert json.loads(typed.arguments)["actions"][0]["text"] == "hunter2"
    assert bad_click.problem and bad_shell.problem
    outs = _gated(a, ["denied", "pending_approval", "denied", "denied", "denied"])
    followups = FMT.followups(a, outs, [])
    assert [f.get("type") for f in followups] == [
        "local_shell_call", "local_shell_call_output",
        "computer_call", "computer_call_output", "message",
        "computer_call", "computer_call_output", "message",
        "computer_call", "computer_call_output", "message",
        "local_shell_call", "local_shell_call_output"]
    assert followups[1]["id"] == "c1" and json.loads(followups[1]["output"])["status"] \
        == "denied"
    shot = followups[3]["output"]
    assert shot["type"] == "computer_screenshot" and shot["image_url"].startswith(
        "data:image/png;base64,")
    note = followups[4]
    assert note["role"] == "developer" and "pending_approval" in note["content"][0]["text"]
    # The follow-ups are valid input of the next turn, billed with the screenshot as an image.
    nxt = parse(input=[{"role": "user", "content": "go"}, *followups])
    assert any(isinstance(m.get("content"), list) and m["content"][0]["type"] == "image_url"
               for m in nxt.prompt_messages)
    valid_next_turn(followups)


@pytest.mark.parametrize(("body", "code"), [
    ({"input": "hi", "tool_choice": {"type": "web_search"}}, "tool_not_allowed"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "previous_response_unknown"),
    ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, "invalid_request"),
    ({"input": [{"type": "local_shell_call_output", "output": "x"}]}, "invalid_request"),
    ({"input": [{"type": "compaction", "encrypted_content": "x"}]}, "unsupported_input_item"),
    ({"input": []}, "invalid_request"),
    ({"input": 5}, "invalid_request"),
    ({"input": ["hi"]}, "invalid_request"),
    ({"input": [{"content": "no role or type"}]}, "invalid_request"),
    ({"input": [{"type": "function_call", "name": "x", "arguments": {}, "call_id": "c"}]},
     "invalid_request"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "invalid_request"),
    ({"input": "hi", "tools": [{"type": "function"}]}, "invalid_request"),
    ({"input": "hi", "tools": [FN, FN]}, "invalid_request"),
    ({"input": "hi", "tools": {"a": 1}}, "invalid_request"),
    ({"input": "hi", "max_output_tokens": 0}, "invalid_request"),
    ({"input": "hi", "max_output_tokens": True}, "invalid_request"),
    ({"input": "hi", "stream": "yes"}, "invalid_request"),
    ({"input": "hi", "instructions": ["x"]}, "invalid_request"),
    ({"input": "hi", "model": ""}, "invalid_request"),
    ({"input": "hi", "previous_response_id": 5}, "invalid_request"),
    ({"input": "hi", "previous_response_id": "r" * 300}, "invalid_request"),
])
def test_hostile_requests_get_a_precise_refusal(body: dict[str, Any], code: str) -> None:
    exc = refused(**body)
    assert exc.code == code and exc.status_code in (400, 403), exc.message


def test_structured_output_is_recognised() -> None:
    req = parse(input="hi", text={"format": {"type": "json_schema", "name": "x",
                                              "schema": {"type": "object"}}})
    assert req.structured_output and not parse(input="hi").structured_output


# -- answers ----------------------------------------------------------------------------------


def test_calls_are_function_and_custom_items_and_the_rest_cannot_be_gated() -> None:
    a = FMT.answer_from(answer(
        reasoning(), msg("hi"), fc("lookup_customer", '{"id": 1}'),
        {"type": "custom_tool_call", "id": "ctc_1", "call_id": "c2", "name": "patch",
         "input": "*** diff"},
        fc("refund", "{}", "c3", namespace="billing"),
        {"type": "web_search_call", "id": "ws_1", "status": "completed"},
        {"type": "computer_call", "id": "cu_1", "call_id": "c4", "action": {"type": "click"}},
        fc("lookup_customer", {"id": 1}, "c5"),  # type: ignore[arg-type]
        {"type": "function_call", "name": "x", "arguments": "{}"},
    ))
    shown = [(c.position, c.kind, c.name, c.problem_code or (c.problem and "problem"))
             for c in a.calls]
    assert shown == [
        (2, "function_call", "lookup_customer", None),
        (3, "custom", "patch", None),
        (4, "function_call", "billing.refund", None),
        (5, "web_search_call", "web_search_call", "unsupported_call_type"),
        (6, "computer_call", "computer_call", None),
        (7, "function_call", "lookup_customer", "problem"),
        (8, "function_call", "x", "problem"),
    ]
    assert json.loads(a.calls[1].arguments) == {"input": "*** diff"}
    assert a.usage == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


@pytest.mark.parametrize("body", [[], {"output": {}}, {"output": [1]}, {"output": [{}]},
                                  {"output": [{"type": "message", "content": "x"}]}])
def test_an_answer_gating_cannot_read_is_malformed(body: Any) -> None:
    with pytest.raises(UpstreamError) as ei:
        FMT.read_answer(json.dumps(body).encode())
    assert ei.value.code == "upstream_malformed_response"


def _gated(a: Any, statuses: list[str]) -> list[ActionOutcome]:
    return [outcome(c, s) for c, s in zip(a.calls, statuses, strict=True)]


def test_withheld_calls_leave_output_and_come_back_as_paired_followups() -> None:
    a = FMT.answer_from(answer(msg("ok"), fc("lookup_customer", '{"id": 1}', "c1"),
                               fc("delete_account", "{}", "c2")))
    outs = _gated(a, ["allowed", "denied"])
    followups = FMT.followups(a, outs, [])
    FMT.rewrite(a, outs, summary=None, structured_output=False)
    kept = a.body["output"]
    assert [i["type"] for i in kept] == ["message", "function_call", "message"]
    assert kept[1]["call_id"] == "c1"
    assert "delete_account: denied" in kept[2]["content"][0]["text"]
    assert [f["type"] for f in followups] == ["function_call", "function_call_output"]
    assert json.loads(followups[1]["output"])["status"] == "denied"
    # an aware stateless app: the kept output, the follow-ups, its own output for c1
    valid_next_turn([*kept, *followups, {"type": "function_call_output", "call_id": "c1",
                                         "output": "{}"}])
    # an unaware one sends the kept output and answers what it saw: still valid
    valid_next_turn([*kept, {"type": "function_call_output", "call_id": "c1", "output": "{}"}])


@pytest.mark.parametrize("structured", [False, True])
def test_a_reasoning_item_goes_with_the_calls_it_led_to(structured: bool) -> None:
    a = FMT.answer_from(answer(reasoning("rs_1"), fc("delete_account", "{}", "c1"),
                               reasoning("rs_2"), fc("lookup_customer", "{}", "c2")))
    outs = _gated(a, ["denied", "allowed"])
    followups = FMT.followups(a, outs, [])
    FMT.rewrite(a, outs, summary=None, structured_output=structured)
    kept = a.body["output"]
    assert [i.get("id") for i in kept][:2] == ["rs_2", "fc_c2"]
    assert [f.get("id") or f["type"] for f in followups] == ["rs_1", "fc_c1",
                                                              "function_call_output"]
    valid_next_turn([*kept, {"type": "function_call_output", "call_id": "c2", "output": "1"}])
    valid_next_turn([*followups, *kept,
                     {"type": "function_call_output", "call_id": "c2", "output": "1"}])
    assert (len(kept) == 2) is structured  # no summary item in a structured answer


def test_nothing_withheld_leaves_the_answer_untouched() -> None:
    a = FMT.answer_from(answer(msg("ok"), fc("lookup_customer")))
    before = json.dumps(a.body)
    outs = _gated(a, ["allowed"])
    assert FMT.followups(a, outs, []) == []
    FMT.rewrite(a, outs, summary=None, structured_output=False)
    assert json.dumps(a.body) == before


# -- streams ----------------------------------------------------------------------------------


def events(body: dict[str, Any]) -> list[str]:
    dec = SSEDecoder()
    return [p for chunk in FMT.synthesise_stream(body) for p in dec.feed(chunk)]


def decoded(parts: list[bytes]) -> list[dict[str, Any]]:
    dec = SSEDecoder()
    return [json.loads(p) for part in parts for p in dec.feed(part)]


def run_stream(upstream: dict[str, Any], statuses: list[str]) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]], Any]:
    """Feed an upstream answer's events; gate with ``statuses``. Returns the events sent
    before the decision, those after, and the rewritten answer."""
    stream = FMT.assembler(parse(input="hi", stream=True))
    assert isinstance(stream, ResponsesStream)
    early: list[bytes] = []
    for payload in events(upstream):
        early.extend(stream.feed(payload))
    assert stream.finished
    a = stream.answer()
    outs = _gated(a, statuses)
    FMT.rewrite(a, outs, summary=None, structured_output=False)
    late = stream.closing(a, {"decision": "allow", "actions": [o.to_dict() for o in outs]})
    return decoded(early), decoded(late), a


def assemble(evs: list[dict[str, Any]]) -> dict[str, Any]:
    """What a client builds from the events: items by output_index, text and arguments
    from deltas (the final event's response is checked against it)."""
    items: dict[int, dict[str, Any]] = {}
    for e in evs:
        if e["type"] == "response.output_item.added":
            items[e["output_index"]] = json.loads(json.dumps(e["item"]))
        elif e["type"] == "response.output_text.delta":
            part = items[e["output_index"]].setdefault("text", "")
            items[e["output_index"]]["text"] = part + e["delta"]
        elif e["type"] == "response.function_call_arguments.delta":
            items[e["output_index"]]["arguments"] += e["delta"]
    assert sorted(items) == list(range(len(items)))
    return {"items": [items[i] for i in sorted(items)], "final": evs[-1]}


def test_a_withheld_call_is_never_streamed_and_later_items_are_renumbered() -> None:
    upstream = answer(msg("first", "msg_a"), fc("delete_account", '{"id": 9}', "c1"),
                      fc("lookup_customer", '{"id": 1}', "c2"))
    early, late, a = run_stream(upstream, ["denied", "allowed"])
    sent = early + late
    # the message streamed at once; nothing about either call before the decision
    assert any(e["type"] == "response.output_text.delta" for e in early)
    assert not any("function_call" in json.dumps(e) for e in early)
    # only the summary item and the final authority name it: its call never goes out
    assert "fc_c1" not in json.dumps(sent) and '"c1"' not in json.dumps(sent[:-1])
    seqs = [e["sequence_number"] for e in sent]
    assert seqs == list(range(len(sent)))
    got = assemble(sent)
    assert [i["type"] for i in got["items"]] == ["message", "function_call", "message"]
    assert got["items"][1]["call_id"] == "c2" and got["items"][1]["arguments"] == '{"id": 1}'
    final = got["final"]
    assert final["type"] == "response.completed"
    assert final["response"]["output"] == a.body["output"]
    assert final["response"]["authority"]["actions"][0]["status"] == "denied"


def test_the_assembled_stream_equals_the_plain_answer() -> None:
    upstream = answer(reasoning(), msg("text"), fc("lookup_customer", '{"id": 1}', "c1"),
                      fc("send_note", '{"t": 1}', "c2"))
    plain = FMT.answer_from(json.loads(json.dumps(upstream)))
    outs = _gated(plain, ["allowed", "pending_approval"])
    FMT.rewrite(plain, outs, summary=None, structured_output=False)
    _, _, streamed = run_stream(upstream, ["allowed", "pending_approval"])
    assert streamed.body["output"] == plain.body["output"]


def test_a_completed_event_that_disagrees_with_the_streamed_items_is_refused() -> None:
    stream = FMT.assembler(parse(input="hi", stream=True))
    for payload in events(answer(msg("hello"))):
        if json.loads(payload)["type"] == "response.completed":
            payload = json.dumps({"type": "response.completed",
                                  "response": answer(fc("delete_account"))})
        stream.feed(payload)
    with pytest.raises(UpstreamError) as ei:
        stream.answer()
    assert ei.value.code == "upstream_malformed_response"


@pytest.mark.parametrize("bad", [
    [{"type": "response.output_item.added", "output_index": 3, "item": msg("x")}],
    [{"type": "response.output_text.delta", "output_index": 0, "delta": "x"}],
    ["not json"],
])
def test_a_stream_out_of_order_or_garbled_is_malformed(bad: list[Any]) -> None:
    stream = FMT.assembler(parse(input="hi", stream=True))
    with pytest.raises(UpstreamError) as ei:
        for e in bad:
            stream.feed(e if isinstance(e, str) else json.dumps(e))
    assert ei.value.code == "upstream_malformed_response"


def test_a_stream_without_its_completed_event_or_that_failed_is_an_error() -> None:
    stream = FMT.assembler(parse(input="hi", stream=True))
    stream.feed(json.dumps({"type": "response.created", "response": answer()}))
    with pytest.raises(UpstreamError):
        stream.answer()
    with pytest.raises(UpstreamError, match="boom"):
        stream.feed(json.dumps({"type": "response.failed", "response": {
            "error": {"message": "boom"}}}))


def test_namespaced_tools_are_actions_of_their_own_name() -> None:
    req = parse(input="hi", tools=[FN, {"type": "namespace", "name": "crm", "description": "",
                                        "tools": [FN, {"type": "custom", "name": "note"}]}])
    assert set(req.tool_schemas) == {"lookup_customer", "crm.lookup_customer"}
    a = FMT.answer_from(answer(fc("lookup_customer", "{}", "c1", namespace="crm"),
                               fc("lookup_customer", "{}", "c2")))
    assert [c.name for c in a.calls] == ["crm.lookup_customer", "lookup_customer"]
    with pytest.raises(RequestDenied):
        parse(input="hi", tools=[{"type": "namespace", "name": "x", "description": "",
                                  "tools": [{"type": "web_search"}]}])


def test_calls_a_program_makes_at_the_provider_are_refused() -> None:
    exc = refused(input="hi", tools=[{**FN, "allowed_callers": ["direct", "programmatic"]}])
    assert exc.code == "tool_not_allowed"
    a = FMT.answer_from(answer(fc("lookup_customer", "{}", "c1",
                                  caller={"type": "program", "caller_id": "p1"}),
                               fc("lookup_customer", "{}", "c2", caller={"type": "direct"}),
                               {"type": "program", "id": "pg_1", "call_id": "p1",
                                "code": "await lookup_customer()"}))
    assert [c.problem_code for c in a.calls] == ["unsupported_call_type", None,
                                                 "unsupported_call_type"]


MCP = {"type": "mcp", "server_label": "docs", "server_url": "https://mcp.example.com/sse",
       "require_approval": "never"}


def test_an_mcp_server_is_named_and_every_call_comes_back_for_approval() -> None:
    req = parse(input="hi", tools=[MCP, {**MCP, "server_label": "crm", "server_url": None,
                                         "connector_id": "connector_gmail"}])
    assert req.mcp_servers == {"docs": "https://mcp.example.com/sse",
                               "crm": "connector:connector_gmail"}
    assert [t["require_approval"] for t in req.data["tools"]] == ["always", "always"]
    assert req.rewritten  # sent as the gateway changed it
    for bad in ({**MCP, "server_url": None}, {**MCP, "tunnel_id": "t1"},
                {**MCP, "server_label": ""}):
        assert refused(input="hi", tools=[bad]).code == "invalid_request"


def test_mcp_approval_requests_are_actions_the_gateway_answers() -> None:
    req = parse(input="hi", tools=[MCP])

    def ask(rid: str, name: str, label: str = "docs") -> dict[str, Any]:
        return {"type": "mcp_approval_request", "id": rid, "name": name, "arguments": "{}",
                "server_label": label}

    a = FMT.answer_from(answer(
        {"type": "mcp_list_tools", "id": "l1", "server_label": "docs", "tools": []},
        ask("a1", "search"), ask("a2", "delete"), ask("a3", "drop"),
        ask("a4", "x", label="other"),
        {"type": "mcp_call", "id": "m1", "server_label": "docs", "name": "search",
         "arguments": "{}", "output": "ok"}), req)
    assert [(c.name, c.problem_code) for c in a.calls] == [
        ("mcp.docs.search", None), ("mcp.docs.delete", None), ("mcp.docs.drop", None),
        ("mcp_approval_request", "unsupported_call_type")]
    outs = _gated(a, ["allowed", "pending_approval", "denied", "denied"])
    followups = FMT.followups(a, outs, [])
    FMT.rewrite(a, outs, summary=None, structured_output=True)
    # every approval request is the gateway's to answer: none is left for the app
    assert [i["type"] for i in a.body["output"]] == ["mcp_list_tools", "mcp_call"]
    assert [(f["type"], f.get("approve")) for f in followups] == [
        ("mcp_approval_request", None), ("mcp_approval_response", True),
        ("mcp_approval_request", None), ("mcp_approval_response", False)]
    # and they are valid input of the next turn
    assert parse(input=[{"role": "user", "content": "go"}, *followups]).prompt_messages


# -- hostile shapes, at random: a precise refusal, never a crash -------------------------------

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))
_KEYS = st.sampled_from(["type", "role", "content", "name", "arguments", "call_id", "id",
                         "input", "output", "tools", "namespace", "server_label", "server_url",
                         "action", "operation", "text", "format", "approve",
                         "approval_request_id", "caller", "environment", "parameters"])
_TYPES = st.sampled_from(["message", "function_call", "function_call_output", "reasoning",
                          "custom_tool_call", "shell_call", "apply_patch_call", "mcp",
                          "mcp_approval_request", "mcp_approval_response", "namespace",
                          "function", "custom", "web_search", "shell", "output_text",
                          "input_text", "input_image", "item_reference", "program"])
_JSON = st.recursive(
    st.one_of(_SCALARS, _TYPES),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(_KEYS, st.one_of(inner, _TYPES), max_size=5)),
    max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(input=_JSON, tools=_JSON, extra=st.dictionaries(_KEYS, _JSON, max_size=3))
def test_any_request_shape_is_parsed_or_refused_precisely(input: Any, tools: Any,
                                                          extra: dict[str, Any]) -> None:
    body = {"model": "gpt-4o-mini", "input": input, "tools": tools, **extra}
    try:
        req = FMT.from_data(body)
    except AuthorityError as exc:
        assert exc.status_code in (400, 403) and exc.code
        return
    default_counter.count_request("gpt-4o-mini", req.count_body())


@pytest.mark.parametrize("label", [["docs"], {"docs": 1}, 7, None])
@pytest.mark.parametrize("kind", ["mcp_call", "mcp_list_tools", "mcp_approval_request"])
def test_an_mcp_item_whose_server_label_is_not_a_string_is_a_call_nobody_may_run(
        kind: str, label: Any) -> None:
    # A list here once raised TypeError (unhashable) in the reader: a 500 at both doors.
    req = parse(input="hi", tools=[{"type": "mcp", "server_label": "docs",
                                    "server_url": "https://x"}])
    a = FMT.answer_from(answer({"type": kind, "id": "m1", "server_label": label,
                                "name": "search", "arguments": "{}"}), req)
    [call] = a.calls
    assert call.problem and call.name == kind


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(output=st.lists(_JSON, max_size=5))
def test_any_answer_shape_is_gated_or_refused_as_malformed(output: list[Any]) -> None:
    req = parse(input="hi", tools=[{"type": "mcp", "server_label": "docs",
                                    "server_url": "https://x"}], stream=True)
    try:
        a = FMT.answer_from(answer(*output), req)
    except UpstreamError as exc:
        assert exc.code == "upstream_malformed_response"
        return
    outs = _gated(a, ["denied"] * len(a.calls))
    FMT.followups(a, outs, [])
    FMT.rewrite(a, outs, summary=None, structured_output=False)
    # and the same answer as a stream goes through the assembler the same way
    stream = FMT.assembler(req)
    for payload in events(answer(*output)):
        stream.feed(payload)
    assert stream.answer().calls == FMT.answer_from(answer(*output), req).calls
