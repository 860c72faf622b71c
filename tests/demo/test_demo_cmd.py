"""``authority demo`` as a user runs it: a subprocess, checked from its output and its audit log."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from authority_sdk.audit import verify
from authority_sdk.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]
AUTHORITY = [sys.executable, "-c", "from authority_sdk.cli import main; main()"]
ROW = re.compile(r"^([✔✘])\s+(\d+)\s+(.+?)\s{2,}(.+?)\s*$")

# (step title contains, outcome printed) in order: the story the issue asks for.
STORY = [
    ("Allowed completion", "200 allow"),
    ("Model outside the allowlist", "403 model_not_allowed"),
    ("Small refund, $25", "executed, 1 webhook call"),
    ("Large refund, $400", "pending_approval, 0 webhook calls"),
    ("approved over HTTP", "200 executed, 1 webhook call"),
    ("approved a second time", "409 approval_executed, 0 webhook calls"),
    ("ops notified with a one-time link", "notified, link approved: executed, 1 webhook call"),
    ("Huge refund, $5,000", "denied_by_rule, 0 webhook calls"),
    ("from dev", "simulated, 0 webhook calls"),
    ("Refund with Idempotency-Key", "executed, 1 webhook call"),
    ("same key, same body", "replayed, LLM not called, 0 webhook calls"),
    ("same key, different body", "422 idempotency_key_reused"),
    ("100,000 output tokens", "403 cost_ceiling_exceeded"),
    ("Model overspends", "post_cost_ceiling_exceeded, 0 webhook calls"),
    ("Agent key flips the kill switch", "403 insufficient_role"),
    ("Kill switch on", "200 engaged"),
    ("while it is on", "403 kill_switch_engaged"),
    ("Kill switch off", "200 released, then 200 allow"),
    ("Responses API", "executed + pending_approval, 1 webhook call"),
    ("authority audit verify", "exit 0, chain intact"),
]


def _env() -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    env.pop("AUTHORITY_POLICY", None)
    return env


def run_demo(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AUTHORITY, "demo", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=110)


def rows(output: str) -> list[tuple[str, int, str, str]]:
    out = []
    for line in output.splitlines():
        m = ROW.match(line)
        if m:
            out.append((m.group(1), int(m.group(2)), m.group(3).strip(), m.group(4).strip()))
    return out


def demo_folder(cwd: Path) -> Path:
    found = sorted((cwd / ".authority").glob("demo-*"))
    assert len(found) == 1, found
    return found[0]


def audit_entries(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "audit.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str],
                                                                  Path]:
    cwd = tmp_path_factory.mktemp("demo")
    return run_demo(cwd), cwd


def test_every_step_behaves_as_the_policy_says(demo_run: tuple[Any, Path]) -> None:
    done, _ = demo_run
    assert done.returncode == 0, done.stdout + done.stderr
    got = rows(done.stdout)
    assert [n for _, n, _, _ in got] == list(range(1, len(STORY) + 1)), done.stdout
    for (mark, n, title, outcome), (title_part, expected) in zip(got, STORY, strict=True):
        assert mark == "✔", f"step {n}: {title}: {outcome}"
        assert title_part in title, (n, title)
        assert outcome == expected, (n, title, outcome)
    assert f"all {len(STORY)} steps behaved as the policy says" in done.stdout


def test_output_shows_what_the_receiver_got_and_where_things_live(
        demo_run: tuple[Any, Path]) -> None:
    done, cwd = demo_run
    folder = demo_folder(cwd)
    rel = folder.relative_to(cwd)
    assert f"audit log  {rel}/audit.jsonl" in done.stdout
    assert f"state      {rel}/state/" in done.stdout
    for order in ("A-1001", "A-1002", "A-1005", "A-1008"):
        assert re.search(rf'receiver got POST /refunds \{{"order_id": "{order}"', done.stdout)
    assert "would POST http://127.0.0.1:" in done.stdout  # the dev simulation's description
    assert re.search(r"ok: \d+ entries, head seq \d+", done.stdout)  # audit verify's own words


def test_audit_log_records_every_decision(demo_run: tuple[Any, Path]) -> None:
    _, cwd = demo_run
    folder = demo_folder(cwd)
    policy = load_policy(folder / "policy.yaml")
    assert policy.audit_path == folder / "audit.jsonl"
    assert policy.state_path == folder / "state"
    result = verify(policy.audit_path)
    assert result.ok, result.reason
    entries = audit_entries(folder)
    assert {e["policy_hash"] for e in entries} == {policy.hash}

    codes = [(e.get("details") or {}).get("code") for e in entries if e["event"] == "request"]
    for code in ("model_not_allowed", "idempotency_key_reused", "cost_ceiling_exceeded",
                 "post_cost_ceiling_exceeded", "kill_switch_engaged"):
        assert codes.count(code) == 1, (code, codes)

    actions = {}
    for e in entries:
        # An executed refund's "executing" entry precedes its outcome: one decision each.
        if e["event"] == "action" and e["details"]["status"] != "executing":
            order = e["details"]["arguments"]["order_id"]
            assert order not in actions, f"{order} decided twice"
            actions[order] = e
    assert set(actions) == {"A-1001", "A-1002", "A-1003", "A-1004", "A-1005", "A-1006",
                            "A-1008", "A-1009", "A-1010"}
    assert actions["A-1001"]["details"]["status"] == "executed"
    assert actions["A-1001"]["execution_result"]["result"]["refund_id"]
    assert actions["A-1002"]["details"]["status"] == "pending_approval"
    assert actions["A-1002"]["approval_status"] == "pending"
    assert (actions["A-1003"]["decision"], actions["A-1003"]["details"]["code"]) == (
        "deny", "denied_by_rule")
    assert actions["A-1004"]["details"]["status"] == "simulated"
    assert actions["A-1004"]["environment"] == "dev"
    assert actions["A-1005"]["details"]["status"] == "executed"
    assert actions["A-1006"]["details"]["code"] == "post_cost_ceiling_exceeded"
    assert actions["A-1008"]["details"]["status"] == "executed"  # through /v1/responses
    assert actions["A-1009"]["details"]["status"] == "pending_approval"

    approvals = [e for e in entries if e["event"] == "approval"]
    assert [(e["approval_status"], e["decision"], e["actor"]) for e in approvals] == [
        ("approved", "allow", "ops"), ("executed", "allow", "ops"),
        ("executed", "deny", "ops"),  # the second approve is refused and audited
        ("approved", "allow", "ops"), ("executed", "allow", "ops")]  # by the link, as ops
    assert [e["details"]["approval_id"] for e in approvals] == [
        actions["A-1002"]["details"]["approval_id"]] * 3 + [
        actions["A-1010"]["details"]["approval_id"]] * 2
    link = [e for e in approvals if e["details"]["approval_id"] ==
            actions["A-1010"]["details"]["approval_id"]]
    assert link[0]["reason"] == "approved from the notification"
    held = [e for e in entries if e["event"] == "notification" and e["decision"] == "allow"
            and e["details"]["event"] == "held"]
    assert {e["details"]["approval_id"] for e in held} >= {
        actions["A-1010"]["details"]["approval_id"]}

    kills = [e for e in entries if e["event"] == "kill_switch"]
    assert [(e["details"]["engaged"], e["actor"]) for e in kills] == [(True, "ops"),
                                                                      (False, "ops")]
    replays = [e for e in entries if e["event"] == "replay"]
    assert len(replays) == 1
    assert replays[0]["details"]["idempotency_key"] == "ticket-7781-refund"


def test_each_refund_reached_the_billing_system_once(demo_run: tuple[Any, Path]) -> None:
    _, cwd = demo_run
    log = (demo_folder(cwd) / "receiver.log").read_text()
    orders = re.findall(r'"order_id": "([A-Z]-\d+)"', "\n".join(
        line.split("->")[0] for line in log.splitlines() if line.startswith("received POST")))
    assert sorted(orders) == ["A-1001", "A-1002", "A-1005", "A-1008", "A-1010"]


def test_demo_policy_points_only_at_loopback(demo_run: tuple[Any, Path]) -> None:
    _, cwd = demo_run
    data = yaml.safe_load((demo_folder(cwd) / "policy.yaml").read_text())
    assert data["upstream"]["base_url"].startswith("http://127.0.0.1:")
    assert data["executors"]["billing"]["url"].startswith("http://127.0.0.1:")
    assert data["executors"]["billing"]["url"].endswith("/refunds")


def test_a_step_that_goes_wrong_fails_the_demo(tmp_path: Path) -> None:
    # A laxer policy: $400 refunds now run without a person. The demo must say so and fail.
    text = (ROOT / "examples" / "policy.yaml").read_text()
    assert "{amount: {lte: 50}}" in text
    lax = tmp_path / "lax.yaml"
    lax.write_text(text.replace("{amount: {lte: 50}}", "{amount: {lte: 500}}"))
    done = run_demo(tmp_path, "--policy", str(lax))
    assert done.returncode == 1, done.stdout + done.stderr
    by_n = {n: (mark, outcome) for mark, n, _, outcome in rows(done.stdout)}
    assert by_n[4] == ("✘", "executed, 1 webhook call (expected pending_approval, 0 webhook "
                            "calls)")
    assert by_n[5][0] == "✘"  # nothing left to approve
    assert by_n[7][0] == "✘"  # the $300 refund ran at once: no notification, no link
    assert by_n[3][0] == by_n[8][0] == by_n[len(STORY)][0] == "✔"
    assert "steps did not behave as the policy says" in done.stdout


def test_a_policy_without_the_keys_the_story_needs_is_refused(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "examples" / "policy.yaml").read_text())
    data["keys"] = [k for k in data["keys"] if k["name"] != "dev-agent"]
    bad = tmp_path / "nodev.yaml"
    bad.write_text(yaml.safe_dump(data))
    done = run_demo(tmp_path, "--policy", str(bad))
    assert done.returncode == 2
    assert "needs a key with secret_env for an agent in dev" in done.stdout


@pytest.fixture
def kept(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    proc = subprocess.Popen([*AUTHORITY, "demo", "--keep"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.lstrip().startswith("authority audit tail"):
                break
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_keep_leaves_the_gateway_running_until_interrupted(
        kept: tuple[subprocess.Popen[str], list[str]]) -> None:
    proc, lines = kept
    text = "\n".join(lines)
    assert f"all {len(STORY)} steps behaved as the policy says" in text, text
    base_url = re.search(r"^\s+base_url\s+(\S+)$", text, re.M)
    key = re.search(r"^\s+support-agent\s+(\S+)\s+environment prod", text, re.M)
    ops = re.search(r"^\s+ops\s+(\S+)\s+environment", text, re.M)
    model_url = re.search(r"^\s+scripted model\s+(\S+)$", text, re.M)
    assert base_url and key and ops and model_url, text

    # The printed snippet's way in: the stock openai client with a printed key.
    client = openai.OpenAI(base_url=base_url.group(1), api_key=key.group(1), max_retries=0)
    r = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "SAY still here"}])
    assert r.choices[0].message.content == "still here"
    held = client.chat.completions.create(model="gpt-4o-mini", messages=[{
        "role": "user", "content": 'CALL issue_refund {"order_id": "K-1", "amount": 400}'}])
    approval_id = held.model_extra["authority"]["actions"][0]["approval_id"]  # type: ignore[index]
    proxy = base_url.group(1).removesuffix("/v1")
    approved = httpx.post(f"{proxy}/authority/approvals/{approval_id}/approve",
                          headers={"Authorization": f"Bearer {ops.group(1)}"})
    assert approved.json()["status"] == "executed"

    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    for url in (proxy + "/healthz", model_url.group(1) + "/models"):
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)
