"""``authority approvals …``, ``authority kill-switch …`` and ``authority budget``.

Locally the commands build a ``Gateway`` on the policy's state and audit files
and call ``authority_sdk.control`` (the actor is ``cli:<os user>``); with
``--url`` and ``--key`` they call a running proxy's management API instead
(the actor is that key). Both paths print the same thing and exit the same
way: 0 when done, 1 when the gateway refused (with its message and code),
2 for a usage problem.
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import typer

from ..errors import AuthorityError
from ..paging import DEFAULT_LIMIT, MAX_LIMIT, Page
from .common import PolicyOpt, console, policy_or_exit, print_json, short, timestamp

if TYPE_CHECKING:
    import httpx

    from ..engine import Gateway

approvals_app = typer.Typer(no_args_is_help=True,
                            help="List, show, approve and reject pending actions.")
kill_switch_app = typer.Typer(no_args_is_help=True,
                              help="Engage, release or show the kill switch.")

UrlOpt = Annotated[str | None, typer.Option(
    "--url", envvar="AUTHORITY_URL",
    help="A running proxy (e.g. http://127.0.0.1:8787); default: act on the local state.")]
KeyOpt = Annotated[str | None, typer.Option(
    "--key", envvar="AUTHORITY_KEY", help="API key for --url (approver or admin role).")]
ReasonOpt = Annotated[str | None, typer.Option("--reason", "-r", help="Recorded in the audit log.")]
EnvOpt = Annotated[str | None, typer.Option(
    "--environment", "-e", help="One environment (default: the global switch).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
LimitOpt = Annotated[int, typer.Option(
    "--limit", "-n", min=1, max=MAX_LIMIT, help=f"At most this many, newest first "
    f"(at most {MAX_LIMIT}).")]
CursorOpt = Annotated[str | None, typer.Option(
    "--cursor", help="Continue after a previous page (the cursor it printed).")]


class Failure(Exception):
    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Backend(Protocol):
    def list_approvals(self, status: str | None, limit: int, cursor: str | None) -> Page: ...
    def get_approval(self, approval_id: str) -> dict[str, Any]: ...
    def approve(self, approval_id: str, reason: str | None) -> dict[str, Any]: ...
    def reject(self, approval_id: str, reason: str | None) -> dict[str, Any]: ...
    def kill_switch_status(self) -> dict[str, Any]: ...
    def set_kill_switch(self, engaged: bool, reason: str | None,
                        environment: str | None) -> dict[str, Any]: ...
    def list_executions(self, status: str | None, limit: int, cursor: str | None) -> Page: ...
    def resolve_execution(self, action_key: str, outcome: str,
                          reason: str | None) -> dict[str, Any]: ...


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = f"uid{os.getuid()}"
    return f"cli:{user}"


class Local:
    def __init__(self, gw: Gateway) -> None:
        from .. import control

        self.gw = gw
        self.control = control
        self.actor = cli_actor()

    def list_approvals(self, status: str | None, limit: int, cursor: str | None) -> Page:
        # The local CLI reads the state files directly: it is unscoped by nature.
        return self.control.list_approvals(self.gw, status, limit=limit, cursor=cursor)

    def get_approval(self, approval_id: str) -> dict[str, Any]:
        return self.control.get_approval(self.gw, approval_id)

    def approve(self, approval_id: str, reason: str | None) -> dict[str, Any]:
        return self.control.approve(self.gw, approval_id, actor=self.actor, reason=reason)

    def reject(self, approval_id: str, reason: str | None) -> dict[str, Any]:
        return self.control.reject(self.gw, approval_id, actor=self.actor, reason=reason)

    def kill_switch_status(self) -> dict[str, Any]:
        return self.control.kill_switch_status(self.gw)

    def set_kill_switch(self, engaged: bool, reason: str | None,
                        environment: str | None) -> dict[str, Any]:
        return self.control.set_kill_switch(self.gw, engaged, actor=self.actor, reason=reason,
                                            environment=environment)

    def list_executions(self, status: str | None, limit: int, cursor: str | None) -> Page:
        return self.control.list_executions(self.gw, status, limit=limit, cursor=cursor)

    def resolve_execution(self, action_key: str, outcome: str,
                          reason: str | None) -> dict[str, Any]:
        return self.control.resolve_execution(self.gw, action_key, outcome=outcome,
                                              actor=self.actor, reason=reason)


class Remote:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            resp = self.client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise Failure(f"cannot reach {self.client.base_url}: {exc}") from exc
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 400:
            err = body.get("error") if isinstance(body, dict) else None
            if isinstance(err, dict):
                raise Failure(str(err.get("message")), err.get("code"))
            raise Failure(f"{method} {path}: HTTP {resp.status_code}: {resp.text[:200]}")
        if body is None:
            raise Failure(f"{method} {path}: the answer is not JSON")
        return body

    def list_executions(self, status: str | None, limit: int, cursor: str | None) -> Page:
        return self.page("/authority/actions", status, limit, cursor)

    def resolve_execution(self, action_key: str, outcome: str,
                          reason: str | None) -> dict[str, Any]:
        from urllib.parse import quote

        return dict(self._call(
            "POST", f"/authority/actions/{quote(action_key, safe='')}/resolve",
            json={"outcome": outcome, "reason": reason}))

    def page(self, path: str, status: str | None, limit: int, cursor: str | None) -> Page:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        body = self._call("GET", path, params=params)
        return Page(body["data"], body.get("next_cursor"))

    def list_approvals(self, status: str | None, limit: int, cursor: str | None) -> Page:
        return self.page("/authority/approvals", status, limit, cursor)

    def get_approval(self, approval_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/authority/approvals/{approval_id}"))

    def approve(self, approval_id: str, reason: str | None) -> dict[str, Any]:
        return dict(self._call("POST", f"/authority/approvals/{approval_id}/approve",
                               json={"reason": reason}))

    def reject(self, approval_id: str, reason: str | None) -> dict[str, Any]:
        return dict(self._call("POST", f"/authority/approvals/{approval_id}/reject",
                               json={"reason": reason}))

    def kill_switch_status(self) -> dict[str, Any]:
        return dict(self._call("GET", "/authority/kill-switch"))

    def set_kill_switch(self, engaged: bool, reason: str | None,
                        environment: str | None) -> dict[str, Any]:
        return dict(self._call("POST", "/authority/kill-switch", json={
            "engaged": engaged, "reason": reason, "environment": environment}))


@contextmanager
def backend(policy: str | None, url: str | None, key: str | None) -> Iterator[Backend]:
    """The local control plane, or a proxy's; errors of either leave as exit 1."""
    try:
        if url:
            if not key:
                typer.echo("error: --url needs --key (or $AUTHORITY_KEY)", err=True)
                raise typer.Exit(2)
            import httpx

            with httpx.Client(base_url=url.rstrip("/"), timeout=30.0, trust_env=False,
                              headers={"authorization": f"Bearer {key}"}) as client:
                yield Remote(client)
            return
        from ..engine import Gateway

        gw = Gateway(policy_or_exit(policy))
        try:
            yield Local(gw)
        finally:
            gw.close()
    except AuthorityError as exc:
        _fail(exc.message, exc.code)
    except Failure as exc:
        _fail(exc.message, exc.code)


def _fail(message: str, code: str | None) -> None:
    typer.echo(f"error: {message}" + (f" [{code}]" if code else ""), err=True)
    raise typer.Exit(1)


# -- output -------------------------------------------------------------------------------


def more_hint(page: Page) -> None:
    """Where the next page starts, on stderr (stdout stays the page itself)."""
    if page.next_cursor:
        typer.echo(f"more: run again with --cursor {page.next_cursor}", err=True)


def listing_table(items: Page, *, as_json: bool, title: str, key_column: str,
                  columns: tuple[str, ...]) -> Any:
    """A page as a table with its columns (the caller fills the rows), or, with --json,
    printed as JSON and ``None``. The next page's cursor goes to stderr either way."""
    more_hint(items)
    if as_json:
        print_json(list(items))
        return None
    from rich.table import Table

    shown = f"{len(items)}{'+' if items.next_cursor else ''}"
    table = Table(title=f"{title}: {shown}", title_justify="left")
    table.add_column(key_column, no_wrap=True)
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def _summary(verb: str, a: dict[str, Any]) -> str:
    line = f"{verb} {a['id']} ({a.get('action_type')}, {a.get('environment')}): {a['status']}"
    if a.get("status") == "approved" and a.get("dispatch") == "client":
        line += " (the app runs it)"
    if a.get("error"):
        line += f": {a['error']}"
    if a.get("result") is not None:
        line += f"\nresult: {short(a['result'], 400)}"
    return line


# -- approvals ----------------------------------------------------------------------------


@approvals_app.command("list")
def list_cmd(
    status: Annotated[str | None, typer.Option(
        "--status", "-s", help="pending, approved, rejected, expired, executed, failed, "
                               "in_doubt, or several separated by commas (default: all).")
    ] = None,
    limit: LimitOpt = DEFAULT_LIMIT, cursor: CursorOpt = None,
    as_json: JsonOpt = False, policy: PolicyOpt = None, url: UrlOpt = None,
    key: KeyOpt = None,
) -> None:
    """List approvals, newest first, a page at a time (with --url: those the key's
    environment may see)."""
    with backend(policy, url, key) as b:
        items = b.list_approvals(status, limit, cursor)
    table = listing_table(items, as_json=as_json, title=f"approvals ({status or 'all'})",
                          key_column="id", columns=(
                              "status", "action", "env", "arguments", "requested by",
                              "created (UTC)", "decided by"))
    if table is None:
        return
    colours = {"pending": "yellow", "executed": "green", "approved": "green",
               "rejected": "red", "failed": "red", "expired": "dim", "in_doubt": "magenta"}
    for a in items:
        st = str(a.get("status"))
        table.add_row(str(a.get("id")), f"[{colours.get(st, '')}]{st}[/]" if st in colours
                      else st, str(a.get("action_type")), str(a.get("environment")),
                      short(a.get("arguments")), str(a.get("requested_by") or ""),
                      timestamp(a.get("created_at")), str(a.get("decided_by") or ""))
    console().print(table)


@approvals_app.command("show")
def show_cmd(approval_id: str, as_json: JsonOpt = False, policy: PolicyOpt = None,
             url: UrlOpt = None, key: KeyOpt = None) -> None:
    """Show one approval: the exact action that would run."""
    with backend(policy, url, key) as b:
        a = b.get_approval(approval_id)
    if as_json:
        print_json(a)
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, title=f"approval {a.get('id')}", title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    # Text, not markup: model-written values such as "[white on white]" must show as written.
    for field in ("status", "action_type", "environment", "dispatch", "executor", "reason",
                  "requested_by", "request_id", "model", "created_at", "expires_at",
                  "decided_by", "decided_at", "decision_reason", "result", "error"):
        value = a.get(field)
        if value is None:
            continue
        text = timestamp(value) if field.endswith("_at") else (
            value if isinstance(value, str) else json.dumps(value, default=str))
        table.add_row(field, Text(text))
    table.add_row("arguments", Text(json.dumps(a.get("arguments"), indent=2,
                                               ensure_ascii=False, default=str)))
    preview = a.get("would_execute")
    if preview is not None:
        # What approving runs, parsed by the executor (an email's recipients, a request).
        table.add_row("would execute", Text(json.dumps(preview, indent=2, ensure_ascii=False,
                                                       default=str)))
    console().print(table)


def _decide(verb: str, approval_id: str, reason: str | None, policy: str | None,
            url: str | None, key: str | None) -> None:
    with backend(policy, url, key) as b:
        a = b.approve(approval_id, reason) if verb == "approved" else \
            b.reject(approval_id, reason)
    typer.echo(_summary(verb, a))
    if a.get("status") in ("failed", "in_doubt"):
        raise typer.Exit(1)


@approvals_app.command("approve")
def approve_cmd(approval_id: str, reason: ReasonOpt = None, policy: PolicyOpt = None,
                url: UrlOpt = None, key: KeyOpt = None) -> None:
    """Approve a pending action; a gateway-dispatched one runs now, once."""
    _decide("approved", approval_id, reason, policy, url, key)


@approvals_app.command("reject")
def reject_cmd(approval_id: str, reason: ReasonOpt = None, policy: PolicyOpt = None,
               url: UrlOpt = None, key: KeyOpt = None) -> None:
    """Reject a pending action; it never runs."""
    _decide("rejected", approval_id, reason, policy, url, key)


# -- kill switch --------------------------------------------------------------------------


def _switch(engaged: bool, environment: str | None, reason: str | None, policy: str | None,
            url: str | None, key: str | None) -> None:
    with backend(policy, url, key) as b:
        state = b.set_kill_switch(engaged, reason, environment)
    why = f" ({state['reason']})" if state.get("reason") else ""
    typer.echo(f"kill switch {state.get('scope')}: "
               f"{'ENGAGED' if state.get('engaged') else 'released'}{why}")


@kill_switch_app.command("on")
def on_cmd(environment: EnvOpt = None, reason: ReasonOpt = None, policy: PolicyOpt = None,
           url: UrlOpt = None, key: KeyOpt = None) -> None:
    """Engage: every request is refused and nothing executes, approved or not."""
    _switch(True, environment, reason, policy, url, key)


@kill_switch_app.command("off")
def off_cmd(environment: EnvOpt = None, reason: ReasonOpt = None, policy: PolicyOpt = None,
            url: UrlOpt = None, key: KeyOpt = None) -> None:
    """Release the switch."""
    _switch(False, environment, reason, policy, url, key)


def _state(s: Any) -> dict[str, Any]:
    """One shape whichever way it was read (the store omits what was never set)."""
    s = s if isinstance(s, dict) else {}
    return {"engaged": bool(s.get("engaged")), "reason": s.get("reason"),
            "actor": s.get("actor"), "ts": s.get("ts")}


@kill_switch_app.command("status")
def status_cmd(environment: EnvOpt = None, as_json: JsonOpt = False, policy: PolicyOpt = None,
               url: UrlOpt = None, key: KeyOpt = None) -> None:
    """Show the global switch and each environment's."""
    with backend(policy, url, key) as b:
        status = b.kill_switch_status()
    rows: list[tuple[str, dict[str, Any]]] = [("global", _state(status.get("global")))]
    rows += sorted((env, _state(s)) for env, s in (status.get("environments") or {}).items())
    if environment is not None:
        if environment not in (status.get("environments") or {}):
            _fail(f"unknown environment {environment!r}", "invalid_request")
        rows = [r for r in rows if r[0] in ("global", environment)]
    if as_json:
        print_json(dict(rows))
        return
    from rich.table import Table

    table = Table(title="kill switch", title_justify="left")
    for col in ("scope", "state", "reason", "by", "since (UTC)"):
        table.add_column(col, overflow="fold")
    for scope, s in rows:
        on = bool(s.get("engaged"))
        table.add_row(scope, "[red]ENGAGED[/red]" if on else "[green]off[/green]",
                      str(s.get("reason") or ""), str(s.get("actor") or ""), timestamp(s.get("ts")))
    console().print(table)


# -- budget -------------------------------------------------------------------------------


def budget(as_json: JsonOpt = False, policy: PolicyOpt = None) -> None:
    """Spend against each budget (environments and keys) in the current period.

    Reads the local state store; in-flight reservations count as spent.
    """
    from ..costs import budget_counter
    from ..engine import Gateway

    pol = policy_or_exit(policy)
    rows: list[dict[str, Any]] = []
    gw = Gateway(pol)
    try:
        scopes = [("environment", "env", name, env.budget)
                  for name, env in pol.environments.items()]
        scopes += [("key", "key", k.name, k.budget) for k in pol.keys]
        for kind, scope, name, b in scopes:
            if b is None:
                continue
            counter = budget_counter(scope, name, b)
            used = gw.store.budget_used(counter)
            rows.append({"scope": kind, "name": name, "period": b.period,
                         "window": counter.rsplit(":", 1)[-1], "limit_usd": b.usd,
                         "used_usd": round(used, 8),
                         "remaining_usd": round(max(b.usd - used, 0.0), 8)})
    except AuthorityError as exc:
        _fail(exc.message, exc.code)
    finally:
        gw.close()
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no budgets in this policy")
        return
    from rich.table import Table

    table = Table(title="budgets (current period)", title_justify="left")
    for col in ("scope", "name", "period", "window", "limit $", "used $", "remaining $",
                "used %"):
        table.add_column(col, justify="right" if "$" in col or "%" in col else "left")
    for r in rows:
        pct = 100.0 * r["used_usd"] / r["limit_usd"] if r["limit_usd"] else 100.0
        colour = "red" if pct >= 90 else "yellow" if pct >= 75 else "green"
        table.add_row(r["scope"], r["name"], r["period"], r["window"], f"{r['limit_usd']:.2f}",
                      f"{r['used_usd']:.6f}", f"{r['remaining_usd']:.6f}",
                      f"[{colour}]{pct:.1f}[/{colour}]")
    console().print(table)
