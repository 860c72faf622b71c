"""What a policy reload leaves behind (issue 17 point 2, follow-up): the replaced engine's
executor clients close once the requests that started on it are done — not under them —
and a refusal of the audit log (entries parked after an effect) holds across the reload,
even when a request still finishing on the old engine meets it after the swap.

Each test holds a request in flight inside a python executor (``record_then_wait``: it
waits for a file) while the policy file changes under it, through the real proxy."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from helpers import ScriptedServer, user
from proxy_env import AGENT_KEY, RunningProxy, start_proxy
from servers import HttpReceiver

TESTS = Path(__file__).resolve().parent.parent

_ESTABLISHED = "01"


def _established(local_port: int, remote_port: int) -> bool:
    """A TCP connection from ``local_port`` to ``remote_port`` on loopback is open (the
    proxy's side of a webhook connection)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if (state == _ESTABLISHED and int(local.rsplit(":", 1)[1], 16) == local_port
                    and int(remote.rsplit(":", 1)[1], 16) == remote_port):
                return True
    return False


def _wait(what: Any, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not what():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _chat(px: RunningProxy, script: str) -> httpx.Response:
    return px.http("POST", "/v1/chat/completions", AGENT_KEY,
                   json={"model": "gpt-4o-mini", "messages": user(script)})


def _reload(px: RunningProxy, before: int) -> None:
    """Change the policy file (a setting that reloads in place) and wait until the new
    policy is on the record, so in force."""
    data = yaml.safe_load(px.policy_path.read_text())
    data["actions"]["lookup_customer"]["mode"] = "require_human_approval"
    px.policy_path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert _wait(lambda: sum(e["event"] == "policy" and e["decision"] == "allow"
                             for e in px.audit_entries()) > before), "the policy did not reload"


def _env(tmp_path: Path, **more: str) -> dict[str, str]:
    return {"PYTHONPATH": str(TESTS), "AUTHORITY_TEST_EFFECTS": str(tmp_path / "effects.jsonl"),
            "AUTHORITY_TEST_GO": str(tmp_path / "go"), **more}


def _effects(tmp_path: Path) -> int:
    path = tmp_path / "effects.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _in_flight(px: RunningProxy, script: str) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(resp=_chat(px, script)), daemon=True)
    thread.start()
    return thread, out


def test_the_old_engines_webhook_client_closes_once_its_requests_are_done(
        upstream: ScriptedServer, tmp_path: Path, rx: HttpReceiver) -> None:
    overrides = {"actions": {"hold": {"executor": "holder", "mode": "auto_execute"},
                             "refund": {"executor": "billing", "mode": "auto_execute"}},
                 "executors": {"holder": {"type": "python",
                                          "target": "sample_actions:record_then_wait"},
                               "billing": {"type": "webhook", "url": rx.url("/refund")}}}
    with start_proxy(upstream, tmp_path, overrides=overrides, env=_env(tmp_path)) as px:
        first = _chat(px, 'CALL refund {"order_id": "o0"}')
        assert first.json()["authority"]["actions"][0]["status"] == "executed", first.text
        old_port = rx.requests[-1].client_port
        assert _established(old_port, rx.port)  # kept alive by the engine's client

        # A request on the old engine, held between its two actions while the policy
        # reloads; its webhook call then goes through the old engine's client.
        thread, out = _in_flight(px, 'CALL hold {"n": 1}\nCALL refund {"order_id": "o1"}')
        assert _wait(lambda: _effects(tmp_path) == 1)
        _reload(px, 0)
        (tmp_path / "go").touch()
        thread.join(30)
        actions = out["resp"].json()["authority"]["actions"]
        # Its webhook went out on the old engine's client after the reload: not closed under it.
        assert [a["status"] for a in actions] == ["executed", "executed"], actions
        held_port = rx.requests[-1].client_port

        # Its last request done, the replaced engine's client is closed.
        assert _wait(lambda: not _established(old_port, rx.port)
                     and not _established(held_port, rx.port)), \
            "the replaced engine's webhook connection is still open"

        # The engine in force has a client of its own, which stays open.
        again = _chat(px, 'CALL refund {"order_id": "o2"}')
        assert again.json()["authority"]["actions"][0]["status"] == "executed", again.text
        new_port = rx.requests[-1].client_port
        assert new_port not in (old_port, held_port)
        time.sleep(1.0)
        assert _established(new_port, rx.port)


def test_an_audit_refusal_met_after_a_reload_holds_for_the_new_policy(
        upstream: ScriptedServer, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    overrides = {"worker": {"interval_s": 60},  # the backlog waits for a request, not it
                 "actions": {"send_note": {"executor": "breaker", "mode": "auto_execute"}},
                 "executors": {"breaker": {
                     "type": "python", "target": "sample_actions:record_wait_then_break_audit"}}}
    env = _env(tmp_path, AUTHORITY_TEST_BREAK_AUDIT=str(log))
    with start_proxy(upstream, tmp_path, overrides=overrides, env=env) as px:
        # The request starts on the old engine; the policy reloads while its first effect
        # runs; then the log breaks and the request parks what it could not write.
        thread, out = _in_flight(px, 'CALL send_note {"text": "one"}\n'
                                     'CALL send_note {"text": "two"}')
        assert _wait(lambda: _effects(tmp_path) == 1)
        _reload(px, 0)
        (tmp_path / "go").touch()
        thread.join(30)
        resp = out["resp"]
        assert resp.status_code == 200, resp.text
        assert [(a["status"], a["code"]) for a in resp.json()["authority"]["actions"]] == [
            ("executed", None), ("denied", "authority_unavailable")]

        # The new policy's engine takes no request while the record is incomplete: the
        # upstream is not even asked.
        asked = px.upstream_stats()["chat_requests"]
        refused = _chat(px, "SAY hello")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "authority_unavailable"
        assert px.upstream_stats()["chat_requests"] == asked

        # The log is writable again: the parked entries go in before the next request's.
        log.rmdir()
        log.with_name(log.name + ".aside").rename(log)
        ok = _chat(px, "SAY hello")
        assert ok.status_code == 200, ok.text
        entries = px.audit_entries()
        parked = [e["seq"] for e in entries if (e.get("details") or {}).get("parked")]
        [served] = [e["seq"] for e in entries if e["event"] == "request"
                    and e.get("request_id") == ok.json()["authority"]["request_id"]]
        assert parked and max(parked) < served, (parked, served)
        assert _effects(tmp_path) == 1


def test_one_backlog_for_the_engines_of_one_log_and_the_worker_clears_it(
        write_policy: Any) -> None:
    """The flag is the log's: set on the replaced engine, the engine in force sees it; the
    background worker (handed the live gateway) clears the engine's, not a shadow copy."""
    from proxy.observe import ObservedGateway
    from proxy.reload import LiveGateway

    old = ObservedGateway(str(write_policy()))
    new = ObservedGateway(old.policy)
    new.share_audit_backlog(old)
    live = LiveGateway(new)
    old.audit_degraded = True
    assert new.audit_degraded and live.audit_degraded
    live.audit_degraded = False
    assert not old.audit_degraded and not new.audit_degraded
    assert "audit_degraded" not in vars(live)
