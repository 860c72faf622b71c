"""Test helpers shared across the suite: the scripted model on loopback, policy files, audit
reading, request shorthands, state backends. Fixtures live in conftest.py; this is a plain
module, so test files (and tests/libs, which has its own conftest) import it without a
name clash."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from servers import free_port

from authority_sdk.scripted import ScriptedModel, build_app

T = TypeVar("T")

__all__ = ["AUDIT_SINKS", "BASE_POLICY", "PG_DSN", "STORE_BACKENDS", "AuditSinkBackend",
           "PostgresBackend", "ScriptedServer", "StoreBackend", "audit_entries", "concurrently",
           "deep_merge", "free_port", "pg_dsn", "postgres_unavailable", "requires_postgres",
           "schema_at", "tool", "user", "write_policy_file"]


class ScriptedServer:
    def __init__(self) -> None:
        import uvicorn

        self.model = ScriptedModel()
        self.port = free_port()
        config = uvicorn.Config(build_app(self.model), host="127.0.0.1", port=self.port,
                                log_level="error", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ScriptedServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/_stats", timeout=0.5)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            raise RuntimeError("scripted model did not start")
        # One answer now, so its first real one does not pay for loading the token counts
        # (tests with short upstream timeouts would otherwise depend on the order they run).
        httpx.post(f"{self.base_url}/chat/completions", timeout=30,
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        self.model.chat_requests, self.model.last_request = 0, None
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)

    @property
    def chat_requests(self) -> int:
        return self.model.chat_requests


BASE_POLICY: dict[str, Any] = {
    "version": 1,
    "default_environment": "prod",
    "defaults": {"mode": "require_human_approval", "approval_ttl_s": 3600,
                 "idempotency_ttl_s": 3600},
    "environments": {
        "dev": {"models": ["gpt-4o-mini", "gpt-4.1-*"], "force_mode": "simulation_only",
                "ceilings": {"per_request_usd": 0.10}},
        "prod": {"models": ["gpt-4o-mini"], "ceilings": {"per_request_usd": 0.05}},
    },
    "actions": {
        "lookup_customer": {"mode": "auto_execute"},
        "send_note": {"executor": "dry", "mode": "auto_execute"},
    },
    "executors": {"dry": {"type": "log"}},
    "redact": ["card_number", "password"],
}


def concurrently(call: Callable[[], T], n: int = 16) -> list[T]:
    """``call`` from ``n`` threads released together; their results."""
    barrier = threading.Barrier(n)

    def one(_: int) -> T:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def write_policy_file(directory: Path, upstream: ScriptedServer,
                      overrides: dict[str, Any] | None = None,
                      name: str = "authority.yaml") -> Path:
    """A policy file (BASE_POLICY deep-merged with overrides) pointing at the scripted
    model, with state and audit under ``directory``."""
    data = deep_merge(BASE_POLICY, {
        "upstream": {"base_url": upstream.base_url, "timeout_s": 5},
        "state": {"path": str(directory / "state")},
        "audit": {"path": str(directory / "audit.jsonl"), "fsync": False},
    })
    data = deep_merge(data, overrides or {})
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def audit_entries(path: Path, event: str | None = None, *,
                  intents: bool = False) -> list[dict[str, Any]]:
    """The audit log's entries (of one event). Without ``intents``, an action's "executing"
    entry — written before its executor runs — is left out, so each action appears once."""
    import json

    # JSON Lines: split on "\n" only (str.splitlines also splits inside strings at U+2028…).
    entries = [json.loads(line) for line in path.read_text().split("\n") if line.strip()]
    return [e for e in entries if (event is None or e["event"] == event)
            and (intents or (e.get("details") or {}).get("status") != "executing")]


def tool(name: str, properties: dict[str, Any] | None = None,
         required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "parameters": {"type": "object", "properties": properties or {},
                                     **({"required": required} if required else {})}}}


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# -- audit sinks: every audit contract test runs on each -----------------------------------


class AuditSinkBackend:
    """One audit sink under test. ``open()`` gives a new writer/reader on the same log (also
    usable in a forked child); the other methods reach past the sink into its storage, as an
    attacker or a failing disk would."""

    name = "file"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "audit" / "audit.jsonl"

    def open(self, **options: Any) -> Any:
        """The sink, built with the keywords every sink takes (``audit.registry.sink_options``
        plus the head): ``head``, ``key``, ``checkpoints``, ``checkpoint_every``, ``redact``,
        ``fsync``."""
        from authority_sdk.audit import FileSink

        options.setdefault("fsync", False)
        return FileSink(self.path, **options)

    def policy_overrides(self) -> dict[str, Any]:
        return {"audit": {"backend": "file", "path": str(self.path)}}

    def raw_entries(self) -> list[dict[str, Any]]:
        import json

        return [json.loads(line) for line in self.path.read_bytes().split(b"\n") if line]

    def append_raw(self, entry: dict[str, Any]) -> None:
        """Store an entry as given, bypassing the sink (a forgery)."""
        import json

        with self.path.open("ab") as f:
            f.write(json.dumps(entry, separators=(",", ":")).encode() + b"\n")

    def drop_last(self, n: int) -> None:
        """Lose the last ``n`` stored entries (a cut tail, a restored old backup)."""
        lines = self.path.read_bytes().splitlines(keepends=True)
        self.path.write_bytes(b"".join(lines[:-n]))

    def delete_all(self) -> None:
        self.path.unlink()

    def cleanup(self) -> None:
        pass


class PostgresAuditBackend(AuditSinkBackend):
    """The audit table in a fresh, migrated schema on the test server; dropped by
    ``cleanup``."""

    name = "postgres"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.pg = PostgresBackend(directory)
        self.dsn = self.pg.dsn

    def open(self, **options: Any) -> Any:
        from authority_sdk.audit.postgres import PgAuditSink

        options.setdefault("fsync", False)
        return PgAuditSink(self.dsn, **options)

    def policy_overrides(self) -> dict[str, Any]:
        return {**self.pg.policy_overrides(), "audit": {"backend": "postgres"}}

    def _sql(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def raw_entries(self) -> list[dict[str, Any]]:
        import json

        return [json.loads(raw) for (raw,) in
                self._sql("SELECT entry FROM authority_audit ORDER BY seq")]

    def append_raw(self, entry: dict[str, Any]) -> None:
        import json

        self._sql("INSERT INTO authority_audit (seq, entry) VALUES (%s, %s)",
                  (entry["seq"], json.dumps(entry, separators=(",", ":"))))

    def drop_last(self, n: int) -> None:
        self._sql("DELETE FROM authority_audit WHERE seq IN (SELECT seq FROM authority_audit "
                  "ORDER BY seq DESC LIMIT %s)", (n,))

    def delete_all(self) -> None:
        self._sql("DELETE FROM authority_audit")

    def cleanup(self) -> None:
        self.pg.cleanup()


AUDIT_SINKS: dict[str, Callable[[Path], AuditSinkBackend]] = {
    "file": AuditSinkBackend, "postgres": PostgresAuditBackend}


# -- state backends: every store test runs on each -----------------------------------------


class StoreBackend:
    """One state backend under test. ``open()`` gives a new connection to the same store
    (also usable in a forked child process)."""

    name = "diskcache"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def open(self) -> Any:
        from authority_sdk.store import DiskStore

        return DiskStore(self.directory / "state")

    def policy_overrides(self) -> dict[str, Any]:
        return {"state": {"backend": "diskcache", "path": str(self.directory / "state")}}

    def cleanup(self) -> None:
        pass


# PostgreSQL for the store tests: AUTHORITY_TEST_PG_DSN, else the project machines' server
# (127.0.0.1:5432, trust auth). Each test gets a schema of its own, dropped after it.
PG_DSN = os.environ.get("AUTHORITY_TEST_PG_DSN",
                        "postgresql://postgres@127.0.0.1:5432/postgres")


def postgres_unavailable() -> str | None:
    """Why the PostgreSQL tests cannot run here (``None``: they can)."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    try:
        with psycopg.connect(PG_DSN, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"no PostgreSQL at {PG_DSN}: {str(exc).strip().splitlines()[0]}"


def requires_postgres() -> Any:
    """Mark a test module as needing PostgreSQL: skipped with the reason on a laptop without
    one, never in CI (there the test fails instead, so a missing server cannot pass)."""
    import pytest

    reason = None if os.environ.get("CI") else postgres_unavailable()
    return pytest.mark.skipif(reason is not None, reason=str(reason))


def pg_dsn(schema: str) -> str:
    """The test server's DSN with ``search_path`` set to ``schema``."""
    sep = "&" if "?" in PG_DSN else "?"
    return f"{PG_DSN}{sep}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def schema_at(version: int, *rows: str) -> Iterator[str]:
    """A schema as an earlier gateway left it: migrations 1 to ``version`` and that version
    recorded, with ``rows`` (SQL) written by it; dropped afterwards."""
    import psycopg

    from authority_sdk.store.pg_schema import _META, MIGRATIONS

    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        with psycopg.connect(pg_dsn(name), autocommit=True) as conn:
            conn.execute(_META)
            for at, sql in MIGRATIONS:
                if at <= version:
                    conn.execute(sql)
            conn.execute("INSERT INTO authority_meta (id, version) VALUES (1, %s)", (version,))
            for row in rows:
                conn.execute(row)
        yield name
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


class PostgresBackend(StoreBackend):
    """A fresh, migrated schema on the test server; dropped by ``cleanup``."""

    name = "postgres"

    def __init__(self, directory: Path) -> None:
        import pytest

        reason = postgres_unavailable()
        if reason is not None:
            if os.environ.get("CI"):
                raise RuntimeError(f"PostgreSQL tests cannot run in CI: {reason}")
            pytest.skip(reason)
        import psycopg

        from authority_sdk.store.pg_schema import migrate

        super().__init__(directory)
        self.schema = f"t_{uuid.uuid4().hex[:16]}"
        self.dsn = pg_dsn(self.schema)
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {self.schema}")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            migrate(conn)

    def open(self) -> Any:
        from authority_sdk.store.postgres import PgStore

        return PgStore(self.dsn)

    def policy_overrides(self) -> dict[str, Any]:
        os.environ[self.dsn_env] = self.dsn
        return {"state": {"backend": "postgres", "dsn_env": self.dsn_env}}

    @property
    def dsn_env(self) -> str:
        return f"AUTHORITY_TEST_DSN_{self.schema.upper()}"

    def cleanup(self) -> None:
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


STORE_BACKENDS: dict[str, Callable[[Path], StoreBackend]] = {
    "diskcache": StoreBackend, "postgres": PostgresBackend}
