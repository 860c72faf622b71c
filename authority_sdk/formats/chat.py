"""OpenAI chat completions (``POST /chat/completions``) as a wire format of the engine.

Every shape of an answer that can carry an action is a :class:`Call`: each
``message.tool_calls[]`` (``function`` and ``custom`` tools; any other type is
withheld as unsupported) and the legacy ``message.function_call``, in every
choice. An answer whose structure gating cannot read is refused as a whole
(``upstream_malformed_response``); a call whose fields are wrong is that
call's problem only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import held_turns
from ..audit import redact
from ..errors import InvalidRequest, UpstreamError
from ..records import ActionOutcome, ActionStatus
from ..strictjson import MAX_DEPTH, depth_ok
from ..wire import MAX_TOKENS, copy_json
from .base import Answer, Call, ParsedRequest, Stateless, load_body
from .sse import DONE, event_json, sse

if TYPE_CHECKING:
    from ..effects import Decision

__all__ = ["ChatCompletions", "followup_payload", "summary_line"]

MAX_MODEL_CHARS = 256
MAX_NAME_CHARS = 256
MAX_N = 128
SUMMARY_PREFIX = "[authority] "

_PASS_KEYS = ("role", "content", "refusal", "reasoning_content")


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_request")


def _malformed(what: str) -> UpstreamError:
    return UpstreamError(f"the upstream answered with a malformed chat completion: {what}",
                         code="upstream_malformed_response")


def _positive_int(data: dict[str, Any], name: str, maximum: int = MAX_TOKENS) -> int | None:
    v = data.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v > maximum:
        raise _bad(f"'{name}' must be a positive integer of at most {maximum}")
    return v


def _schemas(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Tool name -> declared JSON schema, validating ``tools`` and legacy ``functions``."""
    out: dict[str, dict[str, Any]] = {}
    names: set[str] = set()

    def declare(where: str, name: Any, params: Any) -> None:
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
            raise _bad(f"{where}: 'name' must be a string of 1 to {MAX_NAME_CHARS} characters")
        if name in names:
            # Two schemas for one name: the model's call would be checked against either.
            raise _bad(f"{where}: the tool name {name!r} is declared twice")
        names.add(name)
        if params is not None:
            if not isinstance(params, dict):
                raise _bad(f"{where}: 'parameters' must be a JSON schema object")
            out[name] = params

    tools = data.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be a list")
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or not isinstance(t.get("type", "function"), str):
                raise _bad(f"tools[{i}] must be an object with a 'type'")
            kind = t.get("type", "function")
            body = t.get(kind)
            if not isinstance(body, dict):
                raise _bad(f"tools[{i}].{kind} must be an object")
            declare(f"tools[{i}].{kind}", body.get("name"),
                    body.get("parameters") if kind == "function" else None)
    functions = data.get("functions")
    if functions is not None:
        if not isinstance(functions, list):
            raise _bad("'functions' must be a list")
        for i, f in enumerate(functions):
            if not isinstance(f, dict):
                raise _bad(f"functions[{i}] must be an object")
            declare(f"functions[{i}]", f.get("name"), f.get("parameters"))
    return out


def _counted_tools(data: dict[str, Any]) -> list[Any] | None:
    tools = list(data.get("tools") or [])
    # Legacy functions are rendered to the model like tools, and billed like them.
    tools += [{"type": "function", "function": f} for f in data.get("functions") or []]
    return tools or None


def summary_line(outcomes: list[ActionOutcome]) -> str:
    parts = []
    for o in outcomes:
        if o.status == ActionStatus.ALLOWED:
            parts.append(f"{o.action_type}: allowed")
            continue
        detail = o.approval_id if o.status == ActionStatus.PENDING_APPROVAL else (
            o.code or o.reason)
        parts.append(f"{o.action_type}: {o.status}" + (f" ({detail})" if detail else ""))
    return SUMMARY_PREFIX + "; ".join(parts)


def _content_with(content: Any, summary: str) -> Any:
    if content is None or content == "":
        return summary
    if isinstance(content, list):
        return [*content, {"type": "text", "text": summary}]
    return f"{content}\n\n{summary}"


def _read_call(choice: int, position: int, raw: Any) -> Call:
    if not isinstance(raw, dict):
        raise _malformed("a tool call is not an object")
    call_id = raw.get("id")
    cid = call_id if isinstance(call_id, str) else None
    kind = raw.get("type", "function")
    if kind == "function":
        fn = raw.get("function")
        if not isinstance(fn, dict):
            return Call(choice, position, "tool_call", cid, "", "",
                        problem="the tool call has no 'function' object")
        name, args = fn.get("name"), fn.get("arguments")
        if not isinstance(name, str):
            return Call(choice, position, "tool_call", cid, "", "",
                        problem="the tool call's name is not a string")
        if not isinstance(args, str):
            return Call(choice, position, "tool_call", cid, name, "",
                        problem="the tool call's arguments are not a JSON string")
        return Call(choice, position, "tool_call", cid, name, args)
    if kind == "custom":
        body = raw.get("custom")
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) \
                or not isinstance(body.get("input"), str):
            return Call(choice, position, "custom", cid, "", "",
                        problem="the custom tool call needs a string name and input")
        return Call(choice, position, "custom", cid, body["name"],
                    json.dumps({"input": body["input"]}))
    return Call(choice, position, str(kind)[:64], cid, "", "",
                problem=f"unsupported tool call type {str(kind)[:64]!r}")


def _read_function_call(choice: int, position: int, raw: Any) -> Call:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        return Call(choice, position, "function_call", None, "", "",
                    problem="the function call needs a string name")
    args = raw.get("arguments", "")
    if not isinstance(args, str):
        return Call(choice, position, "function_call", None, raw["name"], "",
                    problem="the function call's arguments are not a JSON string")
    return Call(choice, position, "function_call", None, raw["name"], args)


class ChatCompletions(Stateless):
    name = "chat.completions"
    path = "/chat/completions"
    followups_field = "followup_messages"

    # -- requests ---------------------------------------------------------------------

    def parse(self, body: bytes) -> ParsedRequest:
        data = load_body(body)
        return self.from_data(data)

    def from_data(self, data: Any) -> ParsedRequest:
        """Validate an already parsed body (the SDK's tools and benchmarks hold dicts)."""
        if not isinstance(data, dict):
            raise _bad("the request body must be a JSON object")
        model = data.get("model")
        if not isinstance(model, str) or not model or len(model) > MAX_MODEL_CHARS:
            raise _bad(f"'model' is required: a string of 1 to {MAX_MODEL_CHARS} characters")
        msgs = data.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _bad("'messages' is required and must be a non-empty list of objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages[{i}] must be an object with a string 'role'")
            content = m.get("content")
            if content is not None and not isinstance(content, str | list):
                raise _bad(f"messages[{i}].content must be a string, a list of parts or null")
        schemas = _schemas(data)
        stream = data.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise _bad("'stream' must be true or false")
        opts = data.get("stream_options")
        if opts is not None and (not isinstance(opts, dict) or not isinstance(
                opts.get("include_usage", False), bool)):
            raise _bad("'stream_options' must be an object ({\"include_usage\": true|false})")
        n = _positive_int(data, "n", MAX_N) or 1
        explicit = None
        for name in ("max_completion_tokens", "max_tokens"):
            v = _positive_int(data, name)
            if v is not None and explicit is None:
                explicit = v
        fmt = data.get("response_format")
        if fmt is not None and not isinstance(fmt, dict):
            raise _bad("'response_format' must be an object")
        for name in ("tool_choice", "function_call"):
            v = data.get(name)
            if v is not None and not isinstance(v, str | dict):
                raise _bad(f"'{name}' must be a string or an object")
        structured = isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object")
        return ParsedRequest(
            data=data, model=model, stream=bool(stream), n=n, explicit_limit=explicit,
            limit_field=_output_param(model), tool_schemas=schemas,
            structured_output=structured, prompt_messages=msgs,
            prompt_tools=_counted_tools(data),
            client_wants_usage=bool((opts or {}).get("include_usage")))

    def prepare_d(self, req: ParsedRequest, *, caller: str,
                  environment: str) -> Decision[None]:
        """The gateway's own 'pending approval' answers in the conversation are brought
        up to date (held_turns): the model learns what became of the held action."""
        for m in req.data["messages"]:
            content = m.get("content")
            if (m.get("role") not in ("tool", "function") or not isinstance(content, str)
                    or held_turns.MARKER not in content):
                continue
            fresh = yield from held_turns.refreshed_d(m.get("content"), caller=caller,
                                                      environment=environment)
            if fresh is None:
                continue
            m["content"], update = fresh
            if isinstance(m.get("tool_call_id"), str):
                update["tool_call_id"] = m["tool_call_id"]
            req.approval_updates.append(update)
            req.rewritten = True

    def upstream_body(self, req: ParsedRequest, original: bytes, changed: bool) -> bytes:
        if req.stream:
            opts = req.data.get("stream_options") or {}
            if not opts.get("include_usage"):
                # Always priced exactly: the upstream reports the usage of every stream.
                req.data["stream_options"] = {**opts, "include_usage": True}
                changed = True
        return json.dumps(req.data).encode() if changed else original

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
        if not depth_ok(data):
            raise _malformed(f"nested deeper than {MAX_DEPTH} levels")
        choices = data.get("choices")
        if not isinstance(choices, list):
            raise _malformed("'choices' is missing or not a list")
        calls: list[Call] = []
        seen: set[int] = set()
        for pos, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise _malformed(f"choices[{pos}] is not an object")
            index = choice.get("index", pos)
            if isinstance(index, bool) or not isinstance(index, int) or index in seen:
                raise _malformed(f"choices[{pos}] has a missing, repeated or invalid index")
            seen.add(index)
            message = choice.get("message")
            if not isinstance(message, dict):
                raise _malformed(f"choices[{pos}].message is not an object")
            content = message.get("content")
            if content is not None and not isinstance(content, str | list):
                raise _malformed(f"choices[{pos}].message.content has an unknown shape")
            tool_calls = message.get("tool_calls")
            if tool_calls is not None and not isinstance(tool_calls, list):
                raise _malformed(f"choices[{pos}].message.tool_calls is not a list")
            for i, raw in enumerate(tool_calls or []):
                calls.append(_read_call(index, i, raw))
            fc = message.get("function_call")
            if fc is not None:
                calls.append(_read_function_call(index, len(tool_calls or []), fc))
        usage = data.get("usage")
        return Answer(data, calls, usage if isinstance(usage, dict) else None)

    def rewrite(self, answer: Answer, outcomes: list[ActionOutcome], *,
                summary: str | None, structured_output: bool) -> None:
        by_choice: dict[int, list[ActionOutcome]] = {}
        for o in outcomes:
            by_choice.setdefault(o.choice_index, []).append(o)
        for pos, choice in enumerate(answer.body["choices"]):
            mine = by_choice.get(choice.get("index", pos))
            if not mine:
                continue
            message = choice["message"]
            keep = {o.position for o in mine if o.status == ActionStatus.ALLOWED}
            withheld = len(keep) < len(mine)
            if not withheld:
                continue
            tool_calls = message.get("tool_calls") or []
            kept_calls = [c for i, c in enumerate(tool_calls) if i in keep]
            if kept_calls:
                message["tool_calls"] = kept_calls
            else:
                message.pop("tool_calls", None)
            if message.get("function_call") is not None and len(tool_calls) not in keep:
                message.pop("function_call", None)
            if not kept_calls and message.get("function_call") is None \
                    and choice.get("finish_reason") in ("tool_calls", "function_call"):
                choice["finish_reason"] = "stop"
            if not structured_output:
                # Libraries that drop unknown fields still keep a record of what happened.
                message["content"] = _content_with(message.get("content"), summary_line(mine))

    def followups(self, answer: Answer, outcomes: list[ActionOutcome],
                  redact_names: list[str]) -> list[dict[str, Any]]:
        """The assistant turn of the first choice, then one message per action the gateway
        handled (client-dispatched calls are the app's to answer)."""
        choices = answer.body["choices"]
        if not choices:
            return []
        first = choices[0]
        cidx = first.get("index", 0)
        message = first["message"]
        mine = [o for o in outcomes if o.choice_index == cidx]
        if not mine:
            return []
        turn: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            turn["tool_calls"] = copy_json(message["tool_calls"])
        if message.get("function_call") is not None:
            turn["function_call"] = copy_json(message["function_call"])
        msgs = [turn]
        for o in mine:
            if o.status == ActionStatus.ALLOWED:
                continue
            content = json.dumps(followup_payload(o, redact_names), default=str)
            if o.call_kind == "function_call":
                msgs.append({"role": "function", "name": o.action_type, "content": content})
            else:
                msgs.append({"role": "tool", "tool_call_id": o.tool_call["id"],
                             "content": content})
        return msgs

    # -- streams ----------------------------------------------------------------------

    def assembler(self, req: ParsedRequest) -> ChatStream:
        return ChatStream(self, req)

    def synthesise_stream(self, body: dict[str, Any]) -> Iterator[bytes]:
        base = {"id": body.get("id"), "object": "chat.completion.chunk",
                "created": body.get("created"), "model": body.get("model")}
        for pos, choice in enumerate(body.get("choices") or []):
            msg = choice.get("message") or {}
            delta: dict[str, Any] = {"role": msg.get("role") or "assistant"}
            if isinstance(msg.get("content"), str):
                delta["content"] = msg["content"]
            if msg.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **tc}
                                       for i, tc in enumerate(msg["tool_calls"])]
            if msg.get("function_call") is not None:
                delta["function_call"] = msg["function_call"]
            idx = choice.get("index", pos)
            yield sse({**base, "choices": [{"index": idx, "delta": delta,
                                            "finish_reason": None}]})
            yield sse({**base, "choices": [{"index": idx, "delta": {},
                                            "finish_reason": choice.get("finish_reason")}]})
        if body.get("usage") is not None:
            yield sse({**base, "choices": [], "usage": body["usage"]})
        yield sse({**base, "choices": [], "authority": body.get("authority")})
        yield b"data: [DONE]\n\n"


def followup_payload(o: ActionOutcome, redact_names: list[str]) -> dict[str, Any]:
    payload: dict[str, Any] = {"status": o.status}
    if o.status == ActionStatus.EXECUTED:
        payload["result"] = o.result
    elif o.status == ActionStatus.SIMULATED:
        payload["result"] = redact(o.result, redact_names)
        payload["note"] = "simulation only: nothing was executed"
    else:
        payload["reason"] = o.reason
        if o.code:
            payload["code"] = o.code
        if o.approval_id:
            payload["approval_id"] = o.approval_id
    return payload


def _output_param(model: str) -> str:
    # Reasoning models refuse max_tokens; older OpenAI-compatible servers only know it.
    bare = model.rsplit("/", 1)[-1]
    if bare.startswith(("o1", "o3", "o4", "gpt-5")):
        return "max_completion_tokens"
    return "max_tokens"


class ChatStream:
    """Content passes through as it arrives; tool and function calls are held until the
    stream ends (the usage comes last, and only then can the post-call ceiling still stop
    a call), so an assembled stream equals the non-streamed answer."""

    def __init__(self, fmt: ChatCompletions, req: ParsedRequest) -> None:
        self.fmt = fmt
        self.req = req
        self.meta: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.finished = False

    def feed(self, payload: str) -> list[bytes]:
        try:
            chunk = event_json(payload, "a stream chunk")
        except ValueError as exc:
            raise _malformed(str(exc)) from None
        if chunk is DONE:
            self.finished = True
            return []
        if not isinstance(chunk, dict):
            raise _malformed("a stream chunk is not an object")
        if chunk.get("error") or ("error" in chunk and "choices" not in chunk):
            # An error beside choices too: the client's library would raise on it, with no
            # code and nothing on the record; the gateway says the upstream failed.
            err = chunk.get("error")
            msg = err.get("message", "error") if isinstance(err, dict) else str(err)
            raise UpstreamError(f"the upstream failed mid-stream: {str(msg)[:500]}")
        for k in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if k in chunk and k not in self.meta:
                self.meta[k] = chunk[k]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise _malformed("a stream chunk's 'choices' is not a list")
        out_choices = []
        for ch in choices:
            passed = self._accumulate(ch)
            if passed is not None:
                out_choices.append(passed)
        if not out_choices:
            return []
        # "authority" is the gateway's to write: an upstream's own (forged) is dropped.
        out = {k: v for k, v in chunk.items() if k not in ("choices", "usage", "authority")}
        out["choices"] = out_choices
        return [sse(out)]

    def _accumulate(self, ch: Any) -> dict[str, Any] | None:
        if not isinstance(ch, dict):
            raise _malformed("a stream choice is not an object")
        idx = ch.get("index", 0)
        delta = ch.get("delta") or {}
        if isinstance(idx, bool) or not isinstance(idx, int) or not isinstance(delta, dict):
            raise _malformed("a stream choice has an invalid index or delta")
        acc = self.choices.setdefault(idx, {"content": [], "tool_calls": {}, "role": None,
                                            "finish_reason": None, "refusal": [],
                                            "function_call": None})
        if isinstance(delta.get("role"), str):
            acc["role"] = delta["role"]
        if isinstance(delta.get("content"), str):
            acc["content"].append(delta["content"])
        if isinstance(delta.get("refusal"), str):
            acc["refusal"].append(delta["refusal"])
        tcs = delta.get("tool_calls") or []
        if not isinstance(tcs, list):
            raise _malformed("a stream delta's tool_calls is not a list")
        for tc in tcs:
            self._tool_delta(acc, tc)
        fc = delta.get("function_call")
        if isinstance(fc, dict):
            slot = acc["function_call"] or {"name": "", "arguments": []}
            if isinstance(fc.get("name"), str):
                slot["name"] += fc["name"]
            if isinstance(fc.get("arguments"), str):
                slot["arguments"].append(fc["arguments"])
            acc["function_call"] = slot
        if ch.get("finish_reason"):
            acc["finish_reason"] = ch["finish_reason"]
        passed = {k: v for k, v in delta.items() if k in _PASS_KEYS and v is not None}
        if not passed:
            return None
        return {"index": idx, "delta": passed,
                **({"logprobs": ch["logprobs"]} if ch.get("logprobs") else {}),
                "finish_reason": None}

    @staticmethod
    def _tool_delta(acc: dict[str, Any], tc: Any) -> None:
        if not isinstance(tc, dict):
            raise _malformed("a streamed tool call is not an object")
        i = tc.get("index", 0)
        if isinstance(i, bool) or not isinstance(i, int):
            raise _malformed("a streamed tool call has an invalid index")
        slot = acc["tool_calls"].setdefault(i, {"id": None, "type": None, "name": "",
                                                "arguments": [], "custom": False})
        if isinstance(tc.get("id"), str):
            slot["id"] = tc["id"]
        if isinstance(tc.get("type"), str):
            slot["type"] = tc["type"]
        body = tc.get("function")
        if isinstance(tc.get("custom"), dict):
            body, slot["custom"] = tc["custom"], True
        if isinstance(body, dict):
            if isinstance(body.get("name"), str):
                slot["name"] += body["name"]
            piece = body.get("input") if slot["custom"] else body.get("arguments")
            if isinstance(piece, str):
                slot["arguments"].append(piece)

    def answer(self) -> Answer:
        choices = []
        for idx in sorted(self.choices):
            acc = self.choices[idx]
            msg: dict[str, Any] = {"role": acc["role"] or "assistant",
                                   "content": "".join(acc["content"]) or None}
            if acc["refusal"]:
                msg["refusal"] = "".join(acc["refusal"])
            calls = []
            for _, s in sorted(acc["tool_calls"].items()):
                kind = s["type"] or ("custom" if s["custom"] else "function")
                if kind == "custom":
                    calls.append({"id": s["id"], "type": "custom",
                                  "custom": {"name": s["name"],
                                             "input": "".join(s["arguments"])}})
                else:
                    calls.append({"id": s["id"], "type": kind,
                                  "function": {"name": s["name"],
                                               "arguments": "".join(s["arguments"])}})
            if calls:
                msg["tool_calls"] = calls
            if acc["function_call"] is not None:
                msg["function_call"] = {"name": acc["function_call"]["name"],
                                        "arguments": "".join(acc["function_call"]["arguments"])}
            choices.append({"index": idx, "message": msg,
                            "finish_reason": acc["finish_reason"]})
        body = {"id": self.meta.get("id"), "object": "chat.completion",
                "created": self.meta.get("created"), "model": self.meta.get("model"),
                "choices": choices, "usage": self.usage}
        return self.fmt.answer_from(body)

    def streamed_content(self, idx: int) -> str:
        acc = self.choices.get(idx)
        return "".join(acc["content"]) if acc else ""

    def closing(self, answer: Answer, authority: dict[str, Any]) -> list[bytes]:
        base = {"id": self.meta.get("id"), "object": "chat.completion.chunk",
                "created": self.meta.get("created"), "model": self.meta.get("model")}
        out: list[bytes] = []
        for c in answer.body["choices"]:
            msg = c["message"]
            delta: dict[str, Any] = {}
            content = msg.get("content")
            sent = self.streamed_content(c["index"])
            if isinstance(content, str) and len(content) > len(sent) \
                    and content.startswith(sent):
                delta["content"] = content[len(sent):]  # the gateway's summary
            if msg.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **tc}
                                       for i, tc in enumerate(msg["tool_calls"])]
            if msg.get("function_call") is not None:
                delta["function_call"] = msg["function_call"]
            if delta:
                out.append(sse({**base, "choices": [{"index": c["index"], "delta": delta,
                                                     "finish_reason": None}]}))
            out.append(sse({**base, "choices": [{"index": c["index"], "delta": {},
                                                 "finish_reason": c["finish_reason"]}]}))
        if self.req.client_wants_usage and self.usage is not None:
            out.append(sse({**base, "choices": [], "usage": self.usage}))
        out.append(sse({**base, "choices": [], "authority": authority}))
        out.append(b"data: [DONE]\n\n")
        return out
