"""Audit sinks by name: ``audit.backend`` in the policy picks one (DESIGN.md §10).

A sink module offers ``open_for_policy(policy, head) -> AuditSink`` and builds its
sink with :func:`sink_options`, so every sink honours the same policy settings
(fsync, redaction, the key, checkpoints). Another sink registers with
:func:`register_sink`, or by adding its ``"module:function"`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..plugins import Registry
from .checkpoint import CheckpointFile
from .keys import load_key

if TYPE_CHECKING:
    from ..policy import Policy
    from .protocol import AuditHead, AuditSink

__all__ = ["open_sink", "register_sink", "sink_options", "sinks"]

Opener = Callable[["Policy", "AuditHead | None"], "AuditSink"]

_SINKS = Registry("audit.backend", "sink", {
    "file": "authority_sdk.audit.file:open_for_policy",
    "postgres": "authority_sdk.audit.postgres:open_for_policy",
})


def register_sink(name: str, opener: str | Opener) -> None:
    """Make ``audit.backend: <name>`` open a sink with ``opener(policy, head)``."""
    _SINKS.register(name, opener)


def sinks() -> list[str]:
    return _SINKS.names()


def sink_options(policy: Policy) -> dict[str, Any]:
    """The settings every sink takes from the policy (the key is loaded here: fail closed)."""
    key = load_key(policy)
    path = policy.checkpoint_file
    return {"fsync": policy.audit.fsync, "redact": policy.redact, "key": key,
            "checkpoints": CheckpointFile(path, key) if path is not None and key else None,
            "checkpoint_every": policy.audit.checkpoint_every}


def open_sink(policy: Policy, head: AuditHead | None = None) -> AuditSink:
    """The sink the policy names, not yet opened (reading it writes nothing)."""
    sink: AuditSink = _SINKS.resolve(policy.audit.backend)(policy, head)
    return sink
