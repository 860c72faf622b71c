"""Request-level rules that need no state: which models and hosted tools an environment
allows.

(The kill switch and idempotency need the store, cost and budgets the price map:
they are in :mod:`.engine` and :mod:`.costs`; each refusal names its rule in
``decided_by``.)
"""

from __future__ import annotations

import fnmatch

from .errors import ModelNotAllowed, RequestDenied
from .policy import Policy

__all__ = ["check_hosted_tools", "check_mcp_servers", "check_model", "matching_glob"]


def matching_glob(policy: Policy, environment: str, model: str) -> str | None:
    """The first allowlist glob of ``environment`` that ``model`` matches, if any."""
    for glob in policy.environments[environment].models:
        if fnmatch.fnmatchcase(model, glob):
            return glob
    return None


def check_model(policy: Policy, environment: str, model: str) -> str:
    """The glob that admits ``model``; ``ModelNotAllowed`` if none does."""
    glob = matching_glob(policy, environment, model)
    if glob is None:
        env = policy.environments[environment]
        raise ModelNotAllowed(
            f"model {model!r} is not allowed in environment {environment!r} "
            f"(allowed: {', '.join(env.models)})",
            decided_by=f"environments.{environment}.models")
    return glob


def check_hosted_tools(policy: Policy, environment: str, offered: list[str]) -> None:
    """Tools the provider runs before the gateway sees their calls may be offered only
    where the policy says so (``environments.<env>.hosted_tools``)."""
    allowed = policy.environments[environment].hosted_tools
    for tool in offered:
        if tool not in allowed:
            raise RequestDenied(
                f"the {tool!r} tool runs at the provider, before the gateway sees its calls; "
                f"environment {environment!r} does not allow it (allowed: "
                f"{', '.join(allowed) or 'none'})", code="tool_not_allowed",
                decided_by=f"environments.{environment}.hosted_tools")


def check_mcp_servers(policy: Policy, environment: str, servers: dict[str, str]) -> None:
    """A remote MCP server (by URL, connector or tunnel) only where the policy lists it."""
    allowed = policy.environments[environment].mcp_servers
    for label, server in servers.items():
        if not any(fnmatch.fnmatchcase(server, glob) for glob in allowed):
            raise RequestDenied(
                f"the MCP server {label!r} ({server[:200]}) is not allowed in environment "
                f"{environment!r}", code="tool_not_allowed",
                decided_by=f"environments.{environment}.mcp_servers")
