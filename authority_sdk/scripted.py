"""A scripted local model that answers like the OpenAI chat-completions and Responses APIs.

The demo and the tests replace the LLM with it: no API key, no network. What it
answers is scripted by directives in the last user message, one per line:

    CALL <tool_name> <json arguments>    answer with this tool call (several allowed)
    SAY <text>                           answer with this content
    SLEEP <seconds>                      wait before answering
    FAIL <status>                        answer with this HTTP status
    GARBAGE                              answer with a body that is not JSON
    COMPLETION_TOKENS <n>                report this many completion tokens in usage
    SHAPE <name>                         answer in an odd shape some providers send:
                                         content_parts (content as a list of parts),
                                         tool_calls_object (tool_calls as an object),
                                         no_choices (no "choices" at all)
    FUNCTION_CALL <name> <json>          answer with a legacy ``function_call``
    CUSTOM <name> <text>                 (Responses) a custom tool call with this input
    REASON <text>                        (Responses) a reasoning item before the rest
    ITEM <json>                          (Responses) this output item, as it is

``{nonce}`` anywhere in a CALL's arguments becomes a fresh random word in every
answer, as a model words the same action differently each time it is asked.
With ``n`` > 1 the same answer comes back in every choice.

``POST /v1/responses`` speaks the Responses API with the same directives (read
from ``input``: the string, or the last user message item), JSON or SSE events.

Anything else gets a short friendly answer. When the conversation ends with
``tool`` messages (an agent loop sending results back), it answers in words with
what they report, as a real model would, instead of repeating the calls.
Streaming splits content into words and tool-call arguments into small pieces
across many chunks. ``GET /_stats`` counts the chat requests it served and shows
the last one (headers included), so tests can prove that a replay never reached
it and that the caller's key was never forwarded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = ["ScriptedModel", "build_app", "parse_script", "summarise_tool_results"]

MODELS = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1-nano"]


def parse_script(text: str) -> dict[str, Any]:
    script: dict[str, Any] = {"calls": [], "say": [], "sleep": 0.0, "fail": None,
                              "garbage": False, "completion_tokens": None, "shape": None,
                              "function_call": None, "custom": [], "reason": None,
                              "items": []}
    for raw in text.splitlines():
        line = raw.strip()
        word, _, rest = line.partition(" ")
        if word == "CALL":
            name, _, args = rest.strip().partition(" ")
            script["calls"].append((name, args.strip() or "{}"))
        elif word == "SAY":
            script["say"].append(rest)
        elif word == "SLEEP":
            script["sleep"] = float(rest)
        elif word == "FAIL":
            script["fail"] = int(rest)
        elif word == "GARBAGE":
            script["garbage"] = True
        elif word == "COMPLETION_TOKENS":
            script["completion_tokens"] = int(rest)
        elif word == "SHAPE":
            script["shape"] = rest.strip()
        elif word == "CUSTOM":
            name, _, text = rest.strip().partition(" ")
            script["custom"].append((name, text))
        elif word == "REASON":
            script["reason"] = rest
        elif word == "ITEM":
            script["items"].append(json.loads(rest))
        elif word == "FUNCTION_CALL":
            name, _, args = rest.strip().partition(" ")
            script["function_call"] = (name, args.strip() or "{}")
    return script


def summarise_tool_results(messages: list[dict[str, Any]]) -> str | None:
    """One sentence on the trailing ``tool`` messages, or None if the last one is not a tool's."""
    trailing: list[dict[str, Any]] = []
    for m in reversed(messages):
        if m.get("role") != "tool":
            break
        trailing.append(m)
    if not trailing:
        return None
    parts = []
    for m in reversed(trailing):
        content = m.get("content")
        try:
            payload = json.loads(content) if isinstance(content, str) else content
        except (ValueError, RecursionError):
            payload = content
        if isinstance(payload, dict) and "status" in payload:
            detail = payload.get("approval_id") or payload.get("code") or ""
            parts.append(f"{payload['status']}" + (f" ({detail})" if detail else ""))
        else:
            parts.append("done")
    return "I have the results: " + "; ".join(parts) + "."


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            if isinstance(c, list):
                return "\n".join(p.get("text", "") for p in c if isinstance(p, dict))
    return ""


async def _scripted_failure(script: dict[str, Any]) -> Response | None:
    """SLEEP first; then FAIL or GARBAGE answer instead of the model."""
    if script["sleep"]:
        await asyncio.sleep(script["sleep"])
    if script["fail"]:
        return JSONResponse({"error": {"message": "scripted failure", "type": "server_error",
                                       "code": None}}, status_code=script["fail"])
    if script["garbage"]:
        return Response(b"<html>not json", media_type="application/json")
    return None


class ScriptedModel:
    def __init__(self) -> None:
        self.chat_requests = 0
        self.last_request: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self.served: dict[str, dict[str, Any]] = {}  # Responses API: what it stored

    def _usage(self, body: dict[str, Any], content: str, calls: list[tuple[str, str]],
               override: int | None) -> dict[str, int]:
        from .tokens import default_counter

        prompt = default_counter.count_prompt(body.get("model", "gpt-4o-mini"),
                                              body.get("messages") or [], body.get("tools"))
        completion = override if override is not None else max(
            1, (len(content) + sum(len(n) + len(a) for n, a in calls)) // 4)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        with self._lock:
            self.chat_requests += 1
            self.last_request = {"headers": dict(request.headers), "body": body}
        messages = body.get("messages") or []
        summary = summarise_tool_results(messages)
        script = parse_script("SAY " + summary if summary else _last_user_text(messages))
        refused = await _scripted_failure(script)
        if refused is not None:
            return refused
        calls = [(n, a.replace("{nonce}", uuid.uuid4().hex[:8])) for n, a in script["calls"]]
        content = " ".join(script["say"]) if script["say"] else (
            "" if calls or script["function_call"] else "Hello from the scripted model.")
        usage = self._usage(body, content, calls, script["completion_tokens"])
        cid = "chatcmpl-" + uuid.uuid4().hex[:20]
        created = int(time.time())
        model = body.get("model", "gpt-4o-mini")
        tool_calls = [{"id": f"call_{i + 1}_{uuid.uuid4().hex[:6]}", "type": "function",
                       "function": {"name": n, "arguments": a}} for i, (n, a) in enumerate(calls)]
        finish = "tool_calls" if calls else "stop"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _chunks(cid, created, model, content, tool_calls, finish,
                        usage if include_usage else None),
                media_type="text/event-stream")
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        if script["function_call"] is not None:
            fname, fargs = script["function_call"]
            message["function_call"] = {"name": fname, "arguments": fargs}
            finish = "function_call"
        n = body.get("n") if isinstance(body.get("n"), int) else 1
        choices = [{"index": i, "message": message, "finish_reason": finish, "logprobs": None}
                   for i in range(max(1, min(n, 8)))]
        answer: dict[str, Any] = {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage}
        shape = script["shape"]
        if shape == "content_parts":
            message["content"] = [{"type": "text", "text": content or "parts"}]
        elif shape == "tool_calls_object":
            message["tool_calls"] = {"0": tool_calls[0] if tool_calls else {}}
        elif shape == "no_choices":
            del answer["choices"]
        return JSONResponse(answer)

    async def embeddings(self, request: Request) -> Response:
        body = await request.json()
        with self._lock:
            self.chat_requests += 1
            self.last_request = {"headers": dict(request.headers), "body": body}
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) and inputs and not isinstance(
            inputs[0], int) else [inputs]
        from .tokens import default_counter

        tokens = sum(default_counter.count_text(body.get("model", "text-embedding-3-small"),
                                                i if isinstance(i, str) else "x") for i in items)
        return JSONResponse({
            "object": "list", "model": body.get("model"),
            "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                     for i in range(len(items))],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def responses(self, request: Request) -> Response:
        body = await request.json()
        with self._lock:
            self.chat_requests += 1
            self.last_request = {"headers": dict(request.headers), "body": body}
        items = body.get("input")
        items = [{"role": "user", "content": items}] if isinstance(items, str) else items or []
        refusal = self._pairing_error(body.get("previous_response_id"), items)
        if refusal is not None:
            status, message = refusal
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                           "param": "input", "code": None}}, status_code=status)
        answers = ("function_call_output", "custom_tool_call_output", "shell_call_output",
                   "apply_patch_call_output", "local_shell_call_output")
        outputs = [{"role": "tool", "content": i.get("output")} for i in items
                   if i.get("type") in answers]
        summary = summarise_tool_results(outputs) if items and items[-1].get("type") in (
            answers) else None
        script = parse_script("SAY " + summary if summary else _last_user_text(
            [{"role": i.get("role"), "content": _item_text(i.get("content"))} for i in items
             if i.get("role") == "user"]))
        refused = await _scripted_failure(script)
        if refused is not None:
            return refused
        answer = _response_answer(body, script)
        # An approved MCP call runs at the provider: its result is part of this answer.
        with self._lock:
            prev = self.served.get(body.get("previous_response_id") or "") or {}
        asked = {i.get("id"): i for i in [*prev.get("output", []), *items]
                 if isinstance(i, dict) and i.get("type") == "mcp_approval_request"}
        answer["output"][:0] = [
            {"type": "mcp_call", "id": "mcp_" + uuid.uuid4().hex[:12],
             "server_label": asked[i["approval_request_id"]].get("server_label"),
             "name": asked[i["approval_request_id"]].get("name"), "arguments": "{}",
             "output": "done", "approval_request_id": i["approval_request_id"]}
            for i in items if isinstance(i, dict) and i.get("type") == "mcp_approval_response"
            and i.get("approve") is True and i.get("approval_request_id") in asked]
        with self._lock:
            self.served[answer["id"]] = {"input": items, "output": answer["output"]}
        if body.get("stream"):
            return StreamingResponse(_events(answer), media_type="text/event-stream")
        return JSONResponse(answer)

    def _pairing_error(self, previous: Any, items: list[Any]) -> tuple[int, str] | None:
        """The rules OpenAI enforces on a turn, as it words them: every call answered by
        its output, every output answering a call, no item sent twice, a reasoning item
        followed by another."""
        history: list[Any] = []
        if previous is not None:
            with self._lock:
                stored = self.served.get(previous)
            if stored is None:
                return 404, f"Previous response with id '{previous}' not found."
            history = [*stored["input"], *stored["output"]]
        known = {i.get("id") for i in history if isinstance(i, dict) and i.get("id")}
        for i in items:
            if isinstance(i, dict) and i.get("id") and i["id"] in known:
                return 400, f"Duplicate item found with id {i['id']}."
        turn = [*history, *items]
        kinds = ("function_call", "custom_tool_call", "shell_call", "apply_patch_call",
                 "local_shell_call", "computer_call")
        calls = {i.get("call_id") for i in turn if isinstance(i, dict)
                 and i.get("type") in kinds}
        # A local shell call's output names its call by 'id'.
        answered = {i.get("call_id") or (i.get("id") if i.get("type") ==
                                         "local_shell_call_output" else None)
                    for i in turn if isinstance(i, dict)
                    and i.get("type") in tuple(k + "_output" for k in kinds)}
        for cid in sorted(map(str, calls - answered)):
            return 400, f"No tool output found for function call {cid}."
        for cid in sorted(map(str, answered - calls)):
            return 400, f"No tool call found for function call output with call_id {cid}."
        asked = {i.get("id") for i in turn if isinstance(i, dict)
                 and i.get("type") == "mcp_approval_request"}
        for i in items:
            if isinstance(i, dict) and i.get("type") == "mcp_approval_response" \
                    and i.get("approval_request_id") not in asked:
                return 400, (f"Approval request {i.get('approval_request_id')} was not found.")
        for n, i in enumerate(items):
            if isinstance(i, dict) and i.get("type") == "reasoning" and n + 1 == len(items):
                return 400, (f"Item '{i.get('id')}' of type 'reasoning' was provided without "
                             "its required following item.")
        return None

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "scripted"} for m in MODELS]})

    async def stats(self, request: Request) -> Response:
        with self._lock:
            return JSONResponse({"chat_requests": self.chat_requests,
                                 "last_request": self.last_request})


async def _chunks(cid: str, created: int, model: str, content: str,
                  tool_calls: list[dict[str, Any]], finish: str,
                  usage: dict[str, int] | None) -> AsyncIterator[bytes]:
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

    def sse(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + json.dumps({**base, "choices": choices, **extra}).encode() + b"\n\n"

    yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""},
                "finish_reason": None}])
    words = content.split(" ") if content else []
    for i, w in enumerate(words):
        yield sse([{"index": 0, "delta": {"content": w if i == 0 else " " + w},
                    "finish_reason": None}])
        await asyncio.sleep(0)
    for i, tc in enumerate(tool_calls):
        yield sse([{"index": 0, "delta": {"tool_calls": [{
            "index": i, "id": tc["id"], "type": "function",
            "function": {"name": tc["function"]["name"], "arguments": ""}}]},
            "finish_reason": None}])
        args = tc["function"]["arguments"]
        for j in range(0, len(args), 5):
            yield sse([{"index": 0, "delta": {"tool_calls": [{
                "index": i, "function": {"arguments": args[j:j + 5]}}]},
                "finish_reason": None}])
    yield sse([{"index": 0, "delta": {}, "finish_reason": finish}])
    if usage is not None:
        yield sse([], usage=usage)
    yield b"data: [DONE]\n\n"


def _item_text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _response_answer(body: dict[str, Any], script: dict[str, Any]) -> dict[str, Any]:
    from .formats.responses import Responses
    from .tokens import default_counter

    model = body.get("model", "gpt-4o-mini")
    rid = "resp_" + uuid.uuid4().hex[:24]
    output: list[dict[str, Any]] = []
    if script["reason"] is not None:
        output.append({"type": "reasoning", "id": "rs_" + uuid.uuid4().hex[:16],
                       "summary": [{"type": "summary_text", "text": script["reason"]}]})
    content = " ".join(script["say"])
    if not content and not (script["calls"] or script["custom"] or script["items"]):
        content = "Hello from the scripted model."
    if content:
        output.append({"type": "message", "id": "msg_" + uuid.uuid4().hex[:16],
                       "role": "assistant", "status": "completed", "content": [
                           {"type": "output_text", "text": content, "annotations": []}]})
    for name, args in script["calls"]:
        output.append({"type": "function_call", "id": "fc_" + uuid.uuid4().hex[:16],
                       "call_id": "call_" + uuid.uuid4().hex[:12], "name": name,
                       "arguments": args.replace("{nonce}", uuid.uuid4().hex[:8]),
                       "status": "completed"})
    for name, text in script["custom"]:
        output.append({"type": "custom_tool_call", "id": "ctc_" + uuid.uuid4().hex[:16],
                       "call_id": "call_" + uuid.uuid4().hex[:12], "name": name,
                       "input": text})
    output.extend(script["items"])
    try:
        prompt = default_counter.count_request(
            model, Responses().from_data(body).count_body()).tokens
    except Exception:  # a request the gateway would refuse: a rough count will do
        prompt = len(json.dumps(body.get("input"))) // 4
    completion = script["completion_tokens"] or max(1, len(json.dumps(output)) // 16)
    cap = body.get("max_output_tokens")
    cut = isinstance(cap, int) and completion > cap
    if cut:
        completion = cap
    return {"id": rid, "object": "response", "created_at": int(time.time()),
            "status": "incomplete" if cut else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "model": model, "output": output,
            "parallel_tool_calls": True, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "error": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": completion,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": prompt + completion}}


async def _events(answer: dict[str, Any]) -> AsyncIterator[bytes]:
    """A Responses stream as OpenAI sends it: text and arguments in small deltas."""
    n = 0

    def ev(obj: dict[str, Any]) -> bytes:
        nonlocal n
        obj["sequence_number"] = n
        n += 1
        return (f"event: {obj['type']}\n").encode() + b"data: " + json.dumps(obj).encode() \
            + b"\n\n"

    start = {**answer, "status": "in_progress", "output": [], "usage": None}
    yield ev({"type": "response.created", "response": start})
    yield ev({"type": "response.in_progress", "response": start})
    for i, item in enumerate(answer["output"]):
        kind = item.get("type")
        base = {"item_id": item.get("id"), "output_index": i}
        if kind == "message":
            yield ev({"type": "response.output_item.added", "output_index": i,
                      "item": {**item, "content": [], "status": "in_progress"}})
            part = {"type": "output_text", "text": "", "annotations": []}
            yield ev({"type": "response.content_part.added", **base, "content_index": 0,
                      "part": part})
            text = item["content"][0]["text"]
            words = text.split(" ")
            for j, w in enumerate(words):
                yield ev({"type": "response.output_text.delta", **base, "content_index": 0,
                          "delta": w if j == 0 else " " + w, "logprobs": []})
                await asyncio.sleep(0)
            yield ev({"type": "response.output_text.done", **base, "content_index": 0,
                      "text": text, "logprobs": []})
            yield ev({"type": "response.content_part.done", **base, "content_index": 0,
                      "part": item["content"][0]})
        elif kind == "function_call" and isinstance(item.get("arguments"), str):
            yield ev({"type": "response.output_item.added", "output_index": i,
                      "item": {**item, "arguments": "", "status": "in_progress"}})
            args = item["arguments"]
            for j in range(0, len(args), 5):
                yield ev({"type": "response.function_call_arguments.delta", **base,
                          "delta": args[j:j + 5]})
            yield ev({"type": "response.function_call_arguments.done", **base,
                      "arguments": args})
        else:
            yield ev({"type": "response.output_item.added", "output_index": i, "item": item})
        yield ev({"type": "response.output_item.done", "output_index": i, "item": item})
    yield ev({"type": "response.incomplete" if answer["status"] == "incomplete"
              else "response.completed", "response": answer})


def build_app(model: ScriptedModel | None = None) -> Starlette:
    m = model or ScriptedModel()
    app = Starlette(routes=[
        Route("/v1/chat/completions", m.chat, methods=["POST"]),
        Route("/v1/models", m.models, methods=["GET"]),
        Route("/v1/embeddings", m.embeddings, methods=["POST"]),
        Route("/v1/responses", m.responses, methods=["POST"]),
        Route("/_stats", m.stats, methods=["GET"]),
    ])
    app.state.model = m
    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description="A scripted OpenAI-compatible model for demos/tests")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8799)
    a = ap.parse_args()
    uvicorn.run(build_app(), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
