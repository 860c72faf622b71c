"""Policy changes without a restart (issue 17 point 2; issue 16's key rotation): the file
changing on disk or SIGHUP reloads it in every worker; a bad file is refused and audited
and the old policy stays; requests in flight finish under the policy they started with;
keys are added and revoked live."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from helpers import ScriptedServer, tool, user
from proxy_env import ADMIN_KEY, AGENT_KEY, RunningProxy, sha, start_proxy

TOOLS = [tool("delete_account", {"id": {"type": "integer"}})]
NEW_ADMIN = "sk-new-admin-0123456789"


def _status(px: RunningProxy, text: str = 'CALL delete_account {"id": 1}') -> str:
    r = px.http("POST", "/v1/chat/completions", AGENT_KEY,
                json={"model": "gpt-4o-mini", "messages": user(text), "tools": TOOLS})
    assert r.status_code == 200, r.text
    return str(r.json()["authority"]["actions"][0]["status"])


def _edit(px: RunningProxy, change: Any) -> None:
    data = yaml.safe_load(px.policy_path.read_text())
    change(data)
    px.policy_path.write_text(yaml.safe_dump(data, sort_keys=False))


def _policy_entries(px: RunningProxy, n: int, timeout_s: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = [e for e in px.audit_entries() if e["event"] == "policy"]
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _allow_delete(data: dict[str, Any]) -> None:
    data["actions"]["delete_account"]["mode"] = "auto_execute"


def test_a_changed_file_takes_over_and_a_bad_one_is_refused(upstream: ScriptedServer,
                                                            tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path) as px:
        assert _status(px) == "denied"
        _edit(px, _allow_delete)
        [change] = _policy_entries(px, 1)
        assert (change["decision"], change["actor"]) == ("allow", "reload:file")
        assert change["details"]["new_policy_hash"] != change["details"]["old_policy_hash"]
        assert change["policy_hash"] == change["details"]["new_policy_hash"]
        assert _status(px) == "allowed"

        px.policy_path.write_text(px.policy_path.read_text() + "\nactions: [oops\n")
        _, refused = _policy_entries(px, 2)
        assert refused["decision"] == "deny" and "not valid YAML" in refused["reason"]
        assert _status(px) == "allowed"  # the policy in force stayed

        def bigger_bodies(data: dict[str, Any]) -> None:
            # (The upstreams reload in place: tests/proxy/test_upstreams.py.)
            data["proxy"]["max_body_bytes"] = 128 * 1024
            _allow_delete(data)
        px.policy_path.write_text(yaml.safe_dump(yaml.safe_load(
            px.policy_path.read_text().split("\nactions: [oops")[0])))
        _edit(px, bigger_bodies)
        *_, restart = _policy_entries(px, 3)
        assert restart["decision"] == "deny" and "restart to apply" in restart["reason"]
        assert "proxy" in restart["reason"]
    assert px.process.proc is not None


def test_a_request_in_flight_keeps_its_policy_and_sighup_reloads(upstream: ScriptedServer,
                                                                 tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path) as px:
        result: dict[str, str] = {}
        slow = threading.Thread(target=lambda: result.update(
            s=_status(px, 'SLEEP 3\nCALL delete_account {"id": 2}')))
        before = px.upstream_stats()["chat_requests"]
        slow.start()
        while px.upstream_stats()["chat_requests"] == before:  # it has passed admission
            time.sleep(0.02)
        _edit(px, _allow_delete)
        assert px.process.proc is not None
        px.process.proc.send_signal(signal.SIGHUP)  # survives it, and reloads
        [change] = _policy_entries(px, 1)
        assert change["actor"] in ("reload:SIGHUP", "reload:file")
        assert _status(px) == "allowed"
        slow.join(30)
        assert result["s"] == "denied"  # started under the old policy, finished under it
        assert px.process.proc.poll() is None


def test_keys_are_added_and_revoked_without_a_restart(upstream: ScriptedServer,
                                                      tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path) as px:
        assert px.http("GET", "/authority/kill-switch", NEW_ADMIN).status_code == 401

        def add(data: dict[str, Any]) -> None:
            data["keys"].append({"name": "new-admin", "secret_sha256": sha(NEW_ADMIN),
                                 "roles": ["admin"]})
        _edit(px, add)
        _policy_entries(px, 1)
        assert px.http("GET", "/authority/kill-switch", NEW_ADMIN).status_code == 200

        def revoke(data: dict[str, Any]) -> None:
            data["keys"] = [k for k in data["keys"] if k["name"] != "ops-admin"]
        _edit(px, revoke)
        _policy_entries(px, 2)
        assert px.http("GET", "/authority/kill-switch", ADMIN_KEY).status_code == 401
        assert px.http("GET", "/authority/kill-switch", NEW_ADMIN).status_code == 200


def test_every_worker_reloads(upstream: ScriptedServer, tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path, workers=2) as px:
        # Both workers have read the old file (one answering /healthz is not enough).
        deadline = time.monotonic() + 30
        while px.process.output().count("Application startup complete") < 2:
            assert time.monotonic() < deadline, "the second worker did not start"
            time.sleep(0.05)
        _edit(px, _allow_delete)
        changes = _policy_entries(px, 2)
        assert len(changes) == 2  # one per worker, each on the record
        # Whichever worker answers, the new policy decides.
        assert {_status(px) for _ in range(8)} == {"allowed"}
