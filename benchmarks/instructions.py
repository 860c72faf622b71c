"""Instructions per request of a whole `authority serve` (every thread), under callgrind.

    .venv/bin/python benchmarks/instructions.py                  # plain requests
    .venv/bin/python benchmarks/instructions.py --keyed          # Idempotency-Key + budgets
    .venv/bin/python benchmarks/instructions.py --root ../other  # another checkout's code

Throughput and even CPU seconds move with whatever else a shared machine runs (the other
core's load changes caches and clocks); the instructions a request executes do not: the
same code and the same requests give the same count to within about 1 %. So this is the
figure to compare two versions by on a busy machine, before `make bench` on a quiet one.

The server runs under ``valgrind --tool=callgrind`` with collection off; after a warm-up,
``callgrind_control`` turns it on for N requests sent by C threads (keep-alive, the bench
body and policy), dumps the counts and turns it off. Instructions are not time: a
system call counts its user-space side only, and waiting (fsync, the network) not at all.
"""

from __future__ import annotations

import argparse
import http.client
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workload  # noqa: E402
from harness import Server, free_port, start_mock  # noqa: E402


def _send(port: int, token: str, n: int, keyed: bool, statuses: list[int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = workload.body_bytes()
    for _ in range(n):
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        if keyed:
            headers["idempotency-key"] = secrets.token_hex(12)
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        statuses.append(resp.status)
    conn.close()


def _burst(port: int, token: str, n: int, conc: int, keyed: bool) -> int:
    statuses: list[int] = []
    threads = [threading.Thread(target=_send, args=(port, token, n // conc, keyed, statuses))
               for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if set(statuses) != {200}:
        raise RuntimeError(f"the gateway answered {sorted(set(statuses))}, not only 200")
    return len(statuses)


def _total(dump: Path) -> int:
    out = subprocess.run(["callgrind_annotate", str(dump)], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"^\s*([\d,]+)\s.*PROGRAM TOTALS", out, re.M)
    if m is None:
        raise RuntimeError(f"no total in {dump}")
    return int(m.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=HERE.parent,
                    help="the checkout whose code runs (default: this one)")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--keyed", action="store_true",
                    help="an Idempotency-Key on every request, budgets on env and key")
    ap.add_argument("serve_args", nargs="*", help="more arguments for `authority serve`")
    args = ap.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing (Debian: apt-get install valgrind)", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="authority-instr-", dir=HERE))
    mock, mock_port = start_mock(work / "mock.log", None)
    token = "bench-" + secrets.token_hex(16)
    data = yaml.safe_load((HERE / "policy.yaml").read_text())
    data["upstream"]["base_url"] = f"http://127.0.0.1:{mock_port}/v1"
    if args.keyed:
        data["environments"]["prod"]["budget"] = {"usd": 1e9, "period": "day"}
        data["keys"][0]["budget"] = {"usd": 1e9, "period": "hour"}
    (work / "policy.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    port = free_port()
    out = work / "callgrind.out"
    srv = Server("authority serve (callgrind)", [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        "-q", sys.executable, "-m", "authority_sdk.cli", "serve", "--policy",
        str(work / "policy.yaml"), "--port", str(port), *args.serve_args],
        log=work / "serve.log", cwd=work,
        env={"AUTHORITY_KEY_BENCH": token, "BENCH_UPSTREAM_KEY": "sk-mock",
             "PYTHONPATH": str(args.root.resolve())})
    try:
        srv.wait_healthy(f"http://127.0.0.1:{port}/healthz", timeout_s=600)
        _burst(port, token, args.concurrency * 5, args.concurrency, args.keyed)  # warm
        subprocess.run(["callgrind_control", "-i", "on", str(srv.pid)], check=True,
                       capture_output=True)
        n = _burst(port, token, args.requests, args.concurrency, args.keyed)
        subprocess.run(["callgrind_control", "-d", str(srv.pid)], check=True,
                       capture_output=True)
        subprocess.run(["callgrind_control", "-i", "off", str(srv.pid)], check=True,
                       capture_output=True)
        # The dump on demand is callgrind.out.1 (the file at exit holds what came after).
        total = sum(_total(f) for f in work.glob("callgrind.out.*"))
        print(f"{total / n / 1e6:.3f} M instructions per request ({n} requests, "
              f"c={args.concurrency}, {'keyed' if args.keyed else 'plain'}, "
              f"code from {args.root.resolve()})")
    finally:
        srv.stop()
        mock.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
