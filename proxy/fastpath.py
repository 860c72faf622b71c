"""The gated OpenAI doors as a plain ASGI handler, in front of FastAPI's router.

``POST /v1/chat/completions``, ``/v1/embeddings`` and ``/v1/responses`` are the gateway's
hot path: every model call of every app passes here. The input guard has already
authenticated the key, checked its role and bounded the body; what FastAPI would add
on top (routing over every route, dependency solving, a ``Request`` object) measured
about 15 % of the proxy's CPU per request, with nothing to decide. So these requests go
straight to the engine and leave through the same Starlette responses and the same
error path (``answer_error``) as the routes, which stay declared in FastAPI for the
OpenAPI document and for an app built without the guard (they then serve the requests
themselves).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from authority_sdk.errors import AuthorityError, RequestTooLarge
from authority_sdk.wire import GatewayRequest, GatewayResponse, error_response

from .auth import Identity
from .guard import IDENTITY
from .observe import current_info

__all__ = ["GATED_PATHS", "PRIVATE_HEADERS", "GatedDoors"]

log = logging.getLogger("authority.proxy")

GATED_PATHS = frozenset({"/v1/chat/completions", "/v1/embeddings", "/v1/responses"})
# Request headers the engine has no business seeing (it records what it is given).
PRIVATE_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})

Handle = Callable[[GatewayRequest], Awaitable[GatewayResponse]]
# (identity, error, method, path) -> the response that answers it (audited as the routes do)
AnswerError = Callable[[Identity | None, AuthorityError, str, str], Awaitable[Any]]
ToResponse = Callable[[GatewayResponse], Any]


class GatedDoors:
    def __init__(self, app: ASGIApp, *, handle: Handle, answer_error: AnswerError,
                 to_response: ToResponse, max_body: int) -> None:
        self.app = app
        self.handle = handle
        self.answer_error = answer_error
        self.to_response = to_response
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ident: Identity | None = scope.get(IDENTITY) if scope["type"] == "http" else None
        if (ident is None or scope["method"] != "POST" or scope["path"] not in GATED_PATHS
                or "agent" not in ident.caller.roles):
            await self.app(scope, receive, send)  # the router answers (and refuses) the rest
            return
        path = scope["path"]
        info = current_info()
        if info is not None:
            info.route = path  # as the router would have named it (the metrics' label)
        try:
            body = await _read_body(receive, self.max_body)
            if body is None:
                return  # the client went away before its body arrived
            headers = {k.decode("latin-1"): v.decode("latin-1")
                       for k, v in scope["headers"]}
            for name in PRIVATE_HEADERS:
                headers.pop(name, None)
            response = self.to_response(await self.handle(
                GatewayRequest(ident.caller, body, headers, path=path)))
        except AuthorityError as exc:
            response = await self.answer_error(ident, exc, "POST", path)
        except Exception:
            log.exception("unhandled error on POST %s", path)
            try:  # on the record, as the routes' own failures are
                response = await self.answer_error(
                    ident, AuthorityError("internal error in the gateway"), "POST", path)
            except Exception:
                log.exception("the failure on POST %s could not be answered as usual", path)
                response = self.to_response(error_response(
                    AuthorityError("internal error in the gateway")))
        await response(scope, receive, send)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The body, refused with 413 past ``limit`` (the guard has refused a declared or
    chunked size above it already; this holds should a server pass more than declared)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise RequestTooLarge(f"the request body passes the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
