"""``authority policy check|schema|explain|diff``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..errors import PolicyError
from ..policy import Policy, default_policy_path, load_policy
from .common import PolicyOpt, policy_or_exit

app = typer.Typer(no_args_is_help=True)


@app.command()
def check(policy: PolicyOpt = None) -> None:
    """Validate the policy file; exit non-zero naming the path of each error."""

    path = default_policy_path(policy)
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
    action: Annotated[str | None, typer.Option("--action", "-a",
                                               help="Action type (tool name).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Explain a request for this model: the allowlist glob, the "
        "kill switch, the per-request ceiling and the budgets that decide it.")] = None,
    max_tokens: Annotated[int | None, typer.Option(
        "--max-tokens", min=1, help="With --model: the output limit the request sets.")] = None,
    prompt: Annotated[str, typer.Option(
        "--prompt", help="With --model: the user message to count.")] = "hello",
    key: Annotated[str | None, typer.Option(
        "--key", help="With --model: the caller key's name (its budget counts too).")] = None,
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
    """Show which step or rule decides a request (--model) or the mode of one action
    (--action), and why (exit 0, also for deny)."""
    if model is None and action is None:
        typer.echo("error: give --action (an action's mode) or --model (a request)", err=True)
        raise typer.Exit(2)
    if model is not None:
        _explain_request(policy_or_exit(policy), environment, model, max_tokens, prompt, key)
        if action is None:
            return
        typer.echo("")
    assert action is not None
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


def _explain_request(p: Policy, environment: str | None, model: str, max_tokens: int | None,
                     prompt: str, key: str | None) -> None:
    """The request-level decisions, in the engine's order, with the rule that makes each:
    the same code the engine runs, with budgets read from the state store, not reserved."""
    from ..actions import kill_engaged
    from ..admission import matching_glob
    from ..costs import draft_plan, plan_d
    from ..effects import StoreOp
    from ..errors import AuthorityError
    from ..formats import ChatCompletions
    from ..pricing import PriceBook
    from ..store import open_store
    from ..tokens import default_counter

    env_name = environment or p.default_environment
    if env_name not in p.environments:
        typer.echo(f"error: unknown environment {env_name!r}", err=True)
        raise typer.Exit(2)
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    req = ChatCompletions().parse(json.dumps(body).encode())

    def row(label: str, value: str) -> None:
        typer.echo(f"{label + ':':<13}{value}")

    row("request", f"model {model} in {env_name}" + (f" by key {key}" if key else ""))
    glob = matching_glob(p, env_name, model)
    where = f"environments.{env_name}.models"
    if glob is None:
        row("allowlist", f"refused: no glob of {where} matches "
                         f"({', '.join(p.environments[env_name].models)})")
        row("decision", "deny (model_not_allowed)")
        row("decided by", where)
        return
    row("allowlist", f"allowed by glob {glob!r} ({where})")
    store = None
    try:
        if p.state.backend == "diskcache" and not p.state_path.exists():
            raise AuthorityError("no state yet (nothing engaged, nothing spent)")
        store = open_store(p)
        kill = kill_engaged(store.kill_switch_state(), env_name)
    except AuthorityError as exc:
        row("kill switch", f"off: {exc.message}" if store is None and "no state" in exc.message
            else f"unknown: {exc.message}")
        kill = None
    else:
        row("kill switch", f"ENGAGED ({kill['scope']})" if kill else "off")
    if kill is not None:
        row("decision", "deny (kill_switch_engaged)")
        row("decided by", f"kill_switch:{kill['scope']}")
        return
    key_cfg = next((k for k in p.keys if k.name == key), None)
    try:
        decision = plan_d(draft_plan(p, env_name, key_cfg.budget if key_cfg else None,
                                     key or "sdk", req, prices=PriceBook(p.pricing),
                                     counter=default_counter))
        effect = next(decision)
        while True:  # answer the budget reservation from the store's counters, read-only
            assert isinstance(effect, StoreOp) and effect.method == "budget_reserve"
            counters, low = effect.args[0], effect.kwargs["min_usd"]
            rooms = [limit - (store.budget_used(c) if store else 0.0) for c, limit in counters]
            for (c, limit), room in zip(counters, rooms, strict=True):
                row("budget", f"{c}: ${limit - room:.6f} of ${limit} used, ${room:.6f} left")
            room = min(rooms)
            effect = decision.send(None if room < low else min(effect.kwargs["max_usd"], room))
    except StopIteration as stop:
        plan = stop.value
        row("cost", f"estimate ${plan.estimate_usd:.6f} (prompt ~{plan.prompt_tokens} tokens, "
                    f"up to {plan.output_limit} output tokens"
                    + (", a limit the gateway sets" if plan.injected_limit else "") + ")")
        row("ceiling", f"${plan.ceiling_usd} (environments.{env_name}.ceilings.per_request_usd)"
            if plan.ceiling_usd is not None else "none")
        row("decision", "allow")
    except AuthorityError as exc:
        row("decision", f"deny ({exc.code})")
        row("decided by", str(exc.details.get("decided_by") or "-"))
        row("reason", exc.message)
    finally:
        if store is not None:
            store.close()


@app.command()
def diff(
    against: Annotated[str, typer.Option("--against", help="The new policy file to try.")],
    policy: PolicyOpt = None,
    since: Annotated[str | None, typer.Option(
        "--since", help="Only actions recorded in this window: 30m, 12h, 7d.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Replay the actions in the audit log under a new policy: which decisions would
    change, with examples; what the log cannot decide is counted, never guessed."""
    from ..audit import open_sink
    from ..whatif import decided_actions, parse_since, replay

    old = policy_or_exit(policy)
    new = policy_or_exit(against)
    try:
        window = parse_since(since) if since is not None else None
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    sink = open_sink(old)
    try:
        entries = (r.entry for r in sink.records() if r.entry is not None)
        result = replay(old, new, decided_actions(entries, window))
    except OSError as exc:
        typer.echo(f"error: cannot read the audit log: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        sink.close()
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2, ensure_ascii=False, default=str))
        return
    total = sum(result.total.values())
    changed = sum(result.changed.values())
    unknown = sum(result.cannot_tell.values())
    scope = f" in the last {since}" if since else ""
    typer.echo(f"{total} recorded action(s){scope}: {changed} would be decided differently, "
               f"{unknown} cannot tell from the log")
    for (action_type, was, now), n in sorted(result.changed.items()):
        of = result.total[action_type]
        typer.echo(f"  {n} of {of} {action_type}: {was} -> {now}")
        for ex in result.examples[(action_type, was, now)]:
            shown = json.dumps(ex.arguments, ensure_ascii=True)
            shown = shown if len(shown) <= 120 else shown[:117] + "..."
            typer.echo(f"      e.g. {ex.request_id} ({ex.environment}) {shown}")
    for (action_type, why), n in sorted(result.cannot_tell.items()):
        typer.echo(f"  {n} {action_type}: cannot tell ({why})")
