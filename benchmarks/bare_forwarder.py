"""The limit of the gateway's own stack: uvicorn + the aiohttp upstream pool, no decisions.

``python benchmarks/bare_forwarder.py --port P --upstream URL [--fastapi]`` reads each
request body and POSTs it to ``URL/chat/completions`` through one pooled aiohttp
session (the proxy's own settings), then answers with the upstream's status and body.
With ``--fastapi`` the same work sits behind one FastAPI route, to show what the
framework alone costs. The benchmark compares ``authority serve`` against this.
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn

# At module level: with postponed annotations FastAPI resolves ``request: Request`` in the
# module's globals (imported inside the factory it became a required query field: 422).
from fastapi import FastAPI, Request
from fastapi.responses import Response

_session: aiohttp.ClientSession | None = None
_target = ""
_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}


def _pool() -> aiohttp.ClientSession:
    global _session
    if _session is None:  # created inside the server's event loop, as the proxy does
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=60), trust_env=False, auto_decompress=False)
    return _session


async def _forward(body: bytes) -> tuple[int, bytes]:
    async with _pool().post(_target, data=body, headers=_HEADERS) as resp:
        return resp.status, await resp.read()


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    status, payload = await _forward(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def fastapi_app() -> Any:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        status, payload = await _forward(await request.body())
        return Response(payload, status_code=status, media_type="application/json")

    return app


def main() -> None:
    global _target
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    ap.add_argument("--fastapi", action="store_true")
    a = ap.parse_args()
    _target = a.upstream.rstrip("/") + "/chat/completions"
    app = fastapi_app() if a.fastapi else raw_app
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False,
                lifespan="off" if not a.fastapi else "auto")


if __name__ == "__main__":
    main()
