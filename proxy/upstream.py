"""The proxy's one connection pool to the upstream, and the engine's ``send``.

Requests go out with the gateway's own upstream key; nothing of the caller's
request but the body the engine prepared is forwarded (never its key).
"""

from __future__ import annotations

import fnmatch
import os
import time
from typing import Any

import httpx

from authority_sdk.engine import CallContext, UpstreamReply
from authority_sdk.policy import Policy
from authority_sdk.transport import _async_chunks, upstream_error

from .metrics import Metrics
from .observe import current_info

__all__ = ["Upstream"]

_MODELS_TTL_S = 60.0


class Upstream:
    def __init__(self, policy: Policy, metrics: Metrics,
                 client: httpx.AsyncClient | None = None) -> None:
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
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.timeout_s),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            follow_redirects=False, trust_env=False)
        self._models: tuple[float, list[dict[str, Any]]] | None = None

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, ctx: CallContext) -> UpstreamReply:
        headers = {**self._headers, "x-request-id": ctx.request_id}
        if ctx.stream:
            headers["accept"] = "text/event-stream"
        request = self._client.build_request("POST", self.base_url + "/chat/completions",
                                             content=ctx.upstream_body, headers=headers)
        info = current_info()
        started = time.perf_counter()
        if info is not None:
            info.upstream_start = started
            info.streamed = ctx.stream
        try:
            resp = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise upstream_error(exc, self.timeout_s) from exc
        if ctx.stream and resp.status_code < 300:
            self._observe(started, info)
            return UpstreamReply(resp.status_code, dict(resp.headers),
                                 achunks=_async_chunks(resp), close=resp.aclose)
        try:
            body = await resp.aread()
        except httpx.HTTPError as exc:
            raise upstream_error(exc, self.timeout_s) from exc
        finally:
            await resp.aclose()
        self._observe(started, info)
        return UpstreamReply(resp.status_code, dict(resp.headers), body)

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
            resp = await self._client.get(self.base_url + "/models", headers=headers)
            data = resp.json().get("data") if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        if not isinstance(data, list):
            return None
        models = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        self._models = (now, models)
        return models

    async def allowed_models(self, patterns: list[str]) -> list[dict[str, Any]]:
        """Models matching the environment's globs: from the upstream's list when it answers,
        else the patterns that name one model literally."""
        listed = await self.models()
        if listed is not None:
            return [m for m in listed
                    if any(fnmatch.fnmatchcase(m["id"], p) for p in patterns)]
        return [{"id": p, "object": "model", "created": 0, "owned_by": "authority"}
                for p in patterns if not any(c in p for c in "*?[")]
