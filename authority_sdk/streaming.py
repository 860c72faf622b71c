"""Gate a streamed completion (DESIGN.md §3 "Streaming").

Content deltas pass through as they arrive. Tool-call deltas are held until the
stream has ended — the moment each call is complete *and* the usage is known,
so the post-call ceiling can still stop them — then gated by exactly the code
that gates a plain completion (``Gateway.finalize``), and emitted or withheld.
The last chunk before ``[DONE]`` carries ``authority``. The upstream is always
asked for usage; the usage chunk reaches the client only if it asked for it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import AuthorityError, UpstreamError
from .wire import GatewayResponse, error_response

if TYPE_CHECKING:
    from .engine import CallContext, Gateway, UpstreamReply

__all__ = ["SSEDecoder", "StreamGate"]

T = TypeVar("T")

_PASS_KEYS = ("role", "content", "refusal", "reasoning_content")


class SSEDecoder:
    """Incremental ``text/event-stream`` decoder: bytes in, ``data`` payloads out."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        out: list[str] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line = self._buf[:nl].rstrip(b"\r").decode("utf-8")
            self._buf = self._buf[nl + 1:]
            if not line:
                if self._data:
                    out.append("\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)
        return out

    def close(self) -> list[str]:
        out = self.feed(b"\n\n") if self._buf or self._data else []
        return out


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class StreamGate:
    def __init__(self, gw: Gateway, ctx: CallContext, reply: UpstreamReply) -> None:
        self.gw = gw
        self.ctx = ctx
        self.reply = reply
        self.decoder = SSEDecoder()
        self.meta: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.emitted: list[bytes] = []
        self.finished = False

    # -- the shared per-chunk logic ----------------------------------------------------

    def _on_payload(self, payload: str) -> list[bytes]:
        if payload.strip() == "[DONE]":
            return self._finish()
        try:
            chunk = json.loads(payload)
        except ValueError as exc:
            raise UpstreamError("the upstream sent a malformed stream chunk",
                                code="upstream_malformed_response") from exc
        if not isinstance(chunk, dict):
            raise UpstreamError("the upstream sent a malformed stream chunk",
                                code="upstream_malformed_response")
        if "error" in chunk and "choices" not in chunk:
            msg = (chunk.get("error") or {}).get("message", "error") if isinstance(
                chunk.get("error"), dict) else str(chunk.get("error"))
            raise UpstreamError(f"the upstream failed mid-stream: {msg}")
        for k in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if k in chunk and k not in self.meta:
                self.meta[k] = chunk[k]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        out_choices = []
        for ch in chunk.get("choices") or []:
            idx = int(ch.get("index", 0))
            acc = self.choices.setdefault(idx, {"content": [], "tool_calls": {}, "role": None,
                                                "finish_reason": None, "refusal": []})
            delta = ch.get("delta") or {}
            if delta.get("role"):
                acc["role"] = delta["role"]
            if delta.get("content"):
                acc["content"].append(delta["content"])
            if delta.get("refusal"):
                acc["refusal"].append(delta["refusal"])
            for tc in delta.get("tool_calls") or []:
                slot = acc["tool_calls"].setdefault(int(tc.get("index", 0)), {
                    "id": None, "type": "function", "name": "", "arguments": []})
                if tc.get("id"):
                    slot["id"] = tc["id"]
                fn = tc.get("function") or {}
                if fn.get("name"):
                    slot["name"] += fn["name"]
                if fn.get("arguments"):
                    slot["arguments"].append(fn["arguments"])
            if ch.get("finish_reason"):
                acc["finish_reason"] = ch["finish_reason"]
            passed = {k: v for k, v in delta.items() if k in _PASS_KEYS and v is not None}
            if passed:
                out_choices.append({"index": idx, "delta": passed,
                                    **({"logprobs": ch["logprobs"]} if ch.get("logprobs")
                                       else {}),
                                    "finish_reason": None})
        if not out_choices:
            return []
        out = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
        out["choices"] = out_choices
        return [_sse(out)]

    def _assemble(self) -> dict[str, Any]:
        choices = []
        for idx in sorted(self.choices):
            acc = self.choices[idx]
            msg: dict[str, Any] = {"role": acc["role"] or "assistant",
                                   "content": "".join(acc["content"]) or None}
            if acc["refusal"]:
                msg["refusal"] = "".join(acc["refusal"])
            calls = [{"id": s["id"], "type": s["type"],
                      "function": {"name": s["name"], "arguments": "".join(s["arguments"])}}
                     for _, s in sorted(acc["tool_calls"].items())]
            if calls:
                msg["tool_calls"] = calls
            choices.append({"index": idx, "message": msg, "finish_reason": acc["finish_reason"]})
        return {"id": self.meta.get("id"), "object": "chat.completion",
                "created": self.meta.get("created"), "model": self.meta.get("model"),
                "choices": choices, "usage": self.usage}

    def _finish(self) -> list[bytes]:
        if self.finished:
            return []
        self.finished = True
        completion = self._assemble()
        originally_empty = {c["index"]: not c["message"].get("content")
                            for c in completion["choices"]}
        authority = self.gw.finalize(self.ctx, completion)
        base = {"id": self.meta.get("id"), "object": "chat.completion.chunk",
                "created": self.meta.get("created"), "model": self.meta.get("model")}
        out: list[bytes] = []
        for c in completion["choices"]:
            msg = c["message"]
            delta: dict[str, Any] = {}
            if originally_empty[c["index"]] and msg.get("content"):
                delta["content"] = msg["content"]  # the gateway's one-line summary
            if msg.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **tc}
                                       for i, tc in enumerate(msg["tool_calls"])]
            if delta:
                out.append(_sse({**base, "choices": [{"index": c["index"], "delta": delta,
                                                      "finish_reason": None}]}))
            out.append(_sse({**base, "choices": [{"index": c["index"], "delta": {},
                                                  "finish_reason": c["finish_reason"]}]}))
        if self.ctx.client_wants_usage and self.usage is not None:
            out.append(_sse({**base, "choices": [], "usage": self.usage}))
        out.append(_sse({**base, "choices": [], "authority": authority}))
        out.append(b"data: [DONE]\n\n")
        # Stored before the last chunks go out: openai's Stream stops reading at [DONE]
        # and closes the response, so code after the final yield never runs.
        self._store(out)
        return out

    def _on_error(self, exc: AuthorityError) -> bytes:
        # The answer is partial: it may have been billed, so charge the reservation;
        # none of its actions run.
        from .costs import settle

        if not self.ctx.done and self.ctx.plan is not None:
            self.ctx.done = True
            try:
                settle(self.ctx.plan, self.gw.store, None)
                self.gw._release_idempotency(self.ctx)
                self.gw.audit_event(
                    "request", request_id=self.ctx.request_id,
                    environment=self.ctx.environment, model=self.ctx.model, decision="error",
                    reason=exc.message, cost_estimate_usd=self.ctx.plan.estimate_usd,
                    cost_actual_usd=self.ctx.plan.estimate_usd, actor=self.ctx.caller.name,
                    details={"code": exc.code, "stream": True})
            except AuthorityError as inner:
                exc = inner
        body = error_response(exc, request_id=self.ctx.request_id).body
        return b"data: " + body + b"\n\n"

    def _on_abandon(self) -> None:
        # The client stopped reading before the end: none of this answer's actions runs,
        # and the request still gets its audit entry and releases its claims.
        if not self.finished and not self.ctx.done:
            self._on_error(UpstreamError("the client closed the stream before its end",
                                         code="client_closed_stream"))

    def _record(self, parts: list[bytes]) -> list[bytes]:
        if self.ctx.idem_store_key:
            self.emitted.extend(parts)
        return parts

    def _store(self, tail: list[bytes]) -> None:
        if self.ctx.idem_store_key:
            self.gw._store_idempotent(self.ctx, 200, self._headers(),
                                      b"".join(self.emitted + tail))

    def _headers(self) -> dict[str, str]:
        return {"content-type": "text/event-stream", "cache-control": "no-cache",
                "x-request-id": self.ctx.request_id}

    # -- sync and async drivers -----------------------------------------------------

    def _iter(self) -> Iterator[bytes]:
        assert self.reply.chunks is not None
        try:
            for raw in self.reply.chunks:
                for payload in self.decoder.feed(raw):
                    yield from self._record(self._on_payload(payload))
            for payload in self.decoder.close():
                yield from self._record(self._on_payload(payload))
            if not self.finished:
                yield from self._record(self._finish())
        except AuthorityError as exc:
            yield self._on_error(exc)
        except Exception as exc:  # a broken connection mid-stream
            yield self._on_error(UpstreamError(f"the upstream stream broke: {exc}"))
        finally:
            self._on_abandon()
            if self.reply.close:
                self.reply.close()

    def _tool_names(self) -> list[str]:
        return [slot["name"] for acc in self.choices.values()
                for slot in acc["tool_calls"].values()]

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Gate on the event loop unless an executor may run (it may wait seconds)."""
        if not self.gw.may_execute(tool_names=self._tool_names()):
            return fn(*args)
        from anyio.to_thread import run_sync

        return await run_sync(fn, *args)

    async def _aiter(self) -> AsyncIterator[bytes]:
        assert self.reply.achunks is not None
        try:
            async for raw in self.reply.achunks:
                for payload in self.decoder.feed(raw):
                    if payload.strip() == "[DONE]":
                        parts = await self._off_loop(self._on_payload, payload)
                    else:
                        parts = self._on_payload(payload)
                    for p in self._record(parts):
                        yield p
            tail: list[bytes] = []
            # Recorded as they come: _finish stores everything recorded before it.
            for payload in self.decoder.close():
                tail.extend(self._record(await self._off_loop(self._on_payload, payload)))
            if not self.finished:
                tail.extend(self._record(await self._off_loop(self._finish)))
            for p in tail:
                yield p
        except AuthorityError as exc:
            yield await self._off_loop(self._on_error, exc)
        except Exception as exc:
            yield await self._off_loop(self._on_error,
                                       UpstreamError(f"the upstream stream broke: {exc}"))
        finally:
            self._on_abandon()
            if self.reply.close:
                res = self.reply.close()
                if hasattr(res, "__await__"):
                    await res

    def response(self) -> GatewayResponse:
        return GatewayResponse(200, self._headers(), stream=self._iter(),
                               request_id=self.ctx.request_id, decision="allow")

    def aresponse(self) -> GatewayResponse:
        return GatewayResponse(200, self._headers(), astream=self._aiter(),
                               request_id=self.ctx.request_id, decision="allow")
