"""``AuthorityClient``: swap ``OpenAI()`` for it and nothing else changes.

Subclasses of ``openai.OpenAI`` / ``openai.AsyncOpenAI`` whose HTTP client's transport
runs the engine in-process (``httpx`` under openai 2.x, ``httpx2`` under 3.x, or the
library of the ``http_client`` you pass, which is wrapped, not replaced). Nothing of
openai's resource classes is overridden, so every HTTP path is gated and openai upgrades
do not break it; a denial surfaces as the same openai exception the proxy would produce.

What does not go through the HTTP client cannot be gated, so it is refused with an
:class:`~authority_sdk.AuthorityError`: WebSocket connections (``responses.connect()``,
``realtime``, ``live``), which all start by reading ``websocket_base_url``, and the
``provider=`` / ``workload_identity=`` options, which sign or send requests themselves.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Self

import openai

from .engine import Gateway
from .errors import ClientOptionNotAllowed, EndpointNotAllowed
from .http_client import gate_client, resolve_caller
from .policy import Policy
from .wire import Caller

__all__ = ["AsyncAuthorityClient", "AuthorityClient"]

_WEBSOCKETS_REFUSED = (
    "WebSocket connections (responses.connect(), realtime, live) do not pass through the "
    "gateway's HTTP transport, so they cannot be gated and are refused; use chat completions "
    "(POST /v1/chat/completions)")

_UNGATED_OPTIONS = {
    "provider": "a provider signs or rewrites each request after it is built, so the body "
                "the gateway decided on would not be the one sent (or its signature would "
                "break); point the policy's upstream base_url at the provider's "
                "OpenAI-compatible endpoint instead",
    "workload_identity": "workload identity sends requests through its own connection, "
                         "around the gateway; give the client an api_key (or use the proxy)",
}

# openai's copy() reads websocket_base_url to carry it over; only then may it be read.
_copying = threading.local()


def _refuse_ungated_options(kwargs: dict[str, Any]) -> None:
    for name, why in _UNGATED_OPTIONS.items():
        if kwargs.get(name) is not None:
            raise ClientOptionNotAllowed(f"{name}= is not supported by AuthorityClient: {why}")


def _key_retries(client: Any) -> None:
    """openai retries a timed-out or failed call with the same options; naming an
    idempotency header makes it send one key for all attempts of a call, so the gateway
    replays a retry instead of running its actions again. (Not the app's Idempotency-Key:
    these keys are the gateway's, kept only for ``defaults.retry_window_s``.)"""
    from .transport import RETRY_KEY_HEADER

    client._idempotency_header = RETRY_KEY_HEADER


def _client_kwargs(gw: Gateway, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs.setdefault("api_key", os.environ.get("OPENAI_API_KEY") or "unused")
    if not kwargs.get("base_url") and not os.environ.get("OPENAI_BASE_URL"):
        kwargs["base_url"] = gw.policy.routes[0].base_url
    return kwargs


def _copy_kwargs(client: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """openai's copy() rebuilds the client with every constructor field of the installed
    major; ours ride along in its ``_extra_kwargs``."""
    extra: dict[str, Any] = {
        "gateway": client.gateway, "environment": client.environment,
        "caller": client.authority_caller.name, **(kwargs.pop("_extra_kwargs", None) or {})}
    for name in ("gateway", "environment", "caller"):
        if name in kwargs:
            extra[name] = kwargs.pop(name)
    if "policy" in kwargs:
        extra["policy"], extra["gateway"] = kwargs.pop("policy"), None
    kwargs["_extra_kwargs"] = extra
    return kwargs


class _RefusesWebSockets:
    _authority_ws_base_url: Any = None

    @property
    def websocket_base_url(self) -> Any:
        if getattr(_copying, "active", False):
            return self._authority_ws_base_url
        raise EndpointNotAllowed(_WEBSOCKETS_REFUSED)

    @websocket_base_url.setter
    def websocket_base_url(self, value: Any) -> None:
        self._authority_ws_base_url = value


class _Gated(_RefusesWebSockets):
    """What both clients add to openai's: the gate around the HTTP client, the retry key,
    and a copy() that keeps the gateway, environment and caller."""

    _is_async = False
    gateway: Gateway
    environment: str
    authority_caller: Caller

    def __init__(self, *, policy: Policy | str | Path | None = None,
                 environment: str | None = None, gateway: Gateway | None = None,
                 caller: str = "sdk", http_client: Any = None, **kwargs: Any) -> None:
        _refuse_ungated_options(kwargs)
        gw, who = resolve_caller(policy, gateway, environment, caller)
        super().__init__(http_client=gate_client(gw, who, http_client,  # type: ignore[call-arg]
                                                 is_async=self._is_async),
                         **_client_kwargs(gw, kwargs))
        _key_retries(self)
        self.gateway = gw
        self.environment = who.environment
        self.authority_caller = who

    def copy(self, **kwargs: Any) -> Self:
        _copying.active = True
        try:
            return super().copy(**_copy_kwargs(self, kwargs))  # type: ignore[misc]
        finally:
            _copying.active = False

    with_options = copy


class AuthorityClient(_Gated, openai.OpenAI):
    """``openai.OpenAI`` whose every chat completion and tool call passes policy.

    Extra arguments: ``policy`` (path or loaded :class:`Policy`; default
    ``$AUTHORITY_POLICY`` or ``authority.yaml``), ``environment`` (default
    ``$AUTHORITY_ENV`` or the policy's ``default_environment``), ``gateway`` (share one
    engine between clients) and ``caller`` (the name approvals and the audit log record).
    """


class AsyncAuthorityClient(_Gated, openai.AsyncOpenAI):
    """``openai.AsyncOpenAI`` with the same gate as :class:`AuthorityClient`."""

    _is_async = True
