"""``AuthorityClient``: swap ``OpenAI()`` for it and nothing else changes.

Subclasses of ``openai.OpenAI`` / ``openai.AsyncOpenAI`` that install an httpx
transport running the engine in-process. Nothing of openai's resource classes
is overridden, so every openai path is gated and openai upgrades do not break
it; a denial surfaces as the same openai exception the proxy would produce.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import openai

from .engine import Gateway
from .policy import Policy
from .transport import AsyncAuthorityTransport, AuthorityTransport
from .wire import Caller

__all__ = ["AsyncAuthorityClient", "AuthorityClient"]


def _gateway_and_caller(policy: Policy | str | Path | None, gateway: Gateway | None,
                        environment: str | None, caller: str) -> tuple[Gateway, Caller]:
    gw = gateway or Gateway(policy)
    env = environment or os.environ.get("AUTHORITY_ENV") or gw.policy.default_environment
    if env not in gw.policy.environments:
        from .errors import PolicyError

        raise PolicyError(f"environment {env!r} is not defined in the policy "
                          f"(defined: {', '.join(gw.policy.environments)})")
    return gw, Caller(name=caller, environment=env)


RETRY_KEY_HEADER = "X-Authority-Retry-Key"


def _key_retries(client: Any) -> None:
    """openai retries a timed-out or failed call with the same options; naming an
    idempotency header makes it send one key for all attempts of a call, so the gateway
    replays a retry instead of running its actions again. (Not the app's Idempotency-Key:
    these keys are the gateway's, kept only for ``defaults.retry_window_s``.)"""
    client._idempotency_header = RETRY_KEY_HEADER


def _inner_transport(http_client: Any) -> Any:
    # Wrap the caller's own transport (proxies, certificates, mounts) rather than replace it.
    return getattr(http_client, "_transport", None) if http_client is not None else None


class AuthorityClient(openai.OpenAI):
    """``openai.OpenAI`` whose every chat completion and tool call passes policy.

    Extra arguments: ``policy`` (path or loaded :class:`Policy`; default
    ``$AUTHORITY_POLICY`` or ``authority.yaml``), ``environment`` (default
    ``$AUTHORITY_ENV`` or the policy's ``default_environment``), ``gateway`` (share one
    engine between clients) and ``caller`` (the name approvals and the audit log record).
    """

    gateway: Gateway
    environment: str

    def __init__(self, *, policy: Policy | str | Path | None = None,
                 environment: str | None = None, gateway: Gateway | None = None,
                 caller: str = "sdk", http_client: httpx.Client | None = None,
                 **kwargs: Any) -> None:
        gw, who = _gateway_and_caller(policy, gateway, environment, caller)
        inner = _inner_transport(http_client)
        # copy()/with_options() hand us a client that is already gated: keep its transport.
        transport = inner if isinstance(inner, AuthorityTransport) else AuthorityTransport(
            gw, who, inner)
        kwargs.setdefault("api_key", os.environ.get("OPENAI_API_KEY") or "unused")
        if "base_url" not in kwargs and not os.environ.get("OPENAI_BASE_URL"):
            kwargs["base_url"] = gw.policy.upstream.base_url
        super().__init__(http_client=openai.DefaultHttpxClient(transport=transport), **kwargs)
        _key_retries(self)
        self.gateway = gw
        self.environment = who.environment

    def copy(self, **kwargs: Any) -> AuthorityClient:
        kwargs.setdefault("http_client", self._client)
        kwargs.setdefault("gateway", self.gateway)
        kwargs.setdefault("environment", self.environment)
        return _copy(self, AuthorityClient, kwargs)

    with_options = copy


class AsyncAuthorityClient(openai.AsyncOpenAI):
    """``openai.AsyncOpenAI`` with the same gate as :class:`AuthorityClient`."""

    gateway: Gateway
    environment: str

    def __init__(self, *, policy: Policy | str | Path | None = None,
                 environment: str | None = None, gateway: Gateway | None = None,
                 caller: str = "sdk", http_client: httpx.AsyncClient | None = None,
                 **kwargs: Any) -> None:
        gw, who = _gateway_and_caller(policy, gateway, environment, caller)
        inner = _inner_transport(http_client)
        transport = inner if isinstance(inner, AsyncAuthorityTransport) else (
            AsyncAuthorityTransport(gw, who, inner))
        kwargs.setdefault("api_key", os.environ.get("OPENAI_API_KEY") or "unused")
        if "base_url" not in kwargs and not os.environ.get("OPENAI_BASE_URL"):
            kwargs["base_url"] = gw.policy.upstream.base_url
        super().__init__(http_client=openai.DefaultAsyncHttpxClient(transport=transport),
                         **kwargs)
        _key_retries(self)
        self.gateway = gw
        self.environment = who.environment

    def copy(self, **kwargs: Any) -> AsyncAuthorityClient:
        kwargs.setdefault("http_client", self._client)
        kwargs.setdefault("gateway", self.gateway)
        kwargs.setdefault("environment", self.environment)
        return _copy(self, AsyncAuthorityClient, kwargs)

    with_options = copy


def _copy(client: Any, cls: type[Any], kwargs: dict[str, Any]) -> Any:
    """openai's copy() rebuilds the client with its own constructor arguments; ours need
    the gateway and environment carried over as well."""
    base: dict[str, Any] = {
        "api_key": client.api_key, "organization": client.organization,
        "project": client.project, "base_url": client.base_url, "timeout": client.timeout,
        "max_retries": client.max_retries,
        "default_headers": {k: v for k, v in client._custom_headers.items()},
        "default_query": client._custom_query,
    }
    for k in ("set_default_headers", "set_default_query"):
        kwargs.pop(k, None)
    base.update(kwargs)
    return cls(**base)
