"""Single keyed requests alternated between proxies, c=1: an A/B that the machine's drift
cannot bias (issue 14).

    .venv/bin/python benchmarks/pg_alternate.py --requests 1500 \\
        dc=diskcache pg=postgres                 # PostgreSQL against diskcache
    .venv/bin/python benchmarks/pg_alternate.py pg-old=postgres:/path/to/old/checkout \\
        pg-new=postgres                          # two versions of the code on PostgreSQL

``pg_bench.py``'s c=1 figure is the difference of two medians of runs seconds apart, each of
which moves by half a millisecond from run to run on a shared 2-core machine. Here every
server gets one request in turn (the order reversed every round), each with a new
Idempotency-Key, on one kept-alive connection, so all of them see the same moments of the
machine; the figures are each server's median, the median of the per-round differences
against the first server, and each server's CPU per request (``/proc``). Pinned as in
``make bench`` (the client and the mock on CPU 0, the servers on CPU 1); every server on
PostgreSQL gets a schema of its own, migrated by its own code (``name=backend:checkout``
runs that checkout's gateway), dropped at the end. The policy is ``pg_bench.py``'s.
"""

from __future__ import annotations

import argparse
import http.client
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workload  # noqa: E402
from harness import can_pin, cpu_seconds, start_mock  # noqa: E402
from pg_bench import DSN_ENV, PG_DSN, WRK_CPU, serve_proxy  # noqa: E402

WARM_UP = 50


def _schema(code: Path, made: list[str]) -> str:
    """A schema of its own, migrated by the gateway in ``code``."""
    import psycopg

    name = f"alt_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    made.append(name)
    sep = "&" if "?" in PG_DSN else "?"
    dsn = f"{PG_DSN}{sep}options=-csearch_path%3D{name}"
    subprocess.run([sys.executable, "-c", "import sys, psycopg\n"
                    "from authority_sdk.store.pg_schema import migrate\n"
                    "with psycopg.connect(sys.argv[1], autocommit=True) as c: migrate(c)", dsn],
                   env={**os.environ, "PYTHONPATH": str(code)}, cwd="/", check=True)
    return dsn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1500, help="per server")
    ap.add_argument("servers", nargs="+", help="name=backend[:checkout]")
    args = ap.parse_args(argv)
    specs = []
    for spec in args.servers:
        name, _, rest = spec.partition("=")
        backend, _, code = rest.partition(":")
        if not name or backend not in ("diskcache", "postgres"):
            ap.error(f"not name=diskcache|postgres[:checkout]: {spec!r}")
        specs.append((name, backend, Path(code or HERE.parent).resolve()))
    work = HERE / ".work" / "alternate"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    token = "bench-" + secrets.token_hex(16)
    body = workload.body_bytes()
    schemas: list[str] = []
    try:
        with ExitStack() as stack:
            mock, mock_port = start_mock(work / "mock.log", WRK_CPU)
            stack.callback(mock.stop)
            url = f"http://127.0.0.1:{mock_port}/v1"
            ports: dict[str, int] = {}
            pids: dict[str, int] = {}
            for name, backend, code in specs:
                env = {**os.environ, "AUTHORITY_KEY_BENCH": token,
                       "BENCH_UPSTREAM_KEY": "sk-mock", "PYTHONPATH": str(code)}
                if backend == "postgres":
                    env[DSN_ENV] = _schema(code, schemas)
                srv, ports[name] = serve_proxy(stack, work, name, backend, url, env)
                pids[name] = srv.pid
            if can_pin():
                os.sched_setaffinity(0, {int(WRK_CPU)})
            conns = {k: http.client.HTTPConnection("127.0.0.1", p) for k, p in ports.items()}
            names = list(ports)
            lat: dict[str, list[float]] = {k: [] for k in names}
            prefix = secrets.token_hex(4)
            cpu0: dict[str, float] = {}
            for i in range(args.requests + WARM_UP):
                if i == WARM_UP:
                    cpu0 = {k: cpu_seconds(pids[k]) for k in names}
                for k in names if i % 2 == 0 else names[::-1]:
                    conn = conns[k]
                    t0 = time.perf_counter()
                    conn.request("POST", "/v1/chat/completions", body=body, headers={
                        "Content-Type": "application/json", "Authorization": f"Bearer {token}",
                        "Idempotency-Key": f"{prefix}-{k}-{i}"})
                    resp = conn.getresponse()
                    data = resp.read()
                    took = time.perf_counter() - t0
                    if resp.status != 200:
                        raise RuntimeError(f"{k}: {resp.status} {data[:300]!r}")
                    if i >= WARM_UP:
                        lat[k].append(took)
            base = names[0]
            for k in names:
                cpu = (cpu_seconds(pids[k]) - cpu0[k]) / args.requests * 1e3
                paired = statistics.median(a - b for a, b in zip(lat[k], lat[base], strict=True))
                print(f"{k}: p50 {statistics.median(lat[k]) * 1e3:.3f} ms, "
                      f"{(statistics.median(lat[k]) - statistics.median(lat[base])) * 1e3:+.3f} "
                      f"ms against {base} (paired {paired * 1e3:+.3f} ms), "
                      f"CPU {cpu:.3f} ms per request")
    finally:
        if schemas:
            import psycopg

            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                for name in schemas:
                    conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
