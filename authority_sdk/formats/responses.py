"""OpenAI's Responses API (``POST /responses``) as a wire format of the engine.

Requests are parsed in :mod:`.responses_request`, streams gated in
:mod:`.responses_stream`; here: the calls of an answer, its rewrite, the follow-ups,
and the server-side history.

The calls of an answer are its ``output`` items of type ``function_call`` (a
``namespace`` is part of the name), ``custom_tool_call``, the app-run built-ins
(``shell_call``, ``apply_patch_call``) and, for an MCP server the request offered,
``mcp_approval_request``. The results of hosted tools and MCP servers the request
offered are part of the answer. Any other item that is not a ``message`` or
``reasoning`` is a call the gateway cannot gate: withheld as denied
(``unsupported_call_type``). A ``previous_response_id`` is accepted only for a
response this gateway served to the same key and environment (:mod:`..served`):
its history is priced and the answers to its withheld calls are added to the next
request.

Withheld items are removed from ``output`` (a ``reasoning`` item left with nothing
after it goes with them, so the next turn of a stateless client stays valid); the
answer gets ``authority`` with ``followup_items``: what an aware app appends to its
next ``input`` (each withheld call with its answer).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import approvals, held_turns, served
from ..effects import S
from ..records import ActionOutcome, ActionStatus
from ..strictjson import MAX_DEPTH, depth_ok
from ..wire import MAX_TOKENS, copy_json, token_count
from .base import Answer, Call, ParsedRequest, load_body
from .chat import followup_payload, summary_line
from .responses_request import (
    BUILTIN_CALLS,
    CALL_ITEMS,
    HOSTED_ITEMS,
    MCP_CONTENT,
    OUTPUT_ITEMS,
    builtin_arguments,
    output_call_id,
    parse_request,
)
from .responses_stream import EventSequence, ResponsesStream, final_type, item_events, malformed

if TYPE_CHECKING:
    from ..effects import Decision

__all__ = ["Responses", "ResponsesStream"]


def _program_caller(item: dict[str, Any]) -> str | None:
    """Why a call its ``caller`` says a program at the provider made cannot be gated."""
    caller = item.get("caller")
    if caller is not None and not (isinstance(caller, dict) and caller.get("type") == "direct"):
        return "a call made by a program at the provider, not by the model"
    return None


def _call_of(position: int, item: dict[str, Any], hosted: list[str],
             mcp: dict[str, str]) -> Call | None:
    kind = item.get("type")
    if kind in ("message", "reasoning"):
        return None
    if HOSTED_ITEMS.get(str(kind)) in hosted:
        return None  # it ran at the provider, as the policy let the request offer it
    label = item.get("server_label")
    if not isinstance(label, str):
        label = None  # the model's to spell: a list here is no server of the request
    if kind in MCP_CONTENT and label in mcp:
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
        problem = _program_caller(item)
        return Call(0, position, "function_call", call_id, name, args, problem=problem,
                    problem_code="unsupported_call_type" if problem else None)
    if kind in BUILTIN_CALLS:
        field = BUILTIN_CALLS[kind][0]
        args = builtin_arguments(item)
        if args is None or call_id is None:
            return Call(0, position, kind, call_id, kind, "",
                        problem=f"the {kind} needs an object '{field}' and a string call_id")
        return Call(0, position, kind, call_id, kind, json.dumps(args))
    if kind == "custom_tool_call":
        name, text = item.get("name"), item.get("input")
        if not isinstance(name, str) or not name or not isinstance(text, str) \
                or call_id is None:
            return Call(0, position, "custom", call_id, name if isinstance(name, str) else "",
                        "", problem="the custom tool call needs a string name, input and "
                        "call_id")
        ns = item.get("namespace")
        if ns is not None:  # as for a function call: one name in two namespaces is two actions
            if not isinstance(ns, str) or not ns:
                return Call(0, position, "custom", call_id, name, "",
                            problem="the custom tool call's namespace is not a string")
            name = f"{ns}.{name}"
        problem = _program_caller(item)
        return Call(0, position, "custom", call_id, name, json.dumps({"input": text}),
                    problem=problem, problem_code="unsupported_call_type" if problem else None)
    shown = str(kind)[:64]
    return Call(0, position, shown, call_id, shown, "",
                problem=f"output items of type {shown!r} are calls the gateway cannot gate",
                problem_code="unsupported_call_type")


# A 1x1 white PNG: the only answer a withheld computer call can be given.
BLANK_SCREENSHOT = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAA"
                    "CklEQVR4nGP4DwABAQEAsTj2FAAAAABJRU5ErkJggg==")
_NOTE = "[authority] "
# Output items whose 'output' is the gateway's word as text (held_turns refreshes it).
_TEXT_OUTPUTS = ("function_call_output", "custom_tool_call_output", "local_shell_call_output",
                 "apply_patch_call_output")


def computer_note(call_id: str, said: str) -> dict[str, Any]:
    """The gateway's word on a withheld computer call, after its blank screenshot."""
    return {"type": "message", "role": "developer", "content": [
        {"type": "input_text", "text": f"{_NOTE}computer call {call_id} was not run by the "
                                       f"app: {said}"}]}


def _is_note(item: dict[str, Any]) -> bool:
    content = item.get("content")
    return (item.get("type") == "message" and item.get("role") == "developer"
            and isinstance(content, list) and len(content) == 1
            and str(content[0].get("text", "")).startswith(_NOTE))


def _output_item(kind: str, call_id: str, text: str, status: str) -> dict[str, Any]:
    """The item that answers a withheld call of type ``kind`` with the gateway's word."""
    if kind == "shell_call":
        ok = status in (ActionStatus.EXECUTED, ActionStatus.SIMULATED)
        return {"type": "shell_call_output", "call_id": call_id, "output": [{
            "stdout": text if ok else "", "stderr": "" if ok else text,
            "outcome": {"type": "exit", "exit_code": 0 if ok else 1}}]}
    if kind == "local_shell_call":
        return {"type": "local_shell_call_output", "id": call_id, "output": text}
    if kind == "computer_call":
        # Its answer can only be a screenshot: a blank one, and the gateway's word follows
        # as a note (computer_note), so the model is not told the action happened.
        return {"type": "computer_call_output", "call_id": call_id,
                "output": {"type": "computer_screenshot", "image_url": BLANK_SCREENSHOT}}
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
    elif item.get("type") in OUTPUT_ITEMS:
        rid = output_call_id(item)
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
        data = load_body(body)
        return self.from_data(data)

    def from_data(self, data: Any) -> ParsedRequest:
        return parse_request(data)

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
        if prev is not None:
            yield from self._continue_d(req, prev, caller=caller, environment=environment)
        yield from self._refresh_held_d(req, caller=caller, environment=environment)

    def _refresh_held_d(self, req: ParsedRequest, *, caller: str,
                        environment: str) -> Decision[None]:
        """The gateway's own 'pending approval' outputs are brought up to date
        (held_turns), whether the app sent them or the gateway added them."""
        items = req.data.get("input")
        if not isinstance(items, list):
            return
        for item in items:
            if not isinstance(item, dict):
                continue
            output = item.get("output")
            if (item.get("type") not in _TEXT_OUTPUTS
                    or not isinstance(output, str) or held_turns.MARKER not in output):
                continue
            fresh = yield from held_turns.refreshed_d(output, caller=caller,
                                                      environment=environment)
            if fresh is None:
                continue
            item["output"], update = fresh
            if isinstance(item.get("call_id"), str):
                update["tool_call_id"] = item["call_id"]
            req.approval_updates.append(update)
            # Priced as sent now (a result is longer than the pending note it replaces).
            req.prompt_messages = [*req.prompt_messages,
                                   {"role": "tool", "content": item["output"]}]
            req.rewritten = True

    def _continue_d(self, req: ParsedRequest, prev: Any, *, caller: str,
                    environment: str) -> Decision[None]:
        record = yield from served.lookup_d(prev, caller=caller, environment=environment)
        # Counted when it was recorded; a record older than that bound is held to it.
        context = record.get("context_tokens")
        req.history_tokens = min(context, MAX_TOKENS) if type(context) is int and context > 0 \
            else 0
        value = req.data["input"]
        items = [{"role": "user", "content": value}] if isinstance(value, str) else list(value)
        # Withheld items the provider already holds: an aware app may send them back.
        stored = set(record.get("withheld_ids") or [])
        kept = [i for i in items if not (isinstance(i.get("id"), str) and i["id"] in stored
                                         and i.get("type") not in OUTPUT_ITEMS)]
        answered = {_answered(i) for i in kept} - {None}
        missing = [copy_json(o) for o in record.get("outputs") or []
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
        if len(counts) == 2 and all(token_count(c) is not None for c in counts):
            context = min(int(sum(counts)), MAX_TOKENS)
        else:  # no usage to trust: a generous count of what it said
            context = len(json.dumps(answer.body.get("output"))) // 2
        followups = authority.get(self.followups_field) or []
        yield from served.record_d(
            {**answer.body, "authority": authority}, caller=caller, environment=environment,
            request_id=authority["request_id"], context_tokens=context,
            input_items=_as_items(req.data.get("input")),
            outputs=[f for f in followups if _answered(f) is not None or _is_note(f)],
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
            raise malformed("not JSON") from None
        return self.answer_from(data, req)

    def answer_from(self, data: Any, req: ParsedRequest | None = None) -> Answer:
        if not isinstance(data, dict):
            raise malformed("not a JSON object")
        if not depth_ok(data):
            raise malformed(f"nested deeper than {MAX_DEPTH} levels")
        output = data.get("output")
        if not isinstance(output, list):
            raise malformed("'output' is missing or not a list")
        calls: list[Call] = []
        for pos, item in enumerate(output):
            if not isinstance(item, dict) or not isinstance(item.get("type"), str):
                raise malformed(f"output[{pos}] is not an object with a string 'type'")
            if item["type"] == "message" and not isinstance(item.get("content"), list):
                raise malformed(f"output[{pos}].content is not a list")
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
                    items += [copy_json(item), decided]
                continue
            if o is None or item.get("type") not in CALL_ITEMS or o.tool_call["id"] is None:
                continue  # a shape the app never sees and cannot answer
            if pending_reasoning is not None:
                items.append(copy_json(pending_reasoning))
                pending_reasoning = None
            items.append(copy_json(item))
            said = json.dumps(followup_payload(o, redact_names), default=str)
            items.append(_output_item(item["type"], o.tool_call["id"], said, o.status))
            if item["type"] == "computer_call":
                items.append(computer_note(o.tool_call["id"], said))
        return items

    # -- streams ----------------------------------------------------------------------

    def assembler(self, req: ParsedRequest) -> ResponsesStream:
        return ResponsesStream(self, req)

    def synthesise_stream(self, body: dict[str, Any]) -> Iterator[bytes]:
        seq = EventSequence()
        created = {**body, "status": "in_progress", "output": [], "usage": None}
        created.pop("authority", None)
        yield seq.event({"type": "response.created", "response": created})
        for i, item in enumerate(body.get("output") or []):
            yield from item_events(seq, i, item)
        yield seq.event({"type": final_type(body), "response": body})


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
