"""``authority policy check|schema|explain``."""

from __future__ import annotations

import json

import typer

from ..errors import PolicyError
from ..policy import Policy, load_policy
from .common import PolicyOpt

app = typer.Typer(no_args_is_help=True)


@app.command()
def check(policy: PolicyOpt = None) -> None:
    """Validate the policy file; exit non-zero naming the path of each error."""
    import os

    path = policy or os.environ.get("AUTHORITY_POLICY") or "authority.yaml"
    try:
        p = load_policy(path)
    except PolicyError as exc:
        for line in exc.errors:
            typer.echo(f"error: {line}", err=True)
        typer.echo(f"{path}: {len(exc.errors)} error(s)", err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"{path}: ok ({len(p.environments)} environments, {len(p.actions)} actions, "
        f"{len(p.executors)} executors, {len(p.keys)} keys; policy_hash {p.hash[:12]})"
    )


@app.command()
def schema() -> None:
    """Print the policy's JSON Schema."""
    typer.echo(json.dumps(Policy.model_json_schema(by_alias=True), indent=2))
