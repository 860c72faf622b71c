"""Executor secrets and redacted fields never shown (issue 10 G3, G4), executor by executor."""

from __future__ import annotations

import json
import logging
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from servers import HttpReceiver

from authority_sdk.executors import ExecutorRegistry, build_executor
from authority_sdk.executors.webhook import mask_url
from authority_sdk.modes import validate_arguments
from authority_sdk.policy import (
    LogExecutor,
    PythonExecutor,
    SmtpExecutor,
    WebhookExecutor,
    parse_policy,
)

KEY = "act_secrets"


@pytest.mark.parametrize(("url", "shown"), [
    ("http://127.0.0.1:9000/refunds", "http://127.0.0.1:9000/refunds"),
    ("https://hooks.example.com/hooks/refund-requests", "https://hooks.example.com/hooks/refund-requests"),
    ("https://svc:pw@billing.example.com/x", "https://***@billing.example.com/x"),
    ("https://T0KEN@billing.example.com/x", "https://***@billing.example.com/x"),
    ("https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
     "https://hooks.slack.com/services/***/***/***"),
    ("https://h.example.com/api/v1/refunds?token=abc&mode=x&flag",
     "https://h.example.com/api/***/refunds?token=***&mode=***&***"),
    ("https://h.example.com/a;jsessionid=1234/b#frag", "https://h.example.com/***/b#***"),
    ("https://h.example.com/hooks/abcdefghijklmnopqrstuvwxyzabcdef",
     "https://h.example.com/hooks/***"),
    ("http://[::1]:8080/hooks/x%2Fy", "http://[::1]:8080/hooks/***"),
    ("http://h:99999/", "***"),  # not a URL it can take apart: nothing of it is shown
])
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


# A token: letters and digits, as real tokens are; the "Zq9" start keeps it from being a
# word that the description shows anyway ("Content-Type").
_token = st.text(string.ascii_letters + string.digits + "-_", min_size=5, max_size=40).map(
    lambda s: "Zq9" + s)


@settings(max_examples=150, deadline=None)
@given(header_value=_token, path_token=_token, query_value=_token, user=_token,
       header_name=st.sampled_from(["X-Billing-Key", "X-Tenant", "Authorization", "X-Custom"]))
def test_property_no_configured_secret_in_a_webhook_description(
        header_value: str, path_token: str, query_value: str, user: str,
        header_name: str) -> None:
    url = f"https://{user}:{user}x@billing.example.com:8443/hooks/{path_token}?sig={query_value}"
    ex = build_executor("billing", WebhookExecutor(type="webhook", url=url,
                                                   headers={header_name: header_value}))
    shown = json.dumps(ex.describe("issue_refund", {"amount": 5}, KEY))
    for secret in (header_value, path_token, query_value, user):
        assert secret not in shown
    assert "billing.example.com:8443/hooks/***?sig=***" in shown


def test_webhook_transport_errors_are_scrubbed() -> None:
    url = "http://u:Pw0rd-9x@127.0.0.1:1/hooks/S3cretPath?token=Tok3n-77"
    ex = build_executor("billing", WebhookExecutor(type="webhook", url=url, timeout_s=2,
                                                   headers={"X-Key": "h3ader-Secret"}))
    try:
        res = ex.execute("t", {}, KEY)
    finally:
        ex.close()  # type: ignore[attr-defined]
    assert not res.ok
    for secret in ("Pw0rd-9x", "S3cretPath", "Tok3n-77", "h3ader-Secret"):
        assert secret not in json.dumps(res.to_dict())


def test_webhook_echoed_secret_in_a_result_body_is_scrubbed() -> None:
    with HttpReceiver() as rx:
        rx.reply(200, json={"ok": True, "seen_token": "Tok3n-77", "nested": ["h3ader-Secret"]})
        ex = build_executor("billing", WebhookExecutor(
            type="webhook", url=rx.url("/hooks?token=Tok3n-77"),
            headers={"X-Key": "h3ader-Secret", "X-Short": "1"}))
        res = ex.execute("t", {}, KEY)
        ex.close()  # type: ignore[attr-defined]
        # What was sent is untouched: only what is shown is masked.
        assert rx.requests[0].header("x-key") == "h3ader-Secret"
        assert rx.requests[0].path == "/hooks?token=Tok3n-77"
    assert res.ok and res.result == {"ok": True, "seen_token": "***", "nested": ["***"]}


def test_smtp_description_never_reads_or_shows_credentials(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setenv("T_USER", "smtp-User-1")
    monkeypatch.setenv("T_PASS", "smtp-Pass-2")
    ex = build_executor("email", SmtpExecutor(type="smtp", sender="agent@example.com",
                                              username_env="T_USER", password_env="T_PASS"))
    shown = json.dumps(ex.describe("send_email", {"to": "a@example.com", "subject": "s",
                                                  "body": "b"}, KEY))
    assert "smtp-User-1" not in shown and "smtp-Pass-2" not in shown
    assert '"login": true' in shown


ARGS = {"ticket": "T-1", "password": "hunter2", "card": {"card_number": "4111"}}


@pytest.mark.parametrize("config", [
    WebhookExecutor(type="webhook", url="http://127.0.0.1:9/x"),
    PythonExecutor(type="python", target="sample_actions:write_note"),
    LogExecutor(type="log"),
], ids=["webhook", "python", "log"])
def test_every_description_masks_redacted_fields(config: Any) -> None:
    ex = build_executor("x", config, redact=["password", "Card_Number"])
    shown = json.dumps(ex.describe("tag", ARGS, KEY))
    assert "hunter2" not in shown and "4111" not in shown
    assert "T-1" in shown


def test_smtp_description_masks_a_redacted_body() -> None:
    ex = build_executor("email", SmtpExecutor(type="smtp", sender="agent@example.com"),
                        redact=["body"])
    shown = ex.describe("send_email", {"to": "a@example.com", "subject": "s",
                                       "body": "the secret plan"}, KEY)
    assert shown["body"] == "[REDACTED]" and "the secret plan" not in json.dumps(shown)


def test_the_log_executor_logs_redacted_fields_masked(caplog: pytest.LogCaptureFixture) -> None:
    policy = parse_policy({"executors": {"dry": {"type": "log"}}, "redact": ["password"]})
    registry = ExecutorRegistry.from_policy(policy)
    caplog.set_level(logging.INFO, logger="authority.executor")
    assert registry.get("dry").execute("tag", ARGS, KEY).ok
    assert "hunter2" not in caplog.text
    assert '"password":"[REDACTED]"' in caplog.text and '"ticket":"T-1"' in caplog.text
    # Without a redact list nothing is hidden (the registry passes the policy's own list).
    caplog.clear()
    assert ExecutorRegistry(policy.executors).get("dry").execute("tag", ARGS, KEY).ok
    assert "hunter2" in caplog.text


# ---------------------------------------------------------------- schema messages (G4)

SCHEMA = {"type": "object", "properties": {
    "card_number": {"type": "integer"},
    "payment": {"type": "string"},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "Password": {"type": "string", "maxLength": 3}}}},
    "note": {"type": "string", "maxLength": 2},
}}


@pytest.mark.parametrize(("args", "message"), [
    ({"card_number": "4111111111111111"},
     "card_number: does not satisfy the schema's 'type' constraint (value redacted)"),
    ({"payment": {"card_number": "4111111111111111"}},
     "payment: does not satisfy the schema's 'type' constraint (value redacted)"),
    ({"items": [{"Password": "hunter2-long"}]},
     "items.0.Password: does not satisfy the schema's 'maxLength' constraint (value redacted)"),
    ({"note": "toolong"}, "note: 'toolong' is too long"),  # not redacted: jsonschema's words
])
def test_schema_messages_never_quote_a_redacted_value(args: dict[str, Any], message: str
                                                      ) -> None:
    got = validate_arguments(args, SCHEMA, ["card_number", "password"])
    assert got == message
    assert "4111" not in got and "hunter2" not in got


def test_schema_messages_without_a_redact_list_are_jsonschemas() -> None:
    assert validate_arguments({"card_number": "x"}, SCHEMA) == \
        "card_number: 'x' is not of type 'integer'"


def test_a_receiver_echoing_a_redacted_value_is_masked() -> None:
    args = {"amount": 5, "card_number": "4111111111111111", "note": "ok"}
    with HttpReceiver() as rx:
        rx.reply_once(422, body="card 4111111111111111 declined")
        rx.reply_once(200, json={"charged": "4111111111111111", "note": "ok"})
        ex = build_executor("billing", WebhookExecutor(type="webhook", url=rx.url("/pay")),
                            redact=["card_number"])
        declined, charged = ex.execute("pay", args, KEY), ex.execute("pay", args, KEY)
        ex.close()  # type: ignore[attr-defined]
        assert rx.requests[0].json["arguments"]["card_number"] == "4111111111111111"  # sent
    assert declined.error == "webhook answered 422: card [REDACTED] declined"
    assert "4111" not in json.dumps(declined.to_dict())
    assert charged.result == {"charged": "[REDACTED]", "note": "ok"}


def test_a_python_exception_quoting_a_redacted_value_is_masked() -> None:
    ex = build_executor("x", PythonExecutor(type="python", target="sample_actions:refuse"),
                        redact=["amount"])
    res = ex.execute("refund", {"amount": 123456}, KEY)
    assert res.error == "PermissionError: refund over limit: [REDACTED]"
