"""``authority audit tail|verify``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..audit import tail as tail_log
from ..audit import verify as verify_log
from ..errors import AuthorityError
from ..policy import Policy
from .common import PolicyOpt, policy_or_exit

app = typer.Typer(no_args_is_help=True)

FileOpt = Annotated[
    Path | None,
    typer.Option("--file", "-f", help="Audit log to read (default: the policy's audit.path).",
                 dir_okay=False),
]


def _store_head(policy: Policy) -> tuple[tuple[int, str] | None, str | None]:
    """The head recorded in the state store, or why there is none to check against."""
    try:
        from .. import store as store_mod
    except ModuleNotFoundError as exc:
        if exc.name != __name__.rsplit(".", 2)[0] + ".store":
            raise
        return None, "head check skipped: no state store module in this installation"
    try:
        store = store_mod.open_store(policy)
        try:
            head = store.get_audit_head()
        finally:
            store.close()
    except AuthorityError as exc:
        typer.echo(f"error: cannot read the audit head from the state store: {exc.message}",
                   err=True)
        raise typer.Exit(1) from exc
    if head is None:
        return None, "head check skipped: the state store has no audit head yet"
    return head, None


def _resolve(policy: str | None, file: Path | None) -> tuple[Path, Policy | None]:
    if file is not None and policy is None:
        return file, None
    pol = policy_or_exit(policy)
    return (file or pol.audit_path), pol


@app.command()
def verify(policy: PolicyOpt = None, file: FileOpt = None) -> None:
    """Check the hash chain (and the head kept in the state store); exit 1 at the first bad line."""
    path, pol = _resolve(policy, file)
    head: tuple[int, str] | None
    note: str | None
    if pol is None:
        head, note = None, "head check skipped: --file without --policy names no state store"
    else:
        head, note = _store_head(pol)
    result = verify_log(path, head)
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if note:
        typer.echo(f"note: {note}", err=True)
    if not result.ok:
        where = f"line {result.first_bad_line}: " if result.first_bad_line else ""
        typer.echo(f"FAIL: {path}: {where}{result.reason}", err=True)
        raise typer.Exit(1)
    head_text = "head checked" if head is not None else "head not checked"
    typer.echo(f"ok: {result.entries} entries, head seq {result.last_seq} hash "
               f"{result.last_hash[:16]}… ({head_text})")


@app.command()
def tail(
    n: Annotated[int, typer.Option("-n", "--lines", min=1, help="How many entries.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Raw JSON lines.")] = False,
    policy: PolicyOpt = None,
    file: FileOpt = None,
) -> None:
    """Show the last entries of the audit log."""
    path, _ = _resolve(policy, file)
    try:
        entries = tail_log(path, n)
    except OSError as exc:
        typer.echo(f"error: cannot read {path}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from exc
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(entry, ensure_ascii=False))
        return
    _print_table(entries, path)


def _print_table(entries: list[dict[str, Any]], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{path} (last {len(entries)})", title_justify="left")
    for col in ("seq", "time (UTC)", "event", "request", "env", "model / action", "decision",
                "status / reason", "actor", "cost $"):
        table.add_column(col, overflow="fold")
    for e in entries:
        if "invalid_line" in e:
            table.add_row("?", "", "[red]invalid line[/red]", "", "", "", "",
                          f"[red]{e['invalid_line'][:80]!r} at byte {e['offset']}[/red]",
                          "", "")
            continue
        decision = e.get("decision") or ""
        colour = {"allow": "green", "deny": "red", "error": "yellow"}.get(decision, "")
        status = e.get("approval_status") or (e.get("details") or {}).get("status")
        table.add_row(
            str(e.get("seq")),
            str(e.get("ts") or "").replace("T", " ").rstrip("Z"),
            str(e.get("event")),
            str(e.get("request_id") or ""),
            str(e.get("environment") or ""),
            str(e.get("action_type") or e.get("model") or ""),
            f"[{colour}]{decision}[/{colour}]" if colour else decision,
            " ".join(str(x) for x in (status, e.get("reason")) if x),
            str(e.get("actor") or ""),
            _cost(e),
        )
    Console().print(table)


def _cost(e: dict[str, Any]) -> str:
    cost = e.get("cost_actual_usd")
    if cost is None:
        cost = e.get("cost_estimate_usd")
    return f"{cost:.6f}" if isinstance(cost, int | float) else ""
