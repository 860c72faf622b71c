"""Pydantic models of the management API, so /openapi.json describes it.

Request bodies are strict: unknown fields are refused, booleans are JSON
booleans only (``{"engaged": 0}`` is a 400, not "false"), and every string is
bounded. Lists carry ``next_cursor`` (control.py, paging.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

MAX_REASON = 2000
MAX_ENVIRONMENT = 64

__all__ = [
    "Approval",
    "ApprovalList",
    "DecisionBody",
    "ErrorBody",
    "Health",
    "JournalEntry",
    "JournalEntryList",
    "KillSwitchBody",
    "KillSwitchChange",
    "KillSwitchState",
    "KillSwitchStatus",
    "ModelList",
    "ResolveBody",
]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None

    model_config = ConfigDict(extra="allow")


class ErrorBody(BaseModel):
    """OpenAI's error shape; ``error.code`` is one of the codes of DESIGN.md §2/§3."""

    error: ErrorDetail


class DecisionBody(BaseModel):
    reason: str | None = Field(None, max_length=MAX_REASON,
                               description="Recorded in the audit log.")

    model_config = ConfigDict(extra="forbid")


class Approval(BaseModel):
    """One pending (or decided) action. Redacted argument fields are replaced."""

    id: str
    status: str = Field(description="pending, approved, rejected, expired, executed, failed "
                                    "or in_doubt")
    action_type: str
    arguments: Any = None
    environment: str
    model: str | None = None
    request_id: str | None = None
    requested_by: str | None = None
    dispatch: str | None = None
    executor: str | None = None
    reason: str | None = None
    created_at: float | None = None
    expires_at: float | None = None
    decided_by: str | None = None
    decided_at: float | None = None
    decision_reason: str | None = None
    result: Any = None
    error: Any = None
    action_key: str | None = None
    action_hash: str | None = None
    policy_hash: str | None = None
    would_execute: Any = Field(None, description=(
        "What approving runs, as its executor describes it (an email's parsed recipients by "
        "field and envelope, a webhook's request), secrets and redacted fields masked."))
    held_by: str | None = Field(None, description="The policy step that held the action for "
                                                  "approval (e.g. rule[0], limit, action_mode)")

    model_config = ConfigDict(extra="allow")


_NEXT = "Pass as cursor for the next page; null on the last page."


class ApprovalList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Approval] = Field(description="Newest first.")
    next_cursor: str | None = Field(None, description=_NEXT)


class JournalEntry(BaseModel):
    """One entry of the execution journal (DESIGN.md §5). Redacted argument fields are
    replaced."""

    action_key: str
    status: str = Field(description="started, executed, failed or in_doubt")
    action_type: str | None = None
    executor: str | None = None
    arguments: Any = None
    environment: str | None = None
    request_id: str | None = None
    approval_id: str | None = Field(None, description="Set when an approval ran it.")
    started_at: float | None = None
    finished_at: float | None = None
    marked_at: float | None = None
    reason: str | None = Field(None, description="Why it is in doubt.")
    result: Any = Field(None, description="{result, error} once known.")
    resolved_by: str | None = None
    resolved_at: float | None = None
    resolution_reason: str | None = None
    approval_status: str | None = Field(
        None, description="After a resolution: the status its approval moved to.")

    model_config = ConfigDict(extra="allow")


class JournalEntryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JournalEntry] = Field(description="Newest first.")
    next_cursor: str | None = Field(None, description=_NEXT)


class ResolveBody(BaseModel):
    outcome: Literal["executed", "failed"] = Field(
        description="What a person found on the real system. Nothing is run again.")
    reason: str | None = Field(None, max_length=MAX_REASON,
                               description="Recorded in the audit log.")

    model_config = ConfigDict(extra="forbid")


class EvaluateBody(BaseModel):
    action: str = Field(min_length=1, max_length=200, description="the action type (tool name)")
    arguments: dict[str, Any] = Field(default_factory=dict, description="its arguments")
    environment: str | None = Field(None, max_length=MAX_ENVIRONMENT, description=(
        "default: the key's environment, else the policy's default"))

    model_config = ConfigDict(extra="forbid")


class Evaluation(BaseModel):
    action: str
    environment: str
    mode: str
    decision: str
    decided_by: str
    reason: str | None
    code: str | None
    dispatch: str
    executor: str | None
    policy_hash: str


class KillSwitchBody(BaseModel):
    engaged: StrictBool = Field(description="true or false; nothing else is taken for one")
    reason: str | None = Field(None, max_length=MAX_REASON)
    environment: str | None = Field(None, max_length=MAX_ENVIRONMENT, description=(
        "null: the global switch (a key with no environment only); a key bound to an "
        "environment may switch only its own"))

    model_config = ConfigDict(extra="forbid")


class KillSwitchState(BaseModel):
    engaged: bool = False
    reason: str | None = None
    actor: str | None = None
    ts: float | None = None


class KillSwitchChange(KillSwitchState):
    scope: str = Field(description="'global' or the environment's name")


class KillSwitchStatus(BaseModel):
    global_: KillSwitchState = Field(alias="global")
    environments: dict[str, KillSwitchState]

    model_config = ConfigDict(populate_by_name=True)


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    policy_hash: str


class ModelInfo(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "authority"

    model_config = ConfigDict(extra="allow")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]
