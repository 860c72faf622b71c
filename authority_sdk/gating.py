"""Every tool call in a completion is an action: decide it, handle it, rewrite the answer.

DESIGN.md §3: ``message.tool_calls`` keeps exactly the calls the app may run
itself now (allowed client-dispatch actions); everything else is withheld, so
an app that knows nothing of the gateway can never run a denied, pending or
simulated call. The ``authority`` field says what happened to each.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .audit import redact
from .business_keys import normalise_business_value
from .execution import Execution, run_once
from .modes import resolve_action
from .wire import canonical_json

if TYPE_CHECKING:
    from .engine import CallContext, Gateway

__all__ = ["ActionOutcome", "action_hash", "gate_completion"]


@dataclass
class ActionOutcome:
    tool_call: dict[str, Any]
    action_type: str
    mode: str
    dispatch: str
    decision: str
    status: str
    reason: str | None
    action_key: str
    code: str | None = None
    executor: str | None = None
    approval_id: str | None = None
    result: Any = None
    choice_index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "tool_call": self.tool_call,
            "action_type": self.action_type,
            "mode": self.mode,
            "dispatch": self.dispatch,
            "executor": self.executor,
            "decision": self.decision,
            "status": self.status,
            "reason": self.reason,
            "code": self.code,
            "approval_id": self.approval_id,
            "action_key": self.action_key,
            "result": self.result,
        }
        d.update(self.extra)
        return d


def action_hash(action_type: str, arguments: Any, environment: str) -> str:
    """What an approval is bound to: approving means approving exactly what was shown."""
    return hashlib.sha256(
        canonical_json([action_type, arguments, environment]).encode()
    ).hexdigest()


def _action_key(base: str, choice: int, action_type: str, args_json: str, nth: int) -> str:
    # Not the tool call id: a retried request gets new ids from the model for the same action.
    raw = canonical_json([base, choice, action_type, _normalise_args(args_json), nth])
    return "act_" + hashlib.sha256(raw.encode()).hexdigest()[:32]


def _normalise_args(args_json: str) -> Any:
    try:
        return json.loads(args_json)
    except (ValueError, TypeError):
        return args_json


def _dig(args: dict[str, Any], dotted: str) -> Any:
    cur: Any = args
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def _dedupe_key(environment: str, action_type: str, fields: list[str],
                args: dict[str, Any]) -> str | None:
    try:
        values = {f: normalise_business_value(_dig(args, f)) for f in fields}
    except KeyError:
        return None  # the business key is absent: nothing to deduplicate on
    raw = canonical_json([environment, action_type, values])
    return "dedupe:" + hashlib.sha256(raw.encode()).hexdigest()


def _tool_schemas(request: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for tool in request.get("tools") or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            if isinstance(params, dict):
                out[fn["name"]] = params
    return out


def gate_completion(gw: Gateway, ctx: CallContext, completion: dict[str, Any], *,
                    post_ceiling_exceeded: bool) -> list[ActionOutcome]:
    """Decide and handle every tool call, then rewrite ``completion`` in place."""
    schemas = _tool_schemas(ctx.request)
    kill = gw.kill_engaged(ctx.environment)
    outcomes: list[ActionOutcome] = []
    seen: dict[str, int] = {}
    for choice in completion.get("choices") or []:
        message = choice.get("message") or {}
        calls = message.get("tool_calls") or []
        if not calls:
            continue
        cidx = int(choice.get("index", 0))
        kept: list[dict[str, Any]] = []
        choice_outcomes: list[ActionOutcome] = []
        for call in calls:
            fn = call.get("function") or {}
            name = str(fn.get("name", ""))
            args_json = fn.get("arguments") or ""
            marker = canonical_json([cidx, name, _normalise_args(args_json)])
            seen[marker] = seen.get(marker, 0) + 1
            key = _action_key(ctx.action_base, cidx, name, args_json, seen[marker])
            outcome = _handle(gw, ctx, call, name, args_json, key, schemas.get(name),
                              kill=kill, post_ceiling_exceeded=post_ceiling_exceeded)
            outcome.choice_index = cidx
            choice_outcomes.append(outcome)
            if outcome.status == "allowed":
                kept.append(call)
        outcomes.extend(choice_outcomes)
        _rewrite_choice(choice, message, calls, kept, choice_outcomes)
    return outcomes


def _rewrite_choice(choice: dict[str, Any], message: dict[str, Any], calls: list[dict[str, Any]],
                    kept: list[dict[str, Any]], outcomes: list[ActionOutcome]) -> None:
    if len(kept) == len(calls):
        return
    if kept:
        message["tool_calls"] = kept
        return
    message.pop("tool_calls", None)
    if choice.get("finish_reason") == "tool_calls":
        choice["finish_reason"] = "stop"
    if not message.get("content"):
        message["content"] = summary_line(outcomes)


def summary_line(outcomes: list[ActionOutcome]) -> str:
    parts = []
    for o in outcomes:
        detail = o.approval_id if o.status == "pending_approval" else (o.code or o.reason)
        parts.append(f"{o.action_type}: {o.status}" + (f" ({detail})" if detail else ""))
    return "[authority] " + "; ".join(parts)


def _handle(gw: Gateway, ctx: CallContext, call: dict[str, Any], name: str, args_json: str,
            key: str, schema: dict[str, Any] | None, *, kill: bool,
            post_ceiling_exceeded: bool) -> ActionOutcome:
    policy = gw.policy
    tool_call = {"id": call.get("id"), "name": name, "arguments": args_json}
    res = resolve_action(policy, ctx.environment, name, args_json, tool_schema=schema,
                         kill_switch_engaged=kill)
    out = ActionOutcome(tool_call=tool_call, action_type=name, mode=res.mode,
                        dispatch=res.dispatch, decision=res.decision, status="denied",
                        reason=res.reason, code=res.code, action_key=key, executor=res.executor)
    if res.decision == "deny":
        out.code = res.code or "denied_by_policy"
    elif post_ceiling_exceeded:
        out.decision, out.code = "deny", "post_cost_ceiling_exceeded"
        out.reason = (f"actual cost exceeded the per-request ceiling "
                      f"${ctx.plan.ceiling_usd if ctx.plan else None}; no action of this "
                      "completion runs")
    elif res.mode == "simulation_only":
        out.status = "simulated"
        args = res.arguments or {}
        if res.executor is not None:
            out.result = {"would_execute": gw.executors.get(res.executor).describe(name, args, key)}
        else:
            out.result = {"would_dispatch": "client", "action_type": name, "arguments": args}
    else:
        args = res.arguments or {}
        approval_id = ("apr_" + secrets.token_hex(12)
                       if res.mode == "require_human_approval" else None)
        dup = _claim_dedupe(gw, ctx, name, args, key, approval_id)
        if dup is not None:
            out.decision, out.status, out.code = "deny", "denied", "duplicate_action"
            out.reason = (f"{name} already ran on the same "
                          f"{', '.join(policy.actions[name].dedupe_on)} "
                          f"(action {dup.get('action_key')}, request {dup.get('request_id')})")
            out.result = {"duplicate_of": dup}
        elif res.mode == "require_human_approval":
            gw.flush_audit(ctx)
            out.status = "pending_approval"
            out.approval_id = _create_approval(gw, ctx, out, args, schema, approval_id)
        elif res.dispatch == "client":
            out.status = "allowed"
        else:
            assert res.executor is not None
            gw.flush_audit(ctx)
            ex = run_once(gw.store, gw.executors, action_key=key, executor_name=res.executor,
                          action_type=name, arguments=args, ttl_s=gw.idempotency_ttl,
                          info={"request_id": ctx.request_id, "environment": ctx.environment,
                                "requested_by": ctx.caller.name})
            _apply_execution(out, ex)
            if ex.status == "failed":
                _release_dedupe(gw, ctx, name, args, key)
    gw.audit_action(ctx, out)
    return out


def _apply_execution(out: ActionOutcome, ex: Execution) -> None:
    out.status = ex.status
    out.result = ex.result
    if ex.error:
        out.reason = ex.error
    if ex.replayed:
        out.extra["replayed"] = True


def _claim_dedupe(gw: Gateway, ctx: CallContext, name: str, args: dict[str, Any],
                  key: str, approval_id: str | None = None) -> dict[str, Any] | None:
    fields = gw.policy.actions[name].dedupe_on
    if not fields:
        return None
    dkey = _dedupe_key(ctx.environment, name, fields, args)
    if dkey is None:
        return None
    owner = {"action_key": key, "request_id": ctx.request_id, "ts": time.time(),
             "approval_id": approval_id}
    existing = gw.store.dedupe_claim(dkey, owner, ttl_s=gw.idempotency_ttl)
    if existing is not None and _claim_is_void(gw, existing):
        # Its approval expired, was rejected or failed: that action did not take effect,
        # so the object is free again. Release is owner-checked and claim atomic: one wins.
        gw.store.dedupe_release(dkey, str(existing.get("action_key")))
        existing = gw.store.dedupe_claim(dkey, owner, ttl_s=gw.idempotency_ttl)
    if existing is None or existing.get("action_key") == key:
        return None
    return existing


def _claim_is_void(gw: Gateway, owner: dict[str, Any]) -> bool:
    approval_id = owner.get("approval_id")
    if not approval_id:
        return False
    # Not found yet means its request is still creating it: the claim is live.
    approval = gw.store.approval_get(str(approval_id))
    return approval is not None and approval.get("status") in ("expired", "rejected", "failed")


def _release_dedupe(gw: Gateway, ctx: CallContext, name: str, args: dict[str, Any],
                    key: str) -> None:
    fields = gw.policy.actions[name].dedupe_on
    dkey = _dedupe_key(ctx.environment, name, fields, args) if fields else None
    if dkey is not None:
        gw.store.dedupe_release(dkey, key)


def _create_approval(gw: Gateway, ctx: CallContext, out: ActionOutcome, args: dict[str, Any],
                     schema: dict[str, Any] | None, approval_id: str | None = None) -> str:
    now = time.time()
    approval_id = approval_id or "apr_" + secrets.token_hex(12)
    gw.store.approval_create({
        "id": approval_id,
        "status": "pending",
        "created_at": now,
        "expires_at": now + gw.policy.defaults.approval_ttl_s,
        "request_id": ctx.request_id,
        "environment": ctx.environment,
        "model": ctx.model,
        "action_type": out.action_type,
        "arguments": args,
        "arguments_json": out.tool_call["arguments"],
        "tool_call": out.tool_call,
        "tool_schema": schema,
        "action_key": out.action_key,
        "action_hash": action_hash(out.action_type, args, ctx.environment),
        "executor": out.executor,
        "dispatch": out.dispatch,
        "reason": out.reason,
        "requested_by": ctx.caller.name,
        "policy_hash": gw.policy.hash,
    })
    return approval_id


def followup_messages(completion: dict[str, Any],
                      original_calls: dict[int, list[dict[str, Any]]],
                      outcomes: list[ActionOutcome],
                      redact_names: list[str]) -> list[dict[str, Any]]:
    """What an aware app appends to continue: the assistant turn, then one tool message per
    action the gateway handled (client-dispatched calls are the app's to answer)."""
    msgs: list[dict[str, Any]] = []
    choices = completion.get("choices") or []
    first = choices[0] if choices else {}
    cidx = int(first.get("index", 0))
    calls = original_calls.get(cidx)
    if not calls:
        return msgs
    content = (first.get("message") or {}).get("content")
    if content and content.startswith("[authority] "):
        content = None
    msgs.append({"role": "assistant", "content": content, "tool_calls": calls})
    for o in outcomes:
        if o.choice_index != cidx or o.status == "allowed":
            continue
        payload: dict[str, Any] = {"status": o.status}
        if o.status in ("executed",):
            payload["result"] = o.result
        elif o.status == "simulated":
            payload["result"] = redact(o.result, redact_names)
            payload["note"] = "simulation only: nothing was executed"
        else:
            payload["reason"] = o.reason
            if o.code:
                payload["code"] = o.code
            if o.approval_id:
                payload["approval_id"] = o.approval_id
        msgs.append({"role": "tool", "tool_call_id": o.tool_call["id"],
                     "content": json.dumps(payload, default=str)})
    return msgs
