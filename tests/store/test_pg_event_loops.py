"""An async SDK app on the PostgreSQL store across several event loops (issue 14): each
``asyncio.run`` gets a pool of its own; closing the client closes that loop's pool on its
loop, a pool whose loop is gone is discarded without awaiting it, and closing the
gateway closes whatever is left — no connection outlives its owner, nothing hangs at
exit, no "event loop is closed" noise.

The app runs in a child process with a timeout, so a hang fails this test, not the suite.
Its async connections are followed by backend pid in ``pg_stat_activity`` (other tests
on the same server cannot disturb the count)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import PG_DSN, PostgresBackend, ScriptedServer, requires_postgres, write_policy_file

pytestmark = requires_postgres()

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent

# The app: three asyncio.run(...) calls on one Gateway; the client closed (async with) or
# left open. Prints, as JSON, its async backends per run and which were still alive after
# that run, after the next run, and after gw.close().
APP = textwrap.dedent("""
    import asyncio, json, sys, time
    import psycopg
    from helpers import PG_DSN, user
    from authority_sdk import AsyncAuthorityClient, Gateway

    policy, close_client = sys.argv[1], sys.argv[2] == "close"
    gw = Gateway(policy)

    def alive(pids):
        # A backend goes a moment after its socket closes.
        deadline = time.monotonic() + 3.0
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            while True:
                rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)",
                                    (sorted(pids),)).fetchall()
                if not rows or time.monotonic() > deadline:
                    return sorted(r[0] for r in rows)
                time.sleep(0.1)

    async def async_pids():
        # This loop's pool, its connections all back in it once the call is answered.
        pool = await gw.store.aio._get_pool()
        return {c.info.backend_pid for c in pool._pool}

    async def one_call():
        client = AsyncAuthorityClient(gateway=gw, environment="prod", max_retries=0)
        r = await client.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))
        assert r.choices[0].message.content, r
        pids = await async_pids()
        if close_client:
            await client.close()
        return pids

    runs = []
    for _ in range(3):
        pids = asyncio.run(one_call())
        assert pids, "the call used no async connection"
        runs.append({"pids": sorted(pids), "alive_after_run": alive(pids)})
    for earlier, later in zip(runs, runs[1:]):
        earlier["alive_after_next_run"] = alive(set(earlier["pids"]))
    every = {p for r in runs for p in r["pids"]}
    gw.close()
    print(json.dumps({"runs": runs, "alive_after_gateway_close": alive(every)}))
""")


def _run_app(tmp_path: Path, upstream: ScriptedServer, pg: PostgresBackend,
             mode: str) -> tuple[dict[str, Any], str]:
    policy = write_policy_file(tmp_path, upstream, pg.policy_overrides())
    script = tmp_path / "app.py"
    script.write_text(APP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
           "PYTHONWARNINGS": "default"}
    try:
        out = subprocess.run([sys.executable, str(script), str(policy), mode], env=env,
                             capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the app hung (killed after {exc.timeout}s): {exc.stderr!r}")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


# What a pool torn down on the wrong loop (or never) prints.
POOL_NOISE = ("Event loop is closed", "Task was destroyed", "was never awaited", "psycopg")


def _quiet(stderr: str, noise: tuple[str, ...] = POOL_NOISE) -> None:
    for text in noise:
        assert text not in stderr, stderr


_UNCLOSED = re.compile(r"ResourceWarning: unclosed (?:<socket\.socket fd=(\d+).*raddr=\("
                       r"'[^']*', (\d+)\)|transport <_SelectorSocketTransport fd=(\d+))")


def _db_port() -> int:
    from psycopg.conninfo import conninfo_to_dict

    return int(conninfo_to_dict(PG_DSN).get("port") or 5432)


def _without_foreign_sockets(stderr: str, db_port: int) -> str:
    """``stderr`` without the warnings about sockets to anything but the database (the
    app's own HTTP client, left open on purpose): such a warning names the line the
    garbage collector happened to run on, which may be inside psycopg."""
    foreign: set[str] = set()
    kept: list[str] = []
    dropping = False
    for line in stderr.splitlines():
        m = _UNCLOSED.search(line)
        if m is not None:
            fd, port, transport_fd = m.groups()
            if fd is not None and int(port) != db_port:
                foreign.add(fd)
            dropping = (fd or transport_fd) in foreign
        elif line.startswith("ResourceWarning: Enable tracemalloc") or line.startswith(" "):
            pass  # a continuation of the warning above: kept or dropped with it
        else:
            dropping = False
        if not dropping:
            kept.append(line)
    return "\n".join(kept)


def test_closing_the_async_client_closes_its_loops_pool(tmp_path: Path,
                                                        upstream: ScriptedServer,
                                                        pg: PostgresBackend) -> None:
    report, stderr = _run_app(tmp_path, upstream, pg, "close")
    runs = report["runs"]
    assert len({tuple(r["pids"]) for r in runs}) == 3  # one pool per loop
    for run in runs:
        assert run["alive_after_run"] == [], run
    assert report["alive_after_gateway_close"] == []
    _quiet(stderr, (*POOL_NOISE, "ResourceWarning"))  # everything closed: nothing unclosed


def test_a_pool_left_on_a_finished_loop_is_discarded_and_the_gateway_closes_the_last(
        tmp_path: Path, upstream: ScriptedServer, pg: PostgresBackend) -> None:
    report, stderr = _run_app(tmp_path, upstream, pg, "open")
    runs = report["runs"]
    # Nobody closed the first two loops' pools: the next loop's first call discarded them.
    for run in runs[:-1]:
        assert run["alive_after_next_run"] == [], run
    assert report["alive_after_gateway_close"] == []
    # (The app's own HTTP client, never closed, may warn about its socket: not the pool's.)
    _quiet(_without_foreign_sockets(stderr, _db_port()))


# asyncio.run returning while the pool's first connection is still being made: asyncio.run
# cancels every task, and a pool worker cancelled mid-connect schedules another attempt.
OPENING = textwrap.dedent("""
    import asyncio, sys
    from authority_sdk.store.postgres import PgStore

    store = PgStore(sys.argv[1])

    async def main():
        await store.aio._get_pool()  # opened: its first connection is made in the background

    for _ in range(3):
        asyncio.run(main())
    store.close()
    print("done")
""")


def test_a_loop_that_ends_while_its_pool_connects_does_not_hang(tmp_path: Path,
                                                                 pg: PostgresBackend) -> None:
    script = tmp_path / "opening.py"
    script.write_text(OPENING)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        out = subprocess.run([sys.executable, str(script), pg.dsn], env=env,
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"asyncio.run hung at its teardown (killed after {exc.timeout}s)")
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
    for text in ("Event loop is closed", "Task was destroyed", "was never awaited"):
        assert text not in out.stderr, out.stderr


def _alive(pids: set[int]) -> set[int]:
    import psycopg  # the postgres extra: absent, requires_postgres skips the module

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)",
                            (sorted(pids),)).fetchall()
    return {r[0] for r in rows}


def _gone(pids: set[int]) -> bool:
    deadline = time.monotonic() + 5
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pids)


def test_a_closed_view_serves_the_next_call_on_a_new_pool(pg: PostgresBackend) -> None:
    store = pg.open()
    try:
        async def go() -> tuple[set[int], set[int]]:
            await store.aio.health()
            first = {c.info.backend_pid for c in (await store.aio._get_pool())._pool}
            await store.aio.aclose()
            await store.aio.health()  # not PoolClosed: a pool of its own for this loop
            second = {c.info.backend_pid for c in (await store.aio._get_pool())._pool}
            return first, second

        first, second = asyncio.run(go())
        assert first and second and not first & second
        assert _gone(first)
    finally:
        store.close()
    assert _gone(second)


def test_closing_the_store_from_another_thread_closes_the_pool_on_its_running_loop(
        pg: PostgresBackend) -> None:
    store = pg.open()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        async def call() -> set[int]:
            await store.aio.health()
            return {c.info.backend_pid for c in (await store.aio._get_pool())._pool}

        pids = asyncio.run_coroutine_threadsafe(call(), loop).result(30)
        assert pids and _alive(pids) == pids
        store.close()  # the loop still runs: the pool is closed there, workers and all
        assert _gone(pids)
        # Nothing of the pool is left running on that loop to reconnect.
        leftovers = asyncio.run_coroutine_threadsafe(_other_tasks(), loop).result(10)
        assert leftovers == [], leftovers
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _other_tasks() -> list[str]:
    await asyncio.sleep(0.5)  # the close has run
    me = asyncio.current_task()
    return [repr(t) for t in asyncio.all_tasks() if t is not me]
