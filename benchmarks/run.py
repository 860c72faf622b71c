"""`make bench`: the gateway against its baselines, side by side, in one run.

    .venv/bin/python benchmarks/run.py            # full run (~10 min), writes benchmarks/RESULTS.md
    .venv/bin/python benchmarks/run.py --quick    # smoke run (~1 min), writes benchmarks/.work/

Phases: mock upstream → proxy start-up → proxy matrix (direct / authority /
LiteLLM x concurrency 1, 16, 64, plus streaming at 16, interleaved, medians) →
proxy RSS at 20k and 100k requests → SDK overhead and a 50-turn conversation →
audit and state micro-benchmarks → import times. Every figure is compared with
a baseline measured in the same run, because this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import workload  # noqa: E402
from harness import (  # noqa: E402
    Goal,
    Server,
    WrkResult,
    cpu_seconds,
    fmt,
    free_port,
    fsync_probe,
    goal_rows,
    load_average,
    machine_info,
    markdown_table,
    median,
    pin_pid,
    pinned,
    rss_kib,
    run_json,
    run_wrk,
    start_mock,
    wrk_command,
)

WRK_CPU = "0"    # wrk, and the mock while a proxy is under test
SERVER_CPU = "1"  # the server under test
CONCURRENCY = (1, 16, 64)
STREAM_CONCURRENCY = 16
LITELLM_KEY = "sk-bench-litellm-master-0123456789abcdef"


@dataclass(frozen=True)
class Plan:
    duration_s: float
    repeats: int
    warmup_s: float
    rss_checkpoints: tuple[int, ...]
    serve_starts: int
    sdk_calls: int
    sdk_convs: int
    turns: int
    audit_s: float
    store_n: int
    import_runs: int


FULL = Plan(duration_s=3, repeats=5, warmup_s=2, rss_checkpoints=(20_000, 100_000),
            serve_starts=3, sdk_calls=600, sdk_convs=10, turns=50, audit_s=3, store_n=2000,
            import_runs=7)
QUICK = Plan(duration_s=1, repeats=1, warmup_s=1, rss_checkpoints=(1_000, 3_000),
             serve_starts=1, sdk_calls=100, sdk_convs=2, turns=50, audit_s=1, store_n=300,
             import_runs=3)


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Target:
    name: str
    url: str
    token: str
    server: Server | None  # None: the mock itself (direct)
    requests: int = 0  # sent by wrk so far (the RSS checkpoints count them)
    script: str = "body.lua"  # keyed.lua: a new Idempotency-Key on every request
    cpu_ms: list[float] = field(default_factory=list)  # the server's CPU per request, by run


class Bench:
    def __init__(self, plan: Plan, work: Path, *, litellm: bool) -> None:
        self.plan = plan
        self.work = work
        self.use_litellm = litellm
        self.commands: dict[str, str] = {}
        self.results: dict[str, Any] = {"plan": asdict(plan)}
        self.stack = ExitStack()
        self.py = sys.executable

    # ----------------------------------------------------------------------- set-up

    def setup(self) -> None:
        self.mock, self.mock_port = start_mock(self.work / "mock.log", WRK_CPU)
        self.stack.callback(self.mock.stop)
        self.mock_url = f"http://127.0.0.1:{self.mock_port}/v1"
        self.commands["mock upstream"] = f"taskset -c {WRK_CPU} {self.py} " \
                                         "benchmarks/mock_upstream.py --port 0"
        self.body = self.work / "body.json"
        self.body.write_bytes(workload.body_bytes())
        self.stream_body = self.work / "body-stream.json"
        self.stream_body.write_bytes(workload.body_bytes(stream=True))
        self.results["body"] = {
            "bytes": self.body.stat().st_size,
            "prompt_tokens": workload.count_tokens(workload.base_messages(), [workload.TOOL]),
            "messages": len(workload.base_messages()), "tools": 1,
        }
        self.token = "bench-" + secrets.token_hex(16)
        self.auth_env = {"AUTHORITY_KEY_BENCH": self.token, "BENCH_UPSTREAM_KEY": "sk-mock"}
        self.policy = self.write_policy(self.work / "authority")

    def write_policy(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        data = yaml.safe_load((HERE / "policy.yaml").read_text())
        data["upstream"]["base_url"] = self.mock_url
        path = folder / "policy.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def serve_cmd(self, port: int, policy: Path) -> list[str]:
        return pinned([self.py, "-m", "authority_sdk.cli", "serve", "--policy", str(policy),
                       "--port", str(port)], SERVER_CPU)

    def start_authority(self, policy: Path, log_name: str) -> tuple[Server, str, float]:
        port = free_port()
        cmd = self.serve_cmd(port, policy)
        self.commands["authority proxy"] = (
            "AUTHORITY_KEY_BENCH=… BENCH_UPSTREAM_KEY=sk-mock "
            + " ".join(cmd[:-1]).replace(str(self.work), "WORK") + " PORT")
        srv = Server("authority serve", cmd, log=self.work / log_name, env=self.auth_env,
                     cwd=policy.parent)
        took = srv.wait_healthy(f"http://127.0.0.1:{port}/healthz", timeout_s=60)
        return srv, f"http://127.0.0.1:{port}", took

    def start_bare(self, fastapi: bool) -> tuple[Server, str]:
        """The limit of the gateway's own stack: uvicorn + the aiohttp pool, no decisions."""
        port = free_port()
        cmd = pinned([self.py, str(HERE / "bare_forwarder.py"), "--port", str(port),
                      "--upstream", self.mock_url] + (["--fastapi"] if fastapi else []),
                     SERVER_CPU)
        name = "bare forwarder" + (" (FastAPI route)" if fastapi else "")
        self.commands[name] = " ".join(cmd).replace(self.mock_url, "MOCK").replace(
            f"--port {port}", "--port PORT")
        srv = Server(name, cmd, log=self.work / f"bare{'-fastapi' if fastapi else ''}.log",
                     cwd=self.work)
        srv.wait_listening(port, timeout_s=60)
        return srv, f"http://127.0.0.1:{port}"

    def keyed_policy(self) -> Path:
        """The realistic production shape: a budget on the environment and on the key."""
        folder = self.work / "authority-keyed"
        path = self.write_policy(folder)
        data = yaml.safe_load(path.read_text())
        data["environments"]["prod"]["budget"] = {"usd": 1e9, "period": "day"}
        data["keys"][0]["budget"] = {"usd": 1e9, "period": "hour"}
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def start_litellm(self) -> tuple[Server, str, float]:
        port = free_port()
        cfg = (HERE / "litellm_config.yaml").read_text().replace("PORT", str(self.mock_port))
        cfg_path = self.work / "litellm_config.yaml"
        cfg_path.write_text(cfg)
        exe = str(Path(self.py).with_name("litellm"))
        cmd = pinned([exe, "--config", str(cfg_path), "--port", str(port), "--num_workers", "1"],
                     SERVER_CPU)
        self.commands["LiteLLM proxy"] = "LITELLM_LOCAL_MODEL_COST_MAP=True " + " ".join(
            cmd).replace(str(cfg_path), "WORK/litellm_config.yaml (benchmarks/litellm_config."
                         "yaml with the mock's port)").replace(f"--port {port}", "--port PORT")
        srv = Server("litellm", cmd, log=self.work / "litellm.log",
                     env={"LITELLM_LOCAL_MODEL_COST_MAP": "True"}, cwd=self.work)
        took = srv.wait_healthy(f"http://127.0.0.1:{port}/health/liveliness", timeout_s=180)
        return srv, f"http://127.0.0.1:{port}", took

    # ----------------------------------------------------------------------- phases

    def phase_startup(self) -> None:
        say(f"authority serve: time to healthy x{self.plan.serve_starts}")
        times = []
        for i in range(self.plan.serve_starts):
            srv, _, took = self.start_authority(self.write_policy(self.work / f"start{i}"),
                                                f"serve-start{i}.log")
            srv.stop()
            times.append(took)
        self.results["serve_start_s"] = {"median": median(times), "runs": times}

    def check_answer(self, target: Target) -> None:
        """One request by hand: the target must answer what the bench claims it measures."""
        req = urllib.request.Request(target.url, data=self.body.read_bytes(), headers={
            "content-type": "application/json", "authorization": f"Bearer {target.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = json.loads(resp.read())
        calls = data["choices"][0]["message"].get("tool_calls") or []
        if len(calls) != 1:
            raise RuntimeError(f"{target.name}: expected the tool call back, got {data}")
        if target.name.startswith("authority"):
            act = data["authority"]["actions"][0]
            if (act["status"], act["dispatch"], act["mode"]) != ("allowed", "client",
                                                                  "auto_execute"):
                raise RuntimeError(f"authority: unexpected action outcome {act}")
        target.requests += 1

    def wrk(self, target: Target, connections: int, duration_s: float, *,
            stream: bool = False) -> WrkResult:
        direct = target.server is None
        if direct:  # the mock is the server under test: give it the server core
            pin_pid(self.mock.pid, {int(SERVER_CPU)})
        try:
            cmd = wrk_command(target.url, connections=connections, duration_s=duration_s,
                              script=HERE / target.script,
                              body=self.stream_body if stream else self.body,
                              token=target.token, cpu=WRK_CPU)
            before = cpu_seconds(target.server.pid) if target.server is not None else 0.0
            res, _ = run_wrk(cmd)
            if target.server is not None and res.requests:
                target.cpu_ms.append(
                    (cpu_seconds(target.server.pid) - before) * 1e3 / res.requests)
        finally:
            if direct:
                pin_pid(self.mock.pid, {int(WRK_CPU)})
        target.requests += res.requests
        return res

    def phase_matrix(self) -> None:
        auth, auth_url, _ = self.start_authority(self.policy, "authority.log")
        self.stack.callback(auth.stop)
        self.auth = auth
        keyed, keyed_url, _ = self.start_authority(self.keyed_policy(), "authority-keyed.log")
        self.stack.callback(keyed.stop)
        bare, bare_url = self.start_bare(fastapi=False)
        self.stack.callback(bare.stop)
        bare_fa, bare_fa_url = self.start_bare(fastapi=True)
        self.stack.callback(bare_fa.stop)
        targets = [Target("direct", f"{self.mock_url}/chat/completions", self.token, None),
                   Target("bare", f"{bare_url}/v1/chat/completions", self.token, bare),
                   Target("bare-fastapi", f"{bare_fa_url}/v1/chat/completions", self.token,
                          bare_fa),
                   Target("authority", f"{auth_url}/v1/chat/completions", self.token, auth),
                   Target("authority-keyed", f"{keyed_url}/v1/chat/completions", self.token,
                          keyed, script="keyed.lua")]
        self.litellm: Server | None = None
        if self.use_litellm:
            say("starting the LiteLLM proxy")
            try:
                ll, ll_url, ll_took = self.start_litellm()
            except RuntimeError as exc:
                # The gateway's own figures still stand; the comparison is reported missing.
                say(f"LiteLLM proxy did not start, continuing without it: {exc}")
                self.results["litellm_error"] = str(exc)[-2000:]
            else:
                self.stack.callback(ll.stop)
                self.litellm = ll
                self.results["litellm_start_s"] = ll_took
                targets.append(Target("litellm", f"{ll_url}/v1/chat/completions", LITELLM_KEY,
                                      ll))
        for t in targets:
            self.check_answer(t)
            self.wrk(t, 16, self.plan.warmup_s)
            self.wrk(t, 16, self.plan.warmup_s, stream=True)
        self.commands["wrk (each run)"] = (
            f"taskset -c {WRK_CPU} wrk -t1 -cC -d{max(1, round(self.plan.duration_s))}s --latency "
            "--timeout=10s -s benchmarks/body.lua URL -- WORK/body.json TOKEN   "
            "# C in 1 16 64; WORK/body-stream.json for the streamed runs")
        runs: dict[str, list[WrkResult]] = {}
        cpu: dict[str, list[float]] = {}  # the server's CPU ms per request, each run
        cases = [(c, False) for c in CONCURRENCY] + [(STREAM_CONCURRENCY, True)]
        for rep in range(self.plan.repeats):
            for conc, stream in cases:
                for t in targets:
                    say(f"rep {rep + 1}/{self.plan.repeats} {t.name:9} c={conc:<2} "
                        f"{'stream' if stream else 'json'}")
                    t.cpu_ms.clear()
                    res = self.wrk(t, conc, self.plan.duration_s, stream=stream)
                    runs.setdefault(f"{t.name}|{conc}|{int(stream)}", []).append(res)
                    cpu.setdefault(f"{t.name}|{conc}|{int(stream)}", []).extend(t.cpu_ms)
        self.results["matrix"] = {
            key: {"rps": median([r.rps for r in rs]), "p50_ms": median([r.p50_ms for r in rs]),
                  "p99_ms": median([r.p99_ms for r in rs]), "rps_min": min(r.rps for r in rs),
                  "rps_max": max(r.rps for r in rs), "errors": sum(r.errors for r in rs),
                  "requests": sum(r.requests for r in rs), "runs": len(rs),
                  "cpu_ms": median(cpu[key]) if cpu.get(key) else None}
            for key, rs in runs.items()}
        if self.litellm is not None:
            self.results["litellm_rss_kib"] = rss_kib(self.litellm.pid)
            self.litellm.stop()
        auth.stop()
        keyed.stop()
        bare.stop()
        bare_fa.stop()

    def phase_rss(self) -> None:
        """RSS of a fresh authority process after exactly-counted requests (wrk, c=16, run in
        slices until each checkpoint)."""
        srv, url, _ = self.start_authority(self.write_policy(self.work / "rss"), "rss.log")
        self.stack.callback(srv.stop)
        self.auth = srv
        t = Target("authority", f"{url}/v1/chat/completions", self.token, srv)
        rate = self.results["matrix"]["authority|16|0"]["rps"] or 300.0
        points: list[dict[str, Any]] = []
        for checkpoint in self.plan.rss_checkpoints:
            while t.requests < checkpoint:
                left = checkpoint - t.requests
                secs = min(max(left / rate, 1.0), 20.0)
                res = self.wrk(t, 16, secs)
                rate = res.rps or rate
                if res.errors:
                    self.results.setdefault("rss_errors", 0)
                    self.results["rss_errors"] += res.errors
            kib = rss_kib(self.auth.pid)
            points.append({"checkpoint": checkpoint, "requests": t.requests, "rss_kib": kib})
            say(f"authority RSS after {t.requests:,} requests: {kib / 1024:.1f} MiB")
        self.results["rss"] = points
        self.auth.stop()

    def phase_sdk(self) -> None:
        say("SDK overhead (AuthorityClient vs openai.OpenAI) and the growing conversation")
        folder = self.work / "sdk"
        policy = self.write_policy(folder)
        cmd = pinned([self.py, str(HERE / "sdk_bench.py"), "--policy", str(policy), "--calls",
                      str(self.plan.sdk_calls), "--convs", str(self.plan.sdk_convs), "--turns",
                      str(self.plan.turns)], WRK_CPU)
        self.commands["SDK"] = " ".join(cmd).replace(str(self.work), "WORK").replace(
            str(HERE), "benchmarks")
        pin_pid(self.mock.pid, {int(SERVER_CPU)})
        try:
            self.results["sdk"] = run_json(cmd, timeout_s=900, env=self.auth_env,
                                           on_line=lambda s: say(s.strip()))
        finally:
            pin_pid(self.mock.pid, {int(WRK_CPU)})

    def phase_micro(self) -> None:
        micro = str(HERE / "micro.py")
        audit = []
        for procs in (1, 4):
            for head in (False, True):
                say(f"audit appends, fsync on, {procs} process(es)"
                    f"{', chain head in the state store' if head else ''}")
                cmd = [self.py, micro, "audit", "--dir", str(self.work / "micro"), "--procs",
                       str(procs), "--seconds", str(self.plan.audit_s)]
                if head:
                    cmd.append("--head")
                audit.append(run_json(cmd, timeout_s=120))
        self.results["audit"] = audit
        say("state store: idem_begin, budget_reserve… (durable)")
        cmd = [self.py, micro, "store", "--dir", str(self.work / "micro"), "--n",
               str(self.plan.store_n)]
        self.results["store"] = run_json(cmd, timeout_s=300)
        say("the contract's least work per request (warm loop, the server's CPU)")
        cmd = pinned([self.py, micro, "floor", "--n", str(self.plan.store_n * 5)], SERVER_CPU)
        self.results["floor"] = run_json(cmd, timeout_s=300)
        say("import times (fresh interpreters)")
        cmd = [self.py, micro, "imports", "--runs", str(self.plan.import_runs)]
        self.results["imports"] = run_json(cmd, timeout_s=300)
        self.commands["micro"] = (f"{self.py} benchmarks/micro.py audit --dir WORK --procs 1|4 "
                                  f"--seconds {self.plan.audit_s:g} [--head]; … store --n "
                                  f"{self.plan.store_n}; … floor --n {self.plan.store_n * 5}"
                                  f" (taskset -c {SERVER_CPU}); … imports --runs "
                                  f"{self.plan.import_runs}")

    def conditions(self, when: str) -> None:
        self.results.setdefault("conditions", {})[when] = {
            "load_average": load_average(), "fdatasync": fsync_probe(self.work)}

    def run(self) -> None:
        self.conditions("before")
        with self.stack:
            self.setup()
            self.phase_startup()
            self.phase_matrix()
            self.phase_rss()
            self.phase_sdk()
            self.phase_micro()
        self.conditions("after")


# --------------------------------------------------------------------------- report


def goals(r: dict[str, Any]) -> list[Goal]:
    m = r.get("matrix", {})

    def cell(target: str, c: int, stream: bool = False) -> dict[str, Any] | None:
        found: dict[str, Any] | None = m.get(f"{target}|{c}|{int(stream)}")
        return found

    def val(d: dict[str, Any] | None, key: str) -> float | None:
        return None if d is None else float(d[key])

    out: list[Goal] = []
    b1, a1 = cell("bare", 1), cell("authority", 1)
    b64, a64 = cell("bare", 64), cell("authority", 64)
    k64, l64 = cell("authority-keyed", 64), cell("litellm", 64)
    out.append(Goal("at c=64 authority serve reaches ≥ 50 % of the bare forwarder",
                    100 * a64["rps"] / b64["rps"] if a64 and b64 and b64["rps"] else None,
                    50.0, "%", higher_is_better=True,
                    detail=f"{fmt(val(a64, 'rps'))} vs bare {fmt(val(b64, 'rps'))} req/s "
                           "(audit fsync on)"))
    out.append(Goal("at c=64 authority serve ≥ 10x LiteLLM",
                    a64["rps"] / l64["rps"] if a64 and l64 and l64["rps"] else None, 10.0, "x",
                    higher_is_better=True,
                    detail=f"{fmt(val(a64, 'rps'))} vs {fmt(val(l64, 'rps'))} req/s"))
    out.append(Goal("at c=1 the gateway adds ≤ 0.5 ms p50 over the bare forwarder",
                    a1["p50_ms"] - b1["p50_ms"] if a1 and b1 else None, 0.5, "ms",
                    detail=f"authority {fmt(val(a1, 'p50_ms'))} ms vs bare "
                           f"{fmt(val(b1, 'p50_ms'))} ms"))
    out.append(Goal("with an Idempotency-Key and budgets on every request, c=64 ≥ 35 % of bare",
                    100 * k64["rps"] / b64["rps"] if k64 and b64 and b64["rps"] else None,
                    35.0, "%", higher_is_better=True,
                    detail=f"{fmt(val(k64, 'rps'))} vs bare {fmt(val(b64, 'rps'))} req/s"))
    d1 = cell("direct", 1)
    out.append(Goal("proxy adds ≤ 2 ms at p50 over direct, concurrency 1",
                    a1["p50_ms"] - d1["p50_ms"] if a1 and d1 else None, 2.0, "ms",
                    detail=f"authority {fmt(val(a1, 'p50_ms'))} ms vs direct "
                           f"{fmt(val(d1, 'p50_ms'))} ms"))
    sdk = r.get("sdk")
    out.append(Goal("AuthorityClient adds ≤ 50 % to openai.OpenAI's per-call time "
                    "(1,000-token conversation, fsync on)",
                    100 * sdk["cold"]["added_p50_ms"] / sdk["cold"]["stock"]["p50_ms"]
                    if sdk else None, 50.0, "%",
                    detail=f"+{fmt(sdk['cold']['added_p50_ms'] if sdk else None)} ms on "
                           f"{fmt(sdk['cold']['stock']['p50_ms'] if sdk else None)} ms (new "
                           "conversation every call); resent conversation: +"
                           f"{fmt(sdk['warm']['added_p50_ms'] if sdk else None)} ms"))
    g = sdk["growing"] if sdk else None
    out.append(Goal("turn 50 costs the gate ≤ 1.5x turn 1",
                    g["ratio"] if g else None, 1.5, "x",
                    detail=f"{fmt(val(g, 'turn1_gate_ms'))} → {fmt(val(g, 'turn_last_gate_ms'))}"
                           " ms (engine, in-memory upstream)"))
    imp = r.get("imports")
    if imp:
        base = imp["openai"]["median_s"]
        worst = max(imp["authority_sdk"]["median_s"],
                    imp["authority_sdk.AuthorityClient"]["median_s"])
        out.append(Goal("import authority_sdk ≤ import openai + 0.2 s", worst - base, 0.2, "s",
                        detail=f"openai {fmt(base, 3)} s; authority_sdk "
                               f"{fmt(imp['authority_sdk']['median_s'], 3)} s; "
                               "AuthorityClient "
                               f"{fmt(imp['authority_sdk.AuthorityClient']['median_s'], 3)} s"))
    else:
        out.append(Goal("import authority_sdk ≤ import openai + 0.2 s", None, 0.2, "s"))
    rss = r.get("rss")
    if rss and len(rss) >= 2:
        growth = (rss[-1]["rss_kib"] / rss[0]["rss_kib"] - 1) * 100
        out.append(Goal(f"proxy RSS grows < 10 % from {rss[0]['checkpoint']:,} to "
                        f"{rss[-1]['checkpoint']:,} requests", growth, 10.0, "%",
                        detail=f"{rss[0]['rss_kib'] / 1024:.1f} → {rss[-1]['rss_kib'] / 1024:.1f}"
                               " MiB"))
    else:
        out.append(Goal("proxy RSS grows < 10 %", None, 10.0, "%"))
    return out


def mock_check(r: dict[str, Any]) -> Goal | None:
    m = r.get("matrix", {})
    direct = m.get("direct|64|0")
    proxies = [v["rps"] for k, v in m.items() if k.endswith("|64|0") and not k.startswith("direct")]
    if not direct or not proxies:
        return None
    return Goal("mock upstream is not the bottleneck: direct c=64 ≥ 10x the fastest proxy",
                direct["rps"] / max(proxies), 10.0, "x", higher_is_better=True,
                detail=f"direct {fmt(direct['rps'])} req/s")


def summary_table(r: dict[str, Any]) -> str:
    rows: list[list[str]] = []
    m = r.get("matrix", {})
    for conc in CONCURRENCY:
        d = m.get(f"direct|{conc}|0")
        for name in ("direct", "bare", "bare-fastapi", "authority", "authority-keyed",
                     "litellm"):
            c = m.get(f"{name}|{conc}|0")
            if not c:
                continue
            added = f"+{fmt(c['p50_ms'] - d['p50_ms'])}" if d and name != "direct" else ""
            cpu_ms = c.get("cpu_ms")
            rows.append([f"proxy c={conc}", name, f"{fmt(c['rps'])} req/s",
                         f"p50 {fmt(c['p50_ms'])} ms {added}".strip(),
                         f"p99 {fmt(c['p99_ms'])} ms",
                         f"CPU {fmt(cpu_ms)} ms/req" if cpu_ms is not None else "", _err(c)])
    d = m.get(f"direct|{STREAM_CONCURRENCY}|1")
    for name in ("direct", "authority", "litellm"):
        c = m.get(f"{name}|{STREAM_CONCURRENCY}|1")
        if c:
            rows.append([f"stream c={STREAM_CONCURRENCY}", name, f"{fmt(c['rps'])} req/s",
                         f"p50 {fmt(c['p50_ms'])} ms", f"p99 {fmt(c['p99_ms'])} ms", _err(c)])
    sdk = r.get("sdk")
    if sdk:
        for kind, label in (("cold", "new conversation"), ("warm", "resent conversation")):
            s = sdk[kind]
            rows.append([f"SDK per call ({label})", "openai.OpenAI",
                         f"p50 {fmt(s['stock']['p50_ms'])} ms",
                         f"p99 {fmt(s['stock']['p99_ms'])} ms", "", ""])
            rows.append([f"SDK per call ({label})", "AuthorityClient",
                         f"p50 {fmt(s['gated']['p50_ms'])} ms",
                         f"p99 {fmt(s['gated']['p99_ms'])} ms",
                         f"added p50 {fmt(s['added_p50_ms'])} ms",
                         f"added p99 {fmt(s['added_p99_ms'])} ms"])
        g = sdk["growing"]
        pt = g["per_turn"]
        rows.append(["growing conversation", "gate (engine)",
                     f"turn 1 {fmt(g['turn1_gate_ms'])} ms ({pt[0]['prompt_tokens']:,} tok)",
                     f"turn {g['turns']} {fmt(g['turn_last_gate_ms'])} ms "
                     f"({pt[-1]['prompt_tokens']:,} tok)", f"ratio {fmt(g['ratio'])}x", ""])
        rows.append(["growing conversation", "gate, fsync off (CPU only)",
                     f"turn 1 {fmt(pt[0]['cpu_ms'])} ms",
                     f"turn {g['turns']} {fmt(pt[-1]['cpu_ms'])} ms",
                     f"ratio {fmt(g['cpu_ratio'])}x", ""])
        rows.append(["growing conversation", "AuthorityClient e2e added",
                     f"turn 1 {fmt(pt[0]['e2e_added_ms'])} ms",
                     f"turn {g['turns']} {fmt(pt[-1]['e2e_added_ms'])} ms",
                     f"ratio {fmt(pt[-1]['e2e_added_ms'] / pt[0]['e2e_added_ms'])}x"
                     if pt[0]["e2e_added_ms"] > 0 else "", ""])
    for a in r.get("audit", []):
        rows.append([f"audit append, {a['procs']} proc" + ("" if a["procs"] == 1 else "s"),
                     "fsync on" + (" + head in store" if a["head_in_store"] else ""),
                     f"{fmt(a['entries_per_s'])} entries/s", f"p50 {fmt(a['p50_us'])} µs",
                     f"p99 {fmt(a['p99_us'])} µs", ""])
    for op, s in (r.get("store") or {}).items():
        rows.append(["state store (durable)", op, f"p50 {fmt(s['p50_us'])} µs",
                     f"p99 {fmt(s['p99_us'])} µs", "", ""])
    for name, s in (r.get("imports") or {}).items():
        rows.append(["import (fresh interpreter)", name, f"median {fmt(s['median_s'], 3)} s",
                     f"min {fmt(s['min_s'], 3)} s", "", ""])
    if "serve_start_s" in r:
        rows.append(["start-up", "authority serve → /healthz 200",
                     f"median {fmt(r['serve_start_s']['median'])} s",
                     "runs " + ", ".join(fmt(x) for x in r["serve_start_s"]["runs"]), "", ""])
    if "litellm_start_s" in r:
        rows.append(["start-up", "litellm → /health/liveliness 200",
                     f"{fmt(r['litellm_start_s'])} s", "", "", ""])
    for p in r.get("rss", []):
        rows.append(["memory", f"authority RSS after {p['requests']:,} requests",
                     f"{p['rss_kib'] / 1024:.1f} MiB", "", "", ""])
    if "litellm_rss_kib" in r:
        rows.append(["memory", "litellm RSS after its runs",
                     f"{r['litellm_rss_kib'] / 1024:.1f} MiB", "", "", ""])
    width = max(len(row) for row in rows) if rows else 6
    return markdown_table(["measurement", "subject", "figure", *[""] * (width - 3)],
                          [row + [""] * (width - len(row)) for row in rows])


def cpu_note(r: dict[str, Any]) -> list[str]:
    """The c=64 ratios again from the servers' CPU per request, which does not move with
    the shared machine's load as throughput does (a server pinned to one core and
    saturated serves about 1 / its CPU per request)."""
    m = r.get("matrix", {})
    cpu = {name: (m.get(f"{name}|64|0") or {}).get("cpu_ms")
           for name in ("bare", "authority", "authority-keyed", "litellm")}
    bare = cpu["bare"]
    if not bare or not cpu["authority"]:
        return []
    parts = [f"{name} {fmt(ms)} ms ({100 * bare / ms:.1f} % of bare's rate)"
             for name, ms in cpu.items() if ms and name != "bare"]
    return [f"CPU per request at c=64 (each server's own, from /proc): bare {fmt(bare)} ms; "
            + "; ".join(parts) + ".", ""]


def floor_note(r: dict[str, Any]) -> list[str]:
    """What goals 2 and 4 leave the gateway's own work, against the least work the contract
    asks of it (``micro.py floor``). A saturated server on one core serves about 1 / its
    CPU per request, so reaching a share s of the bare forwarder's rate leaves the
    gateway (1/s - 1) times the forwarder's own CPU per request on top of the forwarding."""
    bare = ((r.get("matrix", {}).get("bare|64|0")) or {}).get("cpu_ms")
    floor = r.get("floor") or {}
    total = floor.get("total_p50_us")
    if not bare or not total:
        return []
    parts = {"the body parsed strictly": "parse_body",
             "two chained audit entries sealed and encoded": "audit_entries",
             "the answer read and the response encoded": "read_answer_and_respond"}
    steps = ", ".join(f"{what} {fmt(floor[key]['p50_us'])} µs" for what, key in parts.items()
                      if key in floor)
    budgets = "; ".join(
        f"goal {goal} ({share:.0%} of bare) leaves {fmt(bare * 1e3 * (1 / share - 1))} µs, "
        f"the floor is {100 * total / (bare * 1e3 * (1 / share - 1)):.0f} % of it"
        for goal, share in ((2, 0.5), (4, 0.35)))
    return [f"The contract's least work per request, in a warm loop on the server's core "
            f"(`micro.py floor`: {steps}; no authentication, policy, pricing, logs or HTTP): "
            f"**{fmt(total)} µs**. The bare forwarder spends {fmt(bare * 1e3)} µs of CPU on a "
            f"request at c=64; {budgets}. In the server the same code runs colder than in "
            f"the loop (benchmarks/README.md).", ""]


def _err(c: dict[str, Any]) -> str:
    return f"{c['errors']} errors" if c["errors"] else ""


def render(r: dict[str, Any], info: dict[str, str], commands: dict[str, str], quick: bool,
           elapsed_s: float) -> str:
    gs = goals(r)
    check = mock_check(r)
    lines = ["# Benchmark results", "",
             f"`make bench`{' --quick (smoke run: short, not for conclusions)' if quick else ''}"
             f", {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, took {elapsed_s / 60:.1f}"
             " min. Figures are medians of interleaved runs; ratios compare figures from this "
             "same run.", "", "## Goals", "",
             markdown_table(["goal", "measured", "target", "ratio", "status", "detail"],
                            goal_rows(gs + ([check] if check else []))), "",
             *cpu_note(r), *floor_note(r), "## All figures", "", summary_table(r), ""]
    body = r.get("body", {})
    lines += ["Request body: a support-agent conversation of "
              f"{body.get('messages', '?')} messages, {body.get('prompt_tokens', '?')} prompt "
              f"tokens (gpt-4o-mini, o200k), {body.get('bytes', '?')} bytes, one tool declared; "
              "the mock answers one tool call and a usage block. Authority policy: "
              "`benchmarks/policy.yaml` (model allowed, cost ceiling, the tool call "
              "client-dispatched auto_execute, audit fsync on, key authentication).", ""]
    sdk = r.get("sdk")
    if sdk:
        lines += ["## Growing conversation (per turn, medians)", "",
                  markdown_table(["turn", "prompt tokens", "body bytes", "gate ms",
                                  "of which begin ms", "gate ms, fsync off",
                                  "of which begin ms, fsync off",
                                  "AuthorityClient e2e added ms"],
                                 [[str(t["turn"]), f"{t['prompt_tokens']:,}",
                                   f"{t['body_bytes']:,}", fmt(t["gate_ms"]),
                                   fmt(t["begin_ms"]), fmt(t["cpu_ms"]),
                                   fmt(t["cpu_begin_ms"]), fmt(t["e2e_added_ms"])]
                                  for t in sdk["growing"]["per_turn"]
                                  if t["turn"] in (1, 2, 5, 10, 20, 30, 40, 50)]), ""]
    m = r.get("matrix", {})
    if m:
        lines += ["## Proxy runs (spread over repeats)", "",
                  markdown_table(["target|concurrency|stream", "runs", "req/s median",
                                  "req/s min-max", "p50 ms", "p99 ms", "requests", "errors"],
                                 [[k, str(v["runs"]), fmt(v["rps"]),
                                   f"{fmt(v['rps_min'])}-{fmt(v['rps_max'])}", fmt(v["p50_ms"]),
                                   fmt(v["p99_ms"]), f"{v['requests']:,}", str(v["errors"])]
                                  for k, v in m.items()]), ""]
    cond = [[f"{when}: load average (1/5/15 min)", c["load_average"]] for when, c in
            r.get("conditions", {}).items()]
    cond += [[f"{when}: fdatasync of a 300-byte append in the work dir",
              f"p50 {fmt(c['fdatasync']['p50_us'])} µs, p99 {fmt(c['fdatasync']['p99_us'])} µs"]
             for when, c in r.get("conditions", {}).items()]
    lines += ["## Machine", "", markdown_table(["", ""], [[k, v] for k, v in info.items()]
                                                + cond), "",
              "## Commands", "", "Reproduce with `make bench` (or `.venv/bin/python "
              "benchmarks/run.py [--quick]`). What the run executes (PORT and WORK are chosen "
              "per run):", "", "```"]
    lines += [f"# {k}\n{v}" for k, v in commands.items()]
    lines += ["```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM proxy")
    ap.add_argument("--out", type=Path, help="where to write the results (markdown)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, audit)")
    args = ap.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is not installed: run `sh benchmarks/ensure_wrk.sh` (make bench does)",
              file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    # On the repository's disk, not /tmp: a tmpfs would make fsync free and the figures lie.
    work = HERE / ".work" / time.strftime("run-%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (HERE / ".work" / "RESULTS-quick.md" if args.quick
                       else HERE / "RESULTS.md")
    t0 = time.perf_counter()
    bench = Bench(plan, work, litellm=not args.no_litellm)
    info = machine_info(work)
    failed: BaseException | None = None
    try:
        bench.run()
    except (Exception, KeyboardInterrupt) as exc:
        failed = exc
        say(f"run failed: {type(exc).__name__}: {exc}; reporting what was measured")
    (work / "results.json").write_text(json.dumps(bench.results, indent=1, default=str))
    text = render(bench.results, info, bench.commands, args.quick, time.perf_counter() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print()
    print(markdown_table(["goal", "measured", "target", "ratio", "status", "detail"],
                         goal_rows(goals(bench.results))))
    print()
    print(summary_table(bench.results))
    print(f"\nwritten to {out}")
    if not args.keep and failed is None:
        shutil.rmtree(work, ignore_errors=True)
    elif failed is not None:
        print(f"logs kept in {work}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
