"""Typed access to the ``authority`` field of a completion (DESIGN.md §3)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["ActionInfo", "AuthorityInfo", "CostInfo", "IdempotencyInfo", "ToolCallInfo",
           "authority_of"]

ActionStatus = Literal["executed", "failed", "in_doubt", "pending_approval", "simulated",
                       "denied", "allowed"]


class _Open(BaseModel):
    # Newer gateways may add fields; old SDKs must keep reading.
    model_config = ConfigDict(extra="allow")


class ToolCallInfo(_Open):
    id: str | None = None
    name: str
    arguments: str


class ActionInfo(_Open):
    tool_call: ToolCallInfo
    action_type: str
    mode: str
    dispatch: Literal["gateway", "client"]
    executor: str | None = None
    decision: Literal["allow", "deny"]
    status: ActionStatus
    reason: str | None = None
    code: str | None = None
    approval_id: str | None = None
    action_key: str | None = None
    result: Any = None


class CostInfo(_Open):
    estimate_usd: float | None = None
    actual_usd: float | None = None
    ceiling_usd: float | None = None
    max_output_tokens: int | None = None
    max_output_tokens_set_by_gateway: bool | None = None


class IdempotencyInfo(_Open):
    key: str
    replayed: bool = False


class AuthorityInfo(_Open):
    request_id: str
    environment: str
    decision: Literal["allow", "deny", "error"]
    reason: str | None = None
    code: str | None = None
    cost: CostInfo | None = None
    idempotency: IdempotencyInfo | None = None
    actions: list[ActionInfo] = []
    followup_messages: list[dict[str, Any]] = []  # chat completions
    followup_items: list[dict[str, Any]] = []  # the Responses API
    # Actions held on an earlier turn and decided since (their answer in this request
    # was brought up to date): approval_id, action_type, status, tool_call_id.
    approval_updates: list[dict[str, Any]] = []

    def by_status(self, status: ActionStatus) -> list[ActionInfo]:
        return [a for a in self.actions if a.status == status]


def authority_of(obj: Any) -> AuthorityInfo:
    """The typed ``authority`` field of a ChatCompletion, a Response, a final stream chunk
    (or a ``response.completed`` event), or a dict."""
    raw = obj.get("authority") if isinstance(obj, dict) else getattr(obj, "authority", None)
    if raw is None and hasattr(obj, "model_extra"):
        raw = (obj.model_extra or {}).get("authority")
    if raw is None and getattr(obj, "type", None) in ("response.completed",
                                                      "response.incomplete"):
        return authority_of(obj.response)
    if raw is None:
        raise ValueError("this object carries no 'authority' field (not from the gateway?)")
    return AuthorityInfo.model_validate(raw)
