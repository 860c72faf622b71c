"""The walkthrough: one request per step, each checked against what the policy says.

Every step talks to the real proxy over HTTP, exactly as an application or an
approver would, and checks its outcome three ways where it can: the answer
(status, error code, the ``authority`` field), the webhook receiver (did the
refund reach the billing system, and how many times) and the scripted model's
request counter (did the request reach the LLM at all).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .config import DemoKey, DemoKeys

__all__ = ["Step", "Walkthrough"]

MODEL = "gpt-4o-mini"
NOTIFY_PATH = "/notifications"  # where examples/policy.yaml sends the ops notifications

REFUND_FUNCTION: dict[str, Any] = {
    "name": "issue_refund",
    "description": "Refund part or all of an order.",
    "parameters": {"type": "object", "properties": {
        "order_id": {"type": "string"}, "amount": {"type": "number"}},
        "required": ["order_id", "amount"]}}
REFUND_TOOL = {"type": "function", "function": REFUND_FUNCTION}


@dataclass
class Step:
    title: str
    expected: str
    got: str = ""
    ok: bool = False
    notes: list[str] = field(default_factory=list)


def _error_code(r: httpx.Response) -> str | None:
    try:
        err = r.json().get("error")
    except ValueError:
        return None
    return err.get("code") if isinstance(err, dict) else None


def _error_message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200]


def _first_action(r: httpx.Response) -> dict[str, Any]:
    if r.status_code != 200:
        raise AssertionError(f"HTTP {r.status_code} {_error_code(r)}: {_error_message(r)}")
    actions = r.json()["authority"]["actions"]
    if not actions:
        raise AssertionError("the completion carried no action")
    first: dict[str, Any] = actions[0]
    return first


def _usd(v: Any) -> str:
    return f"${v:.7f}".rstrip("0").rstrip(".") if isinstance(v, int | float) else f"${v}"


def _calls(n: int) -> str:
    return f"{n} webhook call" + ("" if n == 1 else "s")


class Walkthrough:
    def __init__(self, *, proxy_url: str, model_url: str, receiver_url: str, keys: DemoKeys,
                 policy_path: Path, client: httpx.Client | None = None) -> None:
        self.proxy = proxy_url
        self.model = model_url
        self.receiver = receiver_url
        self.keys = keys
        self.policy_path = policy_path
        self.http = client or httpx.Client(timeout=30.0, trust_env=False)  # loopback only
        self._delivered = 0
        self._approval_id: str | None = None
        self._idem_request_id: str | None = None

    # -- plumbing ---------------------------------------------------------------------

    def chat(self, key: DemoKey, text: str, *, model: str = MODEL,
             tools: list[dict[str, Any]] | None = None,
             headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
        body: dict[str, Any] = {"model": model,
                                "messages": [{"role": "user", "content": text}], **extra}
        if tools:
            body["tools"] = tools
        return self.http.post(f"{self.proxy}/v1/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {key.secret}",
                                       **(headers or {})})

    def refund(self, key: DemoKey, order_id: str, amount: float, *, extra: str = "",
               headers: dict[str, str] | None = None) -> httpx.Response:
        args = json.dumps({"order_id": order_id, "amount": amount})
        text = f"Please refund order {order_id} (${amount}).\nCALL issue_refund {args}\n{extra}"
        return self.chat(key, text, tools=[REFUND_TOOL], headers=headers)

    def manage(self, key: DemoKey, method: str, path: str,
               body: dict[str, Any] | None = None) -> httpx.Response:
        return self.http.request(method, self.proxy + path, json=body,
                                 headers={"Authorization": f"Bearer {key.secret}"})

    def _received(self) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = self.http.get(self.receiver + "/received").json()["deliveries"]
        return got

    def new_deliveries(self) -> list[dict[str, Any]]:
        """The actions that reached the webhook receiver since the last look (its
        notifications, sent by the gateway's worker at their own pace, are not actions)."""
        got = [d for d in self._received() if not d["path"].startswith(NOTIFY_PATH)]
        new, self._delivered = got[self._delivered:], len(got)
        return new

    def notification(self, approval_id: str, kind: str,
                     timeout_s: float = 20.0) -> dict[str, Any]:
        """The notification of ``kind`` about ``approval_id``, once the worker sent it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for d in self._received():
                body = d["body"]
                if (d["path"].startswith(NOTIFY_PATH) and body.get("type") == kind
                        and (body.get("approval") or {}).get("id") == approval_id):
                    return dict(body)
            time.sleep(0.2)
        raise AssertionError(f"no {kind} notification for {approval_id} within {timeout_s:g} s")

    def model_calls(self) -> int:
        return int(self.http.get(self.model + "/_stats").json()["chat_requests"])

    @staticmethod
    def delivery_note(d: dict[str, Any]) -> str:
        answer = d.get("answer") or {}
        said = answer.get("refund_id") if isinstance(answer, dict) else None
        return (f"receiver got POST {d['path']} {json.dumps(d['body'].get('arguments'))} "
                f"with Idempotency-Key {str(d['idempotency_key'])[:12]}…, answered "
                f"{said or json.dumps(answer)}")

    # -- the story --------------------------------------------------------------------

    def plan(self) -> list[tuple[str, str, Callable[[Step], None]]]:
        a, d, o = self.keys.agent, self.keys.dev, self.keys.ops
        return [
            (f"Allowed completion ({a.environment}, {MODEL})", "200 allow", self.allowed),
            ("Model outside the allowlist (gpt-4o)", "403 model_not_allowed", self.model_denied),
            ("Small refund, $25: auto-executed", "executed, 1 webhook call", self.small_refund),
            ("Large refund, $400: held", "pending_approval, 0 webhook calls",
             self.large_refund),
            (f"…approved over HTTP ({o.name} key)", "200 executed, 1 webhook call",
             self.approve),
            ("…approved a second time", "409 approval_executed, 0 webhook calls",
             self.approve_again),
            ("Refund $300: held, ops notified with a one-time link",
             "notified, link approved: executed, 1 webhook call", self.link_approve),
            ("Huge refund, $5,000", "denied_by_rule, 0 webhook calls", self.huge_refund),
            (f"Small refund from {d.environment} ({d.name} key)",
             "simulated, 0 webhook calls", self.dev_refund),
            ("Refund with Idempotency-Key", "executed, 1 webhook call", self.idem_first),
            ("…retried: same key, same body", "replayed, LLM not called, 0 webhook calls",
             self.idem_replay),
            ("…same key, different body", "422 idempotency_key_reused", self.idem_conflict),
            ("Asks for up to 100,000 output tokens", "403 cost_ceiling_exceeded",
             self.ceiling),
            ("Model overspends, then calls a refund", "post_cost_ceiling_exceeded, 0 webhook calls",
             self.post_ceiling),
            (f"Agent key flips the kill switch ({a.name})", "403 insufficient_role",
             self.kill_by_agent),
            (f"Kill switch on ({o.name} key)", "200 engaged", self.kill_on),
            ("Any request while it is on", "403 kill_switch_engaged", self.kill_blocks),
            ("Kill switch off, request again", "200 released, then 200 allow", self.kill_off),
            ("Responses API: refunds of $20 and $300",
             "executed + pending_approval, 1 webhook call", self.responses_turn),
            ("authority audit verify", "exit 0, chain intact", self.audit_verify),
        ]

    def run(self, on_step: Callable[[int, Step], None]) -> list[Step]:
        steps = []
        for i, (title, expected, fn) in enumerate(self.plan(), 1):
            step = Step(title, expected)
            try:
                fn(step)
            except Exception as exc:  # a broken step fails; the rest of the story still runs
                step.ok = False
                step.got = step.got or "error"
                step.notes.append(f"{type(exc).__name__}: {exc}")
            steps.append(step)
            on_step(i, step)
        return steps

    def allowed(self, step: Step) -> None:
        r = self.chat(self.keys.agent, "SAY Your order A-1000 ships tomorrow.")
        body = r.json()
        auth = body.get("authority") or {}
        step.got = f"{r.status_code} {auth.get('decision') or _error_code(r)}"
        content = ((body.get("choices") or [{}])[0].get("message") or {}).get("content")
        step.ok = r.status_code == 200 and auth.get("decision") == "allow" and bool(content)
        cost = auth.get("cost") or {}
        step.notes.append(f"model said {content!r}; cost {_usd(cost.get('actual_usd'))} "
                          f"(ceiling {_usd(cost.get('ceiling_usd'))})")

    def model_denied(self, step: Step) -> None:
        before = self.model_calls()
        r = self.chat(self.keys.agent, "SAY hi", model="gpt-4o")
        step.got = f"{r.status_code} {_error_code(r)}"
        step.ok = (r.status_code == 403 and _error_code(r) == "model_not_allowed"
                   and self.model_calls() == before)
        step.notes.append(_error_message(r))

    def small_refund(self, step: Step) -> None:
        r = self.refund(self.keys.agent, "A-1001", 25)
        act = _first_action(r)
        new = self.new_deliveries()
        step.got = f"{act['status']}, {_calls(len(new))}"
        step.ok = (act["status"] == "executed" and len(new) == 1
                   and new[0]["idempotency_key"] == act["action_key"]
                   and new[0]["body"]["arguments"] == {"order_id": "A-1001", "amount": 25})
        step.notes += [self.delivery_note(x) for x in new]
        step.notes.append(f"rule: {act['reason']}")

    def large_refund(self, step: Step) -> None:
        r = self.refund(self.keys.agent, "A-1002", 400)
        act = _first_action(r)
        new = self.new_deliveries()
        self._approval_id = act.get("approval_id")
        message = r.json()["choices"][0]["message"]
        step.got = f"{act['status']}, {_calls(len(new))}"
        step.ok = (act["status"] == "pending_approval" and bool(self._approval_id)
                   and not new and not message.get("tool_calls"))
        step.notes.append(f"approval {self._approval_id}; the app was told: "
                          f"{message.get('content')!r}")

    def approve(self, step: Step) -> None:
        if not self._approval_id:
            raise AssertionError("no approval to approve (the previous step failed)")
        r = self.manage(self.keys.ops, "POST",
                        f"/authority/approvals/{self._approval_id}/approve",
                        {"reason": "checked the order: damaged on arrival"})
        new = self.new_deliveries()
        status = r.json().get("status") if r.status_code == 200 else _error_code(r)
        step.got = f"{r.status_code} {status}, {_calls(len(new))}"
        step.ok = (r.status_code == 200 and status == "executed" and len(new) == 1
                   and new[0]["body"]["arguments"]["order_id"] == "A-1002")
        step.notes += [self.delivery_note(x) for x in new]

    def approve_again(self, step: Step) -> None:
        if not self._approval_id:
            raise AssertionError("no approval to approve (an earlier step failed)")
        r = self.manage(self.keys.ops, "POST",
                        f"/authority/approvals/{self._approval_id}/approve")
        new = self.new_deliveries()
        step.got = f"{r.status_code} {_error_code(r)}, {_calls(len(new))}"
        step.ok = r.status_code == 409 and _error_code(r) == "approval_executed" and not new
        step.notes.append(_error_message(r))

    def link_approve(self, step: Step) -> None:
        r = self.refund(self.keys.agent, "A-1010", 300)
        act = _first_action(r)
        if act["status"] != "pending_approval":  # not held: nobody is told, no link
            step.got = f"{act['status']}, {_calls(len(self.new_deliveries()))}"
            return
        apr = str(act.get("approval_id"))
        note = self.notification(apr, "approval.held")
        link = str(note.get("decide_url"))
        page = self.http.get(link)  # what a link scanner would do: decides nothing
        code = re.search(r'<b id="code">([0-9A-F]{6})</b>', page.text)
        if page.status_code != 200 or code is None:
            raise AssertionError(f"the link page answered {page.status_code}")
        # The person reads the code on the page and types it: only this POST decides.
        done = self.http.post(link, data={"confirm": code.group(1), "decision": "approve",
                                          "reason": "approved from the notification"})
        status = re.search(r'<b id="status">(\w+)</b>', done.text)
        new = self.new_deliveries()
        got = status.group(1) if status else f"HTTP {done.status_code}"
        step.got = f"notified, link approved: {got}, {_calls(len(new))}"
        step.ok = (act["status"] == "pending_approval" and done.status_code == 200
                   and got == "executed" and len(new) == 1)
        step.notes.append(f"notification {note.get('id')} to {NOTIFY_PATH} carried "
                          f"{link[:60]}…")
        step.notes += [self.delivery_note(x) for x in new]

    def huge_refund(self, step: Step) -> None:
        act = _first_action(self.refund(self.keys.agent, "A-1003", 5000))
        new = self.new_deliveries()
        step.got = f"{act['code'] or act['status']}, {_calls(len(new))}"
        step.ok = act["status"] == "denied" and act["code"] == "denied_by_rule" and not new
        step.notes.append(f"rule: {act['reason']}")

    def dev_refund(self, step: Step) -> None:
        act = _first_action(self.refund(self.keys.dev, "A-1004", 25))
        new = self.new_deliveries()
        would = (act.get("result") or {}).get("would_execute") or {}
        step.got = f"{act['status']}, {_calls(len(new))}"
        step.ok = act["status"] == "simulated" and bool(would) and not new
        step.notes.append(f"would {would.get('method')} {would.get('url')} "
                          f"{json.dumps((would.get('json') or {}).get('arguments'))}")

    IDEM_KEY = "ticket-7781-refund"

    def idem_first(self, step: Step) -> None:
        r = self.refund(self.keys.agent, "A-1005", 30, headers={"Idempotency-Key": self.IDEM_KEY})
        act = _first_action(r)
        new = self.new_deliveries()
        self._idem_request_id = r.json()["authority"]["request_id"]
        step.got = f"{act['status']}, {_calls(len(new))}"
        step.ok = act["status"] == "executed" and len(new) == 1
        step.notes += [self.delivery_note(x) for x in new]

    def idem_replay(self, step: Step) -> None:
        before = self.model_calls()
        r = self.refund(self.keys.agent, "A-1005", 30, headers={"Idempotency-Key": self.IDEM_KEY})
        called = self.model_calls() - before
        new = self.new_deliveries()
        replayed = r.headers.get("idempotent-replayed") == "true"
        same = r.status_code == 200 and r.json()["authority"]["request_id"] == self._idem_request_id
        step.got = (f"{'replayed' if replayed else f'{r.status_code} not replayed'}, "
                    f"LLM {'not called' if not called else f'called {called}x'}, "
                    f"{_calls(len(new))}")
        step.ok = replayed and same and called == 0 and not new
        step.notes.append(f"Idempotent-Replayed: {r.headers.get('idempotent-replayed')}; "
                          f"the stored answer of {self._idem_request_id}")

    def idem_conflict(self, step: Step) -> None:
        before = self.model_calls()
        r = self.refund(self.keys.agent, "A-1005", 35, headers={"Idempotency-Key": self.IDEM_KEY})
        step.got = f"{r.status_code} {_error_code(r)}"
        step.ok = (r.status_code == 422 and _error_code(r) == "idempotency_key_reused"
                   and self.model_calls() == before and not self.new_deliveries())
        step.notes.append(_error_message(r))

    def ceiling(self, step: Step) -> None:
        before = self.model_calls()
        r = self.chat(self.keys.agent, "Write a very long essay.", max_tokens=100_000)
        step.got = f"{r.status_code} {_error_code(r)}"
        step.ok = (r.status_code == 403 and _error_code(r) == "cost_ceiling_exceeded"
                   and self.model_calls() == before)
        step.notes.append(_error_message(r))

    def post_ceiling(self, step: Step) -> None:
        r = self.refund(self.keys.agent, "A-1006", 20, extra="COMPLETION_TOKENS 100000")
        act = _first_action(r)
        new = self.new_deliveries()
        step.got = f"{act['code'] or act['status']}, {_calls(len(new))}"
        step.ok = (act["status"] == "denied" and act["code"] == "post_cost_ceiling_exceeded"
                   and not new)
        cost = r.json()["authority"]["cost"]
        step.notes.append(f"actual {_usd(cost.get('actual_usd'))} > ceiling "
                          f"{_usd(cost.get('ceiling_usd'))}: the answer is returned, "
                          "its refund does not run")

    def kill_by_agent(self, step: Step) -> None:
        r = self.manage(self.keys.agent, "POST", "/authority/kill-switch",
                        {"engaged": True, "reason": "an agent should not be able to"})
        step.got = f"{r.status_code} {_error_code(r)}"
        step.ok = r.status_code == 403 and _error_code(r) == "insufficient_role"
        step.notes.append(_error_message(r))

    def kill_on(self, step: Step) -> None:
        r = self.manage(self.keys.ops, "POST", "/authority/kill-switch",
                        {"engaged": True, "reason": "demo: incident drill", "environment": None})
        engaged = r.status_code == 200 and r.json().get("engaged") is True
        step.got = f"{r.status_code} {'engaged' if engaged else _error_code(r)}"
        step.ok = engaged

    def kill_blocks(self, step: Step) -> None:
        before = self.model_calls()
        r = self.refund(self.keys.agent, "A-1007", 10)
        step.got = f"{r.status_code} {_error_code(r)}"
        step.ok = (r.status_code == 403 and _error_code(r) == "kill_switch_engaged"
                   and self.model_calls() == before and not self.new_deliveries())
        step.notes.append(_error_message(r))

    def kill_off(self, step: Step) -> None:
        r = self.manage(self.keys.ops, "POST", "/authority/kill-switch",
                        {"engaged": False, "reason": "drill over"})
        released = r.status_code == 200 and r.json().get("engaged") is False
        after = self.chat(self.keys.agent, "SAY Back to work.")
        decision = (after.json().get("authority") or {}).get("decision") or _error_code(after)
        step.got = (f"{r.status_code} {'released' if released else _error_code(r)}, "
                    f"then {after.status_code} {decision}")
        step.ok = released and after.status_code == 200 and decision == "allow"

    def responses_turn(self, step: Step) -> None:
        # The same policy through POST /v1/responses: the held call leaves the output.
        calls = "\n".join(f"CALL issue_refund {json.dumps({'order_id': o, 'amount': a})}"
                          for o, a in (("A-1008", 20), ("A-1009", 300)))
        r = self.http.post(f"{self.proxy}/v1/responses", json={
            "model": MODEL, "input": f"Refund both orders.\n{calls}",
            "tools": [{"type": "function", **REFUND_FUNCTION}]},
            headers={"Authorization": f"Bearer {self.keys.agent.secret}"})
        if r.status_code != 200:
            raise AssertionError(f"HTTP {r.status_code} {_error_code(r)}: {_error_message(r)}")
        body = r.json()
        statuses = [a["status"] for a in body["authority"]["actions"]]
        new = self.new_deliveries()
        left = [i for i in body["output"] if i["type"] == "function_call"]
        step.got = f"{' + '.join(statuses)}, {_calls(len(new))}"
        step.ok = (statuses == ["executed", "pending_approval"] and len(new) == 1
                   and not left and len(body["authority"]["followup_items"]) == 4)
        step.notes += [self.delivery_note(x) for x in new]
        said = [p["text"] for i in body["output"] if i["type"] == "message"
                for p in i["content"]]
        step.notes.append(f"output: {said!r}; the app gets both calls back as "
                          "followup_items with their outcome")

    def audit_verify(self, step: Step) -> None:
        # The real command, as a user would run it, on the log this demo wrote.
        done = subprocess.run([sys.executable, "-c", "from authority_sdk.cli import main; main()",
                               "audit", "verify",
                               "--policy", str(self.policy_path)],
                              capture_output=True, text=True, timeout=60)
        out = (done.stdout + done.stderr).strip()
        step.ok = done.returncode == 0 and out.startswith("ok:")
        step.got = f"exit {done.returncode}" + (", chain intact" if step.ok else "")
        step.notes += out.splitlines()
