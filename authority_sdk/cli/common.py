"""Options and helpers shared by every sub-command."""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any

import typer

from ..errors import PolicyError
from ..policy import Policy, default_policy_path, load_policy

PolicyOpt = Annotated[
    str | None,
    typer.Option("--policy", "-p",
                 help="Policy file (default: $AUTHORITY_POLICY or authority.yaml)."),
]


def policy_or_exit(path: str | None) -> Policy:
    try:
        return load_policy(default_policy_path(path))
    except PolicyError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc


def timestamp(value: Any) -> str:
    """A Unix time as UTC for a table cell ("" when there is none)."""
    if not isinstance(value, int | float):
        return ""
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def short(value: Any, n: int = 60) -> str:
    """A value as at most ``n`` characters for a table cell."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                           default=str)
    return text if len(text) <= n else text[:n - 1] + "…"


def console() -> Any:
    from rich.console import Console

    return Console()


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))
