"""Options and helpers shared by every sub-command."""

from __future__ import annotations

from typing import Annotated

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
