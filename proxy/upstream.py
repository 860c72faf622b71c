"""The proxy's connection pools to the upstreams, one per upstream of the policy, and the
engine's ``send``.

Requests go out with the gateway's own upstream key; nothing of the caller's
request but the body the engine prepared is forwarded (never its key). Each
request goes to ``ctx.upstream``, which the engine chose by the model (and moves
along the fallbacks on a 5xx, a connection error or a timeout).

The pool is aiohttp's, not httpx's: httpcore checks every pooled connection on
each request (encode/httpx#3215), so at 64 concurrent callers the proxy spent
more time choosing a connection than gating the call (218 req/s against 757
with aiohttp on the same benchmark). The SDK keeps httpx: there the transport
is openai's own.

A reloaded policy gets pools of its own (its upstreams may differ); the old ones are
retired: closed once the last request that started under the old policy is done. So are
the clients of that policy's executors (a webhook's connection pool), which the same
requests use: an engine built for a policy has executors of its own too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from authority_sdk.engine import CallContext, UpstreamReply
from authority_sdk.errors import AuthorityError, upstream_error
from authority_sdk.executors import ExecutorRegistry
from authority_sdk.models_list import allowed_models, model_entries
from authority_sdk.policy import NamedUpstream, Policy

from .metrics import Metrics
from .observe import current_info

__all__ = ["Pool", "Upstreams"]

_MODELS_TTL_S = 60.0
# A retired set of pools is closed at the latest this long after the slowest call could end,
# should a request never say it is done (a stream its client dropped and nobody closed).
_RETIRE_MARGIN_S = 30.0


def _upstream_error(exc: BaseException, timeout_s: float | None = None) -> AuthorityError:
    timed_out = isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError)
    return upstream_error(exc, timed_out=timed_out, timeout_s=timeout_s)


_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class Pool:
    """One upstream: its connection pool, its URL, query, headers and key."""

    def __init__(self, cfg: NamedUpstream, metrics: Metrics) -> None:
        self.name = cfg.name
        self.base_url = cfg.base_url.rstrip("/")
        self.timeout_s = cfg.timeout_s
        self.query = dict(cfg.query)
        self.metrics = metrics
        self._headers = {"content-type": "application/json", "accept": "application/json",
                         # The engine reads whole bodies; compression would only cost a decode.
                         "accept-encoding": "identity", **cfg.headers}
        key = cfg.api_key()
        if key:
            self._headers.update(cfg.auth_headers(key))
        self._session: aiohttp.ClientSession | None = None
        self._models: tuple[float, list[dict[str, Any]]] | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created on first use, inside the server's event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=200, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                trust_env=False, auto_decompress=False)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, ctx: CallContext) -> UpstreamReply:
        headers = {**self._headers, "x-request-id": ctx.request_id}
        if ctx.stream:
            headers["accept"] = "text/event-stream"
        if ctx.trace is not None:  # the upstream's work becomes a child of the call's span
            headers.update(ctx.trace.headers())
        info = current_info()
        started = time.perf_counter()
        if info is not None:
            info.upstream_start = started
            info.streamed = ctx.stream
        assert ctx.fmt is not None
        try:
            resp = await self.session.post(self.base_url + ctx.fmt.path,
                                           data=ctx.upstream_body, headers=headers,
                                           params=self.query or None, allow_redirects=False)
        except _ERRORS as exc:
            raise _upstream_error(exc, self.timeout_s) from exc
        if ctx.stream and resp.status < 300:
            self._observe(started, info)

            async def close() -> None:
                resp.release()

            return UpstreamReply(resp.status, dict(resp.headers),
                                 achunks=self._chunks(resp), close=close)
        try:
            body = await resp.read()
        except _ERRORS as exc:
            raise _upstream_error(exc, self.timeout_s) from exc
        finally:
            resp.release()
        self._observe(started, info)
        return UpstreamReply(resp.status, dict(resp.headers), body)

    async def _chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.content.iter_any():
                yield chunk
        except _ERRORS as exc:
            raise _upstream_error(exc, self.timeout_s) from exc

    def _observe(self, started: float, info: Any) -> None:
        ended = time.perf_counter()
        if info is not None:
            info.upstream_end = ended
        self.metrics.upstream_latency.observe(ended - started)

    async def models(self) -> list[dict[str, Any]] | None:
        """The upstream's model list (cached a minute), or None if it cannot be had."""
        now = time.monotonic()
        if self._models is not None and now - self._models[0] < _MODELS_TTL_S:
            return self._models[1]
        headers = {k: v for k, v in self._headers.items() if k != "content-type"}
        try:
            async with self.session.get(self.base_url + "/models", headers=headers,
                                        params=self.query or None) as resp:
                payload = await resp.json(content_type=None) if resp.status == 200 else None
            models = model_entries(payload)
        except (*_ERRORS, ValueError, RecursionError):
            return None
        if models is None:
            return None
        self._models = (now, models)
        return models


class Upstreams:
    """The pools of one policy, and what is in flight through them. ``executors``: that
    policy's executors, whose clients close with the pools."""

    def __init__(self, policy: Policy, metrics: Metrics,
                 executors: ExecutorRegistry | None = None) -> None:
        self.policy = policy
        self.pools = {cfg.name: Pool(cfg, metrics) for cfg in policy.routes}
        self.executors = executors
        self._in_flight = 0
        self._retired = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Task[None] | None = None
        self._backstop: asyncio.TimerHandle | None = None

    async def send(self, ctx: CallContext) -> UpstreamReply:
        assert ctx.upstream is not None, "the engine routes every call before sending it"
        return await self.pools[ctx.upstream.name].send(ctx)

    # -- requests in flight, so a retired set closes only when they are done -------------

    def enter(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._in_flight += 1

    def leave(self) -> None:
        self._in_flight -= 1
        if self._retired and self._in_flight <= 0:
            self._close_soon()

    async def held(self, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """A streamed answer: the request is in flight until its last chunk."""
        try:
            async for chunk in stream:
                yield chunk
        finally:
            self.leave()

    def retire(self) -> None:
        """No new request comes here (a reload replaced the policy); safe from any thread."""
        loop = self._loop
        if loop is None:
            # Never used on a loop: its sessions and async clients were never opened (a
            # management call may have opened an executor's sync client).
            if self.executors is not None:
                self.executors.close()
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: so are its sessions
            loop.call_soon_threadsafe(self._retire)

    def _retire(self) -> None:
        self._retired = True
        if self._in_flight <= 0:
            self._close_soon()
        else:
            assert self._loop is not None
            self._backstop = self._loop.call_later(self.policy.max_call_s + _RETIRE_MARGIN_S,
                                                   self._close_soon)

    def _close_soon(self) -> None:
        if self._closing is None:
            if self._backstop is not None:
                self._backstop.cancel()
            self._closing = asyncio.get_running_loop().create_task(self.aclose())

    @property
    def closed(self) -> bool:
        return self._closing is not None and self._closing.done()

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.aclose()
        if self.executors is not None:
            await self.executors.aclose()

    # -- GET /v1/models ------------------------------------------------------------------

    async def allowed_models(self, patterns: list[str]) -> list[dict[str, Any]]:
        """The models the environment's globs allow, from every upstream: each lists the
        models routed to it (by its own list, or the literal names when it cannot list)."""
        lists = await asyncio.gather(*(pool.models() for pool in self.pools.values()))
        out: dict[str, dict[str, Any]] = {}
        for pool, listed in zip(self.pools.values(), lists, strict=True):
            for entry in allowed_models(listed, patterns):
                chain = self.policy.route(entry["id"])
                if chain is not None and chain[0].name == pool.name:
                    out.setdefault(entry["id"], entry)
        return list(out.values())
