"""Audit-log and state-store micro-benchmarks; prints one JSON document on stdout.

    python benchmarks/micro.py audit --dir D --procs 4 --seconds 3 [--head]
    python benchmarks/micro.py store --dir D --n 2000
    python benchmarks/micro.py imports --runs 7
    python benchmarks/micro.py tokens --n 20000
    python benchmarks/micro.py floor --n 20000

Everything runs with durability on (audit fsync, SQLite ``synchronous=FULL``),
as the gateway does by default.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import percentile


def _entry_fields(i: int) -> dict[str, Any]:
    # The shape of the gateway's per-request entry, so serialisation cost is representative.
    return {
        "request_id": f"req_{i:024x}", "environment": "prod", "model": "gpt-4o-mini",
        "decision": "allow", "reason": None, "cost_estimate_usd": 0.00123,
        "cost_actual_usd": 0.00016, "actor": "bench", "policy_hash": "f" * 64,
        "details": {"tool_calls": 1, "idempotency_key": None, "stream": False},
    }


def _audit_worker(path: str, state: str | None, seconds: float, barrier: Any, out: Any,
                  worker: int) -> None:
    from authority_sdk.audit import AuditLog
    from authority_sdk.store import DiskStore

    head = DiskStore(state) if state else None
    log = AuditLog(path, fsync=True, head=head)
    log.open()
    barrier.wait()
    n = 0
    lat: list[float] = []
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        s = time.perf_counter()
        if s >= deadline:
            break
        log.append("request", **_entry_fields(worker * 10_000_000 + n))
        lat.append(time.perf_counter() - s)
        n += 1
    out.put((n, time.perf_counter() - t0, lat))
    log.close()


def bench_audit(directory: Path, procs: int, seconds: float, head: bool) -> dict[str, Any]:
    from authority_sdk.audit import verify

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"audit-{procs}p{'-head' if head else ''}.jsonl"
    state = directory / f"state-{procs}p" if head else None
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs)
    out = ctx.Queue()
    workers = [ctx.Process(target=_audit_worker,
                           args=(str(path), str(state) if state else None, seconds, barrier, out,
                                 w))
               for w in range(procs)]
    for w in workers:
        w.start()
    results = [out.get(timeout=seconds + 60) for _ in workers]
    for w in workers:
        w.join(30)
        if w.exitcode != 0:
            raise RuntimeError(f"audit worker exited with {w.exitcode}")
    total = sum(n for n, _, _ in results)
    elapsed = max(e for _, e, _ in results)
    lat = [x for _, _, ls in results for x in ls]
    check = verify(path)
    if not check.ok or check.entries != total:
        raise RuntimeError(f"audit chain check failed: {check}")
    return {"procs": procs, "head_in_store": head, "entries": total, "seconds": elapsed,
            "entries_per_s": total / elapsed, "p50_us": percentile(lat, 50) * 1e6,
            "p99_us": percentile(lat, 99) * 1e6, "chain_verified": True}


def _timed(fn: Any, n: int) -> dict[str, float]:
    lat = []
    for i in range(n):
        s = time.perf_counter()
        fn(i)
        lat.append(time.perf_counter() - s)
    return {"n": n, "p50_us": percentile(lat, 50) * 1e6, "p99_us": percentile(lat, 99) * 1e6,
            "mean_us": statistics.fmean(lat) * 1e6}


def bench_store(directory: Path, n: int) -> dict[str, Any]:
    from authority_sdk.store import DiskStore

    store = DiskStore(directory / "store")
    day = 86_400.0
    counters = [("budget:env:prod:day", 1e9), ("budget:key:bench:day", 1e9)]
    store.health()  # first touch creates the databases; keep it out of the numbers
    res: dict[str, Any] = {}

    from authority_sdk import idempotency

    def idem(i: int) -> None:
        got = idempotency.begin(store, f"idem:bench:prod:k{i}", "f" * 64, claim_id=f"r{i}",
                                ttl_s=day, lease_s=90)
        assert got.state == "new"

    def reserve(i: int) -> None:
        got = store.budget_reserve(counters, min_usd=0.0001, max_usd=0.002, ttl_s=day)
        assert got is not None

    def settle(i: int) -> None:
        store.budget_settle([c for c, _ in counters], reserved=0.002, actual=0.0002, ttl_s=day)

    def kill(i: int) -> None:
        store.kill_switch_state()

    def head(i: int) -> None:
        store.set_audit_head(i + 1, "a" * 64)

    for name, fn in (("idem_begin", idem), ("budget_reserve", reserve),
                     ("budget_settle", settle), ("kill_switch_state", kill),
                     ("set_audit_head", head)):
        fn(-1)  # warm the statement cache
        res[name] = _timed(fn, n)
    store.close()
    return res


_IMPORT_SNIPPET = ("import time, sys; t = time.perf_counter(); {stmt}; "
                   "print(time.perf_counter() - t)")

IMPORTS = {
    "openai": "import openai",
    "authority_sdk": "import authority_sdk",
    "authority_sdk.AuthorityClient": "from authority_sdk.client import AuthorityClient",
}


def bench_imports(runs: int) -> dict[str, Any]:
    """Each statement in a fresh interpreter, interleaved, after one discarded warm-up round
    (the first import after an install compiles .pyc files)."""
    times: dict[str, list[float]] = {k: [] for k in IMPORTS}
    for r in range(runs + 1):
        for name, stmt in IMPORTS.items():
            out = subprocess.run([sys.executable, "-c", _IMPORT_SNIPPET.format(stmt=stmt)],
                                 capture_output=True, text=True, check=True)
            if r:
                times[name].append(float(out.stdout.strip()))
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "runs": ts}
            for name, ts in times.items()}


def bench_tokens(n: int) -> dict[str, Any]:
    """The pre-call cost plan of a plain text conversation (the hot path): a resent
    conversation (every message cached), and an agent's next turn (3 new messages)."""
    import copy
    import tempfile

    import workload

    from authority_sdk.costs import plan_cost
    from authority_sdk.policy import parse_policy
    from authority_sdk.pricing import PriceBook
    from authority_sdk.store import DiskStore
    from authority_sdk.tokens import TokenCounter

    policy = parse_policy({"default_environment": "prod", "environments": {"prod": {
        "models": [workload.MODEL], "ceilings": {"per_request_usd": 0.05}}}})
    prices = PriceBook()
    counter = TokenCounter()
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = DiskStore(Path(tmp) / "store")
        body = workload.chat_body()

        def plan(_: int, b: dict[str, Any] = body) -> None:
            plan_cost(policy, "prod", None, "bench", dict(b), store=store, prices=prices,
                      counter=counter)

        plan(-1)  # load the price map and the encoding; fill the cache
        res["plan_cost_resent_conversation"] = _timed(plan, n)

        def count(_: int) -> None:
            counter.count_prompt(workload.MODEL, body["messages"], body["tools"])

        res["count_prompt_resent_conversation"] = _timed(count, n)
        turns = []
        messages = workload.base_messages("t")
        for t in range(2, 2 + min(n, 2000)):
            messages = workload.agent_turn(messages, t, f"t{t}")[-40:]
            turns.append(copy.deepcopy(workload.chat_body(messages)))

        def turn(i: int) -> None:
            plan_cost(policy, "prod", None, "bench", turns[i], store=store, prices=prices,
                      counter=counter)

        res["plan_cost_agent_turn"] = _timed(turn, len(turns))
        store.close()
    return res


def bench_floor(n: int) -> dict[str, Any]:
    """The least work the contract asks of any gateway for the bench request, with the
    gateway's own functions in a warm loop: the body parsed strictly (a duplicate key or a
    lone surrogate refused), the upstream's answer likewise (its tool calls are gated), two
    chained audit entries (request, action) made safe, hashed and encoded as their lines,
    and the response encoded. Left out, so the floor is low: authentication, the kill
    switch, policy, argument validation, pricing, idempotency, logs, metrics and HTTP.

    ``make bench`` sets it against the bare forwarder's CPU per request from the same run:
    goal 2 (50 % of the forwarder's throughput on one core) leaves the gateway's own work
    exactly one forwarder's CPU per request."""
    import workload
    from mock_upstream import completion_body

    from authority_sdk import strictjson
    from authority_sdk.audit.chain import build_run, prepare

    body = workload.body_bytes()
    answer = json.dumps(completion_body()).encode()
    call = completion_body()["choices"][0]["message"]["tool_calls"][0]
    request = {**_entry_fields(0), "cost_estimate_usd": 0.0099873, "details": {
        "upstream": "default", "tool_calls": 1, "idempotency_key": None, "key_kind": None,
        "stream": False, "format": "chat.completions", "takeover_of": None,
        "max_output_tokens_set_by_gateway": None}}
    action = {
        "request_id": request["request_id"], "environment": "prod", "model": workload.MODEL,
        "action_type": call["function"]["name"], "decision": "allow",
        "reason": "action lookup_customer has mode auto_execute", "actor": "bench",
        "policy_hash": "f" * 64, "details": {
            "mode": "auto_execute", "status": "allowed", "code": None,
            "decided_by": "action_mode", "dispatch": "client", "executor": None,
            "approval_id": None, "action_key": "act_" + "0" * 32,
            "tool_call_id": call["id"], "call_kind": "tool_call",
            "arguments": json.loads(call["function"]["arguments"])}}

    def audit(_: int) -> None:
        entries = build_run([prepare("request", request), prepare("action", action)],
                            10, "0" * 64, None)
        "".join(json.dumps(e, separators=(",", ":"), ensure_ascii=False) + "\n"
                for e in entries).encode("utf-8")

    def respond(_: int) -> None:
        out = strictjson.loads(answer)
        out["authority"] = {"request_id": request["request_id"], "environment": "prod",
                            "decision": "allow", "actions": [{"tool_call_id": call["id"]}]}
        json.dumps(out).encode()

    steps = {"parse_body": lambda _: strictjson.loads(body), "audit_entries": audit,
             "read_answer_and_respond": respond}
    for fn in steps.values():  # first touch: imports, compiled decoders
        fn(-1)
    res: dict[str, Any] = {"body_bytes": len(body)}
    for name, fn in steps.items():
        # The best of five medians: the floor is what the code costs when nothing
        # else on the machine gets in its way.
        res[name] = min((_timed(fn, n) for _ in range(5)), key=lambda t: t["p50_us"])
    res["total_p50_us"] = sum(res[name]["p50_us"] for name in steps)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("audit")
    a.add_argument("--dir", type=Path, required=True)
    a.add_argument("--procs", type=int, default=1)
    a.add_argument("--seconds", type=float, default=3.0)
    a.add_argument("--head", action="store_true")
    s = sub.add_parser("store")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--n", type=int, default=2000)
    i = sub.add_parser("imports")
    i.add_argument("--runs", type=int, default=7)
    t = sub.add_parser("tokens")
    t.add_argument("--n", type=int, default=20000)
    f = sub.add_parser("floor")
    f.add_argument("--n", type=int, default=20000)
    args = ap.parse_args(argv)
    if args.what == "audit":
        result = bench_audit(args.dir, args.procs, args.seconds, args.head)
    elif args.what == "store":
        result = bench_store(args.dir, args.n)
    elif args.what == "tokens":
        result = bench_tokens(args.n)
    elif args.what == "floor":
        result = bench_floor(args.n)
    else:
        result = bench_imports(args.runs)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
