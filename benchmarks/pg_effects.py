"""Where a keyed request's time goes, effect by effect: diskcache against PostgreSQL.

    .venv/bin/python benchmarks/pg_effects.py [--turns 300] [--no-calls]   # ~30 s

The gate per turn of pg_bench (``Engine.begin_d`` + ``complete_d`` on the async driver, an
Idempotency-Key and budgets on every request, the audit chain in the database for
PostgreSQL) with each effect the engine awaits timed where the runtime performs it: the
claim, the reservation, the settlement with the checkpoint, the audit append, the finished
answer (``--no-calls``: an answer without tool calls, which needs no checkpoint and settles
with its finished answer). What pg_count.py counts (round trips, commits), this times; the
rest of a turn is the gateway's own work between effects. Prints a table per store and the
figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import pg_bench  # noqa: E402
from mock_upstream import completion_body  # noqa: E402


def _label(effect: Any) -> str:
    kind = type(effect).__name__
    if kind == "StoreOp":
        return str(effect.method)
    if kind == "StoreOps":
        return "+".join(op.method for op in effect.ops)
    if kind == "AuditOp" and (effect.first or effect.then):  # writes around the append
        return "+".join([*(op.method for op in effect.first), kind,
                         *(op.method for op in effect.then)])
    return kind


def _answer(calls: bool) -> bytes:
    body = completion_body()
    if not calls:
        body["choices"][0]["message"] = {"role": "assistant", "content": "Done."}
        body["choices"][0]["finish_reason"] = "stop"
    return json.dumps(body).encode()


def measure(backend: str, turns: int, work: Path, *, calls: bool = True) -> dict[str, Any]:
    from authority_sdk import effects
    from authority_sdk.engine import Engine

    timings: dict[str, list[float]] = defaultdict(list)
    real = effects.Runtime.aperform
    depth = [0]  # StoreOps performs its writes through aperform too: time the outer one

    async def timed(self: Any, effect: Any) -> Any:
        depth[0] += 1
        t0 = time.perf_counter()
        try:
            return await real(self, effect)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                timings[_label(effect)].append(time.perf_counter() - t0)

    engine = Engine(pg_bench.write_policy(work / backend, backend, "http://127.0.0.1:9/v1"))
    answer = _answer(calls)
    loop = asyncio.new_event_loop()
    effects.Runtime.aperform = timed  # type: ignore[method-assign]
    try:
        loop.run_until_complete(pg_bench._turns_async(engine, 30, f"warm-{time.time()}",
                                                      answer))
        timings.clear()
        total = loop.run_until_complete(pg_bench._turns_async(engine, turns,
                                                              f"t-{time.time()}", answer))
    finally:
        effects.Runtime.aperform = real  # type: ignore[method-assign]
        if backend == "postgres":
            loop.run_until_complete(engine.store.aio.aclose())
        loop.close()
        engine.close()
    rows = {name: {"per_turn": len(v) / turns, "p50_ms": statistics.median(v) * 1e3,
                   "ms_per_turn": sum(v) / turns * 1e3}
            for name, v in sorted(timings.items(), key=lambda kv: -sum(kv[1]))}
    mean_turn = sum(total) / turns * 1e3
    return {"turn_p50_ms": statistics.median(total) * 1e3, "turn_mean_ms": mean_turn,
            "effects": rows,
            "between_effects_ms": mean_turn - sum(r["ms_per_turn"] for r in rows.values())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=300)
    ap.add_argument("--no-calls", action="store_true",
                    help="an answer without tool calls (default: one client-dispatched call)")
    args = ap.parse_args()
    schema = pg_bench.Schema()
    os.environ[pg_bench.DSN_ENV] = schema.dsn
    out: dict[str, Any] = {}
    try:
        for backend in ("diskcache", "postgres"):
            out[backend] = r = measure(backend, args.turns, HERE / ".work" / "pg-effects",
                                       calls=not args.no_calls)
            print(f"\n{backend}: turn p50 {r['turn_p50_ms']:.3f} ms (mean "
                  f"{r['turn_mean_ms']:.3f})", file=sys.stderr)
            print(f"  {'effect':34s} {'n/turn':>6s} {'p50 ms':>8s} {'ms/turn':>8s}",
                  file=sys.stderr)
            for name, row in r["effects"].items():
                print(f"  {name:34s} {row['per_turn']:6.2f} {row['p50_ms']:8.3f} "
                      f"{row['ms_per_turn']:8.3f}", file=sys.stderr)
            print(f"  {'between effects':34s} {'':6s} {'':8s} "
                  f"{r['between_effects_ms']:8.3f}", file=sys.stderr)
    finally:
        schema.drop()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
