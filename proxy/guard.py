"""The proxy's input boundary: who is calling and how big the body is, before any body is read.

FastAPI reads and parses a request's body before it runs a route's
dependencies, so a key checked in a dependency comes too late: a 200 MB body
with no key used to be read and parsed before the 401. This pure ASGI
middleware sits in front of the app and, from the request line and headers
alone,

1. finds the route and the roles it needs (read from the route's own
   ``RoleCheck`` dependency, so the roles are declared once, on the route);
2. authenticates the key for every route that needs one (every path under
   ``/v1/`` and ``/authority/`` except the console page) and checks its roles;
3. bounds the body: a declared ``Content-Length`` above the route's limit is
   refused at once; a chunked body is read here, counted as it streams in, and
   refused as soon as it passes the limit, then handed on from memory.

Refusals leave in OpenAI's error shape with ``Connection: close`` (the unread
body is not drained). An unauthenticated one is never audited (junk costs the
gateway no fsync); an authenticated one is, through ``on_refusal``. The
identity found here travels in the ASGI scope, so the route's dependency does
not hash the key again.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from authority_sdk.errors import (
    AuthenticationFailed,
    AuthorityError,
    Forbidden,
    InvalidRequest,
    RequestTooLarge,
)

from .auth import Identity, KeyRing
from .observe import current_info
from .refusals import decision_for

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["IDENTITY", "MANAGEMENT_MAX_BODY", "Access", "InputGuard", "RoleCheck", "RouteTable"]

IDENTITY = "authority.identity"
# Management bodies are a reason and a flag or two; 64 KiB is generous.
MANAGEMENT_MAX_BODY = 64 * 1024
_KEYED_PREFIXES = ("/v1/", "/authority/")
_PUBLIC_KEYED_PATHS = frozenset({"/authority/ui"})

Refusal = Callable[[Identity, AuthorityError, str, str], Awaitable[AuthorityError | None]]


class RoleCheck:
    """A route's dependency: the caller's identity, refused unless it has one of ``roles``.

    The guard reads ``roles`` off the route to refuse before the body is read; this
    check runs again inside the route (cheap) so the app stays safe without the guard.
    """

    def __init__(self, *roles: str) -> None:
        self.names = roles  # in the order the route declares them, for the error message
        self.roles = frozenset(roles)

    async def __call__(self, request: Request) -> Identity:
        ident: Identity | None = request.scope.get(IDENTITY)
        if ident is None:
            ident = request.app.state.keyring.authenticate(request.headers.get("authorization"))
            _note_identity(ident)
        ident.require(*self.names)
        return ident


@dataclass(frozen=True)
class Access:
    """What a request needs before its body may be read."""

    roles: frozenset[str] | None  # None: no key; empty: any valid key
    max_body: int
    names: tuple[str, ...] = ()


def _role_check(dependant: Any) -> RoleCheck | None:
    for dep in getattr(dependant, "dependencies", ()):
        call = getattr(dep, "call", None)
        if isinstance(call, RoleCheck):
            return call
        found = _role_check(dep)
        if found is not None:
            return found
    return None


class RouteTable:
    """Method and path → :class:`Access`, built once from the app's routes.

    Static paths are a dict lookup (the chat route costs one); only paths with
    parameters are matched by regex.
    """

    def __init__(self, routes: list[Any], *, max_body: int, management_max_body: int) -> None:
        self.max_body = max_body
        self.management_max_body = min(management_max_body, max_body)
        self.static: dict[str, dict[str, Access]] = {}
        self.dynamic: list[tuple[re.Pattern[str], dict[str, Access]]] = []
        for route in routes:
            path = getattr(route, "path", None)
            regex = getattr(route, "path_regex", None)
            if path is None or regex is None:
                continue
            check = _role_check(getattr(route, "dependant", None))
            access = Access(check.roles if check else None, self._limit(path),
                            check.names if check else ())
            methods = getattr(route, "methods", None) or {"GET"}
            by_method = {m: access for m in methods}
            if getattr(route, "param_convertors", None):
                # One path may have a route per method (GET shows, POST decides): one entry.
                same = next((m for r, m in self.dynamic if r.pattern == regex.pattern), None)
                if same is not None:
                    same.update(by_method)
                else:
                    self.dynamic.append((regex, by_method))
            else:
                self.static.setdefault(path, {}).update(by_method)

    def _limit(self, path: str) -> int:
        return self.management_max_body if path.startswith("/authority/") else self.max_body

    def lookup(self, method: str, path: str) -> Access:
        by_method = self.static.get(path)
        if by_method is None:
            for regex, methods in self.dynamic:
                if regex.match(path):
                    by_method = methods
                    break
        if by_method is not None:
            found = by_method.get(method)
            if found is not None:
                return found
        # Not a route (404) or not this method (405): the router answers without reading
        # the body; under the keyed prefixes it answers only a valid key.
        keyed = path.startswith(_KEYED_PREFIXES) and path not in _PUBLIC_KEYED_PATHS
        return Access(frozenset() if keyed else None, self.management_max_body)


def _note_identity(ident: Identity) -> None:
    info = current_info()
    if info is not None:
        info.key = ident.name
        info.environment = ident.caller.environment


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers") or ():
        if k == name:
            return bytes(v)
    return None


class InputGuard:
    def __init__(self, app: ASGIApp, *, keyring: KeyRing, routes: Callable[[], list[Any]],
                 max_body: int, on_refusal: Refusal,
                 management_max_body: int = MANAGEMENT_MAX_BODY) -> None:
        self.app = app
        self.keyring = keyring
        self._routes = routes
        self._max_body = max_body
        self._management_max_body = management_max_body
        self._table: RouteTable | None = None
        self.on_refusal = on_refusal

    @property
    def table(self) -> RouteTable:
        # Built on first use: routes are added to the app after its middleware is declared.
        if self._table is None:
            self._table = RouteTable(self._routes(), max_body=self._max_body,
                                     management_max_body=self._management_max_body)
        return self._table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        access = self.table.lookup(method, path)
        ident: Identity | None = None
        if access.roles is not None:
            auth = _header(scope, b"authorization")
            try:
                ident = self.keyring.authenticate(auth.decode("latin-1") if auth else None)
            except AuthenticationFailed as exc:
                await self._refuse(send, exc, None, method, path)
                return
            scope[IDENTITY] = ident
            _note_identity(ident)
            if access.roles and not ident.caller.roles & access.roles:
                try:
                    ident.require(*access.names)
                except Forbidden as exc:
                    await self._refuse(send, exc, ident, method, path)
                    return
        declared = _header(scope, b"content-length")
        if declared is not None:
            size = int(declared) if declared.isdigit() and len(declared) <= 18 else None
            if size is None:
                await self._refuse(send, InvalidRequest("Content-Length is not a number"),
                                   ident, method, path)
                return
            if size > access.max_body:
                await self._refuse(send, RequestTooLarge(
                    f"the request body is {size} bytes; the limit here is {access.max_body}"),
                    ident, method, path)
                return
        if _header(scope, b"transfer-encoding") is not None:
            body = await self._read_counted(receive, access.max_body)
            if body is None:  # the client went away
                return
            if isinstance(body, RequestTooLarge):
                await self._refuse(send, body, ident, method, path)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    @staticmethod
    async def _read_counted(receive: Receive, limit: int) -> bytes | RequestTooLarge | None:
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return RequestTooLarge(
                    f"the request body passes the limit here of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, send: Send, exc: AuthorityError, ident: Identity | None,
                      method: str, path: str) -> None:
        request_id: str | None = None
        if ident is not None:
            # An authenticated refusal goes on the record; if it cannot, that is the answer.
            replaced = await self.on_refusal(ident, exc, method, path)
            if replaced is not None and replaced is not exc:
                exc = replaced
            rid = exc.details.get("request_id")
            request_id = rid if isinstance(rid, str) else None
        info = current_info()
        if info is not None:
            info.decision = info.decision or decision_for(exc.status_code)
            info.code = info.code or exc.code
            info.request_id = info.request_id or request_id
        await send_error(send, exc, close=True, request_id=request_id)


async def send_error(send: Send, exc: AuthorityError, *, close: bool = False,
                     request_id: str | None = None) -> None:
    """``exc`` as a complete response in OpenAI's error shape."""
    import json

    body = json.dumps(exc.to_body()).encode()  # ASCII: lone surrogates leave escaped
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()),
               (b"x-should-retry", b"true" if exc.retryable else b"false")]
    if exc.status_code == 401:
        headers.append((b"www-authenticate", b'Bearer realm="authority"'))
    if request_id:
        headers.append((b"x-request-id", request_id.encode("ascii", "replace")))
    if close:
        headers.append((b"connection", b"close"))
    start: Message = {"type": "http.response.start", "status": exc.status_code,
                      "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server does

    return replay
