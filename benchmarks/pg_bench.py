"""diskcache against PostgreSQL, side by side in one run (issue 14).

    .venv/bin/python benchmarks/pg_bench.py            # ~3 min
    .venv/bin/python benchmarks/pg_bench.py --quick    # ~40 s
    AUTHORITY_BENCH_PG_DSN=postgresql://… (default: postgres@127.0.0.1:5432/postgres)

1. **The gate per turn**: ``Engine.begin_d`` + ``Engine.complete_d`` around an in-memory
   upstream answer, on the production shape (an Idempotency-Key on every request, a
   budget on the environment: a key claim, a reservation, a settlement, the finished
   key, the kill switch, two audit entries with fsync; on PostgreSQL the audit chain is
   in the database too). Sync driver on both backends,
   the async driver (``arun`` on ``store.aio``) on PostgreSQL; blocks interleaved,
   medians.
2. **The proxy** (needs ``wrk``): ``authority serve`` on each backend with the same
   policy, pinned as in ``make bench`` (wrk and the mock on CPU 0, the server on CPU 1),
   ``keyed.lua`` (a new Idempotency-Key per request) at c=1 and c=64, interleaved,
   medians; then two replicas on PostgreSQL, one wrk each (on 2 cores they share the CPU
   with the load and the database: that row shows correctness under load, not scaling).

Writes ``benchmarks/RESULTS-pg.md`` (``--quick``: ``benchmarks/.work/pg/``) and prints the
figures as JSON. Each run
uses a schema of its own, dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workload  # noqa: E402
from harness import (  # noqa: E402
    Server,
    free_port,
    load_average,
    median,
    percentile,
    pinned,
    run_wrk,
    start_mock,
    wrk_command,
)
from mock_upstream import completion_body  # noqa: E402

PG_DSN = os.environ.get("AUTHORITY_BENCH_PG_DSN",
                        "postgresql://postgres@127.0.0.1:5432/postgres")
DSN_ENV = "AUTHORITY_BENCH_STATE_DSN"
WRK_CPU, SERVER_CPU = "0", "1"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Schema:
    """A migrated schema of its own on the benchmark's PostgreSQL."""

    def __init__(self) -> None:
        import psycopg

        from authority_sdk.store.pg_schema import migrate

        self.name = f"bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {self.name}")
        sep = "&" if "?" in PG_DSN else "?"
        self.dsn = f"{PG_DSN}{sep}options=-csearch_path%3D{self.name}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            migrate(conn)

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.name} CASCADE")


def write_policy(folder: Path, backend: str, upstream_url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((HERE / "policy.yaml").read_text())
    data["upstream"]["base_url"] = upstream_url
    data["environments"]["prod"]["budget"] = {"usd": 1e9, "period": "day"}
    data["keys"][0]["budget"] = {"usd": 1e9, "period": "hour"}
    if backend == "postgres":  # all of it shared: state and the audit chain
        data["state"] = {"backend": "postgres", "dsn_env": DSN_ENV}
        data["audit"] = {"backend": "postgres", "fsync": True}
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- 1. the gate per turn ---------------------------------------------------------------------


def _request(i: int, tag: str) -> Any:
    from authority_sdk.wire import Caller, GatewayRequest

    raw = json.dumps(workload.chat_body(workload.base_messages(tag))).encode()
    return GatewayRequest(caller=Caller(name="bench", environment="prod"), body=raw,
                          headers={"idempotency-key": f"{tag}-{i}"})


def _turns_sync(engine: Any, n: int, tag: str, answer: bytes) -> list[float]:
    from authority_sdk.effects import run

    rt = engine.runtime
    out: list[float] = []
    for i in range(n):
        req = _request(i, tag)
        t0 = time.perf_counter()
        ctx = run(engine.begin_d(req), rt)
        resp = run(engine.complete_d(ctx, 200, answer), rt)
        out.append(time.perf_counter() - t0)
        if resp.status_code != 200:
            raise RuntimeError(f"gate refused: {resp.body[:300]!r}")
    return out


async def _turns_async(engine: Any, n: int, tag: str, answer: bytes) -> list[float]:
    from authority_sdk.effects import arun

    rt = engine.runtime
    out: list[float] = []
    for i in range(n):
        req = _request(i, tag)
        t0 = time.perf_counter()
        ctx = await arun(engine.begin_d(req), rt)
        resp = await arun(engine.complete_d(ctx, 200, answer), rt)
        out.append(time.perf_counter() - t0)
        if resp.status_code != 200:
            raise RuntimeError(f"gate refused: {resp.body[:300]!r}")
    return out


def bench_gate(work: Path, turns: int, blocks: int) -> dict[str, Any]:
    from authority_sdk.engine import Engine

    answer = json.dumps(completion_body()).encode()
    engines = {name: Engine(write_policy(work / f"gate-{name}", backend, "http://127.0.0.1:9/v1"))
               for name, backend in (("diskcache", "diskcache"), ("postgres", "postgres"))}
    lat: dict[str, list[float]] = {"diskcache": [], "postgres": [], "postgres-async": []}
    loop = asyncio.new_event_loop()
    try:
        for name, eng in engines.items():  # warm: price map, tokenizer, pools
            _turns_sync(eng, 20, f"warm-{name}", answer)
        loop.run_until_complete(_turns_async(engines["postgres"], 20, "warm-async", answer))
        for b in range(blocks):
            for name in ("diskcache", "postgres", "postgres-async"):
                tag = f"{name}-{b}-{secrets.token_hex(3)}"
                if name == "postgres-async":
                    lat[name] += loop.run_until_complete(
                        _turns_async(engines["postgres"], turns, tag, answer))
                else:
                    lat[name] += _turns_sync(engines[name], turns, tag, answer)
    finally:
        loop.run_until_complete(engines["postgres"].store.aio.aclose())
        loop.close()
        for eng in engines.values():
            eng.close()
    out: dict[str, Any] = {
        name: {"n": len(v), "p50_ms": percentile(v, 50) * 1e3,
               "p99_ms": percentile(v, 99) * 1e3} for name, v in lat.items()}
    base = out["diskcache"]["p50_ms"]
    for name in ("postgres", "postgres-async"):
        out[name]["added_p50_ms"] = out[name]["p50_ms"] - base
        out[name]["ratio_p50"] = out[name]["p50_ms"] / base
    return out


# -- 2. the proxy -------------------------------------------------------------------------------


def serve_proxy(stack: ExitStack, work: Path, name: str, backend: str, upstream_url: str,
                env: dict[str, str]) -> tuple[Server, int]:
    """``authority serve`` on ``backend`` with this benchmark's policy, pinned to the server's
    CPU, healthy, stopped when ``stack`` closes; the server and its port."""
    policy = write_policy(work / f"proxy-{name}", backend, upstream_url)
    port = free_port()
    cmd = pinned([sys.executable, "-m", "authority_sdk.cli", "serve", "--policy",
                  str(policy), "--port", str(port), "--log-level", "warning"], SERVER_CPU)
    srv = Server(name, cmd, log=work / f"{name}.log", env=env, cwd=policy.parent)
    stack.callback(srv.stop)
    srv.wait_healthy(f"http://127.0.0.1:{port}/healthz", timeout_s=60)
    return srv, port


def bench_proxy(work: Path, duration_s: float, repeats: int, env: dict[str, str]) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        return {"skipped": "wrk is not installed (benchmarks/ensure_wrk.sh)"}
    token = "bench-" + secrets.token_hex(16)
    env = {**env, "AUTHORITY_KEY_BENCH": token, "BENCH_UPSTREAM_KEY": "sk-mock"}
    body = work / "body.json"
    body.write_bytes(workload.body_bytes())
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        mock, mock_port = start_mock(work / "mock.log", WRK_CPU)
        stack.callback(mock.stop)
        url = f"http://127.0.0.1:{mock_port}/v1"

        def serve(name: str, backend: str) -> str:
            _, port = serve_proxy(stack, work, name, backend, url, env)
            return f"http://127.0.0.1:{port}/v1/chat/completions"

        targets = {"diskcache": serve("diskcache", "diskcache"),
                   "postgres": serve("postgres", "postgres")}
        cells: dict[str, list[Any]] = {}
        for _ in range(repeats):
            for c in (1, 64):
                for name, target in targets.items():
                    res, _ = run_wrk(wrk_command(target, connections=c, duration_s=duration_s,
                                                 script=HERE / "keyed.lua", body=body,
                                                 token=token, cpu=WRK_CPU))
                    if res.errors:
                        raise RuntimeError(f"{name} c={c}: {res.errors} errors")
                    cells.setdefault(f"{name} c={c}", []).append(res)
        for cell, runs in cells.items():
            results[cell] = {"rps": median([r.rps for r in runs]),
                             "p50_ms": median([r.p50_ms for r in runs]),
                             "p99_ms": median([r.p99_ms for r in runs])}
        results["postgres added p50 at c=1 (ms)"] = (results["postgres c=1"]["p50_ms"]
                                                    - results["diskcache c=1"]["p50_ms"])
        # Each repeat's two c=1 cells ran one after the other: their difference, repeat by
        # repeat, shows how much of the figure above is the baseline moving.
        results["postgres added p50 at c=1, per repeat (ms)"] = [
            round(pg.p50_ms - dc.p50_ms, 2)
            for dc, pg in zip(cells["diskcache c=1"], cells["postgres c=1"], strict=True)]
        results["postgres/diskcache rps at c=64"] = (results["postgres c=64"]["rps"]
                                                    / results["diskcache c=64"]["rps"])
        # Two replicas on one database: one wrk per replica at once, c=32 each.
        second = serve("postgres-2", "postgres")
        import subprocess

        procs = [subprocess.Popen(
            wrk_command(t, connections=32, duration_s=duration_s, script=HERE / "keyed.lua",
                        body=body, token=token, cpu=WRK_CPU), stdout=subprocess.PIPE,
            text=True) for t in (targets["postgres"], second)]
        from harness import parse_wrk

        outs = [parse_wrk(p.communicate()[0]) for p in procs]
        results["two postgres replicas, c=32 each"] = {
            "rps_total": sum(o.rps for o in outs), "p50_ms": max(o.p50_ms for o in outs),
            "errors": sum(o.errors for o in outs)}
    return results


def _table(gate: dict[str, Any], proxy: dict[str, Any]) -> str:
    lines = ["# diskcache vs PostgreSQL (benchmarks/pg_bench.py)", "",
             f"Load average at the end: {load_average()} (2 cores shared with the load "
             f"generator, the database and anything else running).", "",
             "## The gate per turn (keyed, budgeted; Engine.begin_d + complete_d)", "",
             "| store | p50 ms | p99 ms | added p50 ms | ratio p50 |", "|---|---|---|---|---|"]
    for name, s in gate.items():
        lines.append(f"| {name} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | "
                     f"{s.get('added_p50_ms', 0.0):.3f} | {s.get('ratio_p50', 1.0):.2f} |")
    lines += ["", "## The proxy (wrk, keyed.lua)", ""]
    if "skipped" in proxy:
        lines.append(f"skipped: {proxy['skipped']}")
    else:
        lines += ["| cell | req/s | p50 ms | p99 ms |", "|---|---|---|---|"]
        for cell, s in proxy.items():
            if isinstance(s, dict) and "rps" in s:
                lines.append(f"| {cell} | {s['rps']:.0f} | {s['p50_ms']:.2f} | "
                             f"{s['p99_ms']:.2f} |")
        two = proxy["two postgres replicas, c=32 each"]
        per_repeat = ", ".join(f"{d:.2f}" for d in
                               proxy.get("postgres added p50 at c=1, per repeat (ms)", []))
        lines += ["", f"- postgres added p50 at c=1: "
                  f"{proxy['postgres added p50 at c=1 (ms)']:.2f} ms (goal ≤ 1 ms; "
                  f"repeat by repeat: {per_repeat} ms)",
                  f"- postgres/diskcache throughput at c=64: "
                  f"{proxy['postgres/diskcache rps at c=64']:.0%} (goal ≥ 70 %)",
                  f"- two postgres replicas (c=32 each): {two['rps_total']:.0f} req/s in total, "
                  f"{two['errors']} errors"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-proxy", action="store_true", help="Only the gate per turn.")
    args = ap.parse_args(argv)
    work = HERE / ".work" / "pg"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        schema = Schema()
    except Exception as exc:  # no server here: the rest of `make bench` still counts
        _log(f"skipped: no PostgreSQL at {PG_DSN}: {exc}")
        return 0
    os.environ[DSN_ENV] = schema.dsn
    try:
        _log("gate per turn: diskcache / postgres / postgres async")
        gate = bench_gate(work, turns=50 if args.quick else 200, blocks=2 if args.quick else 5)
        proxy: dict[str, Any] = {"skipped": "--no-proxy"}
        if not args.no_proxy:
            _log("proxy: wrk at c=1 and c=64 on each backend, then two replicas")
            proxy = bench_proxy(work, duration_s=2 if args.quick else 4,
                                repeats=1 if args.quick else 3, env={DSN_ENV: schema.dsn})
    finally:
        schema.drop()
    report = _table(gate, proxy)
    (work / "RESULTS-pg.md").write_text(report)
    if not args.quick:
        (HERE / "RESULTS-pg.md").write_text(report)
    print(report)
    print(json.dumps({"gate": gate, "proxy": proxy}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
