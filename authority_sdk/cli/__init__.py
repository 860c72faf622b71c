"""The ``authority`` command line. Each sub-command group lives in its own module."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="AI Authority Gateway: control, approve, audit and enforce AI actions.")


def _register() -> None:
    from . import policy_cmd

    app.add_typer(policy_cmd.app, name="policy", help="Check, explain and print the policy schema.")
    from . import audit_cmd
    app.add_typer(audit_cmd.app, name="audit", help="Tail and verify the hash-chained audit log.")
    from . import serve_cmd
    app.command("serve")(serve_cmd.serve)
    app.command("worker")(serve_cmd.worker)
    from . import control_cmd
    app.add_typer(control_cmd.approvals_app, name="approvals")
    app.add_typer(control_cmd.kill_switch_app, name="kill-switch")
    app.command("budget")(control_cmd.budget)
    from . import actions_cmd
    app.add_typer(actions_cmd.actions_app, name="actions")
    from . import db_cmd
    app.add_typer(db_cmd.app, name="db",
                  help="The shared PostgreSQL state store: migrate its schema, import local state.")
    from . import demo_cmd
    app.command("demo")(demo_cmd.demo)


def main() -> None:
    _register()
    app()
