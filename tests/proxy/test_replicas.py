"""Several replicas on one PostgreSQL: two real ``authority serve`` processes share one
state schema and one audit chain (the table; its head in the database). Clients spread
over both; real receivers count the effects.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import PostgresBackend, ScriptedServer, requires_postgres, user
from proxy_env import ADMIN_KEY, AGENT_KEY, APPROVER_KEY, PROXY_ENV, write_proxy_policy
from servers import HttpReceiver, TcpRelay

from authority_sdk.audit import verify
from authority_sdk.audit.crashpoints import CRASH_ENV
from authority_sdk.demo.processes import ProxyProcess

pytestmark = [pytest.mark.slow, requires_postgres()]

MODEL = "gpt-4o-mini"


class Replica:
    def __init__(self, proc: ProxyProcess) -> None:
        self.proc = proc

    @property
    def url(self) -> str:
        return self.proc.url

    def chat(self, script: str, key: str | None = None, timeout: float = 60) -> httpx.Response:
        headers = {"authorization": f"Bearer {AGENT_KEY}"}
        if key:
            headers["idempotency-key"] = key
        return httpx.post(self.url + "/v1/chat/completions", timeout=timeout, headers=headers,
                          json={"model": MODEL, "messages": user(script)})

    def manage(self, method: str, path: str, key: str = ADMIN_KEY,
               **kw: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, timeout=30,
                             headers={"authorization": f"Bearer {key}"}, **kw)

    def kill9(self) -> None:
        assert self.proc.proc is not None
        self.proc.proc.send_signal(signal.SIGKILL)
        self.proc.proc.wait(10)
        self.proc.stop()


class Cluster:
    def __init__(self, upstream: ScriptedServer, directory: Path, pg: PostgresBackend,
                 overrides: dict[str, Any], dsn: str | None = None) -> None:
        self.directory = directory
        self.pg = pg
        self.policy = write_proxy_policy(upstream, directory, {
            **overrides, "state": {"backend": "postgres", "dsn_env": pg.dsn_env},
            "audit": {"backend": "postgres", **overrides.get("audit", {})},
            "worker": {"interval_s": 0.3}})
        self.env = {**PROXY_ENV, pg.dsn_env: dsn or pg.dsn}
        self.replicas: list[Replica] = []

    def start(self, n: int, env: dict[str, str] | None = None) -> list[Replica]:
        """``n`` more replicas (``env``: added to theirs); all of them."""
        for _ in range(n):
            log = self.directory / f"replica{len(self.replicas)}.log"
            proc = ProxyProcess(self.policy, env={**self.env, **(env or {})},
                                log_path=log).start(60)
            self.replicas.append(Replica(proc))
        return self.replicas

    def stop(self) -> None:
        for r in self.replicas:
            r.proc.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def verify(self) -> None:
        """`authority audit verify` on the one chain all replicas appended to (the table,
        with the head they moved forward in the database), and the same chain exported
        as JSON Lines verifying as a file."""
        from typer.testing import CliRunner

        from authority_sdk.cli import audit_cmd

        store = self.pg.open()
        try:
            head = store.get_audit_head()
        finally:
            store.close()
        assert head is not None
        out = CliRunner().invoke(audit_cmd.app, ["verify", "--policy", str(self.policy)],
                                 env=self.env)
        assert out.exit_code == 0, out.output
        exported = self.directory / "exported.jsonl"
        out = CliRunner().invoke(audit_cmd.app, ["export", "--policy", str(self.policy),
                                                 "--format", "jsonl", "-o", str(exported)],
                                 env=self.env)
        assert out.exit_code == 0, out.output
        result = verify(exported, head=head)
        assert result.ok, result.reason
        assert result.last_seq == head[0]
        assert not (self.directory / "audit.jsonl").exists()  # nothing went to a file


def _actions(rx: HttpReceiver, mode: str = "auto_execute") -> dict[str, Any]:
    return {"actions": {"issue_refund": {"executor": "billing", "mode": mode}},
            "executors": {"billing": {"type": "webhook", "url": rx.url("/refunds"),
                                      "timeout_s": 60}}}


def test_one_key_over_two_replicas_one_upstream_call_one_effect(
        upstream: ScriptedServer, tmp_path: Path, pg: PostgresBackend,
        rx: HttpReceiver) -> None:
    with Cluster(upstream, tmp_path, pg, _actions(rx)) as cluster:
        a, b = cluster.start(2)
        rx.reply(200, json={"refund_id": "rf"}, delay_s=0.3)
        script = 'CALL issue_refund {"order_id": "R-1", "amount": 10, "note": "{nonce}"}'
        served = upstream.chat_requests
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda i: (a, b)[i % 2].chat(script, key="same-key"),
                                    range(32)))
        codes = sorted({r.status_code for r in answers})
        assert set(codes) <= {200, 409}, [r.text for r in answers if r.status_code not in
                                          (200, 409)]
        assert upstream.chat_requests == served + 1
        assert len(rx.requests) == 1
        done = [r.json() for r in answers if r.status_code == 200]
        assert done and all(d["authority"]["actions"][0]["status"] == "executed" for d in done)
        # Every replica now replays the one answer.
        for r in (a, b):
            again = r.chat(script, key="same-key")
            assert again.status_code == 200 and again.headers.get("idempotent-replayed") == \
                "true"
        assert len(rx.requests) == 1
        cluster.verify()


def test_kill_switch_on_one_replica_refuses_the_next_request_on_another(
        upstream: ScriptedServer, tmp_path: Path, pg: PostgresBackend,
        rx: HttpReceiver) -> None:
    with Cluster(upstream, tmp_path, pg, _actions(rx)) as cluster:
        a, b = cluster.start(2)
        assert b.chat("SAY hello").status_code == 200
        engaged = a.manage("POST", "/authority/kill-switch",
                           json={"engaged": True, "reason": "incident"})
        assert engaged.status_code == 200, engaged.text
        t0 = time.monotonic()
        while (r := b.chat("SAY hello")).status_code == 200:
            assert time.monotonic() - t0 < 1.0, "the switch did not reach replica b in 1 s"
        assert r.json()["error"]["code"] == "kill_switch_engaged", r.text
        # Right before an effect the read is authoritative: no refund on any replica.
        refused = b.chat('CALL issue_refund {"order_id": "K-1", "amount": 1}')
        assert refused.status_code != 200 or \
            refused.json()["authority"]["actions"][0]["status"] != "executed"
        assert rx.requests == []
        # Released with the local CLI on the database (no replica involved): both serve.
        from typer.testing import CliRunner

        from authority_sdk.cli import control_cmd

        out = CliRunner().invoke(control_cmd.kill_switch_app,
                                 ["off", "--policy", str(cluster.policy), "--reason", "ok"],
                                 env=cluster.env)
        assert out.exit_code == 0, out.output
        t0 = time.monotonic()
        while a.chat("SAY hello").status_code != 200 or b.chat("SAY hello").status_code != 200:
            assert time.monotonic() - t0 < 1.0, "the release did not reach both in 1 s"
        cluster.verify()


def test_approval_made_on_a_approved_on_b_runs_once(
        upstream: ScriptedServer, tmp_path: Path, pg: PostgresBackend,
        rx: HttpReceiver) -> None:
    with Cluster(upstream, tmp_path, pg, _actions(rx, "require_human_approval")) as cluster:
        a, b = cluster.start(2)
        resp = a.chat('CALL issue_refund {"order_id": "P-1", "amount": 10}', key="apr-1")
        assert resp.status_code == 200, resp.text
        action = resp.json()["authority"]["actions"][0]
        assert action["status"] == "pending_approval"
        apr = action["approval_id"]
        listed = b.manage("GET", "/authority/approvals", APPROVER_KEY,
                          params={"status": "pending"}).json()["data"]
        assert [x["id"] for x in listed] == [apr]
        ok = b.manage("POST", f"/authority/approvals/{apr}/approve", APPROVER_KEY,
                      json={"reason": "fine"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["status"] == "executed"
        again = a.manage("POST", f"/authority/approvals/{apr}/approve", APPROVER_KEY)
        assert again.status_code == 409, again.text
        time.sleep(1.0)  # several rounds of both replicas' workers
        assert len(rx.requests) == 1
        assert a.manage("GET", f"/authority/approvals/{apr}", APPROVER_KEY).json()["status"] \
            == "executed"
        cluster.verify()


def test_kill9_of_a_replica_mid_execution_the_other_recovers(
        upstream: ScriptedServer, tmp_path: Path, pg: PostgresBackend,
        rx: HttpReceiver) -> None:
    with Cluster(upstream, tmp_path, pg, _actions(rx)) as cluster:
        a, b = cluster.start(2)
        rx.reply_once(200, json={"refund_id": "rf"}, delay_s=30)  # the first delivery hangs
        script = 'CALL issue_refund {"order_id": "D-1", "amount": 10, "note": "{nonce}"}'

        def first() -> None:
            with contextlib.suppress(httpx.HTTPError):  # a dies under it: the point
                a.chat(script, key="dying")

        threading.Thread(target=first, daemon=True).start()
        rx.wait_for(1, timeout_s=30)
        a.kill9()
        # b's worker finds a's started entry (its owner is dead) and settles it: the
        # webhook is idempotent downstream, so it is resent with the same key.
        rx.wait_for(2, timeout_s=20)
        assert len({r.header("idempotency-key") for r in rx.requests}) == 1
        deadline = time.monotonic() + 20
        while True:
            started = b.manage("GET", "/authority/actions",
                               params={"status": "started"}).json()["data"]
            if not started:
                break
            assert time.monotonic() < deadline, started
            time.sleep(0.2)
        # The client's retry on b is told what happened; nothing runs a third time.
        retry = b.chat(script, key="dying")
        assert retry.status_code == 200, retry.text
        assert retry.json()["authority"]["actions"][0]["status"] in ("executed", "in_doubt")
        time.sleep(0.5)
        assert len(rx.requests) == 2
        assert upstream.model.chat_requests >= 1
        cluster.verify()


def test_killed_after_its_finished_answer_before_the_response_a_retry_elsewhere_replays(
        upstream: ScriptedServer, tmp_path: Path, pg: PostgresBackend) -> None:
    """The finished answer goes in the audit entries' transaction (README section 7). A
    replica killed right after it (a real SIGKILL), before a byte of the response left:
    the client's retry on another replica is replayed — the same calls, the model asked
    once, the chain whole."""
    # fsync on (the tests' policies turn it off): a relaxed log keeps the two apart.
    with Cluster(upstream, tmp_path, pg, {"audit": {"fsync": True}}) as cluster:
        [b] = cluster.start(1)
        [_, a] = cluster.start(1, env={CRASH_ENV: "respond:finished"})
        script = 'CALL lookup_customer {"customer_id": "C-{nonce}"}'
        served = upstream.chat_requests
        with pytest.raises(httpx.HTTPError):
            a.chat(script, key="killed-before-sending")
        assert a.proc.proc is not None and a.proc.proc.wait(10) == -signal.SIGKILL
        retry = b.chat(script, key="killed-before-sending")
        assert retry.status_code == 200, retry.text
        assert retry.headers.get("idempotent-replayed") == "true"
        [call] = retry.json()["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == "lookup_customer"
        assert upstream.chat_requests == served + 1  # never asked again
        cluster.verify()


def test_database_gone_answers_503_and_nothing_goes_upstream(
        upstream: ScriptedServer, tmp_path: Path, pg: PostgresBackend,
        rx: HttpReceiver) -> None:
    with TcpRelay("127.0.0.1", 5432) as relay:
        dsn = pg.dsn.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        with Cluster(upstream, tmp_path, pg, _actions(rx), dsn=dsn) as cluster:
            [a] = cluster.start(1)
            assert a.chat("SAY hello", key="before").status_code == 200
            served = upstream.chat_requests
            relay.cut()
            time.sleep(0.6)  # past the kill-switch cache: every read must reach the database
            refused = a.chat('CALL issue_refund {"order_id": "U-1", "amount": 1}', key="k")
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "authority_unavailable"
            assert str(relay.port) not in refused.text  # where the database is stays inside
            health = httpx.get(a.url + "/healthz", timeout=30)
            assert health.status_code == 503, health.text  # a load balancer takes it out
            assert upstream.chat_requests == served
            assert rx.requests == []
            relay.restore()
            deadline = time.monotonic() + 20
            while (ok := a.chat("SAY hello", key="after")).status_code != 200:
                assert time.monotonic() < deadline, ok.text
                time.sleep(0.3)
            assert httpx.get(a.url + "/healthz", timeout=30).status_code == 200


def test_a_tight_budget_hit_from_both_replicas_is_never_exceeded(
        upstream: ScriptedServer, tmp_path: Path, pg: PostgresBackend,
        rx: HttpReceiver) -> None:
    from authority_sdk.costs import budget_counter
    from authority_sdk.policy import Budget

    # gpt-4o-mini, 100 output tokens: room for about 8 requests in all.
    limit = 0.0006
    budget = {"environments": {"prod": {"budget": {"usd": limit, "period": "day"}}}}
    with Cluster(upstream, tmp_path, pg, {**_actions(rx), **budget}) as cluster:
        a, b = cluster.start(2)
        served = upstream.chat_requests

        def ask(i: int) -> httpx.Response:
            return httpx.post((a, b)[i % 2].url + "/v1/chat/completions", timeout=60,
                              headers={"authorization": f"Bearer {AGENT_KEY}"},
                              json={"model": MODEL, "max_tokens": 100,
                                    "messages": user("COMPLETION_TOKENS 100\nSAY x")})

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(40)))
        ok = [r for r in answers if r.status_code == 200]
        denied = [r for r in answers if r.status_code == 403]
        assert len(ok) + len(denied) == 40, [r.text for r in answers]
        assert {r.json()["error"]["code"] for r in denied} == {"budget_exceeded"}
        assert 1 <= len(ok) < 40 and upstream.chat_requests - served == len(ok)
        store = pg.open()
        try:
            spent = store.budget_used(budget_counter("env", "prod", Budget(usd=limit)))
        finally:
            store.close()
        assert 0 < spent <= limit + 1e-12
        cluster.verify()


def test_kill9_after_a_non_idempotent_effect_is_in_doubt_everywhere_never_rerun(
        upstream: ScriptedServer, tmp_path: Path, pg: PostgresBackend) -> None:
    """The effect happened, its outcome was never recorded: the other replica's worker
    cannot know, so it marks the entry in_doubt (visible from every replica) and runs
    nothing again; the client's retry is told so."""
    effects = tmp_path / "effects.jsonl"
    tests_dir = str(Path(__file__).resolve().parent.parent)
    cluster = Cluster(upstream, tmp_path, pg, {
        "actions": {"send_note": {"executor": "hang", "mode": "auto_execute"}},
        "executors": {"hang": {"type": "python", "target": "sample_actions:record_then_hang",
                               "idempotent": False}}})
    cluster.env.update({"PYTHONPATH": tests_dir, "AUTHORITY_TEST_EFFECTS": str(effects)})
    try:
        a, b = cluster.start(2)
        script = 'CALL send_note {"text": "hello"}'

        def first() -> None:
            with contextlib.suppress(httpx.HTTPError):
                a.chat(script, key="hanging")

        threading.Thread(target=first, daemon=True).start()
        deadline = time.monotonic() + 30
        while not (effects.exists() and effects.read_text().strip()):
            assert time.monotonic() < deadline, "the effect never ran"
            time.sleep(0.05)
        a.kill9()
        deadline = time.monotonic() + 20
        while not (doubt := b.manage("GET", "/authority/actions",
                                     params={"status": "in_doubt"}).json()["data"]):
            assert time.monotonic() < deadline, "b did not settle a's interrupted execution"
            time.sleep(0.2)
        assert len(doubt) == 1
        retry = b.chat(script, key="hanging")
        assert retry.status_code == 200, retry.text
        assert retry.json()["authority"]["actions"][0]["status"] == "in_doubt"
        time.sleep(0.5)
        assert len(effects.read_text().splitlines()) == 1  # never run a second time
        cluster.verify()
    finally:
        cluster.stop()
