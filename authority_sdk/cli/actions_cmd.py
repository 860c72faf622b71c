"""``authority actions …``: the execution journal, and settling what is in doubt.

An execution interrupted by a crash whose executor cannot deduplicate is left
``in_doubt`` (DESIGN.md §5). A person checks the real system and records what
happened with ``resolve --as executed|failed``; nothing is run again. Like the
other control commands, each works on the local state or, with ``--url`` and
``--key``, through a running proxy, with the same output and exit codes.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from ..paging import DEFAULT_LIMIT
from .common import PolicyOpt, console, short, timestamp
from .control_cmd import (
    CursorOpt,
    JsonOpt,
    KeyOpt,
    LimitOpt,
    ReasonOpt,
    UrlOpt,
    backend,
    listing_table,
)

actions_app = typer.Typer(no_args_is_help=True,
                          help="List gateway-run actions and settle those left in doubt.")


class Outcome(StrEnum):
    executed = "executed"
    failed = "failed"


def _note(e: dict[str, Any]) -> str:
    if e.get("resolved_by"):
        why = f": {e['resolution_reason']}" if e.get("resolution_reason") else ""
        return f"resolved by {e['resolved_by']}{why}"
    body = e.get("result")
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    return str(e.get("reason") or "")


@actions_app.command("list")
def list_cmd(
    status: Annotated[str | None, typer.Option(
        "--status", "-s", help="started, executed, failed, in_doubt, or several separated "
                               "by commas (default: all).")] = None,
    limit: LimitOpt = DEFAULT_LIMIT, cursor: CursorOpt = None,
    as_json: JsonOpt = False, policy: PolicyOpt = None, url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """List actions the gateway ran (its execution journal), newest first, a page at a
    time (with --url: those the key's environment may see)."""
    with backend(policy, url, key) as ex:
        items = ex.list_executions(status, limit, cursor)
    table = listing_table(items, as_json=as_json, title=f"actions ({status or 'all'})",
                          key_column="action key", columns=(
                              "status", "action", "env", "executor", "arguments",
                              "started (UTC)", "approval", "note"))
    if table is None:
        return
    colours = {"executed": "green", "failed": "red", "in_doubt": "magenta",
               "started": "yellow"}
    for e in items:
        st = str(e.get("status"))
        table.add_row(str(e.get("action_key")), f"[{colours[st]}]{st}[/]" if st in colours
                      else st, str(e.get("action_type")), str(e.get("environment") or ""),
                      str(e.get("executor") or ""), short(e.get("arguments")),
                      timestamp(e.get("started_at")), str(e.get("approval_id") or ""), _note(e))
    console().print(table)


@actions_app.command("resolve")
def resolve_cmd(
    action_key: str,
    outcome: Annotated[Outcome, typer.Option(
        "--as", help="What a person found on the real system: executed or failed.",
        case_sensitive=False)],
    reason: ReasonOpt = None, policy: PolicyOpt = None, url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """Settle an in_doubt action as executed or failed. Nothing is run again."""
    with backend(policy, url, key) as ex:
        e = ex.resolve_execution(action_key, outcome.value, reason)
    line = (f"resolved {e.get('action_key')} ({e.get('action_type')}, {e.get('environment')}):"
            f" {e.get('status')}")
    if e.get("approval_id"):
        line += f"\napproval {e['approval_id']}: {e.get('approval_status')}"
    typer.echo(line)
