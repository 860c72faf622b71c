"""Gated HTTP clients: an ``httpx``/``httpx2`` client whose every request passes the gate.

For libraries that take an ``http_client=`` rather than an openai client, and what
:class:`~authority_sdk.AuthorityClient` itself is built on. The library follows the
caller's own client when one is given (so its proxies, certificates and mounts
still apply: it is wrapped, not replaced), else the one the installed openai runs
on (``httpx2`` for openai 3.x, ``httpx`` for 2.x).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

from .engine import Gateway
from .errors import PolicyError
from .policy import Policy
from .transport import HTTP_LIBRARIES, is_gate, sender, transport_classes
from .wire import Caller

__all__ = ["gated_async_http_client", "gated_http_client"]


@cache
def default_http_library() -> str:
    """``httpx2`` where the installed openai runs on it (3.x), else ``httpx``."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    loaded = sys.modules.get("openai")  # already imported by nearly every caller
    try:
        text = loaded.__version__ if loaded is not None else version("openai")
        major = int(text.split(".", 1)[0])
    except (PackageNotFoundError, ValueError, AttributeError):
        major = 2
    return "httpx2" if major >= 3 else "httpx"


def library_of(client: Any, *, is_async: bool) -> str:
    """Which HTTP library a client object belongs to, by its class's lineage."""
    want = "AsyncClient" if is_async else "Client"
    for klass in type(client).__mro__:
        root = klass.__module__.split(".", 1)[0]
        if root in HTTP_LIBRARIES and klass.__name__ == want:
            return root
    raise TypeError(f"http_client must be an httpx or httpx2 {want}, not {type(client)!r}")


def resolve_caller(policy: Policy | str | Path | None, gateway: Gateway | None,
                   environment: str | None, caller: str) -> tuple[Gateway, Caller]:
    gw = gateway or Gateway(policy)
    env = environment or os.environ.get("AUTHORITY_ENV") or gw.policy.default_environment
    if env not in gw.policy.environments:
        raise PolicyError(f"environment {env!r} is not defined in the policy "
                          f"(defined: {', '.join(gw.policy.environments)})")
    return gw, Caller(name=caller, environment=env)


def gate_client(gw: Gateway, who: Caller, http_client: Any, *, is_async: bool,
                library: str | None = None) -> Any:
    """A client of the right library whose transport is the gate.

    A client that is already gated for the same gateway and caller is returned as it is
    (openai's ``copy()`` hands ours back); one gated for another caller is re-gated around
    what it wrapped, never stacked."""
    if http_client is not None:
        library = library_of(http_client, is_async=is_async)
        current: Any = getattr(http_client, "_transport", None)
        if is_gate(current):
            if current.gateway is gw and current.caller == who:
                return http_client
            inner, timeout = current.inner, http_client.timeout
        else:
            inner, timeout = sender(http_client, is_async=is_async), http_client.timeout
        follow = False  # the caller's client follows redirects by its own setting
    else:
        library = library or default_http_library()
        inner, timeout, follow = None, None, True
    sync_cls, async_cls = transport_classes(library)
    mod: Any = sync_cls.http.mod
    transport = (async_cls if is_async else sync_cls)(gw, who, inner)
    if timeout is None:
        timeout = mod.Timeout(timeout=600, connect=5.0)  # openai's own default
    limits = mod.Limits(max_connections=1000, max_keepalive_connections=100)
    client_cls = mod.AsyncClient if is_async else mod.Client
    return client_cls(transport=transport, timeout=timeout, limits=limits,
                      follow_redirects=follow)


def gated_http_client(*, policy: Policy | str | Path | None = None,
                      environment: str | None = None, gateway: Gateway | None = None,
                      caller: str = "sdk", http_client: Any = None,
                      http_library: str | None = None) -> Any:
    """A sync ``httpx.Client`` / ``httpx2.Client`` whose chat completions pass policy.

    Hand it to a library that takes ``http_client=`` (LangChain's ``ChatOpenAI``,
    ``openai.OpenAI`` itself). ``http_client`` (optional) is your own client to wrap;
    ``http_library`` (``"httpx"`` or ``"httpx2"``) picks the library when you give none.
    The other arguments are :class:`~authority_sdk.AuthorityClient`'s."""
    gw, who = resolve_caller(policy, gateway, environment, caller)
    return gate_client(gw, who, http_client, is_async=False, library=http_library)


def gated_async_http_client(*, policy: Policy | str | Path | None = None,
                            environment: str | None = None, gateway: Gateway | None = None,
                            caller: str = "sdk", http_client: Any = None,
                            http_library: str | None = None) -> Any:
    """The async twin of :func:`gated_http_client` (``httpx.AsyncClient`` /
    ``httpx2.AsyncClient``)."""
    gw, who = resolve_caller(policy, gateway, environment, caller)
    return gate_client(gw, who, http_client, is_async=True, library=http_library)
