"""Streaming the audit log to real receivers on loopback: syslog over UDP and TCP (RFC 5424,
octet-counted over TCP) and HTTP. Every entry arrives, in order, with its seq and hash;
a receiver that is down makes the stream lag and back off, never the log fail, and once
it is back the stream catches up from its durable cursor with nothing lost. The copy a
receiver kept is an outside checkpoint: ``verify --against-stream`` finds a rewritten log.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import socketserver
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers import HttpReceiver
from typer.testing import CliRunner

from authority_sdk.audit import FileSink, open_sink, verify_sink
from authority_sdk.audit.lifecycle import lifecycle_status, stream_cursor
from authority_sdk.audit.stream import StreamCursor, stream_round
from authority_sdk.audit.stream_check import compare_with_stream, read_stream_copy
from authority_sdk.cli.audit_cmd import app
from authority_sdk.policy import AuditRotate, HttpStream, Policy, SyslogStream, load_policy

runner = CliRunner()
LATER = 10_000.0  # past any backoff
_SD = re.compile(r'\[authority@32473 seq="(\d+)" hash="([0-9a-f]{64})"')


class SyslogReceiver:
    """A real syslog receiver on loopback (UDP datagrams, or RFC 6587 octet-counted TCP)."""

    def __init__(self, protocol: str, port: int = 0) -> None:
        self.messages: list[str] = []
        self._lock = threading.Lock()
        rx = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                rx._add(self.request[0])

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    length = b""
                    while (c := self.rfile.read(1)) not in (b" ", b""):
                        length += c
                    if not length:
                        return
                    rx._add(self.rfile.read(int(length)))

        class UdpServer(socketserver.ThreadingUDPServer):
            allow_reuse_address = True

        class TcpServer(socketserver.ThreadingTCPServer):
            allow_reuse_address = True  # the down-then-up test reopens the same port

        self.server: socketserver.BaseServer = (
            UdpServer(("127.0.0.1", port), Udp) if protocol == "udp"
            else TcpServer(("127.0.0.1", port), Tcp))
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def _add(self, data: bytes) -> None:
        with self._lock:
            self.messages.append(data.decode("utf-8"))

    def seqs(self) -> list[int]:
        with self._lock:
            return [int(m.group(1)) for m in map(_SD.search, self.messages) if m]

    def wait(self, n: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seqs()) < n and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _log(tmp_path: Path, n: int, **kw: Any) -> FileSink:
    s = FileSink(tmp_path / "audit.jsonl", fsync=True, **kw)
    for i in range(n):
        s.append("request", request_id=f"r{i}", decision="allow", reason="ok")
    return s


def _hashes(s: FileSink) -> dict[int, str]:
    return {r.entry["seq"]: r.entry["hash"] for r in s.records() if r.entry}


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_syslog_receives_every_entry_in_order(tmp_path: Path, protocol: str) -> None:
    rx = SyslogReceiver(protocol)
    try:
        s = _log(tmp_path, 25, rotate=AuditRotate(max_bytes=2000))  # across rotated files
        target = SyslogStream(kind="syslog", address=f"127.0.0.1:{rx.port}", protocol=protocol,
                              facility="local3")
        cursor = StreamCursor(tmp_path / "cursor.json")
        state = stream_round(s, target, cursor)
        assert state.last_error is None and state.seq == 25
        rx.wait(25)
        assert rx.seqs() == list(range(1, 26))
        first = rx.messages[0]
        assert first.startswith(f"<{19 * 8 + 6}>1 ")  # local3.info, RFC 5424 version 1
        hashes = _hashes(s)
        for msg in rx.messages:
            m = _SD.search(msg)
            assert m and hashes[int(m.group(1))] == m.group(2)
            entry = json.loads(msg[msg.index("] {") + 2:])
            assert entry["hash"] == m.group(2)
        s.append("request", request_id="more")
        assert stream_round(s, target, cursor).seq == 26  # only what is new
        rx.wait(26)
        assert rx.seqs() == list(range(1, 27))
    finally:
        rx.close()


def test_tcp_receiver_down_then_up_catches_up_without_loss(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nobody listens there now
    s = _log(tmp_path, 10)
    target = SyslogStream(kind="syslog", address=f"127.0.0.1:{port}", protocol="tcp")
    cursor = StreamCursor(tmp_path / "cursor.json")
    down = stream_round(s, target, cursor)
    assert down.failures == 1 and down.seq == 0 and down.last_error
    assert down.next_attempt_ts > time.time()
    # The log keeps taking entries while the receiver is down.
    for i in range(5):
        s.append("request", request_id=f"while-down-{i}")
    assert stream_round(s, target, cursor).failures == 1  # backing off: not even tried
    rx = SyslogReceiver("tcp", port)
    try:
        up = stream_round(s, target, StreamCursor(cursor.path), now=time.time() + LATER)
        assert up.failures == 0 and up.seq == 15 and up.last_error is None
        rx.wait(15)
        assert rx.seqs() == list(range(1, 16))
    finally:
        rx.close()


def test_http_receiver_gets_every_entry_resumes_after_failures(tmp_path: Path) -> None:
    with HttpReceiver() as rx:
        s = _log(tmp_path, 12)
        target = HttpStream(kind="http", url=rx.url("/audit"), headers={"x-tenant": "t1"},
                            batch=5)
        cursor = StreamCursor(tmp_path / "cursor.json")
        rx.reply_once(503)  # the first batch is refused: nothing moves
        failed = stream_round(s, target, cursor)
        assert failed.failures == 1 and failed.seq == 0 and "503" in (failed.last_error or "")
        ok = stream_round(s, target, StreamCursor(cursor.path), now=time.time() + LATER)
        assert ok.seq == 12 and ok.failures == 0
        got: list[dict[str, Any]] = []
        for req in rx.requests[1:]:
            assert req.header("x-tenant") == "t1"
            assert req.header("content-type") == "application/json"
            got.extend(json.loads(req.body)["entries"])
        assert [e["seq"] for e in got] == list(range(1, 13))
        assert {e["seq"]: e["hash"] for e in got} == _hashes(s)
        # A restart (a new cursor object on the same file) sends nothing twice.
        before = len(rx.requests)
        assert stream_round(s, target, StreamCursor(cursor.path)).seq == 12
        assert len(rx.requests) == before


def test_a_failing_stream_never_blocks_the_log(tmp_path: Path) -> None:
    s = _log(tmp_path, 3)
    target = HttpStream(kind="http", url="http://127.0.0.1:9/nothing", timeout_s=0.5)
    state = stream_round(s, target, StreamCursor(tmp_path / "c.json"))
    assert state.failures == 1
    s.append("request", request_id="still-writing")
    assert verify_sink(s).ok


def _policy(tmp_path: Path, url: str) -> Policy:
    path = tmp_path / "authority.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "state": {"path": "run/state"}, "audit": {
        "path": "run/audit.jsonl", "fsync": False,
        "stream": [{"kind": "http", "url": url, "name": "siem"}]}}))
    return load_policy(path)


def test_status_shows_lag_and_verify_against_the_stream_copy(tmp_path: Path) -> None:
    with HttpReceiver() as rx:
        policy = _policy(tmp_path, rx.url("/audit"))
        pol_file = str(tmp_path / "authority.yaml")
        s = open_sink(policy)
        for i in range(8):
            s.append("request", request_id=f"r{i}")
        target = policy.audit.stream[0]
        assert lifecycle_status(policy, s)["streams"][0]["lag"] == 8
        stream_round(s, target, stream_cursor(policy, target))
        info = json.loads(runner.invoke(app, ["status", "--json", "--policy", pol_file]).stdout)
        assert info["streams"][0]["lag"] == 0 and info["streams"][0]["seq"] == 8
        copy = tmp_path / "received.jsonl"
        copy.write_bytes(b"".join(req.body + b"\n" for req in rx.requests))
    ok = runner.invoke(app, ["verify", "--policy", pol_file, "--against-stream", str(copy)])
    assert ok.exit_code == 0, ok.output
    assert "8 entries match the local chain" in ok.stdout

    # The log and the state deleted and written anew: locally a clean chain, but the copy
    # outside remembers other hashes.
    shutil.rmtree(tmp_path / "run")
    s = open_sink(policy)
    for i in range(3):
        s.append("request", request_id=f"forged-{i}")
    assert verify_sink(s).ok
    bad = runner.invoke(app, ["verify", "--policy", pol_file, "--against-stream", str(copy)])
    assert bad.exit_code == 1
    assert "seq 1: local hash" in bad.stderr and "rewritten after it was sent" in bad.stderr
    assert "seq 8 is in the stream copy but past the local end" in bad.stderr


def test_stream_copy_from_syslog_lines_and_a_receiver_side_edit(tmp_path: Path) -> None:
    rx = SyslogReceiver("udp")
    try:
        s = _log(tmp_path, 6)
        stream_round(s, SyslogStream(kind="syslog", address=f"127.0.0.1:{rx.port}"),
                     StreamCursor(tmp_path / "c.json"))
        rx.wait(6)
        lines = list(rx.messages)
    finally:
        rx.close()
    copy = tmp_path / "syslog.log"
    copy.write_text("\n".join(lines) + "\n")
    cmp = compare_with_stream(s.records(), read_stream_copy(copy))
    assert cmp.ok and cmp.compared == 6
    copy.write_text("\n".join(lines).replace('"request_id":"r2"', '"request_id":"r9"') + "\n")
    cmp = compare_with_stream(s.records(), read_stream_copy(copy))
    assert not cmp.ok and any("altered at the receiver" in p for p in cmp.problems)



def test_every_sink_streams_the_same_way(audit_backend: Any, tmp_path: Path) -> None:
    """The PostgreSQL table streams like the file (read by seq from the chain)."""
    sink = audit_backend.open()
    for i in range(7):
        sink.append("request", request_id=f"r{i}")
    with HttpReceiver() as rx:
        target = HttpStream(kind="http", url=rx.url("/audit"), batch=3)
        cursor = StreamCursor(tmp_path / f"{audit_backend.name}.json")
        assert stream_round(sink, target, cursor).seq == 7
        sink.append("request", request_id="later")
        assert stream_round(sink, target, StreamCursor(cursor.path)).seq == 8
        got = [e["seq"] for req in rx.requests for e in json.loads(req.body)["entries"]]
    assert got == list(range(1, 9))
    sink.close()


def test_a_log_rewritten_after_streaming_is_flagged(tmp_path: Path) -> None:
    with HttpReceiver() as rx:
        s = _log(tmp_path, 5)
        target = HttpStream(kind="http", url=rx.url("/audit"))
        cursor = StreamCursor(tmp_path / "c.json")
        assert stream_round(s, target, cursor).divergence is None
        (tmp_path / "audit.jsonl").unlink()
        forged = _log(tmp_path, 7)  # a fresh chain: the same seqs, other hashes
        state = stream_round(forged, target, StreamCursor(cursor.path))
        assert state.divergence and "seq 5" in state.divergence
        assert state.seq == 7  # the stream goes on with what is new


def test_a_crash_between_send_and_cursor_resends_only_that_batch(tmp_path: Path) -> None:
    """SIGKILL right after a batch was sent, before the cursor moved: after a restart that
    batch comes again (at least once, same seq and hash for the receiver to drop), and
    nothing is lost."""
    import os
    import signal
    import subprocess
    import sys

    from authority_sdk.audit.crashpoints import CRASH_ENV

    root = Path(__file__).resolve().parents[2]
    with HttpReceiver() as rx:
        s = _log(tmp_path, 12)
        code = (
            "import sys\n"
            "from authority_sdk.audit import FileSink\n"
            "from authority_sdk.audit.stream import StreamCursor, stream_round\n"
            "from authority_sdk.policy import HttpStream\n"
            "stream_round(FileSink(sys.argv[1]), HttpStream(kind='http', url=sys.argv[2], "
            "batch=5), StreamCursor(__import__('pathlib').Path(sys.argv[3])))\n")
        proc = subprocess.run(
            [sys.executable, "-c", code, str(s.path), rx.url("/audit"),
             str(tmp_path / "c.json")],
            env={**os.environ, "PYTHONPATH": str(root), CRASH_ENV: "stream:after_send"},
            check=False)
        assert proc.returncode == -signal.SIGKILL
        assert [e["seq"] for e in json.loads(rx.requests[0].body)["entries"]] == [1, 2, 3, 4, 5]
        state = stream_round(s, HttpStream(kind="http", url=rx.url("/audit"), batch=5),
                             StreamCursor(tmp_path / "c.json"))
        assert state.seq == 12
        got = [(e["seq"], e["hash"]) for req in rx.requests
               for e in json.loads(req.body)["entries"]]
    seqs = [seq for seq, _ in got]
    assert seqs == [1, 2, 3, 4, 5, *range(1, 13)]  # the unacknowledged batch, again
    assert len(set(got)) == 12  # a resent entry carries the same seq and hash: dedupable
    assert dict(got) == _hashes(s)  # and, deduped, every entry is there


def test_syslog_to_a_local_socket(tmp_path: Path) -> None:
    """``address: /dev/log``-style: a Unix datagram socket (here a real one in tmp_path)."""
    path = tmp_path / "log.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    try:
        s = _log(tmp_path, 3)
        state = stream_round(s, SyslogStream(kind="syslog", address=str(path)),
                             StreamCursor(tmp_path / "c.json"))
        assert state.seq == 3 and state.last_error is None
        got = [server.recv(70000).decode() for _ in range(3)]
        seqs = [int(m.group(1)) for m in map(_SD.search, got) if m]
        assert seqs == [1, 2, 3]
    finally:
        server.close()
