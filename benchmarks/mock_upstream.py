"""A deliberately tiny OpenAI-compatible upstream for benchmarks.

Raw asyncio HTTP/1.1 (keep-alive, uvloop when present), no framework: every
byte it sends is precomputed, so any proxy in front of it is the bottleneck,
not the mock. The run checks that by measuring direct throughput to it.

    POST /v1/chat/completions            one tool call (lookup_customer) + usage
    POST /v1/chat/completions stream:true  the same as SSE (chunked), usage chunk, [DONE]
    GET  /v1/models                      one model
    GET  /health                         200

Run: ``python benchmarks/mock_upstream.py --port 0`` prints ``READY <port>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any, cast

MODEL = "gpt-4o-mini"
TOOL_NAME = "lookup_customer"
TOOL_ARGS = '{"customer_id": "C-1042"}'
PROMPT_TOKENS = 1000
COMPLETION_TOKENS = 18
_MAX_HEADER = 64 * 1024


def completion_body(model: str = MODEL) -> dict[str, Any]:
    return {
        "id": "chatcmpl-mock0001",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "system_fingerprint": "fp_mock",
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [{
                    "id": "call_mock_1",
                    "type": "function",
                    "function": {"name": TOOL_NAME, "arguments": TOOL_ARGS},
                }],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                  "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS},
    }


def stream_events(model: str = MODEL) -> list[dict[str, Any]]:
    base = {"id": "chatcmpl-mock0001", "object": "chat.completion.chunk",
            "created": 1_700_000_000, "model": model, "system_fingerprint": "fp_mock"}
    half = len(TOOL_ARGS) // 2

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}]}

    return [
        chunk({"role": "assistant", "content": None}),
        chunk({"tool_calls": [{"index": 0, "id": "call_mock_1", "type": "function",
                               "function": {"name": TOOL_NAME, "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": TOOL_ARGS[:half]}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": TOOL_ARGS[half:]}}]}),
        chunk({}, "tool_calls"),
        {**base, "choices": [],
         "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                   "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}},
    ]


def _response(status: str, ctype: str, body: bytes) -> bytes:
    head = (f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\n"
            f"content-length: {len(body)}\r\nconnection: keep-alive\r\n\r\n")
    return head.encode() + body


def _chunked_sse(events: list[dict[str, Any]]) -> bytes:
    out = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
           b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
           b"connection: keep-alive\r\n\r\n"]
    payloads = [f"data: {json.dumps(e, separators=(',', ':'))}\n\n".encode() for e in events]
    payloads.append(b"data: [DONE]\n\n")
    for p in payloads:
        out.append(f"{len(p):x}\r\n".encode() + p + b"\r\n")
    out.append(b"0\r\n\r\n")
    return b"".join(out)


COMPLETION = _response("200 OK", "application/json",
                       json.dumps(completion_body(), separators=(",", ":")).encode())
STREAM = _chunked_sse(stream_events())
MODELS = _response("200 OK", "application/json", json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1_700_000_000,
                                 "owned_by": "mock"}]}).encode())
HEALTH = _response("200 OK", "application/json", b'{"ok":true}')
NOT_FOUND = _response("404 Not Found", "application/json",
                      b'{"error":{"message":"not found","type":"invalid_request_error",'
                      b'"code":"not_found"}}')
BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
               b"connection: close\r\n\r\n")


def _wants_stream(body: bytes) -> bool:
    # Only a body that mentions "stream" is parsed; the common case costs a substring scan.
    if b'"stream"' not in body:
        return False
    try:
        return bool(json.loads(body).get("stream"))
    except (ValueError, AttributeError):
        return False


def answer(method: bytes, path: bytes, body: bytes) -> bytes:
    """The canned bytes for one request (pure: the test calls it directly)."""
    path = path.split(b"?", 1)[0]
    if method == b"POST" and path.endswith(b"/chat/completions"):
        return STREAM if _wants_stream(body) else COMPLETION
    if method == b"GET" and path.endswith(b"/models"):
        return MODELS
    if method == b"GET" and path in (b"/health", b"/healthz", b"/"):
        return HEALTH
    return NOT_FOUND


class _HttpProtocol(asyncio.Protocol):
    __slots__ = ("_buf", "_transport")

    def __init__(self) -> None:
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-typed ones.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data
        out: list[bytes] = []
        close = False
        # Pipelined requests are answered in order; a partial one waits for more bytes.
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEADER:
                    out.append(BAD_REQUEST)
                    close = True
                    buf = b""
                break
            head = buf[:end]
            first, _, rest = head.partition(b"\r\n")
            parts = first.split(b" ")
            if len(parts) != 3:
                out.append(BAD_REQUEST)
                close = True
                buf = b""
                break
            length = 0
            lower = rest.lower()
            if b"transfer-encoding: chunked" in lower:
                out.append(BAD_REQUEST)  # no client we drive sends chunked bodies
                close = True
                buf = b""
                break
            i = lower.find(b"content-length:")
            if i >= 0:
                j = lower.find(b"\r\n", i)
                length = int(lower[i + 15:j if j >= 0 else len(lower)].strip() or 0)
            total = end + 4 + length
            if len(buf) < total:
                break
            body = buf[end + 4:total]
            buf = buf[total:]
            out.append(answer(parts[0], parts[1], body))
            if b"connection: close" in lower:
                close = True
                break
        self._buf = buf
        t = self._transport
        if t is None:
            return
        if out:
            t.write(b"".join(out) if len(out) > 1 else out[0])
        if close:
            t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def serve(host: str, port: int, ready: asyncio.Future[int] | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_HttpProtocol, host, port, backlog=1024, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready.set_result(bound)
    else:
        print(f"READY {bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    run: Any = asyncio.run
    if os.environ.get("MOCK_NO_UVLOOP") != "1":
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            pass
    run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
