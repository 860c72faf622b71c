"""AI Authority Gateway: every chat completion and tool call passes policy first.

The client classes are imported on first use, so ``import authority_sdk`` (and
the decision modules under it) does not pay for openai or httpx until needed.
"""

import typing as _typing

from .errors import (
    ApprovalError,
    AuthenticationFailed,
    AuthorityError,
    AuthorityUnavailable,
    BudgetExceeded,
    ClientOptionNotAllowed,
    CostCeilingExceeded,
    EndpointNotAllowed,
    ExecutionError,
    Forbidden,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InvalidRequest,
    KillSwitchEngaged,
    ModelNotAllowed,
    ModelNotRouted,
    ModelPriceUnknown,
    NotFound,
    PolicyError,
    RateLimited,
    RequestDenied,
    RequestTooLarge,
    UpstreamError,
    UpstreamTimeout,
)
from .policy import Policy, load_policy
from .types import ActionInfo, AuthorityInfo, CostInfo, authority_of

if _typing.TYPE_CHECKING:
    from .client import AsyncAuthorityClient, AuthorityClient
    from .engine import Engine, Gateway
    from .http_client import gated_async_http_client, gated_http_client
    from .telemetry import Telemetry

__all__ = [
    "ActionInfo",
    "ApprovalError",
    "AsyncAuthorityClient",
    "AuthenticationFailed",
    "AuthorityClient",
    "AuthorityError",
    "AuthorityInfo",
    "AuthorityUnavailable",
    "BudgetExceeded",
    "ClientOptionNotAllowed",
    "CostCeilingExceeded",
    "CostInfo",
    "EndpointNotAllowed",
    "Engine",
    "ExecutionError",
    "Forbidden",
    "Gateway",
    "IdempotencyInProgress",
    "IdempotencyKeyReused",
    "InvalidRequest",
    "KillSwitchEngaged",
    "ModelNotAllowed",
    "ModelNotRouted",
    "ModelPriceUnknown",
    "NotFound",
    "Policy",
    "PolicyError",
    "RateLimited",
    "RequestDenied",
    "RequestTooLarge",
    "Telemetry",
    "UpstreamError",
    "UpstreamTimeout",
    "authority_of",
    "gated_async_http_client",
    "gated_http_client",
    "load_policy",
]

_LAZY = {"AuthorityClient": "client", "AsyncAuthorityClient": "client", "Gateway": "engine",
         "Engine": "engine", "gated_http_client": "http_client",
         "gated_async_http_client": "http_client", "Telemetry": "telemetry"}


def __getattr__(name: str) -> _typing.Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'authority_sdk' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
