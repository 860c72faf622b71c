"""``authority policy check|schema|explain``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..errors import PolicyError
from ..policy import Policy, load_policy
from .common import PolicyOpt, policy_or_exit

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


@app.command()
def explain(
    action: Annotated[str, typer.Option("--action", "-a", help="Action type (tool name).")],
    policy: PolicyOpt = None,
    environment: Annotated[
        str | None,
        typer.Option("--environment", "-e", help="Environment (default: the policy's default)."),
    ] = None,
    args: Annotated[str, typer.Option("--args", help="The tool call's arguments, as JSON.")] = "{}",
    tool_schema: Annotated[
        str | None,
        typer.Option("--tool-schema", help="JSON schema the request declares for the tool."),
    ] = None,
    kill_switch: Annotated[
        bool, typer.Option("--kill-switch", help="Explain as if the kill switch were engaged.")
    ] = False,
) -> None:
    """Show which step or rule decides the mode of one action, and why (exit 0, also for deny)."""
    from ..audit import REDACTED
    from ..modes import (
        condition_verdict,
        describe_condition,
        describe_rule,
        lookup,
        parse_arguments,
        resolve_action,
        rule_verdict,
    )

    p = policy_or_exit(policy)
    env_name = environment or p.default_environment
    if env_name not in p.environments:
        typer.echo(f"error: unknown environment {env_name!r} (defined: "
                   f"{', '.join(sorted(p.environments))})", err=True)
        raise typer.Exit(2)
    try:
        json.loads(args)
    except ValueError as exc:
        typer.echo(f"error: --args is not valid JSON: {exc}", err=True)
        raise typer.Exit(2) from exc
    schema = None
    if tool_schema is not None:
        try:
            schema = json.loads(tool_schema)
        except ValueError as exc:
            typer.echo(f"error: --tool-schema is not valid JSON: {exc}", err=True)
            raise typer.Exit(2) from exc
        if not isinstance(schema, dict):
            typer.echo("error: --tool-schema must be a JSON object", err=True)
            raise typer.Exit(2)

    r = resolve_action(p, env_name, action, args, tool_schema=schema,
                       kill_switch_engaged=kill_switch)
    dispatch = f"gateway (executor: {r.executor})" if r.executor else "client (the app runs it)"
    rows = [
        ("action", action), ("environment", env_name), ("mode", r.mode),
        ("decision", r.decision), ("dispatch", dispatch), ("decided by", r.decided_by),
        ("reason", r.reason or "-"),
    ]
    if r.code:
        rows.append(("code", r.code))
    for label, value in rows:
        typer.echo(f"{label + ':':<13}{value}")

    action_policy = p.actions.get(action)
    if action_policy is None:
        return
    typer.echo("")
    if not action_policy.rules:
        typer.echo("rules: none")
        return
    typer.echo("rules (first match wins; a rule that cannot compare a value it meets is "
               "undecidable, and its mode applies if stricter):")
    parsed, _ = parse_arguments(args)
    redacted_names = {n.lower() for n in p.redact}
    verdicts = ([rule_verdict(rule, parsed).verdict for rule in action_policy.rules]
                if parsed is not None else [])
    first_match = next((i for i, v in enumerate(verdicts) if v == "match"), len(verdicts))
    # The rules were read at all only if no earlier step (kill switch, validation…) decided.
    rules_read = r.decided_by.startswith("rule[") or r.decided_by in (
        "action_mode", "environment_default", "global_default")
    for i, rule in enumerate(action_policy.rules):
        head = f"  rule[{i}] if {describe_rule(rule)} -> {rule.mode}"
        if parsed is None:
            typer.echo(f"{head}: not evaluated (arguments are not a JSON object)")
            continue
        verdict = verdicts[i]
        if verdict == "no_match":
            line = "no match"
        elif not rules_read:
            line = ("matched" if verdict == "match" else "undecidable") + (
                f" (not reached: {r.decided_by} decided)")
        elif i > first_match:
            line = ("matched" if verdict == "match" else "undecidable") + (
                " (an earlier rule decided)")
        elif verdict == "match":
            line = "matched" + ("  <- decides" if r.decided_by == f"rule[{i}]" else
                                f" (an undecidable rule with a stricter mode decided: "
                                f"{r.decided_by})")
        elif r.decided_by == f"rule[{i}]:undecidable":
            line = "undecidable  <- decides (the strictest mode met)"
        else:
            line = "undecidable (its mode is not stricter than the outcome)"
        typer.echo(f"{head}: {line}")
        for f, conds in rule.if_.items():
            cond, why = condition_verdict(parsed, f, conds)
            if cond == "match":
                continue
            if f == "recipients":
                shown = "recipients = " + _recipient_list(parsed, redacted_names)
            else:
                found, value = lookup(parsed, f)
                hidden = any(part.lower() in redacted_names for part in f.split("."))
                shown = f"{f} = " + ("missing" if not found else json.dumps(REDACTED) if hidden
                                     else json.dumps(value, ensure_ascii=False))
            if cond == "undecidable":
                typer.echo(f"      cannot decide: {describe_condition(f, conds)} ({why})")
            else:
                typer.echo(f"      fails: {describe_condition(f, conds)} ({shown})")


def _recipient_list(args: dict[str, object], redacted_names: set[str]) -> str:
    from ..addresses import RECIPIENT_FIELDS, AddressError, parse_recipients

    if redacted_names & set(RECIPIENT_FIELDS):
        return '"[REDACTED]"'
    try:
        found = [r.addr_spec for rs in parse_recipients(args).values() for r in rs]
    except AddressError:
        return "(does not parse)"
    return json.dumps(found) if found else "none (no to, cc or bcc)"
