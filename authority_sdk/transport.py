"""Transports that run the engine in-process around the real HTTP layer.

Every path of the openai client (``create``, ``stream=True``, ``.stream()``,
``.parse()``, ``with_raw_response``, ``with_options()``) goes through its HTTP
layer, so gating here cannot be bypassed by a new openai method. :func:`route` is
the one place that decides what a request is: chat requests are gated, ``GET
/models`` is answered with the models the policy allows, anything else is
refused (``endpoint_not_allowed``), because the gateway cannot vouch for what it
does not understand.

openai 2.x runs on ``httpx``, openai 3.x on ``httpx2`` (same API, other classes),
and openai 3 still accepts a plain ``httpx.Client``. The gate's logic is written
once; :func:`transport_classes` binds it to one library's base classes.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Iterator
from functools import cache, lru_cache
from typing import Any, Literal

from . import served
from .engine import CallContext, Gateway, UpstreamReply
from .errors import AuthorityError, EndpointNotAllowed, upstream_error
from .formats import format_for_path
from .models_list import models_body
from .policy import NamedUpstream
from .wire import Caller, GatewayRequest, GatewayResponse, error_response

__all__ = ["HTTP_LIBRARIES", "is_gate", "route", "sender", "transport_classes"]

HTTP_LIBRARIES = ("httpx", "httpx2")
# openai's own retry loop sends one key for all attempts of a call under this header
# (AuthorityClient names it), so the gateway replays a retry instead of running it again.
RETRY_KEY_HEADER = "X-Authority-Retry-Key"
Route = Literal["chat", "models", "stored", "refuse"]
# Set by the gate itself (content-length, accept-encoding) or private to the gateway.
_NOT_FORWARDED = frozenset({"content-length", "accept-encoding", "idempotency-key",
                            RETRY_KEY_HEADER.lower()})


@lru_cache(maxsize=256)
def _upstream_url(mod: Any, url: str, query: tuple[tuple[str, str], ...]) -> Any:
    """URLs are immutable: parsed once per upstream and path, not on every call."""
    return mod.URL(url, params=dict(query))


def route(method: str, path: str) -> Route:
    """What the gateway does with a request, by method and URL path: a POST to a path a
    wire format serves goes to the engine (which picks the format by the path)."""
    path = path.rstrip("/")
    if method == "POST" and format_for_path(path) is not None:
        return "chat"
    if method == "GET" and path.endswith("/models"):
        return "models"
    if method == "GET" and served.stored_path(path) is not None:
        return "stored"  # a response this gateway served, from its own record
    # Everything else, GETs included: stored completions, files, batches and conversations
    # hand back model output the gateway never saw.
    return "refuse"


def routed_key(up: NamedUpstream | None) -> tuple[NamedUpstream, str] | None:
    """The SDK routes a call to the policy's upstream only where that upstream's key is
    set in the app's environment; otherwise the app's own base_url and api_key stay as
    they are (an app that brought its own provider keeps it: issue 17)."""
    if up is None:
        return None
    key = up.api_key()
    return (up, key) if key else None


def _reachable(up: NamedUpstream) -> bool:
    """A fallback the SDK can try: one whose credentials it has."""
    return routed_key(up) is not None


def _timeout_of(ctx: CallContext) -> float | None:
    routed = routed_key(ctx.upstream)
    return routed[0].timeout_s if routed is not None else None


def _upstream_error(exc: Exception, timeout_s: float | None = None) -> AuthorityError:
    return upstream_error(exc, timed_out=_is_timeout(exc), timeout_s=timeout_s)


def _is_timeout(exc: Exception) -> bool:
    # Either library's TimeoutException (connect, read, write, pool).
    return any(c.__name__ == "TimeoutException" for c in type(exc).__mro__)


class _Http:
    """The classes of one HTTP library (``httpx`` or ``httpx2``) the gate needs."""

    def __init__(self, name: str) -> None:
        mod: Any = importlib.import_module(name)
        self.name = name
        self.mod = mod
        self.Request = mod.Request
        self.Response = mod.Response
        self.Headers = mod.Headers
        self.HTTPError: type[Exception] = mod.HTTPError

        class ClosingStream(mod.SyncByteStream):
            """The library never closes a plain iterator given as content. Closing the
            response must close the gate's generator: it audits the abandoned request and
            frees the upstream connection."""

            def __init__(self, it: Iterator[bytes]) -> None:
                self._it = it

            def __iter__(self) -> Iterator[bytes]:
                yield from self._it

            def close(self) -> None:
                close = getattr(self._it, "close", None)
                if close is not None:
                    close()

        class AsyncClosingStream(mod.AsyncByteStream):
            def __init__(self, it: AsyncIterator[bytes]) -> None:
                self._it = it

            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in self._it:
                    yield chunk

            async def aclose(self) -> None:
                aclose = getattr(self._it, "aclose", None)
                if aclose is not None:
                    await aclose()

        self.ClosingStream = ClosingStream
        self.AsyncClosingStream = AsyncClosingStream

    def gateway_request(self, request: Any, caller: Caller) -> GatewayRequest:
        headers = {k.lower(): v for k, v in request.headers.items()}
        return GatewayRequest(caller=caller, body=request.content, headers=headers,
                              path=request.url.path, method=request.method)

    def forward(self, request: Any, ctx: CallContext) -> Any:
        # The outgoing headers in one pass over the app's, then one Headers built: each
        # pop or set on a Headers object scans all of them, and a call has about twenty.
        drop = _NOT_FORWARDED
        ours: list[tuple[str, str]] = [
            ("content-length", str(len(ctx.upstream_body))),
            # We read the answer ourselves; a compressed body would only cost a decode.
            ("accept-encoding", "identity")]
        url, extensions = request.url, request.extensions
        routed = routed_key(ctx.upstream)
        if routed is not None:
            up, key = routed
            assert ctx.fmt is not None
            # The policy's upstream, with its own credentials: the app's key, host and
            # timeout were meant for the app's base_url, not for this provider.
            own = {**up.headers, **up.auth_headers(key)}
            drop = drop | {"authorization", "api-key", "host", up.api_key_header.lower(),
                           *(name.lower() for name in own)}
            ours.extend(own.items())
            url = self.upstream_url(up, ctx.fmt.path, request.url)
            t = up.timeout_s
            extensions = {**extensions,
                          "timeout": {"connect": t, "read": t, "write": t, "pool": t}}
        if ctx.trace is not None:  # the upstream's work becomes a child of the call's span
            trace = ctx.trace.headers()
            drop = drop | {"traceparent", "tracestate", *(name.lower() for name in trace)}
            ours.extend(trace.items())
        headers: list[tuple[Any, Any]] = [
            (name, value) for name, value in request.headers.raw
            if name.decode("latin-1").lower() not in drop]
        headers.extend(ours)
        return self.Request(request.method, url, headers=headers,
                            content=ctx.upstream_body, extensions=extensions)

    def upstream_url(self, up: NamedUpstream, path: str, app_url: Any) -> Any:
        if not app_url.query:  # the common case: the same URL object every call
            return _upstream_url(self.mod, up.base_url + path, tuple(up.query.items()))
        return self.mod.URL(up.base_url + path, params={**dict(app_url.params), **up.query})

    def refuse(self, request: Any) -> Any:
        exc = EndpointNotAllowed.for_request(request.method, request.url.path)
        return self.to_response(error_response(exc), request)

    def to_response(self, resp: GatewayResponse, request: Any) -> Any:
        if resp.stream is not None:
            return self.Response(resp.status_code, headers=resp.headers,
                                 stream=self.ClosingStream(resp.stream), request=request)
        if resp.astream is not None:
            return self.Response(resp.status_code, headers=resp.headers,
                                 stream=self.AsyncClosingStream(resp.astream), request=request)
        return self.Response(resp.status_code, headers=resp.headers, content=resp.body,
                             request=request)

    def models_response(self, status: int, headers: Any, body: bytes, patterns: list[str],
                        request: Any) -> Any:
        out = {k: v for k, v in headers.items()
               if k.lower() not in ("content-length", "content-encoding", "transfer-encoding")}
        out["content-type"] = "application/json"
        return self.Response(200, headers=out, content=models_body(status, body, patterns),
                             request=request)

    def sync_chunks(self, resp: Any) -> Iterator[bytes]:
        try:
            yield from resp.iter_bytes()
        except self.HTTPError as exc:
            raise _upstream_error(exc) from exc

    async def async_chunks(self, resp: Any) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.aiter_bytes():
                yield chunk
        except self.HTTPError as exc:
            raise _upstream_error(exc) from exc


class _SyncSender:
    """Sends through the caller's own client, so its proxies, certificates, mounts, auth
    and event hooks still apply to what goes upstream."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def handle_request(self, request: Any) -> Any:
        return self.client.send(request, stream=True)

    def close(self) -> None:
        self.client.close()


class _AsyncSender:
    def __init__(self, client: Any) -> None:
        self.client = client

    async def handle_async_request(self, request: Any) -> Any:
        return await self.client.send(request, stream=True)

    async def aclose(self) -> None:
        await self.client.aclose()


class _SyncGate:
    """The gate as a sync transport; bound to one HTTP library by :func:`transport_classes`."""

    http: _Http

    def __init__(self, gateway: Gateway, caller: Caller, inner: Any = None) -> None:
        self.gateway = gateway
        self.caller = caller
        self.inner = inner if inner is not None else self.http.mod.HTTPTransport()

    def handle_request(self, request: Any) -> Any:
        http = self.http
        what = route(request.method, request.url.path)
        if what == "refuse":
            return http.refuse(request)
        if what == "models":
            return self._models(request)
        request.read()
        if what == "stored":
            return http.to_response(self.gateway.stored_response(
                http.gateway_request(request, self.caller)), request)

        def send(ctx: CallContext) -> UpstreamReply:
            try:
                resp = self.inner.handle_request(http.forward(request, ctx))
            except http.HTTPError as exc:
                raise _upstream_error(exc, _timeout_of(ctx)) from exc
            if ctx.stream and resp.status_code < 300:
                wrapped = http.Response(resp.status_code, headers=resp.headers,
                                        stream=resp.stream, request=request)
                return UpstreamReply(resp.status_code, dict(wrapped.headers),
                                     chunks=http.sync_chunks(wrapped), close=wrapped.close)
            try:
                # Read as it came (decoded by its own headers, as any Response is).
                body = resp.read()
            except http.HTTPError as exc:
                raise _upstream_error(exc) from exc
            finally:
                resp.close()
            return UpstreamReply(resp.status_code, dict(resp.headers), body)

        return http.to_response(self.gateway.handle(
            http.gateway_request(request, self.caller), send, usable=_reachable), request)

    def _models(self, request: Any) -> Any:
        # An upstream that cannot list gets the literal allowed names, as from the proxy.
        status, headers, body = 0, {}, b""
        try:
            resp = self.inner.handle_request(request)
            try:
                status, headers, body = resp.status_code, resp.headers, resp.read()
            finally:
                resp.close()
        except self.http.HTTPError:
            pass
        patterns = self.gateway.policy.environments[self.caller.environment].models
        return self.http.models_response(status, headers, body, patterns, request)

    def close(self) -> None:
        self.inner.close()


class _AsyncGate:
    http: _Http

    def __init__(self, gateway: Gateway, caller: Caller, inner: Any = None) -> None:
        self.gateway = gateway
        self.caller = caller
        self.inner = inner if inner is not None else self.http.mod.AsyncHTTPTransport()

    async def handle_async_request(self, request: Any) -> Any:
        http = self.http
        what = route(request.method, request.url.path)
        if what == "refuse":
            return http.refuse(request)
        if what == "models":
            return await self._models(request)
        await request.aread()
        if what == "stored":
            return http.to_response(await self.gateway.astored_response(
                http.gateway_request(request, self.caller)), request)

        async def send(ctx: CallContext) -> UpstreamReply:
            try:
                resp = await self.inner.handle_async_request(http.forward(request, ctx))
            except http.HTTPError as exc:
                raise _upstream_error(exc, _timeout_of(ctx)) from exc
            wrapped = http.Response(resp.status_code, headers=resp.headers, stream=resp.stream,
                                    request=request)
            if ctx.stream and resp.status_code < 300:
                return UpstreamReply(resp.status_code, dict(wrapped.headers),
                                     achunks=http.async_chunks(wrapped), close=wrapped.aclose)
            try:
                body = await wrapped.aread()
            except http.HTTPError as exc:
                raise _upstream_error(exc) from exc
            finally:
                await wrapped.aclose()
            return UpstreamReply(resp.status_code, dict(wrapped.headers), body)

        resp = await self.gateway.ahandle(http.gateway_request(request, self.caller), send,
                                          usable=_reachable)
        return http.to_response(resp, request)

    async def _models(self, request: Any) -> Any:
        status, headers, body = 0, {}, b""
        try:
            resp = await self.inner.handle_async_request(request)
            try:
                status, headers, body = resp.status_code, resp.headers, await resp.aread()
            finally:
                await resp.aclose()
        except self.http.HTTPError:
            pass
        patterns = self.gateway.policy.environments[self.caller.environment].models
        return self.http.models_response(status, headers, body, patterns, request)

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            # The client's loop may end next (asyncio.run): what the engine opened on it goes
            # now, closed on it, rather than left to a loop that is gone.
            await self.gateway.aclose()


@cache
def transport_classes(library: str) -> tuple[type[_SyncGate], type[_AsyncGate]]:
    """The (sync, async) gated transport classes for ``httpx`` or ``httpx2``."""
    if library not in HTTP_LIBRARIES:
        raise ValueError(f"unknown HTTP library {library!r} (one of {HTTP_LIBRARIES})")
    http = _Http(library)
    sync = type("AuthorityTransport", (_SyncGate, http.mod.BaseTransport),
                {"http": http, "__module__": __name__})
    async_ = type("AsyncAuthorityTransport", (_AsyncGate, http.mod.AsyncBaseTransport),
                  {"http": http, "__module__": __name__})
    return sync, async_


def is_gate(transport: Any) -> bool:
    return isinstance(transport, _SyncGate | _AsyncGate)


def sender(client: Any, *, is_async: bool) -> Any:
    """The caller's own client as the inner layer of a gate."""
    return _AsyncSender(client) if is_async else _SyncSender(client)
