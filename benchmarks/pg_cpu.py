"""CPU per keyed request on the async driver, diskcache against PostgreSQL, at a given
concurrency: the figure wall-clock benchmarks on a shared 2-core machine measure with
noise, measured without most of it.

    .venv/bin/python benchmarks/pg_cpu.py [--conc 1,64] [--turns 400] [--backends ...]

The gate per turn of pg_bench (``Engine.begin_d`` + ``complete_d`` with ``arun``, an
Idempotency-Key per request, budgets on the environment and the key, the audit chain in
the database on PostgreSQL), ``conc`` requests at once on one event loop (each counted in
``Runtime.in_flight`` as ``Engine.ahandle`` counts it). Per request: the gateway's CPU
(this process, every thread), PostgreSQL's CPU (every ``postgres`` process of the
machine: the backends, the WAL writer, …), wall time, and the round trips (``ss``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import pg_bench  # noqa: E402
import pg_count  # noqa: E402


def _pg_cpu_s() -> float:
    """CPU seconds of every process named postgres (utime + stime), now."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        if name != "postgres":
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _load(engine: Any, conc: int, turns: int, tag: str, answer: bytes) -> None:
    from authority_sdk.effects import arun

    rt = engine.runtime
    per = max(turns // conc, 1)

    async def worker(w: int) -> None:
        for i in range(per):
            req = pg_bench._request(i, f"{tag}-{w}")
            rt.in_flight += 1
            try:
                ctx = await arun(engine.begin_d(req), rt)
                resp = await arun(engine.complete_d(ctx, 200, answer), rt)
            finally:
                rt.in_flight -= 1
            if resp.status_code != 200:
                raise RuntimeError(f"gate refused: {resp.body[:300]!r}")

    await asyncio.gather(*(worker(w) for w in range(conc)))


def measure(backend: str, concs: list[int], turns: int, work: Path) -> dict[str, Any]:
    from mock_upstream import completion_body

    from authority_sdk.engine import Engine

    answer = json.dumps(completion_body()).encode()
    engine = Engine(pg_bench.write_policy(work / backend, backend, "http://127.0.0.1:9/v1"))
    loop = asyncio.new_event_loop()
    out: dict[str, Any] = {}
    try:
        loop.run_until_complete(_load(engine, 8, 80, f"warm-{time.time()}", answer))
        for conc in concs:
            n = max(turns // conc, 1) * conc
            trips = pg_count.server_answers()
            c0, p0, t0 = _self_cpu_s(), _pg_cpu_s(), time.perf_counter()
            loop.run_until_complete(_load(engine, conc, turns, f"c{conc}-{time.time()}",
                                          answer))
            wall = time.perf_counter() - t0
            time.sleep(0.2)  # the WAL writer's share lands a little later
            client, server = _self_cpu_s() - c0, _pg_cpu_s() - p0 - 0.0
            out[f"c={conc}"] = {
                "req/s": round(n / wall, 1),
                "gateway cpu us/req": round(client / n * 1e6),
                "postgres cpu us/req": round(server / n * 1e6),
                "round trips/req": round((pg_count.server_answers() - trips) / n, 2),
            }
    finally:
        aclose = getattr(engine.store.aio, "aclose", None)
        if aclose is not None:
            loop.run_until_complete(aclose())
        loop.close()
        engine.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conc", default="1,64")
    ap.add_argument("--turns", type=int, default=400)
    ap.add_argument("--backends", default="diskcache,postgres")
    args = ap.parse_args()
    concs = [int(c) for c in args.conc.split(",")]
    work = HERE / ".work" / "pg-cpu"
    schema = pg_bench.Schema()
    os.environ[pg_bench.DSN_ENV] = schema.dsn
    report: dict[str, Any] = {}
    try:
        for backend in args.backends.split(","):
            report[backend] = measure(backend, concs, args.turns, work)
    finally:
        schema.drop()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
