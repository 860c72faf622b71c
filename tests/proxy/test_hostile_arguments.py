"""Hostile tool-call arguments through both doors (issue 10 G1, G3, G4, G6, G7).

Every case runs through ``AuthorityClient`` (in process) and through the real proxy
(``authority serve`` as a child process), against the scripted model, a real SMTP
server and a real HTTP receiver that count what actually happened; and again through the
Responses API (``POST /v1/responses``) in both doors, where the same calls must meet the
same fate.
"""

from __future__ import annotations

import email.policy
import json
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import ScriptedServer
from proxy_env import (
    ADMIN_KEY,
    AGENT_KEY,
    APPROVER_KEY,
    DEV_KEY,
    RunningProxy,
    start_proxy,
    write_proxy_policy,
)
from servers import HttpReceiver, SmtpSink

from authority_sdk import AuthorityClient, control
from authority_sdk.business_keys import normalise_business_value

# Secrets the gateway holds for the app: none may reach a simulation, an approval, the audit
# log, a response or the model.
URL_PATH_SECRET = "T0KEN-path-9f8e71"
URL_QUERY_SECRET = "qs-secret-77c1d2"
HEADER_SECRET = "hdr-secret-5a5a9b"
TENANT_VALUE = "tenant-3c3c4d"  # a header with an innocent name is masked too
SMTP_USER, SMTP_PASSWORD = "smtp-user-8e8e8e", "smtp-pass-1f1f1f"
SECRETS = [URL_PATH_SECRET, URL_QUERY_SECRET, HEADER_SECRET, TENANT_VALUE, SMTP_USER,
           SMTP_PASSWORD]
CARD = "4111111111111111"

REFUND_RULES = [
    {"if": {"amount": {"lte": 50}}, "mode": "auto_execute"},
    {"if": {"amount": {"gt": 1000}}, "mode": "deny", "reason": "refunds above $1000 go to finance"},
]


def overrides(billing: HttpReceiver, mailbox: SmtpSink) -> dict[str, Any]:
    return {
        "actions": {
            # No schema: the rules alone stand between the model and the money (G6).
            "issue_refund": {"executor": "billing", "mode": "require_human_approval",
                             "dedupe_on": ["order_id"], "rules": REFUND_RULES},
            "send_email": {"executor": "email", "mode": "require_human_approval", "rules": [
                {"if": {"recipients": {"domain_in": ["example.com"]}}, "mode": "auto_execute",
                 "reason": "internal mail goes out at once"}]},
            "send_report": {"executor": "mailer_with_login", "mode": "auto_execute"},
            "pay": {"executor": "billing", "mode": "auto_execute", "parameters": {
                "type": "object", "properties": {"card_number": {"type": "integer"},
                                                 "amount": {"type": "number"}}}},
            "tag_ticket": {"executor": "dry", "mode": "auto_execute"},
        },
        "executors": {
            "billing": {"type": "webhook", "timeout_s": 5,
                        "url": billing.url(f"/hooks/{URL_PATH_SECRET}?token={URL_QUERY_SECRET}"),
                        "headers": {"X-Billing-Key": HEADER_SECRET, "X-Tenant": TENANT_VALUE}},
            "email": {"type": "smtp", "host": "127.0.0.1", "port": mailbox.port,
                      "sender": "agent@example.com", "timeout_s": 5},
            "mailer_with_login": {"type": "smtp", "host": "127.0.0.1", "port": mailbox.port,
                                  "sender": "agent@example.com", "username_env": "HA_SMTP_USER",
                                  "password_env": "HA_SMTP_PASSWORD"},
            "dry": {"type": "log"},
        },
        "redact": ["card_number", "password"],
    }


@dataclass
class Door:
    """One way in: ``chat`` sends a scripted answer and returns the completion as JSON."""

    name: str
    directory: Path
    client: AuthorityClient | None = None
    dev_client: AuthorityClient | None = None
    proxy: RunningProxy | None = None
    api: str = "chat"  # or "responses": the same cases through the Responses API

    def chat(self, script: str, *, dev: bool = False) -> dict[str, Any]:
        """The scripted answer (a chat completion or a response) as JSON."""
        if self.api == "responses":
            body: dict[str, Any] = {"model": "gpt-4o-mini", "input": script}
            path = "/v1/responses"
        else:
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": script}]}
            path = "/v1/chat/completions"
        if self.proxy is not None:
            r = self.proxy.http("POST", path, key=DEV_KEY if dev else AGENT_KEY, json=body)
            assert r.status_code == 200, r.text
            return dict(r.json())
        c = self.dev_client if dev else self.client
        assert c is not None
        if self.api == "responses":
            return dict(c.responses.create(**body).to_dict())
        completion: dict[str, Any] = c.chat.completions.create(**body).to_dict()  # type: ignore[call-overload]
        return completion

    def followup_texts(self, completion: dict[str, Any]) -> list[str]:
        """What the follow-ups tell the model about each handled action."""
        auth = completion["authority"]
        if self.api == "responses":
            return [i["output"] for i in auth["followup_items"]
                    if i["type"] == "function_call_output"]
        return [m["content"] for m in auth["followup_messages"] if m["role"] == "tool"]

    def call(self, tool: str, args: dict[str, Any], *, dev: bool = False) -> dict[str, Any]:
        """One tool call; returns its ``authority.actions[0]`` (and checks there is one)."""
        completion = self.chat(f"CALL {tool} {json.dumps(args)}", dev=dev)
        [action] = completion["authority"]["actions"]
        return dict(action)

    def approval(self, approval_id: str) -> dict[str, Any]:
        if self.proxy is not None:
            r = self.proxy.http("GET", f"/authority/approvals/{approval_id}", key=APPROVER_KEY)
            assert r.status_code == 200, r.text
            return dict(r.json())
        assert self.client is not None
        return control.get_approval(self.client.gateway, approval_id)

    def approve(self, approval_id: str) -> dict[str, Any]:
        if self.proxy is not None:
            r = self.proxy.http("POST", f"/authority/approvals/{approval_id}/approve",
                                key=APPROVER_KEY, json={"reason": "read it"})
            assert r.status_code == 200, r.text
            return dict(r.json())
        assert self.client is not None
        return control.approve(self.client.gateway, approval_id, actor="ops")

    def audit_text(self) -> str:
        return (self.directory / "audit.jsonl").read_text(encoding="utf-8")

    def process_log(self, caplog: pytest.LogCaptureFixture) -> str:
        if self.proxy is not None:
            return (self.directory / "proxy.log").read_text(encoding="utf-8")
        return caplog.text


@pytest.fixture(scope="module")
def billing() -> Iterator[HttpReceiver]:
    with HttpReceiver() as rx:
        rx.reply(200, json={"refund_id": "rf_1"})
        yield rx


@pytest.fixture(scope="module")
def mailbox() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture(scope="module", params=["sdk", "proxy", "sdk-responses", "proxy-responses"])
def door(request: pytest.FixtureRequest, upstream: ScriptedServer, billing: HttpReceiver,
         mailbox: SmtpSink, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    directory = tmp_path_factory.mktemp(f"door-{request.param}")
    which, _, api = request.param.partition("-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HA_SMTP_USER", SMTP_USER)
        mp.setenv("HA_SMTP_PASSWORD", SMTP_PASSWORD)
        if which == "proxy":
            with start_proxy(upstream, directory, overrides=overrides(billing, mailbox)) as rp:
                yield Door("proxy", directory, proxy=rp, api=api or "chat")
            return
        path = write_proxy_policy(upstream, directory, overrides(billing, mailbox))
        client = AuthorityClient(policy=str(path), environment="prod", max_retries=0)
        dev = AuthorityClient(gateway=client.gateway, environment="dev", max_retries=0)
        try:
            yield Door("sdk", directory, client=client, dev_client=dev, api=api or "chat")
        finally:
            client.gateway.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def mails(mailbox: SmtpSink, subject: str) -> list[Any]:
    return [m for m in mailbox.messages if m.message["Subject"] == subject]


def deliveries(billing: HttpReceiver, order_id: str) -> list[Any]:
    want = normalise_business_value(order_id)
    return [r for r in billing.requests
            if normalise_business_value(r.json["arguments"].get("order_id")) == want]


# ---------------------------------------------------------------- G1: email recipients


@pytest.mark.parametrize("args", [
    {"to": "evil@attacker.com, boss@example.com"},
    {"to": "boss@example.com", "cc": "evil@attacker.com"},
    {"to": "boss@example.com", "cc": ["ann@example.com", "evil@attacker.com"]},
    {"to": "boss@example.com", "bcc": ["evil@attacker.com"]},
    {"to": "boss@example.com (evil@attacker.com)"},
    {"to": '"boss@example.com" <evil@attacker.com>'},
    {"to": "team: evil@attacker.com, boss@example.com;"},
    {"to": "boss@example.com.attacker.com"},
    {"to": ["boss@example.com"], "cc": [["evil@attacker.com"]]},
], ids=["two-in-to", "cc", "cc-list", "bcc", "comment", "name-looks-like-address", "group",
        "suffix", "nested-list"])
def test_mail_to_outsiders_is_never_sent_without_approval(door: Door, mailbox: SmtpSink,
                                                          args: dict[str, Any]) -> None:
    subject = unique("g1-outside")
    action = door.call("send_email", {**args, "subject": subject, "body": "b"})
    assert (action["status"], action["mode"]) == ("pending_approval", "require_human_approval")
    assert mails(mailbox, subject) == []


def test_internal_mail_goes_to_exactly_the_parsed_recipients(door: Door,
                                                             mailbox: SmtpSink) -> None:
    subject = unique("g1-inside")
    action = door.call("send_email", {
        "to": ["Boss <boss@example.com>", '"Smith, John" <john@EXAMPLE.com>'],
        "cc": "ann@example.com", "bcc": ["audit@example.com"], "subject": subject, "body": "b"})
    assert action["status"] == "executed", action
    assert action["reason"] == "internal mail goes out at once"
    [mail] = mails(mailbox, subject)
    assert mail.rcpt_tos == ["boss@example.com", "john@example.com", "ann@example.com",
                             "audit@example.com"]
    assert [(a.display_name, a.addr_spec) for a in mail.message["To"].addresses] == [
        ("Boss", "boss@example.com"), ("Smith, John", "john@example.com")]
    assert mail.message["Bcc"] is None


def test_the_approver_reads_the_parsed_recipients_and_that_is_what_is_sent(
        door: Door, mailbox: SmtpSink) -> None:
    subject = unique("g1-approved")
    args = {"to": ['"Smith, John" <john@example.com>'], "cc": "Zoë Eve <eve@attacker.com>",
            "subject": subject, "body": "quarterly numbers"}
    action = door.call("send_email", args)
    assert action["status"] == "pending_approval"
    shown = door.approval(action["approval_id"])["would_execute"]
    assert shown["recipients"] == {"to": ['"Smith, John" <john@example.com>'],
                                   "cc": ["Zoë Eve <eve@attacker.com>"]}
    assert shown["envelope"]["rcpt_to"] == ["john@example.com", "eve@attacker.com"]
    assert mails(mailbox, subject) == []

    assert door.approve(action["approval_id"])["status"] == "executed"
    [mail] = mails(mailbox, subject)
    # Byte for byte what was shown: the envelope, and each header re-read from the wire.
    assert mail.rcpt_tos == shown["envelope"]["rcpt_to"]
    wire = email.message_from_bytes(mail.data, policy=email.policy.default)
    for field, header in (("to", "To"), ("cc", "Cc")):
        assert [str(a) for a in wire[header].addresses] == shown["recipients"][field]


def test_an_unparseable_recipient_cannot_be_sent_even_when_approved(door: Door,
                                                                    mailbox: SmtpSink) -> None:
    subject = unique("g1-unparseable")
    action = door.call("send_email", {"to": "evil@attacker.com, boss@example.com",
                                       "subject": subject, "body": "b"})
    preview = door.approval(action["approval_id"])["would_execute"]
    assert preview["error"] == (
        "email not sent: argument 'to': one value must hold exactly one address (give a list "
        "of addresses instead; quote a display name that has , ; or :)")
    assert door.approve(action["approval_id"])["status"] == "failed"
    assert mails(mailbox, subject) == []


# ---------------------------------------------------------------- G6: type confusion


@pytest.mark.parametrize("amount", ["5000", [5000], {"v": 5000}, "5e3"],
                         ids=["string", "list", "object", "exponent-string"])
def test_a_deny_rule_cannot_be_skipped_by_changing_the_type(door: Door, billing: HttpReceiver,
                                                            amount: Any) -> None:
    order = unique("g6")
    action = door.call("issue_refund", {"order_id": order, "amount": amount})
    assert (action["status"], action["decision"], action["code"]) == (
        "denied", "deny", "denied_by_rule")
    assert action["reason"].startswith("rule[1] (refunds above $1000 go to finance -> deny) "
                                       "cannot be decided: amount is ")
    assert deliveries(billing, order) == []


def test_a_small_numeric_refund_still_runs(door: Door, billing: HttpReceiver) -> None:
    order = unique("g6-ok")
    action = door.call("issue_refund", {"order_id": order, "amount": 20})
    assert action["status"] == "executed"
    assert len(deliveries(billing, order)) == 1


# ---------------------------------------------------------------- G7: business keys


def spellings(order: str) -> list[str]:
    upper = order.upper()
    wide = "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in upper)
    return [upper, order.lower(), upper + " ", "\t" + upper, upper[:3] + "\u200b" + upper[3:],
            "\ufeff" + upper, "\u00a0" + upper + "\u00a0", wide,
            upper.replace("-", "\u2011"), upper[:2] + "\u200d" + upper[2:]]


def test_ten_spellings_of_one_order_refund_once(door: Door, billing: HttpReceiver) -> None:
    order = unique("ORD").upper()
    statuses = [door.call("issue_refund", {"order_id": s, "amount": 50})
                for s in spellings(order)]
    assert [a["status"] for a in statuses] == ["executed"] + ["denied"] * 9
    assert {a["code"] for a in statuses[1:]} == {"duplicate_action"}
    assert len(deliveries(billing, order)) == 1


def test_spellings_in_one_answer_refund_once(door: Door, billing: HttpReceiver) -> None:
    order = unique("ORD").upper()
    script = "\n".join(f"CALL issue_refund {json.dumps({'order_id': s, 'amount': 10})}"
                       for s in spellings(order)[:5])
    actions = door.chat(script)["authority"]["actions"]
    assert sorted(a["status"] for a in actions) == ["denied"] * 4 + ["executed"]
    assert len(deliveries(billing, order)) == 1


# ---------------------------------------------------------------- G4: redacted values


def test_a_schema_error_never_quotes_a_redacted_value(door: Door, billing: HttpReceiver) -> None:
    before = len(billing.requests)
    completion = door.chat(f'CALL pay {{"card_number": "{CARD}", "amount": 5}}')
    [action] = completion["authority"]["actions"]
    assert (action["status"], action["code"]) == ("denied", "invalid_arguments")
    assert action["reason"] == ("invalid arguments: card_number: does not satisfy the schema's "
                                "'type' constraint (value redacted)")
    tool_messages = door.followup_texts(completion)
    assert tool_messages and all(CARD not in m for m in tool_messages)
    assert CARD not in door.audit_text()
    assert len(billing.requests) == before
    if door.proxy is not None:  # and the audit API serves the same clean record
        served = door.proxy.http("GET", "/authority/audit", key=ADMIN_KEY,
                                 params={"limit": 1000})
        assert served.status_code == 200 and CARD not in served.text


def test_the_log_executor_never_logs_a_redacted_field(door: Door,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="authority.executor")
    ticket = unique("T")
    action = door.call("tag_ticket", {"ticket": ticket, "password": "hunter2-" + ticket})
    assert action["status"] == "executed"
    logged = [line for line in door.process_log(caplog).splitlines() if ticket in line]
    assert logged and all("hunter2" not in line for line in logged)
    assert any('"password":"[REDACTED]"' in line for line in logged)


# ---------------------------------------------------------------- G3: executor secrets


def assert_no_secret(where: str, text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{where} leaks {leaked}"


def test_simulation_never_shows_executor_secrets(door: Door, billing: HttpReceiver) -> None:
    completion = door.chat(
        f'CALL issue_refund {{"order_id": "{unique("sim")}", "amount": 20}}\n'
        'CALL send_email {"to": "ann@example.com", "subject": "s", "body": "b"}\n'
        'CALL send_report {"to": "ann@example.com", "subject": "r", "body": "b"}\n'
        f'CALL pay {{"card_number": 4111111111111111, "amount": 5}}', dev=True)
    actions = completion["authority"]["actions"]
    assert [a["status"] for a in actions] == ["simulated"] * 4
    refund = actions[0]["result"]["would_execute"]
    assert refund["url"] == billing.url("/hooks/***?token=***")
    assert refund["headers"]["X-Billing-Key"] == refund["headers"]["X-Tenant"] == "***"
    assert actions[2]["result"]["would_execute"]["server"]["login"] is True
    assert actions[3]["result"]["would_execute"]["json"]["arguments"]["card_number"] \
        == "[REDACTED]"
    assert_no_secret("the response", json.dumps(completion))
    assert_no_secret("the follow-up messages", json.dumps(door.followup_texts(completion)))
    assert_no_secret("the audit log", door.audit_text())


def test_an_approval_never_shows_executor_secrets(door: Door) -> None:
    action = door.call("issue_refund", {"order_id": unique("apr"), "amount": 400,
                                        "card_number": CARD})
    assert action["status"] == "pending_approval"
    shown = door.approval(action["approval_id"])
    assert shown["would_execute"]["url"].endswith("/hooks/***?token=***")
    assert shown["would_execute"]["json"]["arguments"]["card_number"] == "[REDACTED]"
    assert_no_secret("the approval", json.dumps(shown))
    assert CARD not in json.dumps(shown)


def test_a_webhook_error_never_leaks_a_secret(door: Door, billing: HttpReceiver) -> None:
    # A receiver that echoes what it got (URL, headers) into its error answer.
    billing.reply_once(500, body=f"bad token {URL_QUERY_SECRET} for key {HEADER_SECRET} "
                                 f"at /hooks/{URL_PATH_SECRET}")
    completion = door.chat(f'CALL issue_refund {{"order_id": "{unique("err")}", "amount": 5}}')
    [action] = completion["authority"]["actions"]
    assert action["status"] == "failed"
    assert action["reason"] == "webhook answered 500: bad token *** for key *** at /hooks/***"
    assert_no_secret("the response", json.dumps(completion))
    assert_no_secret("the audit log", door.audit_text())


def test_one_hostile_call_never_poisons_the_others(door: Door, billing: HttpReceiver,
                                                  mailbox: SmtpSink) -> None:
    order, subject = unique("mix"), unique("mix-mail")
    script = "\n".join([
        "CALL send_email " + json.dumps({"to": "evil@attacker.com, boss@example.com",
                                         "subject": subject, "body": "b"}),
        "CALL issue_refund " + json.dumps({"order_id": order, "amount": "5000"}),
        "CALL issue_refund " + json.dumps({"order_id": order + "-b", "amount": 12}),
    ])
    actions = door.chat(script)["authority"]["actions"]
    assert [a["status"] for a in actions] == ["pending_approval", "denied", "executed"]
    assert mails(mailbox, subject) == [] and deliveries(billing, order) == []
    assert len(deliveries(billing, order + "-b")) == 1
