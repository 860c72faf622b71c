"""What one keyed, budgeted request sends PostgreSQL: statements, round trips, commits.

    .venv/bin/python benchmarks/pg_count.py      # needs a local server it may read the log of

The figures pg_bench.py measures with noise, counted without any: the gate per turn of
pg_bench (``Engine.begin_d`` + ``complete_d``, an Idempotency-Key per request, budgets on
the environment and the key, the audit chain in the database) runs a few turns on a
database of its own whose sessions log every statement (``log_statement = all`` given as a
connection option, so nothing else on the server changes), and the server's log is read
back. Round trips are counted on the client's sockets (``ss``: the data segments the
server sent, one per answer the client waited for); a commit is a transaction block's
``COMMIT`` or an autocommitted write (a statement outside a block, or a relaxed one
sent with its ``set_config``); a *flushed* commit waits for its WAL on disk
(``synchronous_commit`` not turned off in it).

Needs superuser rights (``log_statement`` is a superuser setting) and the log file
(``AUTHORITY_COUNT_PG_LOG``, default Debian's). Prints a table per driver.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import pg_bench  # noqa: E402

PG_DSN = os.environ.get("AUTHORITY_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
LOG = Path(os.environ.get("AUTHORITY_COUNT_PG_LOG",
                          "/var/log/postgresql/postgresql-15-main.log"))
DB = "authority_pg_count"
TURNS = int(os.environ.get("PG_COUNT_TURNS", "10"))
# "<ts> UTC [pid] user@db LOG:  statement: SQL" or "... LOG:  execute <unnamed>: SQL"
_LINE = re.compile(r"\[(\d+)\] \S*@(\S+) LOG:  (?:statement|execute [^:]*): (.*)$")
# The parameters of an extended-protocol statement, on a DETAIL line of their own.
_PARAMS = re.compile(r"\[(\d+)\] \S*@(\S+) DETAIL:  parameters: (.*)$")
# Server-side functions that commit without the WAL flush when their first argument is true
# (schema version 4: the state batch, the audit append of a sink without fsync).
_RELAXED_INSIDE = "/* relaxed inside */"
_RELAXING = re.compile(r"^SELECT authority_(state_batch|audit_append)\(\$1\b", re.I)
# (A WITH that calls the server-side functions: the writes that ride with an audit append.)
_WRITE = re.compile(r"^\s*(WITH\b.*\b(INSERT|UPDATE|DELETE|authority_\w+\()|INSERT|UPDATE|"
                    r"DELETE|SELECT\s+authority_\w+\()", re.S | re.I)


def _dsn(base: str, db: str, options: str = "") -> str:
    head, _, _ = base.rpartition("/")
    return f"{head}/{db}" + (f"?options={options}" if options else "")


def _setup() -> tuple[str, str]:
    """The database and a fresh schema in it; its DSN without and with statement logging."""
    import psycopg

    from authority_sdk.store.pg_schema import migrate

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB,)).fetchone():
            conn.execute(f"CREATE DATABASE {DB}")
    plain = _dsn(PG_DSN, DB)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS count CASCADE")
        conn.execute("CREATE SCHEMA count")
    with psycopg.connect(_dsn(PG_DSN, DB, "-csearch_path%3Dcount"), autocommit=True) as conn:
        migrate(conn)
    return plain, _dsn(PG_DSN, DB, "-csearch_path%3Dcount%20-clog_statement%3Dall")


def server_answers(field: str = "data_segs_in") -> int:
    """Data segments this process received from the server, over all its connections. The
    server flushes its answers at each Sync (or simple query, or Flush) and the client
    waits for each: their count is the number of round trips. (Not the segments sent: a
    pipeline goes out in several sends without waiting in between; ``data_segs_out``
    counts those sends.)"""
    import subprocess

    out = subprocess.run(["ss", "-tinpH", f"dport = :{_port()}"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    total, mine = 0, False
    for line in out:
        if "users:" in line or line[:1].isalpha():
            mine = f"pid={os.getpid()}," in line
        elif mine and (m := re.search(rf"{field}:(\d+)", line)):
            total += int(m.group(1))
    return total


def _port() -> int:
    m = re.search(r":(\d+)/", PG_DSN)
    return int(m.group(1)) if m else 5432


def _parse(text: str) -> list[tuple[str, str]]:
    """(pid, statement) for each statement of this database, in log order; a statement's
    continuation lines (multi-line SQL) are folded into it."""
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        m = _LINE.search(line)
        if m:
            if m.group(2) == DB:
                out.append((m.group(1), m.group(3)))
        elif (d := _PARAMS.search(line)) is not None:
            if d.group(2) == DB and out and out[-1][0] == d.group(1) \
                    and _RELAXING.match(out[-1][1]) and d.group(3).startswith("$1 = 't'"):
                out[-1] = (out[-1][0], out[-1][1] + " " + _RELAXED_INSIDE)
        elif line.startswith(("\t", " ")) and out:
            out[-1] = (out[-1][0], out[-1][1] + " " + line.strip())
    return out


def _statements(sql: str) -> list[str]:
    """The statements of one simple query, split at semicolons outside quoted literals."""
    out, cur, quoted = [], [], False
    for ch in sql:
        if ch == "'":
            quoted = not quoted  # '' (an escaped quote) toggles twice
        if ch == ";" and not quoted:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return [s for s in out if s]


def _split(statements: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Several statements sent as one simple query (a relaxed statement with its relax, an
    audit append) are one line of the log: back into statements."""
    return [(pid, one) for pid, sql in statements for one in _statements(sql)]


def tally(statements: list[tuple[str, str]]) -> dict[str, int]:
    """Round trips, statements, commits and flushed commits, per session in order."""
    c: Counter[str] = Counter()
    state: dict[str, dict[str, bool]] = {}
    for pid, sql in _split(statements):
        s = state.setdefault(pid, {"tx": False, "wrote": False, "relaxed": False})
        head = sql.strip().upper()
        c["server statements (with BEGIN/COMMIT)"] += 1
        if head.startswith("BEGIN"):
            s.update(tx=True, wrote=False, relaxed=False)
            continue
        if head.startswith(("COMMIT", "ROLLBACK")):
            if head.startswith("COMMIT") and s["wrote"]:
                c["commits"] += 1
                c["flushed commits"] += not s["relaxed"]
            s.update(tx=False, wrote=False, relaxed=False)
            continue
        c["statements"] += 1
        if "SYNCHRONOUS_COMMIT" in head and "OFF" in head:
            # In a transaction block: until its end. Outside one: the store sends it with
            # the next statement as one simple query (one implicit transaction).
            s["relaxed"] = True
            continue
        if _RELAXED_INSIDE.upper() in head:
            s["relaxed"] = True
        write = bool(_WRITE.match(sql)) or "SELECT PG_NOTIFY" in head
        if s["tx"]:
            s["wrote"] = s["wrote"] or write
        else:
            if write:
                c["commits"] += 1
                c["flushed commits"] += not s["relaxed"]
            s["relaxed"] = False
    return dict(c)


def main() -> int:
    from mock_upstream import completion_body

    from authority_sdk.engine import Engine

    _, logged = _setup()
    os.environ[pg_bench.DSN_ENV] = logged
    work = HERE / ".work" / "pg-count"
    answer = json.dumps(completion_body()).encode()
    engine = Engine(pg_bench.write_policy(work, "postgres", "http://127.0.0.1:9/v1"))
    loop = asyncio.new_event_loop()
    report: dict[str, Any] = {}
    try:
        pg_bench._turns_sync(engine, 5, "warm", answer)
        loop.run_until_complete(pg_bench._turns_async(engine, 5, "warm-a", answer))
        for name in ("sync", "async"):
            time.sleep(0.3)
            start = LOG.stat().st_size
            sends = server_answers()
            outs = server_answers("data_segs_out")
            if name == "sync":
                pg_bench._turns_sync(engine, TURNS, f"count-{time.time()}", answer)
            else:
                loop.run_until_complete(pg_bench._turns_async(engine, TURNS,
                                                              f"count-a-{time.time()}", answer))
            sends = server_answers() - sends
            outs = server_answers("data_segs_out") - outs
            time.sleep(0.3)  # the server writes its log asynchronously
            with LOG.open("rb") as f:
                f.seek(start)
                stmts = _parse(f.read().decode("utf-8", "replace"))
            total = tally(stmts)
            total["round trips"] = sends
            total["client sends"] = outs
            report[name] = {k: v / TURNS for k, v in sorted(total.items())}
            if "-vv" in sys.argv:
                for pid, sql in stmts:
                    print(f"[{pid}] {re.sub(r'[ ]+', ' ', sql)[:120]}")
            elif "-v" in sys.argv:
                seen: Counter[str] = Counter(re.sub(r"\s+", " ", s)[:150] for _, s in stmts)
                for sql, n in seen.most_common():
                    print(f"{n / TURNS:5.1f}  {sql}")
    finally:
        loop.run_until_complete(engine.store.aio.aclose())
        loop.close()
        engine.close()
    print(json.dumps({"per keyed request": report}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
