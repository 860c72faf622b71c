"""OpenAI's Responses API (``POST /responses``) as a wire format of the engine.

The calls of an answer are its ``output`` items of type ``function_call`` and
``custom_tool_call``; any other item that is not a ``message`` or ``reasoning``
(app-executed built-ins, hosted tool calls, MCP requests, types this gateway
does not know) is a call the gateway cannot gate: it is withheld as denied
(``unsupported_call_type``). What could offer or produce a call outside the
request body is refused before the call: hosted and built-in tools, stored
prompts, ``background``, ``conversation`` and item references. A
``previous_response_id`` is accepted only for a response this gateway served to
the same key and environment (:mod:`..served`): its history is priced and the
outputs of its withheld calls are added to the next request.

Withheld items are removed from ``output`` (a ``reasoning`` item left with
nothing after it goes with them, so the next turn of a stateless client stays
valid); the answer gets ``authority`` with ``followup_items``: what an aware
app appends to its next ``input`` (each withheld call with its
``function_call_output``).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import approvals, served, strictjson
from ..effects import S
from ..errors import InvalidRequest, RequestDenied, UpstreamError
from ..records import ActionOutcome, ActionStatus
from .base import Answer, Call, ParsedRequest
from .chat import MAX_MODEL_CHARS, MAX_NAME_CHARS, followup_payload, summary_line
from .sse import sse

if TYPE_CHECKING:
    from ..effects import Decision

__all__ = ["BUILTIN_TOOLS", "HOSTED_TOOLS", "Responses", "ResponsesStream"]

# Tools the provider runs before anyone sees their calls: offered only where the policy
# allows them (environments.<env>.hosted_tools, by family); their result items are then
# part of the answer, not calls to gate. tool type -> family -> its result item type.
HOSTED_TOOLS = {"web_search": "web_search", "web_search_preview": "web_search",
                "web_search_2025_08_26": "web_search",
                "web_search_preview_2025_03_11": "web_search",
                "file_search": "file_search", "code_interpreter": "code_interpreter",
                "image_generation": "image_generation"}
_HOSTED_ITEMS = {"web_search_call": "web_search", "file_search_call": "file_search",
                 "code_interpreter_call": "code_interpreter",
                 "image_generation_call": "image_generation"}
# App-executed built-ins gated as actions named by their call's type, with its arguments
# (``shell`` only when the app runs it: with a hosted environment it runs at the provider).
BUILTIN_TOOLS = frozenset({"shell", "apply_patch"})
# call item type -> (the field holding its arguments, the item that answers it)
_BUILTIN_CALLS = {"shell_call": ("action", "shell_call_output"),
                  "apply_patch_call": ("operation", "apply_patch_call_output")}
_CALL_ITEMS = ("function_call", "custom_tool_call", *_BUILTIN_CALLS)
# Request fields that bring in calls, tools or history the gateway never saw.
_REFUSED_FIELDS = {
    "background": ("background_not_allowed", "'background' responses are fetched later "
                   "with GET /v1/responses/{id}, which the gateway does not gate"),
    "prompt": ("prompt_not_allowed", "a stored 'prompt' can carry tools and input the "
               "gateway never sees"),
    "conversation": ("conversation_not_allowed", "a 'conversation' holds items the gateway "
                     "never saw (its items API can add calls)"),
}
_OUTPUT_ITEMS = ("function_call_output", "custom_tool_call_output",
                 *(out for _, out in _BUILTIN_CALLS.values()))
# MCP items: what the provider ran (content) and the approvals the gateway decides.
_MCP_CONTENT = frozenset({"mcp_call", "mcp_list_tools"})
_PASS_INPUT = frozenset({"message", "reasoning", *_CALL_ITEMS, *_OUTPUT_ITEMS, *_MCP_CONTENT,
                         "mcp_approval_request", "mcp_approval_response"})


def _bad(message: str, code: str = "invalid_request") -> InvalidRequest:
    return InvalidRequest(message, code=code)


def _malformed(what: str) -> UpstreamError:
    return UpstreamError(f"the upstream answered with a malformed response: {what}",
                         code="upstream_malformed_response")


def _text_parts(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content in the chat shape the token counter reads."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of parts")
    parts: list[dict[str, Any]] = []
    for i, p in enumerate(content):
        if not isinstance(p, dict) or not isinstance(p.get("type"), str):
            raise _bad(f"{where}.content[{i}] must be an object with a 'type'")
        kind = p["type"]
        if kind in ("input_text", "output_text", "text", "refusal"):
            text = p.get("text", p.get("refusal"))
            if not isinstance(text, str):
                raise _bad(f"{where}.content[{i}].text must be a string")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image" and isinstance(p.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {
                "url": p["image_url"], "detail": p.get("detail") or "auto"}})
        else:
            # Files, stored images, audio: the counter cannot see them, and the cost
            # planner refuses what it cannot see.
            parts.append({"type": "file", "file": {k: v for k, v in p.items() if k != "type"}})
    return parts


def _call_message(item: dict[str, Any], where: str) -> dict[str, Any]:
    kind = item["type"]
    name, call_id = item.get("name", kind if kind in _BUILTIN_CALLS else None), \
        item.get("call_id")
    if not isinstance(name, str) or not isinstance(call_id, str):
        raise _bad(f"{where} needs a string 'name' and 'call_id'")
    if kind in _BUILTIN_CALLS:
        body: Any = json.dumps(item.get(_BUILTIN_CALLS[kind][0]))
    else:
        body = item.get("arguments") if kind == "function_call" else item.get("input")
    if not isinstance(body, str):
        raise _bad(f"{where}: its arguments (or input) must be a string")
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": call_id, "type": "function", "function": {"name": name, "arguments": body}}]}


def _output_message(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str):
        raise _bad(f"{where} needs a string 'call_id'")
    if item.get("type") == "shell_call_output":
        # Its output is a list of {stdout, stderr, outcome}: billed as the text it is.
        return {"role": "tool", "tool_call_id": call_id, "content": json.dumps(output)}
    if not isinstance(output, str | list):
        raise _bad(f"{where}.output must be a string or a list of parts")
    return {"role": "tool", "tool_call_id": call_id,
            "content": _text_parts(output, where)}


def _input_messages(data: dict[str, Any]) -> list[Any]:
    messages: list[Any] = []
    instructions = data.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("'instructions' must be a string")
        messages.append({"role": "system", "content": instructions})
    value = data.get("input")
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
        return messages
    if not isinstance(value, list) or not value:
        raise _bad("'input' is required: a string or a non-empty list of items")
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an object")
        kind = item.get("type", "message" if "role" in item else None)
        if not isinstance(kind, str):
            raise _bad(f"{where} needs a 'type' (or a 'role' for a message)")
        if kind == "item_reference":
            raise _bad(f"{where}: an 'item_reference' points at stored items the gateway "
                       "never saw; send the item itself", code="previous_response_unknown")
        if kind not in _PASS_INPUT:
            raise _bad(f"{where}: input items of type {kind[:64]!r} are not accepted by the "
                       "gateway", code="unsupported_input_item")
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str):
                raise _bad(f"{where}.role must be a string")
            messages.append({"role": role, "content": _text_parts(item.get("content"), where)})
        elif kind in _CALL_ITEMS:
            messages.append(_call_message(item, where))
        elif kind in _MCP_CONTENT or kind.startswith("mcp_approval_"):
            if kind == "mcp_approval_response" and (
                    not isinstance(item.get("approval_request_id"), str)
                    or not isinstance(item.get("approve"), bool)):
                raise _bad(f"{where} needs a string 'approval_request_id' and a boolean "
                           "'approve'")
            messages.append({"role": "assistant", "content": json.dumps(item)})
        elif kind == "reasoning":
            # Its summary (and any encrypted content) is billed as input again.
            messages.append({"role": "assistant", "content": json.dumps(
                [item.get("summary"), item.get("encrypted_content")])})
        else:
            messages.append(_output_message(item, where))
    return messages


def _mcp_server(where: str, t: dict[str, Any]) -> tuple[str, str]:
    """(server_label, the server as the policy names it), and every call it may make
    comes back for approval first: the gateway decides those (it forces
    ``require_approval: "always"``; ``allowed_tools`` and the rest stay as sent)."""
    label = t.get("server_label")
    if not isinstance(label, str) or not label or len(label) > MAX_NAME_CHARS:
        raise _bad(f"{where}.server_label must be a string of 1 to {MAX_NAME_CHARS} "
                   "characters")
    found = [(k, t.get(k)) for k in ("server_url", "connector_id", "tunnel_id")
             if t.get(k) is not None]
    if len(found) != 1 or not isinstance(found[0][1], str) or not found[0][1]:
        raise _bad(f"{where}: an MCP tool needs exactly one of server_url, connector_id or "
                   "tunnel_id, as a string")
    key, value = found[0][0], str(found[0][1])
    t["require_approval"] = "always"
    return label, value if key == "server_url" else f"{key.split('_')[0]}:{value}"


def _tools(data: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[Any] | None,
                                         list[str], dict[str, str]]:
    """Tool name -> declared schema, the tools in the chat shape for counting, the hosted
    tool families offered and the MCP servers (label -> server)."""
    tools = data.get("tools")
    if tools is None:
        return {}, None, [], {}
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list")
    schemas: dict[str, dict[str, Any]] = {}
    counted: list[Any] = []
    names: set[str] = set()
    hosted: list[str] = []
    mcp: dict[str, str] = {}
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("type"), str):
            raise _bad(f"tools[{i}] must be an object with a string 'type'")
        kind = t["type"]
        if kind == "mcp":
            label, server = _mcp_server(f"tools[{i}]", t)
            if label in mcp:
                raise _bad(f"tools[{i}]: the MCP server label {label!r} is used twice")
            mcp[label] = server
            counted.append({"type": "function", "function": {
                "name": "mcp_" + label, "description": json.dumps(t)}})
            continue
        if kind in HOSTED_TOOLS:
            # Billed by the provider as it runs them; admitted per environment.
            hosted.append(HOSTED_TOOLS[kind])
            counted.append({"type": "function", "function": {
                "name": kind, "description": json.dumps(t)}})
            continue
        env = t.get("environment")
        if kind in BUILTIN_TOOLS and (env is None or (isinstance(env, dict)
                                                       and env.get("type") == "local")):
            # The model knows these tools already: their definition costs no prompt here,
            # and their calls are actions named by the call's type.
            continue
        if kind == "namespace":
            ns, inner = t.get("name"), t.get("tools")
            if not isinstance(ns, str) or not ns or not isinstance(inner, list):
                raise _bad(f"tools[{i}]: a namespace needs a string 'name' and a list 'tools'")
            for j, sub in enumerate(inner):
                _declare(f"tools[{i}].tools[{j}]", sub, ns, schemas, counted, names)
            continue
        _declare(f"tools[{i}]", t, None, schemas, counted, names)
    return schemas, counted or None, sorted(set(hosted)), mcp


def _declare(where: str, t: Any, namespace: str | None, schemas: dict[str, dict[str, Any]],
             counted: list[Any], names: set[str]) -> None:
    """One function or custom tool; in a namespace its action name is ``namespace.name``."""
    kind = t.get("type") if isinstance(t, dict) else None
    if not isinstance(kind, str):
        raise _bad(f"{where} must be an object with a string 'type'")
    if kind not in ("function", "custom"):
        raise RequestDenied(
            f"{where}: the {kind[:64]!r} tool runs where the gateway cannot gate it (at the "
            "provider, or as a built-in it does not handle yet); offer function or custom "
            "tools instead", code="tool_not_allowed", decided_by="tools")
    callers = t.get("allowed_callers")
    if callers is not None and callers != ["direct"]:
        # A program the provider runs would call it: calls the app never sees first.
        raise RequestDenied(f"{where}: 'allowed_callers' other than ['direct'] lets a program "
                            "at the provider call the tool", code="tool_not_allowed",
                            decided_by="tools")
    name = t.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        raise _bad(f"{where}.name must be a string of 1 to {MAX_NAME_CHARS} characters")
    full = f"{namespace}.{name}" if namespace else name
    if full in names:
        raise _bad(f"{where}: the tool name {full!r} is declared twice")
    names.add(full)
    params = t.get("parameters")
    if kind == "function" and params is not None:
        if not isinstance(params, dict):
            raise _bad(f"{where}.parameters must be a JSON schema object")
        schemas[full] = params
    fn = {"name": full, "description": t.get("description") or ""}
    if kind == "function" and params is not None:
        fn["parameters"] = params
    elif kind == "custom" and t.get("format") is not None:
        fn["description"] += " " + json.dumps(t["format"])
    counted.append({"type": "function", "function": fn})


class ResponsesRequest(ParsedRequest):
    def count_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": self.prompt_messages}
        if self.prompt_tools:
            body["tools"] = self.prompt_tools
        choice = self.data.get("tool_choice")
        if isinstance(choice, dict) and isinstance(choice.get("name"), str):
            body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        elif isinstance(choice, str):
            body["tool_choice"] = choice
        return body


def _call_of(position: int, item: dict[str, Any], hosted: list[str],
             mcp: dict[str, str]) -> Call | None:
    kind = item.get("type")
    if kind in ("message", "reasoning"):
        return None
    if _HOSTED_ITEMS.get(str(kind)) in hosted:
        return None  # it ran at the provider, as the policy let the request offer it
    label = item.get("server_label")
    if kind in _MCP_CONTENT and label in mcp:
        return None  # a call the gateway approved, or the server's tool list
    if kind == "mcp_approval_request" and label in mcp:
        name, args, rid = item.get("name"), item.get("arguments"), item.get("id")
        if not isinstance(name, str) or not name or not isinstance(args, str) \
                or not isinstance(rid, str):
            return Call(0, position, "mcp_approval_request", rid if isinstance(rid, str)
                        else None, f"mcp.{label}", "", problem="the MCP approval request "
                        "needs a string id, name and arguments")
        return Call(0, position, "mcp_approval_request", rid, f"mcp.{label}.{name}", args)
    call_id = item.get("call_id") if isinstance(item.get("call_id"), str) else None
    if kind == "function_call":
        name, args = item.get("name"), item.get("arguments")
        if not isinstance(name, str) or not name:
            return Call(0, position, "function_call", call_id, "", "",
                        problem="the function call's name is not a string")
        ns = item.get("namespace")
        if ns is not None:
            if not isinstance(ns, str) or not ns:
                return Call(0, position, "function_call", call_id, name, "",
                            problem="the function call's namespace is not a string")
            name = f"{ns}.{name}"  # one name in two namespaces is two action types
        if not isinstance(args, str):
            return Call(0, position, "function_call", call_id, name, "",
                        problem="the function call's arguments are not a JSON string")
        if call_id is None:
            return Call(0, position, "function_call", None, name, args,
                        problem="the function call has no string 'call_id'")
        caller = item.get("caller")
        if caller is not None and not (isinstance(caller, dict)
                                       and caller.get("type") == "direct"):
            return Call(0, position, "function_call", call_id, name, args,
                        problem="a call made by a program at the provider, not by the model",
                        problem_code="unsupported_call_type")
        return Call(0, position, "function_call", call_id, name, args)
    if kind in _BUILTIN_CALLS:
        field = _BUILTIN_CALLS[kind][0]
        args = item.get(field)
        if not isinstance(args, dict) or call_id is None:
            return Call(0, position, kind, call_id, kind, "",
                        problem=f"the {kind} needs an object '{field}' and a string call_id")
        commands = args.get("commands")
        if kind == "shell_call" and isinstance(commands, list) \
                and all(isinstance(c, str) for c in commands):
            # One string to match a rule's glob or regex against, as well as the list.
            args = {**args, "command": "\n".join(commands)}
        return Call(0, position, kind, call_id, kind, json.dumps(args))
    if kind == "custom_tool_call":
        name, text = item.get("name"), item.get("input")
        if not isinstance(name, str) or not name or not isinstance(text, str) \
                or call_id is None:
            return Call(0, position, "custom", call_id, name if isinstance(name, str) else "",
                        "", problem="the custom tool call needs a string name, input and "
                        "call_id")
        return Call(0, position, "custom", call_id, name, json.dumps({"input": text}))
    shown = str(kind)[:64]
    return Call(0, position, shown, call_id, shown, "",
                problem=f"output items of type {shown!r} are calls the gateway cannot gate",
                problem_code="unsupported_call_type")


def _output_item(kind: str, call_id: str, text: str, status: str) -> dict[str, Any]:
    """The item that answers a withheld call of type ``kind`` with the gateway's word."""
    if kind == "shell_call":
        ok = status in (ActionStatus.EXECUTED, ActionStatus.SIMULATED)
        return {"type": "shell_call_output", "call_id": call_id, "output": [{
            "stdout": text if ok else "", "stderr": "" if ok else text,
            "outcome": {"type": "exit", "exit_code": 0 if ok else 1}}]}
    if kind == "apply_patch_call":
        return {"type": "apply_patch_call_output", "call_id": call_id, "output": text,
                "status": "completed" if status == ActionStatus.EXECUTED else "failed"}
    out = "function_call_output" if kind == "function_call" else "custom_tool_call_output"
    return {"type": out, "call_id": call_id, "output": text}


def _approval_response(o: ActionOutcome) -> dict[str, Any] | None:
    """The gateway's answer to an MCP approval request: the policy's decision, or None
    while a person has yet to decide."""
    if o.status == ActionStatus.PENDING_APPROVAL:
        return None
    ok = o.status == ActionStatus.ALLOWED
    out: dict[str, Any] = {"type": "mcp_approval_response",
                           "approval_request_id": o.tool_call["id"], "approve": ok}
    if not ok:
        out["reason"] = (o.reason or o.status)[:500]
    return out


def _answered(item: Any) -> str | None:
    """The call (or approval request) an input item answers, if it answers one."""
    if not isinstance(item, dict):
        return None
    if item.get("type") == "mcp_approval_response":
        rid = item.get("approval_request_id")
    elif item.get("type") in _OUTPUT_ITEMS:
        rid = item.get("call_id")
    else:
        return None
    return rid if isinstance(rid, str) else None


def _as_items(value: Any) -> list[Any]:
    """A request's ``input`` as the items ``input_items`` lists."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": value}]}]
    return list(value) if isinstance(value, list) else []


def _summary_item(text: str, rid: Any) -> dict[str, Any]:
    return {"type": "message", "id": f"msg_authority_{rid}", "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _withheld_positions(output: list[Any], outcomes: list[ActionOutcome]) -> set[int]:
    """The items to remove: every call not allowed, and a reasoning item whose following
    items (up to the next reasoning item) are all removed: upstream refuses a reasoning
    item without its following item."""
    gone = {o.position for o in outcomes if o.status != ActionStatus.ALLOWED
            or o.call_kind == "mcp_approval_request"}
    for i, item in enumerate(output):
        if item.get("type") != "reasoning":
            continue
        group: list[int] = []
        for j in range(i + 1, len(output)):
            if output[j].get("type") == "reasoning":
                break
            group.append(j)
        if group and all(j in gone for j in group):
            gone.add(i)
    return gone


class Responses:
    name = "responses"
    path = "/responses"
    followups_field = "followup_items"

    # -- requests ---------------------------------------------------------------------

    def parse(self, body: bytes) -> ParsedRequest:
        try:
            data = strictjson.loads(body)
        except strictjson.StrictJSONError as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
        return self.from_data(data)

    def from_data(self, data: Any) -> ParsedRequest:
        if not isinstance(data, dict):
            raise _bad("the request body must be a JSON object")
        model = data.get("model")
        if not isinstance(model, str) or not model or len(model) > MAX_MODEL_CHARS:
            raise _bad(f"'model' is required: a string of 1 to {MAX_MODEL_CHARS} characters")
        for name, (code, why) in _REFUSED_FIELDS.items():
            value = data.get(name)
            if value is not None and value is not False:
                raise _bad(f"'{name}' is not accepted by the gateway: {why}", code=code)
        prev = data.get("previous_response_id")
        if prev is not None and (not isinstance(prev, str) or not prev
                                 or len(prev) > served.MAX_ID_CHARS):
            raise _bad(f"'previous_response_id' must be a string of 1 to {served.MAX_ID_CHARS} "
                       "characters")
        messages = _input_messages(data)
        schemas, counted, hosted, mcp = _tools(data)
        stream = data.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise _bad("'stream' must be true or false")
        limit = data.get("max_output_tokens")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit <= 0):
            raise _bad("'max_output_tokens' must be a positive integer")
        choice = data.get("tool_choice")
        if choice is not None and not isinstance(choice, str | dict):
            raise _bad("'tool_choice' must be a string or an object")
        if isinstance(choice, dict) and choice.get("type") not in (
                "function", "custom", "allowed_tools") and HOSTED_TOOLS.get(
                str(choice.get("type"))) not in hosted:
            raise RequestDenied("'tool_choice' forces a tool the gateway cannot gate",
                                code="tool_not_allowed", decided_by="tools")
        text = data.get("text")
        if text is not None and not isinstance(text, dict):
            raise _bad("'text' must be an object")
        fmt = (text or {}).get("format")
        structured = isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object")
        return ResponsesRequest(
            data=data, model=model, stream=bool(stream), n=1, explicit_limit=limit,
            limit_field="max_output_tokens", tool_schemas=schemas,
            structured_output=structured, prompt_messages=messages, prompt_tools=counted,
            client_wants_usage=True, hosted_tools=hosted, mcp_servers=mcp,
            rewritten=bool(mcp))

    def upstream_body(self, req: ParsedRequest, original: bytes, changed: bool) -> bytes:
        # The usage always comes in the final event: nothing to ask for.
        return json.dumps(req.data).encode() if changed else original

    # -- server-side history ----------------------------------------------------------

    def prepare_d(self, req: ParsedRequest, *, caller: str,
                  environment: str) -> Decision[None]:
        """A continuation (``previous_response_id``) of a response served here, to this key
        and environment: its context is priced, and the outputs of the calls it withheld
        are added where the app did not answer them (it never saw those calls, but the
        provider's stored response still holds them)."""
        prev = req.data.get("previous_response_id")
        if prev is None:
            return
        record = yield from served.lookup_d(prev, caller=caller, environment=environment)
        req.history_tokens = int(record.get("context_tokens") or 0)
        value = req.data["input"]
        items = [{"role": "user", "content": value}] if isinstance(value, str) else list(value)
        # Withheld items the provider already holds: an aware app may send them back.
        stored = set(record.get("withheld_ids") or [])
        kept = [i for i in items if not (isinstance(i.get("id"), str) and i["id"] in stored
                                         and i.get("type") not in _OUTPUT_ITEMS)]
        answered = {_answered(i) for i in kept} - {None}
        missing = [copy.deepcopy(o) for o in record.get("outputs") or []
                   if _answered(o) not in answered]
        for held in record.get("pending_approvals") or []:
            # An MCP call held for a person: answered once decided, left open till then.
            if held["approval_request_id"] in answered:
                continue
            approval = yield S.approval_get(held["approval_id"])
            status = (approval or {}).get("status")
            if approval is not None and approvals.is_overdue(approval, time.time()):
                status = "expired"
            if status in ("approved", "executed"):
                missing.append({"type": "mcp_approval_response", "approve": True,
                                "approval_request_id": held["approval_request_id"]})
            elif status not in ("pending", None):
                missing.append({"type": "mcp_approval_response", "approve": False,
                                "approval_request_id": held["approval_request_id"],
                                "reason": f"the approval is {status}"})
        if missing or len(kept) != len(items):
            req.data["input"] = [*missing, *kept]
            req.prompt_messages = [*req.prompt_messages,
                                   *({"role": "tool", "content": json.dumps(o)}
                                     for o in missing)]
            req.rewritten = True

    def record_d(self, req: ParsedRequest, answer: Answer, authority: dict[str, Any], *,
                 caller: str, environment: str, ttl_s: float) -> Decision[None]:
        usage = answer.body.get("usage")
        counts: list[Any] = [usage.get(k) for k in ("input_tokens", "output_tokens")] \
            if isinstance(usage, dict) else []
        if len(counts) == 2 and all(type(c) is int and c >= 0 for c in counts):
            context = int(sum(counts))
        else:  # no usage to trust: a generous count of what it said
            context = len(json.dumps(answer.body.get("output"))) // 2
        followups = authority.get(self.followups_field) or []
        yield from served.record_d(
            {**answer.body, "authority": authority}, caller=caller, environment=environment,
            request_id=authority["request_id"], context_tokens=context,
            input_items=_as_items(req.data.get("input")),
            outputs=[f for f in followups if _answered(f) is not None],
            withheld_ids=[f["id"] for f in followups
                          if _answered(f) is None and isinstance(f.get("id"), str)],
            pending_approvals=[
                {"approval_request_id": a["tool_call"]["id"], "approval_id": a["approval_id"]}
                for a in authority.get("actions") or []
                if a.get("status") == ActionStatus.PENDING_APPROVAL and a.get("approval_id")
                and (a.get("tool_call") or {}).get("id")
                and str(a.get("action_type", "")).startswith("mcp.")],
            ttl_s=ttl_s)

    # -- answers ----------------------------------------------------------------------

    def read_answer(self, body: bytes, req: ParsedRequest | None = None) -> Answer:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise _malformed("not JSON") from None
        return self.answer_from(data, req)

    def answer_from(self, data: Any, req: ParsedRequest | None = None) -> Answer:
        if not isinstance(data, dict):
            raise _malformed("not a JSON object")
        output = data.get("output")
        if not isinstance(output, list):
            raise _malformed("'output' is missing or not a list")
        calls: list[Call] = []
        for pos, item in enumerate(output):
            if not isinstance(item, dict) or not isinstance(item.get("type"), str):
                raise _malformed(f"output[{pos}] is not an object with a string 'type'")
            if item["type"] == "message" and not isinstance(item.get("content"), list):
                raise _malformed(f"output[{pos}].content is not a list")
            call = _call_of(pos, item, req.hosted_tools if req is not None else [],
                            req.mcp_servers if req is not None else {})
            if call is not None:
                calls.append(call)
        return Answer(data, calls, _chat_usage(data.get("usage")))

    def rewrite(self, answer: Answer, outcomes: list[ActionOutcome], *,
                summary: str | None, structured_output: bool) -> None:
        output = answer.body["output"]
        gone = _withheld_positions(output, outcomes)
        if not gone:
            return
        answer.body["output"] = [item for i, item in enumerate(output) if i not in gone]
        if not structured_output:
            # Libraries that drop unknown fields still keep a record of what happened.
            withheld = [o for o in outcomes if o.status != ActionStatus.ALLOWED]
            answer.body["output"].append(_summary_item(summary_line(withheld),
                                                       answer.body.get("id")))

    def followups(self, answer: Answer, outcomes: list[ActionOutcome],
                  redact_names: list[str]) -> list[dict[str, Any]]:
        """Each withheld function or custom call (after its reasoning item, if that was
        withheld too) with its output: appended to the next ``input`` by a stateless app,
        they keep the pairing rules; allowed calls are the app's to answer."""
        output = answer.body["output"]
        gone = _withheld_positions(output, outcomes)
        by_pos = {o.position: o for o in outcomes}
        items: list[dict[str, Any]] = []
        pending_reasoning: dict[str, Any] | None = None
        for i, item in enumerate(output):
            if i not in gone:
                continue
            if item.get("type") == "reasoning":
                pending_reasoning = item
                continue
            o = by_pos.get(i)
            if o is not None and o.call_kind == "mcp_approval_request" \
                    and o.tool_call["id"] is not None:
                decided = _approval_response(o)
                if decided is not None:  # pending: answered once a person decides
                    items += [copy.deepcopy(item), decided]
                continue
            if o is None or item.get("type") not in _CALL_ITEMS or o.tool_call["id"] is None:
                continue  # a shape the app never sees and cannot answer
            if pending_reasoning is not None:
                items.append(copy.deepcopy(pending_reasoning))
                pending_reasoning = None
            items.append(copy.deepcopy(item))
            items.append(_output_item(item["type"], o.tool_call["id"], json.dumps(
                followup_payload(o, redact_names), default=str), o.status))
        return items

    # -- streams ----------------------------------------------------------------------

    def assembler(self, req: ParsedRequest) -> ResponsesStream:
        return ResponsesStream(self, req)

    def synthesise_stream(self, body: dict[str, Any]) -> Iterator[bytes]:
        seq = _Sequence()
        created = {**body, "status": "in_progress", "output": [], "usage": None}
        created.pop("authority", None)
        yield seq.event({"type": "response.created", "response": created})
        for i, item in enumerate(body.get("output") or []):
            yield from item_events(seq, i, item)
        yield seq.event({"type": _final_type(body), "response": body})


def _chat_usage(usage: Any) -> dict[str, Any] | None:
    """The Responses usage in the chat shape the pricing reads."""
    if not isinstance(usage, dict):
        return None
    out: dict[str, Any] = {"prompt_tokens": usage.get("input_tokens"),
                           "completion_tokens": usage.get("output_tokens"),
                           "total_tokens": usage.get("total_tokens")}
    details = usage.get("input_tokens_details")
    if isinstance(details, dict):
        out["prompt_tokens_details"] = {"cached_tokens": details.get("cached_tokens")}
    details = usage.get("output_tokens_details")
    if isinstance(details, dict):
        out["completion_tokens_details"] = {"reasoning_tokens": details.get("reasoning_tokens")}
    return out


def _final_type(body: dict[str, Any]) -> str:
    return "response.incomplete" if body.get("status") == "incomplete" else "response.completed"


class _Sequence:
    """The stream's ``sequence_number``: increasing over every event the client gets."""

    def __init__(self) -> None:
        self.n = 0

    def event(self, obj: dict[str, Any]) -> bytes:
        obj["sequence_number"] = self.n
        self.n += 1
        return sse(obj)


def item_events(seq: _Sequence, index: int, item: dict[str, Any]) -> Iterator[bytes]:
    """One finished output item as the events that stream it (its place in ``output``)."""
    kind = item.get("type")
    iid = item.get("id")
    base = {"item_id": iid, "output_index": index}
    if kind == "function_call":
        yield seq.event({"type": "response.output_item.added", "output_index": index,
                         "item": {**item, "arguments": "", "status": "in_progress"}})
        args = item.get("arguments") or ""
        yield seq.event({"type": "response.function_call_arguments.delta", **base,
                         "delta": args})
        yield seq.event({"type": "response.function_call_arguments.done", **base,
                         "arguments": args, "name": item.get("name")})
    elif kind == "custom_tool_call":
        yield seq.event({"type": "response.output_item.added", "output_index": index,
                         "item": {**item, "input": ""}})
        text = item.get("input") or ""
        yield seq.event({"type": "response.custom_tool_call_input.delta", **base,
                         "delta": text})
        yield seq.event({"type": "response.custom_tool_call_input.done", **base,
                         "input": text})
    elif kind == "message":
        yield seq.event({"type": "response.output_item.added", "output_index": index,
                         "item": {**item, "content": [], "status": "in_progress"}})
        for ci, part in enumerate(item.get("content") or []):
            where = {**base, "content_index": ci}
            if not isinstance(part, dict) or part.get("type") != "output_text":
                yield seq.event({"type": "response.content_part.added", **where,
                                 "part": part})
                yield seq.event({"type": "response.content_part.done", **where,
                                 "part": part})
                continue
            text = part.get("text") or ""
            yield seq.event({"type": "response.content_part.added", **where,
                             "part": {**part, "text": ""}})
            yield seq.event({"type": "response.output_text.delta", **where, "delta": text,
                             "logprobs": []})
            yield seq.event({"type": "response.output_text.done", **where, "text": text,
                             "logprobs": []})
            yield seq.event({"type": "response.content_part.done", **where, "part": part})
    else:
        yield seq.event({"type": "response.output_item.added", "output_index": index,
                         "item": item})
    yield seq.event({"type": "response.output_item.done", "output_index": index,
                     "item": item})


class ResponsesStream:
    """Events of ``message`` items pass through as they arrive; from the first item of any
    other type (a call, reasoning, a type unknown here) every event is held until
    ``response.completed``, whose response is the answer gated. The held part is then
    streamed again from the rewritten answer: a withheld item has no event at all, later
    items are renumbered and ``sequence_number`` keeps increasing."""

    def __init__(self, fmt: Responses, req: ParsedRequest) -> None:
        self.fmt = fmt
        self.req = req
        self.seq = _Sequence()
        self.kinds: list[str] = []  # the type of each output item announced so far
        self.hold_from: int | None = None
        self.final: dict[str, Any] | None = None
        self.finished = False

    def feed(self, payload: str) -> list[bytes]:
        if payload.strip() == "[DONE]":
            self.finished = True
            return []
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):
            raise _malformed("a stream event is not JSON") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise _malformed("a stream event is not an object with a 'type'")
        kind = event["type"]
        if kind in ("error", "response.failed"):
            err = event.get("error") or (event.get("response") or {}).get("error")
            msg = err.get("message", "error") if isinstance(err, dict) else str(err)
            raise UpstreamError(f"the upstream failed mid-stream: {str(msg)[:500]}")
        if kind in ("response.completed", "response.incomplete"):
            if not isinstance(event.get("response"), dict):
                raise _malformed(f"'{kind}' carries no response")
            self.final = event["response"]
            self.finished = True
            return []
        if kind in ("response.created", "response.in_progress", "response.queued"):
            return [self.seq.event({k: v for k, v in event.items()
                                    if k != "sequence_number"})]
        index = event.get("output_index")
        if isinstance(index, bool) or not isinstance(index, int):
            return []  # an event about nothing the client needs: not passed on
        if kind == "response.output_item.added":
            item = event.get("item")
            if index != len(self.kinds) or not isinstance(item, dict):
                raise _malformed("output items were announced out of order")
            self.kinds.append(str(item.get("type")))
            if item.get("type") != "message" and self.hold_from is None:
                self.hold_from = index
        elif not 0 <= index < len(self.kinds):
            raise _malformed("an event refers to an output item never announced")
        if self.hold_from is not None and index >= self.hold_from:
            return []
        return [self.seq.event({k: v for k, v in event.items() if k != "sequence_number"})]

    def answer(self) -> Answer:
        if self.final is None:
            raise _malformed("the stream ended before 'response.completed'")
        answer = self.fmt.answer_from(self.final, self.req)
        passed = len(self.kinds) if self.hold_from is None else self.hold_from
        output = answer.body["output"]
        if len(output) < passed or any(output[i].get("type") != "message"
                                       for i in range(passed)):
            # What was streamed must be what is gated: a final response that disagrees
            # with its own events is refused.
            raise _malformed("'response.completed' disagrees with the streamed items")
        return answer

    def closing(self, answer: Answer, authority: dict[str, Any]) -> list[bytes]:
        body = answer.body
        body["authority"] = authority
        passed = len(self.kinds) if self.hold_from is None else self.hold_from
        out: list[bytes] = []
        for i, item in enumerate(body["output"]):
            if i >= passed:
                out.extend(item_events(self.seq, i, item))
        out.append(self.seq.event({"type": _final_type(body), "response": body}))
        return out
