"""Options and helpers shared by every sub-command."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from ..errors import PolicyError
from ..policy import Policy, load_policy

PolicyOpt = Annotated[
    str | None,
    typer.Option("--policy", "-p",
                 help="Policy file (default: $AUTHORITY_POLICY or authority.yaml)."),
]


def policy_or_exit(path: str | None) -> Policy:
    try:
        return load_policy(path or os.environ.get("AUTHORITY_POLICY") or "authority.yaml")
    except PolicyError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
