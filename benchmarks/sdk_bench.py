"""SDK overhead: ``AuthorityClient`` against the stock ``openai.OpenAI`` on the same mock.

    python benchmarks/sdk_bench.py --policy P --calls 600 --convs 10 --turns 50

Prints one JSON document on stdout (progress on stderr):

* ``per_call``: end-to-end ``chat.completions.create`` latency of both clients,
  interleaved in blocks, for a new ~1,000-token conversation on every call
  (``cold``: every message is new to the token counter) and for the same
  conversation resent (``warm``). ``added_*`` = gated minus stock.
* ``growing``: an agent conversation over ``turns`` turns (≈160 new tokens a
  turn), the gate's own cost per turn (``Engine.begin_d`` + ``Engine.complete_d``
  around an in-memory upstream answer, so no network noise), median over
  ``convs`` conversations; the same with fsync off (``cpu_ms``: how the CPU part
  scales once fsync's constant is gone); the end-to-end added latency per turn.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import workload
from harness import median, percentile
from mock_upstream import completion_body


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _stats(lat: list[float]) -> dict[str, float]:
    return {"n": len(lat), "p50_ms": percentile(lat, 50) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3, "mean_ms": sum(lat) / len(lat) * 1e3}


def _check_gated(resp: Any) -> None:
    """The bench must measure the policy it claims: the tool call allowed, client dispatch."""
    extra = resp.model_extra or {}
    auth = extra.get("authority")
    if not auth or auth.get("decision") != "allow":
        raise RuntimeError(f"gated call not allowed: {auth!r}")
    actions = auth.get("actions") or []
    if len(actions) != 1 or actions[0].get("mode") != "auto_execute" \
            or actions[0].get("dispatch") != "client":
        raise RuntimeError(f"unexpected action outcome: {actions!r}")
    if not resp.choices[0].message.tool_calls:
        raise RuntimeError("the allowed client-dispatched tool call was withheld")


def per_call(stock: Any, gated: Any, calls: int, block: int, *, cold: bool,
             tag: str) -> dict[str, Any]:
    def body(i: int, who: str) -> dict[str, Any]:
        nonce = f"{tag}-{who}-{i}" if cold else tag
        return workload.chat_body(workload.base_messages(nonce))

    # Bodies are built up front: only the client call is timed.
    s_bodies = [body(i, "s") for i in range(calls)]
    g_bodies = [body(i, "g") for i in range(calls)]
    s_lat: list[float] = []
    g_lat: list[float] = []
    gc.collect()
    for start in range(0, calls, block):
        for i in range(start, min(start + block, calls)):
            t = time.perf_counter()
            stock.chat.completions.create(**s_bodies[i])
            s_lat.append(time.perf_counter() - t)
        for i in range(start, min(start + block, calls)):
            t = time.perf_counter()
            gated.chat.completions.create(**g_bodies[i])
            g_lat.append(time.perf_counter() - t)
    s, g = _stats(s_lat), _stats(g_lat)
    return {"stock": s, "gated": g, "added_p50_ms": g["p50_ms"] - s["p50_ms"],
            "added_p99_ms": g["p99_ms"] - s["p99_ms"]}


def _gate_turns(gateway: Any, tag: str, turns: int, gate: list[list[float]],
                begin: list[list[float]], tokens: list[int] | None = None,
                sizes: list[int] | None = None) -> None:
    """One conversation through the engine alone (its own nonce: nothing pre-counted)."""
    from authority_sdk.effects import run
    from authority_sdk.wire import Caller, GatewayRequest

    caller = Caller(name="sdk", environment="prod")
    rt = gateway.runtime
    answer = json.dumps(completion_body()).encode()
    msgs = workload.base_messages(tag)
    for turn in range(1, turns + 1):
        if turn > 1:
            msgs = workload.agent_turn(msgs, turn, tag)
        raw = json.dumps(workload.chat_body(msgs)).encode()
        if tokens is not None and sizes is not None:
            tokens.append(workload.count_tokens(msgs, [workload.TOOL]))
            sizes.append(len(raw))
        req = GatewayRequest(caller=caller, body=raw, headers={})
        t0 = time.perf_counter()
        ctx = run(gateway.begin_d(req), rt)
        t1 = time.perf_counter()
        resp = run(gateway.complete_d(ctx, 200, answer), rt)
        t2 = time.perf_counter()
        if resp.status_code != 200:
            raise RuntimeError(f"gate refused turn {turn}: {resp.body[:300]!r}")
        gate[turn - 1].append(t2 - t0)
        begin[turn - 1].append(t1 - t0)


def growing(gateway: Any, nosync: Any, stock: Any, gated: Any, convs: int,
            turns: int) -> dict[str, Any]:
    gate: list[list[float]] = [[] for _ in range(turns)]
    begin: list[list[float]] = [[] for _ in range(turns)]
    cpu: list[list[float]] = [[] for _ in range(turns)]
    cpu_begin: list[list[float]] = [[] for _ in range(turns)]
    e2e_added: list[list[float]] = [[] for _ in range(turns)]
    tokens: list[int] = []
    sizes: list[int] = []
    # First touch opens the store and the audit file; keep that out of turn 1.
    scratch: list[list[float]] = [[] for _ in range(3)]
    _gate_turns(gateway, "grow-warm", 3, scratch, [[] for _ in range(3)])
    _gate_turns(nosync, "grow-warm", 3, scratch, [[] for _ in range(3)])
    for conv in range(convs):
        _gate_turns(gateway, f"grow-gate-{conv}", turns, gate, begin,
                    tokens if conv == 0 else None, sizes if conv == 0 else None)
        # The same engine with fsync off: what is left is CPU, which shows how it scales.
        _gate_turns(nosync, f"grow-cpu-{conv}", turns, cpu, cpu_begin)
        # End to end through both clients on the mock, same messages for both.
        msgs = workload.base_messages(f"grow-e2e-{conv}")
        for turn in range(1, turns + 1):
            if turn > 1:
                msgs = workload.agent_turn(msgs, turn, f"grow-e2e-{conv}")
            b = workload.chat_body(msgs)
            t0 = time.perf_counter()
            stock.chat.completions.create(**b)
            t1 = time.perf_counter()
            gated.chat.completions.create(**b)
            t2 = time.perf_counter()
            e2e_added[turn - 1].append((t2 - t1) - (t1 - t0))
        _log(f"  growing conversation {conv + 1}/{convs} done")
    per_turn = [{"turn": i + 1, "prompt_tokens": tokens[i], "body_bytes": sizes[i],
                 "gate_ms": median(gate[i]) * 1e3, "begin_ms": median(begin[i]) * 1e3,
                 "cpu_ms": median(cpu[i]) * 1e3, "cpu_begin_ms": median(cpu_begin[i]) * 1e3,
                 "e2e_added_ms": median(e2e_added[i]) * 1e3} for i in range(turns)]
    first, last = per_turn[0], per_turn[-1]
    return {"turns": turns, "convs": convs, "per_turn": per_turn,
            "turn1_gate_ms": first["gate_ms"], "turn_last_gate_ms": last["gate_ms"],
            "ratio": last["gate_ms"] / first["gate_ms"],
            "cpu_ratio": last["cpu_ms"] / first["cpu_ms"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", type=Path, required=True)
    ap.add_argument("--calls", type=int, default=600)
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--convs", type=int, default=10)
    ap.add_argument("--turns", type=int, default=50)
    args = ap.parse_args(argv)

    import openai

    from authority_sdk.client import AuthorityClient
    from authority_sdk.engine import Gateway
    from authority_sdk.policy import AuditConfig, StateConfig

    gateway = Gateway(args.policy)
    # Diagnostics only: the same policy with durability off, in its own files.
    nosync = Gateway(gateway.policy.model_copy(update={
        "audit": AuditConfig(path="audit-nosync.jsonl", fsync=False),
        "state": StateConfig(path="state-nosync")}))
    base_url = gateway.policy.routes[0].base_url
    key = os.environ.get("BENCH_UPSTREAM_KEY", "sk-mock")
    stock = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    gated = AuthorityClient(gateway=gateway, environment="prod", base_url=base_url, api_key=key,
                            max_retries=0)

    first = gated.chat.completions.create(**workload.chat_body())
    _check_gated(first)
    warm = max(20, args.block)
    for _ in range(warm):  # connection pools, caches, first-touch of the store
        stock.chat.completions.create(**workload.chat_body())
        gated.chat.completions.create(**workload.chat_body())

    _log("  per-call overhead, new conversation each call")
    cold = per_call(stock, gated, args.calls, args.block, cold=True, tag="cold")
    _log("  per-call overhead, same conversation resent")
    warm_res = per_call(stock, gated, args.calls, args.block, cold=False, tag="warm")
    _log("  growing conversation")
    grow = growing(gateway, nosync, stock, gated, args.convs, args.turns)
    body_tokens = workload.count_tokens(workload.base_messages(), [workload.TOOL])
    print(json.dumps({"body_tokens": body_tokens, "cold": cold, "warm": warm_res,
                      "growing": grow}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
