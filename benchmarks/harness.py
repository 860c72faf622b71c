"""Helpers for the benchmark run: wrk output parsing, statistics, processes, goals.

The pure functions (``parse_wrk``, ``percentile``, ``median``, ``evaluate``…)
are covered by ``tests/test_benchmarks_smoke.py`` so the bench code cannot rot.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0…100) of unsorted values."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within 0…100, got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


# --------------------------------------------------------------------------- wrk

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DURATION = re.compile(r"^([\d.]+)(us|ms|s|m|h)$")


def _to_ms(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def parse_wrk(text: str) -> WrkResult:
    """Parse ``wrk --latency`` output. Raises ValueError when a required line is missing."""
    pct: dict[int, float] = {}
    for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", text, re.M):
        pct[int(m.group(1))] = _to_ms(m.group(2))
    if set(pct) != {50, 75, 90, 99}:
        raise ValueError("wrk output has no latency distribution (was --latency given?)")
    done = re.search(r"^\s*(\d+) requests in ([\d.]+\w+),", text, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not done or not rps:
        raise ValueError("wrk output has no request totals")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = ({k: int(v) for k, v in zip(("connect", "read", "write", "timeout"), sock.groups(),
                                         strict=True)} if sock else {})
    return WrkResult(
        requests=int(done.group(1)), duration_s=_to_ms(done.group(2)) / 1000,
        rps=float(rps.group(1)), p50_ms=pct[50], p75_ms=pct[75], p90_ms=pct[90], p99_ms=pct[99],
        non_2xx=int(non2xx.group(1)) if non2xx else 0, socket_errors=errors,
    )


def wrk_command(url: str, *, connections: int, duration_s: float, script: Path, body: Path,
                token: str = "", cpu: str | None = None, timeout_s: float = 10) -> list[str]:
    # One thread: it is pinned to one core, the server gets the other. wrk takes whole
    # seconds only.
    secs = max(1, math.ceil(duration_s - 1e-9))
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{secs}s", "--latency",
           f"--timeout={max(1, math.ceil(timeout_s))}s", "-s", str(script), url, "--", str(body)]
    if token:
        cmd.append(token)
    return pinned(cmd, cpu)


def run_wrk(cmd: list[str]) -> tuple[WrkResult, str]:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout}")
    return parse_wrk(out.stdout), out.stdout


# --------------------------------------------------------------------------- processes


def can_pin() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(cmd: list[str], cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu, *cmd] if cpu is not None and can_pin() else cmd


def pin_pid(pid: int, cpus: set[int]) -> None:
    """Move a running process's threads to ``cpus`` (no-op where pinning is not possible)."""
    if not can_pin():
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(int(tid), cpus)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout_s: float = 1.0, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


class Server:
    """A child process we started, in its own session, stopped by its own pid."""

    def __init__(self, name: str, cmd: list[str], *, log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log
        self._log: IO[bytes] = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=cwd,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_healthy(self, url: str, timeout_s: float = 60.0, interval_s: float = 0.01,
                     headers: dict[str, str] | None = None) -> float:
        """Seconds from spawn until ``url`` answers 200."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"log:\n{self.tail_log()}")
            if http_status(url, timeout_s=1.0, headers=headers) == 200:
                return time.perf_counter() - self.started
            time.sleep(interval_s)
        raise RuntimeError(f"{self.name} not healthy after {timeout_s}s; log:\n{self.tail_log()}")

    def wait_listening(self, port: int, timeout_s: float = 60.0) -> float:
        """Seconds from spawn until a TCP connection to ``port`` is accepted (a server with no
        health route of its own)."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"log:\n{self.tail_log()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return time.perf_counter() - self.started
            except OSError:
                time.sleep(0.01)
        raise RuntimeError(f"{self.name} not listening after {timeout_s}s")

    def tail_log(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                # Our own session: workers it forked go with it.
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout_s)
            except ProcessLookupError:
                pass
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mock(log: Path, cpu: str | None) -> tuple[Server, int]:
    here = Path(__file__).resolve().parent
    srv = Server("mock upstream", pinned([sys.executable, str(here / "mock_upstream.py"),
                                          "--port", "0"], cpu), log=log)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        m = re.search(r"READY (\d+)", text)
        if m:
            return srv, int(m.group(1))
        if srv.proc.poll() is not None:
            break
        time.sleep(0.02)
    srv.stop()
    raise RuntimeError(f"mock upstream did not start:\n{srv.tail_log()}")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _tree(pid: int) -> Iterator[int]:
    """``pid`` and all its descendants (uvicorn workers are children)."""
    stack = [pid]
    while stack:
        p = stack.pop()
        yield p
        stack.extend(_children(p))


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants, in KiB."""
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f
                               if line.startswith("VmRSS:")), 0)
        except OSError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants so far (0 where /proc is
    not there). CPU per request does not depend on what else the machine runs, as
    throughput on a shared machine does."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


# --------------------------------------------------------------------------- machine


def machine_info(work_dir: Path) -> dict[str, str]:
    info: dict[str, str] = {
        "nproc": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "memory": _mem_total(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "work dir filesystem": _fs_of(work_dir),
        "wrk": _wrk_version(),
        "pinning": "taskset (wrk and mock on CPU 0, proxy under test on CPU 1)"
        if can_pin() else "none (taskset missing or a single CPU)",
    }
    info["code"] = _git_state(work_dir)
    from importlib import metadata

    for pkg in ("ai-authority-gateway", "openai", "httpx", "fastapi", "uvicorn", "uvloop",
                "httptools", "pydantic", "diskcache", "tiktoken", "litellm"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    return info


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def fsync_probe(directory: Path, n: int = 300) -> dict[str, float]:
    """fdatasync latency of 300-byte appends in ``directory``: what every durable write pays."""
    path = directory / ".fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    lat: list[float] = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 299 + b"\n")
            t = time.perf_counter()
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    return {"p50_us": percentile(lat, 50) * 1e6, "p99_us": percentile(lat, 99) * 1e6}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _fs_of(path: Path) -> str:
    best, fs = "", "unknown"
    try:
        target = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, kind = line.split()[:3]
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, fs = mnt, f"{kind} ({dev} on {mnt})"
    except OSError:
        pass
    return fs


def _git_state(path: Path) -> str:
    """The commit measured, and which files (other than the results) were uncommitted."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=False, timeout=10)
        status = subprocess.run(["git", "-C", str(path), "status", "--porcelain"],
                                capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = head.stdout.strip()
    if not commit:
        return "unknown (not a git checkout)"
    changed = [line[3:] for line in status.stdout.splitlines()
               if line[3:] and not line[3:].endswith("benchmarks/RESULTS.md")]
    if not changed:
        return commit
    shown = ", ".join(changed[:5]) + (f" (+{len(changed) - 5} more)" if len(changed) > 5 else "")
    return f"{commit} + uncommitted changes: {shown}"


def _wrk_version() -> str:
    if not shutil.which("wrk"):
        return "missing"
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip() if first else "unknown"


# --------------------------------------------------------------------------- goals


@dataclass(frozen=True)
class Goal:
    name: str
    measured: float | None
    target: float
    unit: str
    higher_is_better: bool = False
    detail: str = ""

    @property
    def status(self) -> str:
        if self.measured is None or math.isnan(self.measured):
            return "NOT MEASURED"
        ok = self.measured >= self.target if self.higher_is_better else self.measured <= self.target
        return "PASS" if ok else "MISS"

    @property
    def ratio(self) -> float | None:
        """measured / target: ≤ 1 passes a ceiling, ≥ 1 passes a floor."""
        if self.measured is None or math.isnan(self.measured) or self.target == 0:
            return None
        return self.measured / self.target


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def goal_rows(goals: Sequence[Goal]) -> list[list[str]]:
    rows = []
    for g in goals:
        op = "≥" if g.higher_is_better else "≤"
        rows.append([g.name, f"{fmt(g.measured)} {g.unit}", f"{op} {fmt(g.target)} {g.unit}",
                     fmt(g.ratio), g.status, g.detail])
    return rows


def run_json(cmd: list[str], *, timeout_s: float, env: dict[str, str] | None = None,
             on_line: Callable[[str], None] | None = None) -> Any:
    """Run a helper that prints progress on stderr and one JSON document last on stdout."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False,
                         env={**os.environ, **(env or {})})
    if on_line:
        for line in out.stderr.splitlines():
            on_line(line)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
