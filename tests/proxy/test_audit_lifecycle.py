"""The audit log's lifecycle through the real proxy (issue 17 point 6): a tiny
``audit.rotate.max_bytes`` rotates the log many times under real requests (the proxy's
group commit appends), the background worker compresses the archive and streams every
entry to a real HTTP receiver, and the real ``authority audit verify`` passes across the
files and against the receiver's copy."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ScriptedServer, user
from proxy_env import ADMIN_KEY, AGENT_KEY, PROXY_ENV, start_proxy
from servers import HttpReceiver

pytestmark = pytest.mark.slow

MODEL = "gpt-4o-mini"
AUDIT_KEY = "lifecycle-audit-key-0123456789"


def _cli(policy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authority_sdk.cli", "audit", *args, "--policy", str(policy)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**PROXY_ENV, "PX_AUDIT_KEY": AUDIT_KEY, "PATH": "/usr/bin:/bin"})


def test_rotation_and_streaming_through_the_proxy(upstream: ScriptedServer, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PX_AUDIT_KEY", AUDIT_KEY)
    with HttpReceiver() as rx:
        overrides: dict[str, Any] = {
            "worker": {"interval_s": 0.3},
            "audit": {"hmac_key_env": "PX_AUDIT_KEY",
                      "rotate": {"max_bytes": 2500, "compress": True},
                      "stream": [{"kind": "http", "url": rx.url("/audit"), "name": "siem"}]}}
        with start_proxy(upstream, tmp_path, overrides=overrides) as rp:
            for i in range(12):
                r = httpx.post(rp.url + "/v1/chat/completions", timeout=30,
                               headers={"authorization": f"Bearer {AGENT_KEY}"},
                               json={"model": MODEL, "messages": user(f"hello {i}")})
                assert r.status_code == 200, r.text
            archive = tmp_path / "archive"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                got = [e for req in rx.requests for e in json.loads(req.body)["entries"]]
                names = sorted(p.name for p in archive.iterdir()) if archive.exists() else []
                if (len(got) >= 12 and names and all(n.endswith(".gz") for n in names
                                                     if n.endswith((".jsonl", ".gz")))):
                    break
                time.sleep(0.2)
            policy = rp.policy_path
            text = rp.http("GET", "/metrics").text
            assert 'authority_audit_stream_failures{stream="siem"} 0' in text
            lag = re.search(r'authority_audit_stream_lag_entries\{stream="siem"\} (\d+)', text)
            assert lag is not None and int(lag.group(1)) <= 2, text[-600:]
            # The management API pages back through the archive too, and judges the chain.
            paged: list[int] = []
            cursor = None
            while True:
                params: dict[str, Any] = {"limit": 5, **({"cursor": cursor} if cursor else {})}
                page = rp.http("GET", "/authority/audit", ADMIN_KEY, params=params).json()
                paged = [e["seq"] for e in page["data"]] + paged
                cursor = page["next_cursor"]
                if not cursor:
                    break
            assert paged == list(range(1, len(paged) + 1)) and len(paged) >= 12
            verdict = rp.http("GET", "/authority/audit/verify", ADMIN_KEY).json()
            assert verdict["ok"] is True, verdict
        # Stopped: every entry is on disk; the receiver got them all, in order.
        got = [e for req in rx.requests for e in json.loads(req.body)["entries"]]
    names = sorted(p.name for p in (tmp_path / "archive").iterdir())
    assert len([n for n in names if n.endswith(".jsonl.gz")]) >= 2, names
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(set(seqs)) and seqs[0] == 1 and len(seqs) >= 12
    copy = tmp_path / "received.jsonl"
    copy.write_text("".join(json.dumps(e) + "\n" for e in got))

    out = _cli(policy, "verify", "--against-stream", str(copy))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "checked: head, MACs" in out.stdout and "match the local chain" in out.stdout
    status = _cli(policy, "status", "--json")
    info = json.loads(status.stdout)
    assert info["archives"] and info["streams"][0]["name"] == "siem"
