"""Requests of the Responses API, parsed strictly: what the engine prices and decides on.

The vocabulary of items and tools is defined here once: which tools the provider runs
(admitted per environment), which built-ins the app runs (their calls are actions),
which calls answer which outputs. A request that would bring in calls, tools or
history the gateway never saw is refused here; hosted tools and MCP servers are
named for the policy to admit (:mod:`..admission`).
"""

from __future__ import annotations

import json
from typing import Any

from .. import served
from ..errors import InvalidRequest, RequestDenied
from ..wire import MAX_TOKENS
from .base import ParsedRequest
from .chat import MAX_MODEL_CHARS, MAX_NAME_CHARS

__all__ = ["BUILTIN_CALLS", "BUILTIN_TOOLS", "CALL_ITEMS", "COMPUTER_TOOLS", "HOSTED_ITEMS",
           "HOSTED_TOOLS", "MCP_CONTENT", "OUTPUT_ITEMS", "ResponsesRequest", "builtin_arguments",
           "output_call_id", "parse_request"]

# Tools the provider runs before anyone sees their calls: offered only where the policy
# allows them (environments.<env>.hosted_tools, by family); their result items are then
# part of the answer, not calls to gate. tool type -> family -> its result item type.
HOSTED_TOOLS = {"web_search": "web_search", "web_search_preview": "web_search",
                "web_search_2025_08_26": "web_search",
                "web_search_preview_2025_03_11": "web_search",
                "file_search": "file_search", "code_interpreter": "code_interpreter",
                "image_generation": "image_generation"}
HOSTED_ITEMS = {"web_search_call": "web_search", "file_search_call": "file_search",
                 "code_interpreter_call": "code_interpreter",
                 "image_generation_call": "image_generation"}
# App-executed built-ins gated as actions named by their call's type, with its arguments
# (``shell`` only when the app runs it: with a hosted environment it runs at the provider).
BUILTIN_TOOLS = frozenset({"shell", "apply_patch", "local_shell"})
# The computer tool's 'environment' names a display ("browser", "linux"…), never a host.
COMPUTER_TOOLS = frozenset({"computer", "computer_use_preview"})
# call item type -> (the field holding its arguments, the item that answers it)
BUILTIN_CALLS = {"shell_call": ("action", "shell_call_output"),
                  "apply_patch_call": ("operation", "apply_patch_call_output"),
                  "local_shell_call": ("action", "local_shell_call_output"),
                  "computer_call": ("action", "computer_call_output")}
CALL_ITEMS = ("function_call", "custom_tool_call", *BUILTIN_CALLS)
# Request fields that bring in calls, tools or history the gateway never saw.
_REFUSED_FIELDS = {
    "background": ("background_not_allowed", "'background' responses are fetched later "
                   "with GET /v1/responses/{id}, which the gateway does not gate"),
    "prompt": ("prompt_not_allowed", "a stored 'prompt' can carry tools and input the "
               "gateway never sees"),
    "conversation": ("conversation_not_allowed", "a 'conversation' holds items the gateway "
                     "never saw (its items API can add calls)"),
}
OUTPUT_ITEMS = ("function_call_output", "custom_tool_call_output",
                 *(out for _, out in BUILTIN_CALLS.values()))
# MCP items: what the provider ran (content) and the approvals the gateway decides.
MCP_CONTENT = frozenset({"mcp_call", "mcp_list_tools"})
_PASS_INPUT = frozenset({"message", "reasoning", *CALL_ITEMS, *OUTPUT_ITEMS, *MCP_CONTENT,
                         "mcp_approval_request", "mcp_approval_response"})


def _bad(message: str, code: str = "invalid_request") -> InvalidRequest:
    return InvalidRequest(message, code=code)


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


def builtin_arguments(item: dict[str, Any]) -> dict[str, Any] | None:
    """An app-run built-in call's arguments as one object for the policy's rules, or None
    where its shape is not one."""
    kind = item.get("type")
    if kind == "computer_call":
        # One action, or a batch of them (newer models); the provider's safety checks
        # go with them, so a rule can hold what it flagged.
        args: dict[str, Any] = {k: item[k] for k in ("action", "actions")
                                if item.get(k) is not None}
        if not (isinstance(args.get("action"), dict) or isinstance(args.get("actions"), list)):
            return None
        checks = item.get("pending_safety_checks") or []
        args["safety_checks"] = [c.get("code") for c in checks if isinstance(c, dict)] \
            if isinstance(checks, list) else ["unreadable"]
        return args
    value = item.get(BUILTIN_CALLS[str(kind)][0])
    if not isinstance(value, dict):
        return None
    commands = value.get("commands") if kind == "shell_call" else value.get("command") \
        if kind == "local_shell_call" else None
    if isinstance(commands, list) and all(isinstance(c, str) for c in commands):
        # One string to match a rule's glob or regex against, as well as the list.
        sep = "\n" if kind == "shell_call" else " "
        value = {**value, "command_line" if kind == "local_shell_call" else "command":
                 sep.join(commands)}
    return value


def output_call_id(item: dict[str, Any]) -> Any:
    """The call an output item answers (a local shell output names it by ``id``)."""
    if item.get("type") == "local_shell_call_output" and item.get("call_id") is None:
        return item.get("id")
    return item.get("call_id")


def _call_message(item: dict[str, Any], where: str) -> dict[str, Any]:
    kind = item["type"]
    name, call_id = item.get("name", kind if kind in BUILTIN_CALLS else None), \
        item.get("call_id")
    if not isinstance(name, str) or not isinstance(call_id, str):
        raise _bad(f"{where} needs a string 'name' and 'call_id'")
    if kind in BUILTIN_CALLS:
        body: Any = json.dumps(builtin_arguments(item))
    else:
        body = item.get("arguments") if kind == "function_call" else item.get("input")
    if not isinstance(body, str):
        raise _bad(f"{where}: its arguments (or input) must be a string")
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": call_id, "type": "function", "function": {"name": name, "arguments": body}}]}


def _output_message(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, output = output_call_id(item), item.get("output")
    if not isinstance(call_id, str):
        raise _bad(f"{where} needs a string 'call_id'")
    if item.get("type") == "computer_call_output":
        # A screenshot, billed as the image it is; one stored as a file the planner
        # cannot see, so it refuses to guess.
        if not isinstance(output, dict) or output.get("type") != "computer_screenshot":
            raise _bad(f"{where}.output must be a computer_screenshot object")
        url = output.get("image_url")
        part: dict[str, Any] = {"type": "image_url", "image_url": {"url": url,
                                                                   "detail": "auto"}} \
            if isinstance(url, str) else {"type": "file", "file": {
                k: v for k, v in output.items() if k != "type"}}
        return {"role": "tool", "tool_call_id": call_id, "content": [part]}
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
        elif kind in CALL_ITEMS:
            messages.append(_call_message(item, where))
        elif kind in MCP_CONTENT or kind.startswith("mcp_approval_"):
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
        if kind in COMPUTER_TOOLS:
            # Its display size is part of the prompt the provider bills.
            counted.append({"type": "function", "function": {
                "name": kind, "description": json.dumps(t)}})
            continue
        if kind in BUILTIN_TOOLS and (env is None or (isinstance(env, dict)
                                                       and env.get("type") == "local")):
            # The model knows these tools already: their definition costs no prompt here,
            # and their calls are actions named by the call's type.
            continue
        if kind == "namespace":
            ns, inner = t.get("name"), t.get("tools")
            if not isinstance(ns, str) or not ns or len(ns) > MAX_NAME_CHARS \
                    or not isinstance(inner, list):
                raise _bad(f"tools[{i}]: a namespace needs a 'name' of 1 to {MAX_NAME_CHARS} "
                           "characters and a list 'tools'")
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
    description = t.get("description")
    if description is not None and not isinstance(description, str):
        raise _bad(f"{where}.description must be a string")
    fn = {"name": full, "description": description or ""}
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


def parse_request(data: Any) -> ParsedRequest:
    """Strictly parse and validate a request body already read as JSON."""
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
                              or not 0 < limit <= MAX_TOKENS):
        raise _bad(f"'max_output_tokens' must be a positive integer of at most {MAX_TOKENS}")
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
