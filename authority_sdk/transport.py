"""httpx transports that run the engine in-process around the real transport.

Every path of the openai client (``create``, ``stream=True``, ``.stream()``,
``.parse()``, ``with_raw_response``, ``with_options()``) goes through its HTTP
layer, so gating here cannot be bypassed by a new openai method. Chat requests
are gated; ``GET`` requests (``models.list``) pass through; any other ``POST``
is refused, because the gateway cannot vouch for what it does not understand.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx

from .engine import CallContext, Gateway, UpstreamReply
from .errors import AuthorityError, InvalidRequest, UpstreamError, UpstreamTimeout
from .formats import format_for_path
from .wire import Caller, GatewayRequest, GatewayResponse, error_response

__all__ = ["AsyncAuthorityTransport", "AuthorityTransport", "upstream_error"]


def upstream_error(exc: Exception, timeout_s: float | None = None) -> AuthorityError:
    """Map an httpx failure to the gateway's codes: timeout → 504, connection → 502."""
    if isinstance(exc, httpx.TimeoutException):
        after = f" after {timeout_s:g}s" if timeout_s else ""
        return UpstreamTimeout(f"the upstream did not answer in time{after}")
    return UpstreamError(f"cannot reach the upstream: {type(exc).__name__}: {exc}")


def _is_chat(request: httpx.Request) -> bool:
    return request.method == "POST" and format_for_path(request.url.path) is not None


def _gateway_request(request: httpx.Request, caller: Caller) -> GatewayRequest:
    headers = {k.lower(): v for k, v in request.headers.items()}
    return GatewayRequest(caller=caller, body=request.content, headers=headers,
                          path=request.url.path, method=request.method)


def _forward(request: httpx.Request, ctx: CallContext) -> httpx.Request:
    headers = httpx.Headers(request.headers)
    headers["content-length"] = str(len(ctx.upstream_body))
    # We read the answer ourselves; a compressed body would only cost a decode.
    headers["accept-encoding"] = "identity"
    for private in ("idempotency-key", "x-authority-retry-key"):
        headers.pop(private, None)
    return httpx.Request(request.method, request.url, headers=headers,
                         content=ctx.upstream_body, extensions=request.extensions)


def _refuse(request: httpx.Request) -> httpx.Response:
    exc = InvalidRequest(f"{request.method} {request.url.path} is not governed by the gateway",
                         code="endpoint_not_allowed")
    return _to_httpx(error_response(exc), request)


class _ClosingStream(httpx.SyncByteStream):
    """httpx never closes a plain iterator given as content. Closing the response must close
    the gate's generator: it audits the abandoned request and frees the upstream connection."""

    def __init__(self, it: Iterator[bytes]) -> None:
        self._it = it

    def __iter__(self) -> Iterator[bytes]:
        yield from self._it

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


class _AsyncClosingStream(httpx.AsyncByteStream):
    def __init__(self, it: AsyncIterator[bytes]) -> None:
        self._it = it

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._it:
            yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self._it, "aclose", None)
        if aclose is not None:
            await aclose()


def _to_httpx(resp: GatewayResponse, request: httpx.Request) -> httpx.Response:
    if resp.stream is not None:
        return httpx.Response(resp.status_code, headers=resp.headers,
                              stream=_ClosingStream(resp.stream), request=request)
    if resp.astream is not None:
        return httpx.Response(resp.status_code, headers=resp.headers,
                              stream=_AsyncClosingStream(resp.astream), request=request)
    return httpx.Response(resp.status_code, headers=resp.headers, content=resp.body,
                          request=request)


class AuthorityTransport(httpx.BaseTransport):
    def __init__(self, gateway: Gateway, caller: Caller,
                 inner: httpx.BaseTransport | None = None) -> None:
        self.gateway = gateway
        self.caller = caller
        self.inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not _is_chat(request):
            if request.method == "GET":
                return self.inner.handle_request(request)
            return _refuse(request)
        request.read()

        def send(ctx: CallContext) -> UpstreamReply:
            try:
                resp = self.inner.handle_request(_forward(request, ctx))
            except httpx.HTTPError as exc:
                raise upstream_error(exc, self.gateway.policy.upstream.timeout_s) from exc
            wrapped = httpx.Response(resp.status_code, headers=resp.headers, stream=resp.stream,
                                     request=request)
            if ctx.stream and resp.status_code < 300:
                return UpstreamReply(resp.status_code, dict(wrapped.headers),
                                     chunks=_sync_chunks(wrapped), close=wrapped.close)
            try:
                body = wrapped.read()
            except httpx.HTTPError as exc:
                raise upstream_error(exc) from exc
            finally:
                wrapped.close()
            return UpstreamReply(resp.status_code, dict(wrapped.headers), body)

        return _to_httpx(self.gateway.handle(_gateway_request(request, self.caller), send),
                         request)

    def close(self) -> None:
        self.inner.close()


def _sync_chunks(resp: httpx.Response) -> Iterator[bytes]:
    try:
        yield from resp.iter_bytes()
    except httpx.HTTPError as exc:
        raise upstream_error(exc) from exc


async def _async_chunks(resp: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.aiter_bytes():
            yield chunk
    except httpx.HTTPError as exc:
        raise upstream_error(exc) from exc


class AsyncAuthorityTransport(httpx.AsyncBaseTransport):
    def __init__(self, gateway: Gateway, caller: Caller,
                 inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.gateway = gateway
        self.caller = caller
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not _is_chat(request):
            if request.method == "GET":
                return await self.inner.handle_async_request(request)
            return _refuse(request)
        await request.aread()

        async def send(ctx: CallContext) -> UpstreamReply:
            try:
                resp = await self.inner.handle_async_request(_forward(request, ctx))
            except httpx.HTTPError as exc:
                raise upstream_error(exc, self.gateway.policy.upstream.timeout_s) from exc
            wrapped = httpx.Response(resp.status_code, headers=resp.headers, stream=resp.stream,
                                     request=request)
            if ctx.stream and resp.status_code < 300:
                return UpstreamReply(resp.status_code, dict(wrapped.headers),
                                     achunks=_async_chunks(wrapped), close=wrapped.aclose)
            try:
                body = await wrapped.aread()
            except httpx.HTTPError as exc:
                raise upstream_error(exc) from exc
            finally:
                await wrapped.aclose()
            return UpstreamReply(resp.status_code, dict(wrapped.headers), body)

        resp = await self.gateway.ahandle(_gateway_request(request, self.caller), send)
        return _to_httpx(resp, request)

    async def aclose(self) -> None:
        await self.inner.aclose()
