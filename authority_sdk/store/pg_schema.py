"""The PostgreSQL schema and its versioned migrations (``authority db migrate``).

Tables live in the connection's ``current_schema()`` (set ``search_path`` in the DSN to
keep several gateways, or tests, apart in one database). ``authority_meta`` holds the
schema version. Each migration runs once, in order, inside one transaction that holds a
transaction-scoped advisory lock on the schema: replicas started together serialise on
it, and the one that comes second finds nothing left to do.

A gateway never migrates on its own: ``serve`` refuses a schema older (or newer) than
the one it was built for, so two versions of the gateway never write one database.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate", "schema_version"]

# Records are JSON *text*, not jsonb: jsonb refuses a lone surrogate escape ("\ud800"),
# which a hostile client or model can put in any argument. The fields a primitive
# compares on are columns of their own. Times are epoch seconds of the database's clock.
MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE authority_idem (
    key text PRIMARY KEY,
    claim_id text,
    record text NOT NULL,
    expires_at double precision NOT NULL
);
CREATE TABLE authority_counters (
    name text PRIMARY KEY,
    used double precision NOT NULL,
    expires_at double precision NOT NULL
);
CREATE TABLE authority_kill_switch (
    scope text PRIMARY KEY,
    entry text NOT NULL
);
CREATE TABLE authority_approvals (
    id text PRIMARY KEY,
    status text NOT NULL,
    created_at double precision NOT NULL,
    record text NOT NULL
);
CREATE INDEX authority_approvals_by_status
    ON authority_approvals (status, created_at DESC, id);
CREATE INDEX authority_approvals_by_time ON authority_approvals (created_at DESC, id);
CREATE TABLE authority_journal (
    action_key text PRIMARY KEY,
    status text NOT NULL,
    started_at double precision NOT NULL,
    audited boolean,
    record text NOT NULL,
    expires_at double precision
);
CREATE INDEX authority_journal_open ON authority_journal (status, started_at DESC)
    WHERE status IN ('started', 'in_doubt');
CREATE INDEX authority_journal_unaudited ON authority_journal (started_at DESC)
    WHERE audited = false;
CREATE INDEX authority_journal_by_time ON authority_journal (started_at DESC);
CREATE TABLE authority_dedupe (
    key text PRIMARY KEY,
    action_key text,
    owner text NOT NULL,
    claimed_at double precision NOT NULL,
    expires_at double precision NOT NULL
);
CREATE TABLE authority_outbox (
    kind text NOT NULL,
    item_id text NOT NULL,
    seq bigserial,
    payload text NOT NULL,
    PRIMARY KEY (kind, item_id)
);
CREATE INDEX authority_outbox_order ON authority_outbox (kind, seq);
CREATE TABLE authority_leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    until double precision NOT NULL
);
CREATE TABLE authority_audit_head (
    id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    seq bigint NOT NULL,
    hash text NOT NULL
);
"""),
    # The audit chain of every replica in one table (audit.backend: postgres): appends are
    # serialised by an advisory lock in the appending transaction.
    (2, """
CREATE TABLE authority_audit (
    seq bigint PRIMARY KEY,
    entry text NOT NULL
);
"""),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]

_META = """
CREATE TABLE IF NOT EXISTS authority_meta (
    id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    version integer NOT NULL,
    probed_at double precision
)
"""


def schema_version(cur: Any) -> int:
    """The version of the schema ``cur``'s connection sees (0: never migrated)."""
    cur.execute("SELECT to_regclass('authority_meta') IS NOT NULL")
    row = cur.fetchone()
    if not row or not row[0]:
        return 0
    cur.execute("SELECT version FROM authority_meta WHERE id = 1")
    row = cur.fetchone()
    return int(row[0]) if row else 0


def migrate(conn: Any) -> tuple[int, int]:
    """Bring the schema up to :data:`SCHEMA_VERSION`; returns ``(from, to)``.

    ``conn`` is a psycopg connection in autocommit mode; the whole upgrade is one
    transaction (PostgreSQL's DDL is transactional: a failed step leaves nothing).
    """
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT current_schema()")
        row = cur.fetchone()
        if not row or row[0] is None:
            raise ValueError("no schema to migrate: the DSN's search_path names no "
                             "existing schema")
        # One migrator per schema at a time; released at commit or rollback.
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('authority-migrate:' || "
                    "current_schema()))")
        cur.execute(_META)
        before = schema_version(cur)
        if before > SCHEMA_VERSION:
            raise ValueError(f"the database schema is at version {before}, newer than this "
                             f"gateway's {SCHEMA_VERSION}: upgrade the gateway")
        for version, sql in MIGRATIONS:
            if version > before:
                cur.execute(sql)
        cur.execute("INSERT INTO authority_meta (id, version) VALUES (1, %s) "
                    "ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version",
                    (SCHEMA_VERSION,))
    return before, SCHEMA_VERSION
