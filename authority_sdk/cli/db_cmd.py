"""``authority db migrate|import-local``: the shared (PostgreSQL) state store's schema,
and moving a local diskcache store's open records into it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import AuthorityError
from ..policy import Policy
from .common import PolicyOpt, policy_or_exit

app = typer.Typer(no_args_is_help=True)


def _postgres_policy(policy: str | None) -> Policy:
    pol = policy_or_exit(policy)
    if pol.state.backend != "postgres":
        typer.echo(f"error: the policy's state.backend is {pol.state.backend!r}; these "
                   f"commands work on a postgres state store", err=True)
        raise typer.Exit(2)
    return pol


def _dsn(pol: Policy) -> str:
    from ..store.postgres import dsn_for_policy

    try:
        return dsn_for_policy(pol)
    except AuthorityError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from exc


@app.command()
def migrate(policy: PolicyOpt = None) -> None:
    """Create or upgrade the schema (idempotent; safe while replicas start)."""
    import psycopg

    from ..store.pg_schema import migrate as run_migrations
    from ..store.postgres import CONNECT_TIMEOUT_S

    pol = _postgres_policy(policy)
    try:
        with psycopg.connect(_dsn(pol), autocommit=True,
                             connect_timeout=int(CONNECT_TIMEOUT_S)) as conn:
            before, after = run_migrations(conn)
    except (psycopg.Error, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        typer.echo(f"error: migration failed: {first}", err=True)
        raise typer.Exit(1) from exc
    if before == after:
        typer.echo(f"schema already at version {after}")
    else:
        typer.echo(f"schema migrated from version {before} to {after}")


@app.command("import-local")
def import_local_cmd(
    policy: PolicyOpt = None,
    source: Annotated[Path, typer.Option(
        "--from", help="The diskcache state folder to import (the old policy's state.path).",
        exists=True, file_okay=False)] = Path(".authority/state"),
    audit_from: Annotated[Path | None, typer.Option(
        "--audit-from", help="The old JSONL audit log: with audit.backend postgres, its "
        "entries become the table's first, so one chain spans both.", exists=True,
        dir_okay=False)] = None,
) -> None:
    """Copy open approvals, journal entries, idempotency and dedupe records, counters,
    parked audit entries, the kill switch and the audit head into the shared store (and,
    with --audit-from, the file's audit chain into the audit table)."""
    from ..store.disk import DiskStore
    from ..store.importer import import_local
    from ..store.postgres import open_for_policy

    pol = _postgres_policy(policy)
    try:
        target = open_for_policy(pol)
        src = DiskStore(source)
        try:
            counts: dict[str, Any] = import_local(src, target)
        finally:
            src.close()
            target.close()
        if audit_from is not None:
            counts["audit_entries"] = _import_audit(pol, audit_from)
    except AuthorityError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(counts, sort_keys=True))


def _import_audit(pol: Policy, path: Path) -> int:
    from ..audit import FileSink, open_sink, verify_sink
    from ..audit.postgres import PgAuditSink

    if pol.audit.backend != "postgres":
        typer.echo("error: --audit-from needs audit.backend: postgres", err=True)
        raise typer.Exit(2)
    old = FileSink(path, fsync=False)
    result = verify_sink(old)
    if not result.ok:  # a broken chain is not carried over silently
        typer.echo(f"error: {path} does not verify: {result.reason}", err=True)
        raise typer.Exit(1)
    sink = open_sink(pol)
    assert isinstance(sink, PgAuditSink)
    try:
        return sink.import_chain(r.entry for r in old.records() if r.entry is not None)
    finally:
        sink.close()
