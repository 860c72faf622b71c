"""The records the gateway keeps and returns, defined once.

Statuses are ``StrEnum``s, so they compare equal to (and serialise as) the
strings of the wire format and the store; the proxy's schemas, the CLI's
columns and the console's filters all use these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "ActionOutcome",
    "ActionStatus",
    "ApprovalStatus",
    "Dispatch",
    "JournalStatus",
    "Mode",
    "strictest",
]


class Mode(StrEnum):
    """An action's mode, strictest first (DESIGN.md §10)."""

    DENY = "deny"
    REQUIRE_HUMAN_APPROVAL = "require_human_approval"
    SIMULATION_ONLY = "simulation_only"
    AUTO_EXECUTE = "auto_execute"


_STRICTNESS = {m.value: i for i, m in enumerate(Mode)}


def strictest(*modes: str) -> str:
    """The strictest of ``modes``: a limit or an undecidable value only ever moves an action
    towards ``deny``."""
    return min(modes, key=lambda m: _STRICTNESS.get(m, -1))


class Dispatch(StrEnum):
    GATEWAY = "gateway"  # the gateway runs it with an executor
    CLIENT = "client"  # the app runs it once allowed


class ActionStatus(StrEnum):
    """What happened to one action, in the ``authority`` field and the audit log."""

    EXECUTED = "executed"
    FAILED = "failed"
    IN_DOUBT = "in_doubt"
    PENDING_APPROVAL = "pending_approval"
    SIMULATED = "simulated"
    DENIED = "denied"
    ALLOWED = "allowed"  # client dispatch: the app may run it


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    EXECUTED = "executed"
    FAILED = "failed"
    IN_DOUBT = "in_doubt"


class JournalStatus(StrEnum):
    STARTED = "started"
    EXECUTED = "executed"
    FAILED = "failed"
    IN_DOUBT = "in_doubt"


@dataclass
class ActionOutcome:
    """One action of an answer: what was decided, by which rule, and what happened."""

    tool_call: dict[str, Any]  # {"id", "name", "arguments"} as the model sent it
    action_type: str
    mode: str
    dispatch: str
    decision: str  # allow | deny | error
    status: str
    reason: str | None
    action_key: str
    decided_by: str
    code: str | None = None
    executor: str | None = None
    approval_id: str | None = None
    result: Any = None
    choice_index: int = 0
    position: int = 0  # the call's place in its choice (tool_calls index; function_call last)
    call_kind: str = "tool_call"  # tool_call | function_call | custom
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "tool_call": self.tool_call,
            "action_type": self.action_type,
            "mode": self.mode,
            "dispatch": self.dispatch,
            "executor": self.executor,
            "decision": self.decision,
            "decided_by": self.decided_by,
            "status": self.status,
            "reason": self.reason,
            "code": self.code,
            "approval_id": self.approval_id,
            "action_key": self.action_key,
            "result": self.result,
        }
        if self.choice_index:
            d["choice_index"] = self.choice_index
        d.update(self.extra)
        return d
