"""The audit chain as the gateway writes it (issue 9 point 9 and F9; issue 10 G8/G9).

A real ``authority serve`` writes the log with a MAC key from its environment and signed
checkpoints in another directory; it is SIGKILLed under load, its log is cut, forged and
deleted together with its state, and ``authority audit verify`` / ``acknowledge`` (the
real CLI) judge what is left.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ScriptedServer, user
from proxy_env import ADMIN_KEY, AGENT_KEY, PROXY_ENV, write_proxy_policy

from authority_sdk.audit import entry_hash
from authority_sdk.demo.processes import ProxyProcess

AUDIT_KEY = "audit-key-for-tests-0123456789abcdef"
ENV = {**PROXY_ENV, "PX_AUDIT_KEY": AUDIT_KEY}
MODEL = "gpt-4o-mini"


class Gateway:
    """A proxy with a keyed, checkpointed log that can be SIGKILLed and restarted."""

    def __init__(self, upstream: ScriptedServer, directory: Path, **audit: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.log = directory / "audit.jsonl"
        self.checkpoint = directory.parent / f"{directory.name}-checkpoints" / "audit.cp"
        self.policy = write_proxy_policy(upstream, directory, {
            "audit": {"fsync": True, "hmac_key_env": "PX_AUDIT_KEY",
                      "checkpoint_path": str(self.checkpoint), "checkpoint_every": 4,
                      **audit}})
        self.proc: ProxyProcess | None = None
        self.port: int | None = None
        self.start()

    def start(self) -> None:
        self.proc = ProxyProcess(self.policy, port=self.port, env=ENV,
                                 log_path=self.directory / "proxy.log").start(60)
        self.port = self.proc.port

    def kill9(self) -> None:
        assert self.proc is not None and self.proc.proc is not None
        self.proc.proc.send_signal(signal.SIGKILL)
        self.proc.proc.wait(10)
        self.proc.stop()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def chat(self, text: str = "hello", **body: Any) -> httpx.Response:
        assert self.proc is not None
        return httpx.post(self.proc.url + "/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {AGENT_KEY}"},
                          json={"model": MODEL, "messages": user(text), **body})

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_bytes().split(b"\n") if line]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "authority_sdk.cli", "audit", *args, "--policy",
             str(self.policy)], capture_output=True, text=True, timeout=120,
            env={**ENV, "PATH": "/usr/bin:/bin"}, check=False)


@pytest.fixture
def gateway(upstream: ScriptedServer, tmp_path: Path) -> Any:
    gw = Gateway(upstream, tmp_path / "gw")
    yield gw
    gw.stop()


def _swallow(fn: Any) -> Any:
    def run() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the proxy died under it: the point
            fn()
    return run


@pytest.mark.slow
def test_kill9_mid_write_then_a_torn_line_recovers_and_verifies(gateway: Gateway) -> None:
    """SIGKILL with appends in flight: every line on disk is whole (one write() per batch),
    and the torn tail a power cut leaves (the only way to tear one: the kernel finishes a
    write() before a SIGKILL lands) is set aside on restart; nothing synced was lost, so
    the log verifies, checkpoint and all."""
    assert gateway.chat().status_code == 200
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            _swallow(lambda: gateway.chat(
                'CALL lookup_customer {"id": "c-{nonce}"}', tools=[_tool()]))()

    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(hammer)
        _wait_for_entries(gateway, 30)
        gateway.kill9()
        stop.set()
    raw = gateway.log.read_bytes()
    assert raw.endswith(b"\n")
    before = gateway.entries()
    assert len(before) >= 30
    with gateway.log.open("ab") as f:  # half of the next entry, never synced
        f.write(b'{"ts":"2030-01-01T00:00:00.000Z","seq":' + str(before[-1]["seq"] + 1).encode()
                + b',"event":"request","request_id":"req_torn')
    gateway.start()
    assert gateway.chat().status_code == 200
    entries = gateway.entries()
    torn = [e for e in entries if (e.get("details") or {}).get("problem") == "torn_line"]
    assert len(torn) == 1 and torn[0]["seq"] == before[-1]["seq"] + 1
    assert '"req_torn' in torn[0]["details"]["torn"]
    out = gateway.cli("verify")
    assert out.returncode == 0, out.stderr
    assert "checked: head, MACs, checkpoint" in out.stdout
    assert "torn last line moved aside" in out.stderr


@pytest.mark.slow
def test_a_cut_synced_tail_fails_verify_until_a_person_acknowledges(gateway: Gateway) -> None:
    for _ in range(6):
        assert gateway.chat().status_code == 200
    gateway.stop()  # a clean shutdown: the checkpoint covers every entry
    entries = gateway.entries()
    last = entries[-1]["seq"]
    lines = gateway.log.read_bytes().splitlines(keepends=True)
    gateway.log.write_bytes(b"".join(lines[:-3]))

    cut = gateway.cli("verify")
    assert cut.returncode == 1 and "truncated" in cut.stderr, cut.stderr
    gateway.start()  # the restart records exactly what is gone
    assert gateway.chat().status_code == 200
    recovery = [e for e in gateway.entries() if e["event"] == "recovery"]
    assert recovery[0]["details"]["lost"] == [last - 2, last]
    lost = gateway.cli("verify")
    assert lost.returncode == 3, lost.stderr
    assert gateway.proc is not None
    verdict = httpx.get(gateway.proc.url + "/authority/audit/verify", timeout=30,
                        headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert (verdict["ok"], verdict["kind"], verdict["checkpoint_checked"]) == (
        False, "lost", True)
    assert f"entries {last - 2}..{last} lost" in lost.stderr
    assert "authority audit acknowledge" in lost.stderr

    ack = gateway.cli("acknowledge", "--by", "alice@ops", "--reason", "disk restored, INC-42")
    assert ack.returncode == 0, ack.stderr
    assert f"acknowledged: entries {last - 2}..{last} lost" in ack.stdout
    mine = gateway.entries()[-1]
    assert (mine["actor"], mine["reason"]) == ("alice@ops", "disk restored, INC-42")
    assert mine["details"]["acknowledges"] == [recovery[0]["seq"]]
    ok = gateway.cli("verify")
    assert ok.returncode == 0, ok.stderr
    assert "acknowledged by alice@ops" in ok.stderr
    # The running gateway goes on writing after the CLI's entry: one chain.
    assert gateway.chat().status_code == 200
    assert gateway.cli("verify").returncode == 0


@pytest.mark.slow
def test_deleting_the_log_and_the_state_together_is_caught(gateway: Gateway) -> None:
    for _ in range(5):
        assert gateway.chat().status_code == 200
    gateway.stop()
    last = gateway.entries()[-1]["seq"]
    gateway.log.unlink()
    shutil.rmtree(gateway.directory / "state")
    gone = gateway.cli("verify")
    assert gone.returncode == 1, gone.stderr
    assert "missing but the checkpoint" in gone.stderr and f"seq {last}" in gone.stderr
    gateway.start()
    assert gateway.chat().status_code == 200
    first = gateway.entries()[0]
    assert first["details"]["lost"] == [1, last] and first["seq"] == last + 1
    assert gateway.cli("verify").returncode == 3
    assert gateway.cli("acknowledge", "--by", "bob", "--reason", "rebuilt").returncode == 0
    assert gateway.cli("verify").returncode == 0


@pytest.mark.slow
def test_a_forged_entry_appended_to_the_gateways_log_fails(gateway: Gateway) -> None:
    assert gateway.chat().status_code == 200
    last = gateway.entries()[-1]
    forged = {k: last[k] for k in last if k not in ("hash", "mac")}
    forged.update(seq=last["seq"] + 1, prev_hash=last["hash"], reason="refund approved")
    forged["hash"] = entry_hash(last["hash"], forged)
    with gateway.log.open("ab") as f:
        f.write(json.dumps(forged).encode() + b"\n")
    out = gateway.cli("verify")
    assert out.returncode == 1
    assert f"seq {last['seq'] + 1} has no MAC" in out.stderr
    refused = gateway.cli("acknowledge", "--by", "eve", "--reason", "nothing to see")
    assert refused.returncode == 1 and "not because of a recorded loss" in refused.stderr


def test_bad_and_unauthenticated_input_cannot_bloat_the_log(gateway: Gateway) -> None:
    """G8/G9: junk without a key writes no line; a 4 MB model name costs the log ~4 KB; a
    lone surrogate is written as valid UTF-8."""
    assert gateway.proc is not None
    assert gateway.chat().status_code == 200
    size = gateway.log.stat().st_size
    r = httpx.post(gateway.proc.url + "/v1/chat/completions", timeout=30,
                   content=b"\xff" * 60_000, headers={"content-type": "application/json"})
    assert r.status_code == 401
    r = httpx.post(gateway.proc.url + "/authority/kill-switch", timeout=30,
                   content=b"{" * 10_000, headers={"authorization": "Bearer sk-wrong"})
    assert r.status_code == 401
    assert gateway.log.stat().st_size == size

    huge = "m" * (4 << 20)
    r = httpx.post(gateway.proc.url + "/v1/chat/completions", timeout=60,
                   headers={"authorization": f"Bearer {AGENT_KEY}",
                            "content-type": "application/json"},
                   content=json.dumps({"model": huge, "messages": user("hi")}))
    assert r.status_code in (400, 403, 413), r.text
    r = gateway.chat('CALL lookup_customer {"id": "\\ud800"}', tools=[_tool()])
    assert r.status_code == 200, r.text
    grown = gateway.log.stat().st_size - size
    assert grown < 64_000, grown
    gateway.log.read_bytes().decode("utf-8")  # strict: every line is valid UTF-8
    assert gateway.cli("verify").returncode == 0


def _tool() -> dict[str, Any]:
    return {"type": "function", "function": {"name": "lookup_customer", "parameters": {
        "type": "object", "properties": {"id": {"type": "string"}}}}}


def _wait_for_entries(gateway: Gateway, n: int) -> None:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if gateway.log.exists() and gateway.log.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError("the gateway wrote too few entries")
