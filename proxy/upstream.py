"""The proxy's one connection pool to the upstream, and the engine's ``send``.

Requests go out with the gateway's own upstream key; nothing of the caller's
request but the body the engine prepared is forwarded (never its key).

The pool is aiohttp's, not httpx's: httpcore checks every pooled connection on
each request (encode/httpx#3215), so at 64 concurrent callers the proxy spent
more time choosing a connection than gating the call (218 req/s against 757
with aiohttp on the same benchmark). The SDK keeps httpx: there the transport
is openai's own.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from authority_sdk.engine import CallContext, UpstreamReply
from authority_sdk.errors import AuthorityError, upstream_error
from authority_sdk.models_list import allowed_models, model_entries
from authority_sdk.policy import Policy

from .metrics import Metrics
from .observe import current_info

__all__ = ["Upstream"]

_MODELS_TTL_S = 60.0


def _upstream_error(exc: BaseException, timeout_s: float | None = None) -> AuthorityError:
    timed_out = isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError)
    return upstream_error(exc, timed_out=timed_out, timeout_s=timeout_s)


_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class Upstream:
    def __init__(self, policy: Policy, metrics: Metrics) -> None:
        cfg = policy.upstream
        self.base_url = cfg.base_url.rstrip("/")
        self.timeout_s = cfg.timeout_s
        self.metrics = metrics
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self._headers = {"content-type": "application/json", "accept": "application/json",
                         # The engine reads whole bodies; compression would only cost a decode.
                         "accept-encoding": "identity"}
        if key:
            self._headers["authorization"] = f"Bearer {key}"
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
                                           allow_redirects=False)
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
            async with self.session.get(self.base_url + "/models", headers=headers) as resp:
                payload = await resp.json(content_type=None) if resp.status == 200 else None
            models = model_entries(payload)
        except (*_ERRORS, ValueError):
            return None
        if models is None:
            return None
        self._models = (now, models)
        return models

    async def allowed_models(self, patterns: list[str]) -> list[dict[str, Any]]:
        """Models matching the environment's globs (the rule the SDK applies too)."""
        return allowed_models(await self.models(), patterns)
