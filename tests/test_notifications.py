"""Notifications (issue 16): configured in the policy, queued in the durable outbox in the
step that changes an approval, delivered by the worker to real receivers (an HTTP server
that checks the signature, a Slack-shaped endpoint, an SMTP server), retried with
backoff, audited, never blocking the approval."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import audit_entries, tool, user
from servers import HttpReceiver, RecordedRequest, SmtpSink

from authority_sdk import control
from authority_sdk.client import AuthorityClient
from authority_sdk.delivery import deliver_round
from authority_sdk.engine import Gateway
from authority_sdk.errors import PolicyError
from authority_sdk.notifications import OUTBOX_KIND
from authority_sdk.notify_messages import sign, verify
from authority_sdk.policy import parse_policy
from authority_sdk.worker import Worker

pytestmark = pytest.mark.usefixtures("audit_chain_intact")

SECRET = "whsec-test-0123456789"
MODEL = "gpt-4o-mini"
TOOLS = [tool("issue_refund"), tool("grant_access")]
APPROVER_SHA = hashlib.sha256(b"ops-alice-secret").hexdigest()


def base_policy(billing: HttpReceiver, channels: dict[str, Any],
                **notifications: Any) -> dict[str, Any]:
    return {
        "actions": {
            "issue_refund": {"executor": "billing", "mode": "require_human_approval"},
            "grant_access": {"mode": "require_human_approval"},
        },
        "executors": {"billing": {"type": "webhook", "url": billing.url("/refunds"),
                                  "timeout_s": 5}},
        "keys": [{"name": "ops-alice", "secret_sha256": APPROVER_SHA,
                  "roles": ["approver"]}],
        "notifications": {"public_base_url": "https://gateway.example.com",
                          "backoff_s": 1, **notifications, "channels": channels},
    }


def webhook(rx: HttpReceiver, **kw: Any) -> dict[str, Any]:
    return {"type": "webhook", "url": rx.url("/hook"), "secret_env": "NOTIFY_SECRET",
            "timeout_s": 5, **kw}


class Setup:
    def __init__(self, path: Path, gateways: list[Gateway]) -> None:
        agent = Gateway(path)
        self.gw = Gateway(path)
        gateways.extend([agent, self.gw])
        self.client = AuthorityClient(gateway=agent, caller="support-bot", max_retries=0)
        self.log = path.parent / "audit.jsonl"

    def hold(self, name: str, args: dict[str, Any]) -> str:
        resp = self.client.chat.completions.create(
            model=MODEL, messages=user(f"CALL {name} {json.dumps(args)}"), tools=TOOLS)
        [action] = resp.authority["actions"]
        assert action["status"] == "pending_approval"
        return str(action["approval_id"])

    def outbox(self) -> list[tuple[str, dict[str, Any]]]:
        return self.gw.store.outbox_list(OUTBOX_KIND)

    def notification_audit(self) -> list[dict[str, Any]]:
        return audit_entries(self.log, "notification")


@pytest.fixture
def hook() -> Iterator[HttpReceiver]:
    with HttpReceiver() as receiver:
        yield receiver


@pytest.fixture
def make(write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway],
         monkeypatch: pytest.MonkeyPatch) -> Callable[..., Setup]:
    monkeypatch.setenv("NOTIFY_SECRET", SECRET)

    def build(channels: dict[str, Any], **notifications: Any) -> Setup:
        return Setup(write_policy(base_policy(rx, channels, **notifications)), gateways)

    return build


def receiver_verifies(req: RecordedRequest, secret: str = SECRET) -> bool:
    """The README's recipe, written as a receiver would (not the gateway's own code)."""
    header = req.header("x-authority-signature") or ""
    fields = dict(part.split("=", 1) for part in header.split(","))
    t = int(fields["t"])
    if abs(time.time() - t) > 300:
        return False
    mac = hmac.new(secret.encode(), f"{t}.".encode() + req.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, fields["v1"])


# -- policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(("channel", "problem"), [
    ({"type": "webhook", "url": "http://x", "secret_env": "S", "evnets": ["held"]},
     "evnets"),
    ({"type": "webhook", "url": "http://x", "secret_env": "S", "events": ["hled"]},
     "channels.ops.events.0"),
    ({"type": "webhook", "url": "http://x"}, "secret_env"),
    ({"type": "pager", "url": "http://x"}, "pager"),
    ({"type": "email", "executor": "billing", "to": ["a@example.com"]},
     "is not an smtp executor"),
    ({"type": "slack", "url_env": "S", "environments": ["staging"]}, "unknown environment"),
    ({"type": "slack", "url_env": "S", "actions": ["refund"]}, "unknown action 'refund'"),
    ({"type": "slack", "url_env": "S", "approver": "support-bot"}, "approver role"),
])
def test_a_channel_typo_is_a_policy_error_naming_it(rx: HttpReceiver, channel: dict[str, Any],
                                                    problem: str) -> None:
    data = base_policy(rx, {"ops": channel})
    data["environments"] = {"prod": {}}
    data["default_environment"] = "prod"
    with pytest.raises(PolicyError) as err:
        parse_policy(data)
    assert problem in str(err.value)


def test_public_base_url_must_be_absolute(rx: HttpReceiver) -> None:
    data = base_policy(rx, {})
    data["environments"] = {"prod": {}}
    data["default_environment"] = "prod"
    data["notifications"]["public_base_url"] = "gateway.example.com/x"
    with pytest.raises(PolicyError, match="public_base_url"):
        parse_policy(data)


# -- webhook -----------------------------------------------------------------------------


def test_held_action_is_queued_with_the_approval_and_delivered_signed_by_the_worker(
        make: Callable[..., Setup], hook: HttpReceiver) -> None:
    s = make({"ops": webhook(hook, approver="ops-alice")})
    apr = s.hold("issue_refund", {"amount": 300, "card_number": "4111111111111111"})
    # Queued in the same step as the approval; nothing sent before the worker runs.
    [(nid, item)] = s.outbox()
    assert item["approval_id"] == apr and item["event"] == "held" and hook.requests == []

    report = Worker(s.gw).tick()
    assert report["notified"] == [nid]
    [req] = hook.wait_for(1)
    assert receiver_verifies(req)
    assert req.header("idempotency-key") == nid
    body = req.json
    assert body["type"] == "approval.held" and body["id"] == nid
    assert body["approval"]["id"] == apr and body["approval"]["status"] == "pending"
    assert body["approval"]["arguments"]["amount"] == 300
    assert "4111111111111111" not in req.body.decode()  # redacted as the policy says
    assert body["decide_url"].startswith("https://gateway.example.com/authority/decide/")
    assert s.outbox() == []
    [entry] = s.notification_audit()
    assert entry["decision"] == "allow" and entry["details"]["notification_id"] == nid
    assert entry["details"]["link"] is True
    # A tampered body, another secret or an old timestamp fails verification.
    assert verify(SECRET, req.body, req.header("x-authority-signature") or "")
    assert not verify(SECRET, req.body + b" ", req.header("x-authority-signature") or "")
    assert not verify("other", req.body, req.header("x-authority-signature") or "")
    old = sign(SECRET, req.body, ts=int(time.time()) - 301)
    assert not verify(SECRET, req.body, old)


def test_a_failing_receiver_is_retried_with_backoff_and_never_blocks_the_approval(
        make: Callable[..., Setup], hook: HttpReceiver, rx: HttpReceiver) -> None:
    s = make({"ops": webhook(hook)}, max_attempts=3)
    hook.reply(503, json={"error": "down"})
    apr = s.hold("issue_refund", {"amount": 300})
    t0 = time.time()
    assert deliver_round(s.gw, now=t0) == []
    [(nid, item)] = s.outbox()
    assert item["attempts"] == 1 and t0 + 0.9 < item["next_at"] <= t0 + 1.1
    assert deliver_round(s.gw, now=t0 + 0.5) == []  # not due yet: no second request
    assert len(hook.requests) == 1
    assert deliver_round(s.gw, now=t0 + 1.5) == []
    [(_, item)] = s.outbox()
    assert item["attempts"] == 2 and item["next_at"] == pytest.approx(t0 + 1.5 + 2, abs=0.01)

    # Meanwhile the approval is decided as usual, and that outcome is queued too.
    got = control.approve(s.gw, apr, actor="ops-alice")
    assert got["status"] == "executed" and len(rx.requests) == 1
    hook.reply(200, json={"ok": True})
    sent = deliver_round(s.gw, now=t0 + 10)
    assert nid in sent and len(sent) == 3  # held, approved, executed
    types = [r.json["type"] for r in hook.requests[2:]]
    assert sorted(types) == ["approval.approved", "approval.executed", "approval.held"]
    assert all(receiver_verifies(r) for r in hook.requests)
    # The retried held notice went out after the decision: it carries no link any more.
    held = next(r.json for r in hook.requests[2:] if r.json["type"] == "approval.held")
    assert held["decide_url"] is None
    reasons = [e["reason"] for e in s.notification_audit() if e["decision"] == "error"]
    assert len(reasons) == 2 and "HTTP 503" in reasons[0]


def test_a_notification_is_given_up_after_max_attempts_audited(
        make: Callable[..., Setup], hook: HttpReceiver) -> None:
    s = make({"ops": webhook(hook)}, max_attempts=2)
    hook.reply(500)
    apr = s.hold("grant_access", {"user": "bob"})
    t0 = time.time()
    deliver_round(s.gw, now=t0)
    deliver_round(s.gw, now=t0 + 60)
    assert s.outbox() == [] and len(hook.requests) == 2
    last = s.notification_audit()[-1]
    assert last["decision"] == "error" and "given up" in last["reason"]
    assert control.get_approval(s.gw, apr)["status"] == "pending"


def test_a_missing_secret_is_a_failed_attempt_not_an_unsigned_post(
        make: Callable[..., Setup], hook: HttpReceiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = make({"ops": webhook(hook)})
    monkeypatch.delenv("NOTIFY_SECRET")
    s.hold("grant_access", {"user": "bob"})
    deliver_round(s.gw)
    assert hook.requests == []
    [entry] = s.notification_audit()
    assert entry["decision"] == "error" and "$NOTIFY_SECRET is not set" in entry["reason"]


def test_channels_filter_by_environment_action_and_event(
        make: Callable[..., Setup], hook: HttpReceiver) -> None:
    s = make({
        "refunds": webhook(hook, actions=["issue_refund"], events=["held"]),
        "dev-only": webhook(hook, environments=["dev"]),
        "outcomes": webhook(hook, events=["rejected", "expired"]),
    })
    a1 = s.hold("issue_refund", {"amount": 300})
    s.hold("grant_access", {"user": "bob"})
    assert [(p["channel"], p["approval_id"]) for _, p in s.outbox()] == [("refunds", a1)]
    control.reject(s.gw, a1, actor="ops-alice", reason="no")
    assert sorted(p["event"] for _, p in s.outbox()) == ["held", "rejected"]


def test_expiry_by_the_worker_is_notified(make: Callable[..., Setup], hook: HttpReceiver,
                                          write_policy: Callable[..., Path]) -> None:
    s = make({"ops": webhook(hook, events=["expired"])})
    apr = s.hold("grant_access", {"user": "bob"})
    s.gw.store.approval_transition(apr, "pending", "pending", expires_at=time.time() - 1)
    report = Worker(s.gw).tick()
    assert report["expired"] == [apr] and len(report["notified"]) == 1
    [req] = hook.wait_for(1)
    assert req.json["type"] == "approval.expired" and receiver_verifies(req)


# -- slack -------------------------------------------------------------------------------

HOSTILE = ("<!channel> <@U123> *bold* _it_ ~gone~ `code` <http://evil.example|click here> "
           "& &amp; @here\n```\nbreak```")


def _texts(blocks: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for b in blocks:
        for key in ("text",):
            if isinstance(b.get(key), dict):
                yield b[key]
        yield from b.get("fields") or []
        for el in b.get("elements") or []:
            if isinstance(el.get("text"), dict):
                yield el["text"]


def test_slack_gets_block_kit_with_model_text_never_formatting(
        make: Callable[..., Setup], hook: HttpReceiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_URL", hook.url("/services/T000/B000/XXXX"))
    s = make({"team": {"type": "slack", "url_env": "SLACK_URL", "approver": "ops-alice"}})
    apr = s.hold("grant_access", {"user": HOSTILE, "password": "hunter2"})
    Worker(s.gw).tick()
    [req] = hook.wait_for(1)
    assert req.path == "/services/T000/B000/XXXX"
    msg = req.json
    assert msg["unfurl_links"] is False and msg["unfurl_media"] is False
    assert msg["blocks"][0]["type"] == "header"
    texts = list(_texts(msg["blocks"]))
    assert texts and all(t["type"] == "plain_text" and t["emoji"] is False for t in texts)
    joined = "\n".join(t["text"] for t in texts) + msg["text"]
    # No mention, link or entity can form: every <, > and & the model wrote is escaped.
    assert "<" not in joined and ">" not in joined
    assert "&lt;!channel&gt;" in joined and "&lt;http://evil.example|click here&gt;" in joined
    assert "&amp;amp;" in joined
    assert apr in joined and "hunter2" not in req.body.decode()
    [button] = msg["blocks"][-1]["elements"]
    assert button["url"].startswith("https://gateway.example.com/authority/decide/")


# -- email -------------------------------------------------------------------------------


def test_email_goes_through_the_policys_smtp_executor(
        write_policy: Callable[..., Path], rx: HttpReceiver, gateways: list[Gateway]) -> None:
    with SmtpSink() as sink:
        data = base_policy(rx, {"mail": {"type": "email", "executor": "mailer",
                                         "to": ["Ops <ops@example.com>"],
                                         "approver": "ops-alice"}})
        data["executors"]["mailer"] = {"type": "smtp", "host": "127.0.0.1",
                                       "port": sink.port, "sender": "gateway@example.com"}
        s = Setup(write_policy(data), gateways)
        apr = s.hold("issue_refund", {"amount": 300, "card_number": "4111111111111111"})
        Worker(s.gw).tick()
        [mail] = sink.wait_for(1)
    assert mail.rcpt_tos == ["ops@example.com"]
    msg = mail.message
    assert msg["Subject"] == f"Approval needed: issue_refund ({apr})"
    text = msg.get_content()
    assert '"amount": 300' in text and "4111111111111111" not in text
    assert "https://gateway.example.com/authority/decide/" in text
    assert s.outbox() == []


def test_expiry_found_by_a_reader_is_notified_once(make: Callable[..., Setup],
                                                   hook: HttpReceiver) -> None:
    s = make({"ops": webhook(hook, events=["expired"])})
    apr = s.hold("grant_access", {"user": "bob"})
    s.gw.store.approval_transition(apr, "pending", "pending", expires_at=time.time() - 1)
    assert control.get_approval(s.gw, apr)["status"] == "expired"
    assert list(control.list_approvals(s.gw))
    assert [p["event"] for _, p in s.outbox()] == ["expired"]
    report = Worker(s.gw).tick()
    assert report["expired"] == [] and len(report["notified"]) == 1
    [req] = hook.wait_for(1)
    assert req.json["type"] == "approval.expired"


def test_an_apps_key_gets_a_signed_callback_of_its_own_actions_outcomes(
        write_policy: Callable[..., Path], rx: HttpReceiver, hook: HttpReceiver,
        gateways: list[Gateway], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SECRET", SECRET)
    monkeypatch.setenv("APP_SECRET", "whsec-app")
    data = base_policy(rx, {"ops": webhook(hook, events=["held"])})
    data["keys"].append({"name": "support-bot", "secret_sha256": "ab" * 32,
                         "callback": {"url": hook.url("/app"), "secret_env": "APP_SECRET"}})
    s = Setup(write_policy(data), gateways)
    apr = s.hold("issue_refund", {"amount": 300})
    control.approve(s.gw, apr, actor="ops-alice")
    Worker(s.gw).tick()
    got = hook.wait_for(3)
    app = [r for r in got if r.path == "/app"]
    assert sorted(r.json["type"] for r in app) == ["approval.approved", "approval.executed"]
    assert all(receiver_verifies(r, "whsec-app") and r.json["decide_url"] is None for r in app)
    [ops] = [r for r in got if r.path == "/hook"]
    assert ops.json["type"] == "approval.held" and receiver_verifies(ops)


def test_a_round_stops_when_the_lease_is_lost_and_a_bug_is_a_failed_attempt(
        make: Callable[..., Setup], hook: HttpReceiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = make({"ops": webhook(hook)})
    s.hold("grant_access", {"user": "bob"})
    asked: list[float] = []

    def lost(ttl_s: float) -> bool:
        asked.append(ttl_s)
        return False

    assert deliver_round(s.gw, keep_lease=lost) == []
    assert hook.requests == [] and len(s.outbox()) == 1 and asked == [15.0]  # 5 s + margin

    import authority_sdk.delivery as delivery

    def broken(*_: Any) -> bytes:
        raise KeyError("oops")

    monkeypatch.setattr(delivery, "webhook_body", broken)
    report = Worker(s.gw).tick()
    assert report["leader"] is True and report["notified"] == [] and "error" not in report
    [entry] = s.notification_audit()
    assert entry["decision"] == "error" and "cannot build or send: KeyError" in entry["reason"]
    assert s.outbox()[0][1]["attempts"] == 1


def test_outbox_and_one_time_links_on_every_state_backend(
        write_policy: Callable[..., Path], rx: HttpReceiver, hook: HttpReceiver,
        gateways: list[Gateway], store_backend: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import deep_merge

    from authority_sdk import links

    monkeypatch.setenv("NOTIFY_SECRET", SECRET)
    data = deep_merge(base_policy(rx, {"ops": webhook(hook, approver="ops-alice")}),
                      store_backend.policy_overrides())
    s = Setup(write_policy(data), gateways)
    apr = s.hold("issue_refund", {"amount": 300})
    assert Worker(s.gw).tick()["notified"]
    [req] = hook.wait_for(1)
    assert receiver_verifies(req)
    token = req.json["decide_url"].rsplit("/", 1)[1]
    rec = links.lookup(s.gw.store, token)
    assert rec is not None and rec["approval_id"] == apr and rec["approver"] == "ops-alice"
    assert links.lookup(s.gw.store, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert links.lookup(s.gw.store, token, now=rec["expires_at"]) is None  # expired then
    assert links.consume(s.gw.store, token) and not links.consume(s.gw.store, token)
    assert links.lookup(s.gw.store, token) is None


def test_a_notice_whose_approval_never_came_is_kept_briefly_then_dropped_audited(
        make: Callable[..., Setup], hook: HttpReceiver) -> None:
    # What a crash between queueing the held notice and creating the approval leaves.
    s = make({"ops": webhook(hook)})
    t0 = time.time()
    s.gw.store.outbox_put(OUTBOX_KIND, "ntf_orphan", {
        "channel": "ops", "event": "held", "approval_id": "apr_never", "created_at": t0,
        "attempts": 0, "next_at": t0})
    assert deliver_round(s.gw, now=t0 + 1) == [] and len(s.outbox()) == 1
    assert deliver_round(s.gw, now=t0 + 61) == [] and s.outbox() == []
    assert hook.requests == []
    [entry] = s.notification_audit()
    assert entry["decision"] == "deny" and "no such approval" in entry["reason"]
